"""What changed between two compiler stages (``Explanation.diff``, ``rasfx inspect --diff``):
nodes added, removed and changed, grouped by the pass that made each change."""

from __future__ import annotations

import html
import json
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..stages import STAGES
from .render import CSS, Colors, html_table, table_lines
from .schema import DIFF_SCHEMA
from .views import PER_VARIANT, NodeView, _json_default, _leaf_str, _pass_rank

if TYPE_CHECKING:
    from .explanation import Explanation


@dataclass
class DiffEntry:
    kind: str  # "+" added, "-" removed, "~" changed
    pass_name: str
    node: str
    op: str
    detail: str

    def as_dict(self) -> dict:
        return {"kind": {"+": "added", "-": "removed", "~": "changed"}[self.kind], "pass": self.pass_name,
                "node": self.node, "op": self.op, "detail": self.detail}


class StageDiff:
    """Nodes added, removed and changed between two stages, grouped by pass."""

    def __init__(self, a: Explanation, b: Explanation):
        self.a, self.b = a, b
        self.entries = self._compute()

    def _compute(self) -> list[DiffEntry]:
        a_all, b_all = self.a.nodes(filtered=False), self.b.nodes(filtered=False)
        A = {v.name: v for v in a_all}
        B = {v.name: v for v in b_all}
        keep_a = {v.name for v in self.a.nodes()}
        keep_b = {v.name for v in self.b.nodes()}
        entries: list[DiffEntry] = []
        reverse = STAGES.index(self.b.stage) < STAGES.index(self.a.stage)
        a_only_by_val: dict = {}
        for v in a_all:
            if v.name not in B and v.val_id is not None:
                a_only_by_val.setdefault(v.val_id, v)
        b_only_by_val: dict = {}
        for v in b_all:
            if v.name not in A and v.val_id is not None:
                b_only_by_val.setdefault(v.val_id, v)
        for v in b_all:
            if v.name in A or v.name not in keep_b:
                continue
            if v.created_by:
                entries.append(DiffEntry("+", v.created_by, v.name, v.op, _added_detail(v)))
                continue
            orig = a_only_by_val.get(v.val_id) if v.val_id is not None else None
            if orig is not None:  # a pass-made node turned back into the captured one
                entries.append(DiffEntry("+", orig.created_by or "unknown pass", v.name, v.op,
                                         f"replaces {orig.name} ({orig.op}); {_added_detail(v)}"))
            else:
                entries.append(DiffEntry("+", "dead-code elimination" if reverse else "unknown pass", v.name, v.op,
                                         _added_detail(v)))
        for v in a_all:
            if v.name in B or v.name not in keep_a:
                continue
            repl = b_only_by_val.get(v.val_id) if v.val_id is not None else None
            if v.created_by:
                entries.append(DiffEntry("-", v.created_by, v.name, v.op,
                                         f"not in the {self.b.stage} stage" + (f" (replaced by {repl.name})" if repl else "")))
            elif repl is not None:
                entries.append(DiffEntry("-", repl.created_by or "unknown pass", v.name, v.op,
                                         f"replaced by {repl.name} ({repl.op})"))
            else:
                entries.append(DiffEntry("-", "dead-code elimination", v.name, v.op, "no longer used"))
        for v in a_all:
            w = B.get(v.name)
            if w is None or (v.name not in keep_a and v.name not in keep_b):
                continue
            if v.tokens != w.tokens and (_nontrivial_tokens(v.tokens) or _nontrivial_tokens(w.tokens)):
                entries.append(DiffEntry("~", "analyze_tokens", v.name, w.op,
                                         f"token axes: {_tok(v)} -> {_tok(w)}"))
            if v.mode != w.mode and ({v.mode, w.mode} - {None, "-"}):
                entries.append(DiffEntry("~", "plan_regions", v.name, w.op,
                                         f"mode: {v.mode_str() or 'unplanned'} -> {w.mode_str() or 'unplanned'}"))
            if v.op != w.op:
                entries.append(DiffEntry("~", w.created_by or "unknown pass", v.name, w.op, f"op: {v.op} -> {w.op}"))
            if v.args != w.args:
                entries.extend(self._arg_changes(v, w, A, B))
        entries.sort(key=lambda e: (_pass_rank(e.pass_name), "+-~".index(e.kind)))
        return entries

    def _arg_changes(self, v: NodeView, w: NodeView, A: dict, B: dict) -> list[DiffEntry]:
        old, new = dict(v.args), dict(w.args)
        by_pass: OrderedDict[str, list] = OrderedDict()
        for path in list(OrderedDict.fromkeys([p for p, _ in v.args] + [p for p, _ in w.args])):
            x, y = old.get(path), new.get(path)
            if x == y:
                continue
            pass_name = "rewrite"
            for leaf, table, other in ((y, B, A), (x, A, B)):
                if leaf is not None and leaf[0] == "node" and leaf[1] not in other:
                    created = table[leaf[1]].created_by if leaf[1] in table else None
                    if created:
                        pass_name = created
                        break
            by_pass.setdefault(pass_name, []).append(
                f"{_path_str(path)}: {_leaf_str(x) if x else '(none)'} -> {_leaf_str(y) if y else '(none)'}")
        return [DiffEntry("~", p, w.name, w.op, "; ".join(changes)) for p, changes in by_pass.items()]

    def groups(self) -> OrderedDict[str, list[DiffEntry]]:
        g: OrderedDict[str, list] = OrderedDict()
        for e in self.entries:
            g.setdefault(e.pass_name, []).append(e)
        return g

    def title(self) -> str:
        a, b = self.a, self.b
        va = f" ({a.variant_name})" if a.variant is not None and a.stage in PER_VARIANT else ""
        vb = f" ({b.variant_name})" if b.variant is not None and b.stage in PER_VARIANT else ""
        return f"{a.model_name} ({a.model_class}): {a.stage}{va} -> {b.stage}{vb}"

    def _counts(self, entries) -> str:
        c = Counter(e.kind for e in entries)
        return f"+{c.get('+', 0)} added, -{c.get('-', 0)} removed, ~{c.get('~', 0)} changed"

    def summary(self, *, color: bool = False) -> str:
        col = Colors(color)
        out = [col.bold(f"rasfx diff: {self.title()}")]
        filt = self.a.filters_str()
        if filt:
            out.append(f"filter: {filt}")
        na, nb = len(self.a.nodes()), len(self.b.nodes())
        out.append(f"nodes: {na} -> {nb}; {self._counts(self.entries)}")
        if not self.entries:
            out.append("no differences")
        for name, entries in self.groups().items():
            out.append(f"  {col.pass_(name):<28} {self._counts(entries)}")
        return "\n".join(out) + "\n"

    def text(self, *, color: bool = False) -> str:
        col = Colors(color)
        out = [self.summary(color=color).rstrip()]
        for name, entries in self.groups().items():
            out.append("")
            out.append(col.bold(f"{name}: {self._counts(entries)}"))
            rows = [[e.kind, e.node, e.op, e.detail] for e in entries]
            for e, line in zip(entries, table_lines(rows)):
                out.append("  " + (col.diff(e.kind, line) if color else line))
        return "\n".join(out) + "\n"

    def as_dict(self) -> dict:
        return {
            "schema": DIFF_SCHEMA,
            "model": {"name": self.a.model_name, "class": self.a.model_class},
            "from": {"stage": self.a.stage, "variant": self.a.variant_name, "nodes": len(self.a.nodes())},
            "to": {"stage": self.b.stage, "variant": self.b.variant_name, "nodes": len(self.b.nodes())},
            "filters": {"module": self.a.module_filter, "op": self.a.op_filter},
            "groups": [{"pass": name, "added": sum(e.kind == "+" for e in es), "removed": sum(e.kind == "-" for e in es),
                        "changed": sum(e.kind == "~" for e in es), "entries": [e.as_dict() for e in es]}
                       for name, es in self.groups().items()],
        }

    def to_json(self, *, indent: int | None = 1) -> str:
        return json.dumps(self.as_dict(), indent=indent, default=_json_default) + "\n"

    def to_html_fragment(self) -> str:
        parts = [f"<h2>Diff: {html.escape(self.title())}</h2>",
                 f"<p>{html.escape(self._counts(self.entries))}</p>"]
        for name, entries in self.groups().items():
            parts.append(f"<h3>{html.escape(name)}: {html.escape(self._counts(entries))}</h3>")
            parts.append(html_table(["", "node", "op", "detail"], [[e.kind, e.node, e.op, e.detail] for e in entries],
                                     row_classes=[{"+": "added", "-": "removed", "~": "changed"}[e.kind]
                                                  for e in entries]))
        return "\n".join(parts)

    def to_html(self) -> str:
        title = html.escape(f"rasfx diff: {self.title()}")
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title></head>\n'
                f'<body><style>{CSS}</style><div class="rasfx"><section id="diff">{self.to_html_fragment()}'
                f"</section></div></body></html>\n")

    def _repr_html_(self) -> str:
        return f'<style>{CSS}</style><div class="rasfx">{self.to_html_fragment()}</div>'

    def __repr__(self) -> str:
        return f"<StageDiff {self.title()}: {self._counts(self.entries)}>"


def _nontrivial_tokens(tokens) -> bool:
    return bool(tokens) and any(bool(e) for e in tokens)


def _tok(v: NodeView) -> str:
    return "unannotated" if v.tokens is None else v.tokens_str()


def _path_str(path: str) -> str:
    m = re.match(r"^\[0\]\[(\d+)\](.*)$", path)
    if m:
        return f"arg {m.group(1)}{m.group(2)}"
    m = re.match(r"^\[1\]\.(.*)$", path)
    if m:
        return f"kwarg {m.group(1)}"
    return path


def _added_detail(v: NodeView) -> str:
    parts = [v.shape_str()] if v.shapes is not None else []
    if v.note:
        parts.append(v.note)
    elif v.inputs:
        parts.append("from " + ", ".join(v.inputs[:3]))
    return "  ".join(parts)
