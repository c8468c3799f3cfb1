"""Text and HTML views of an :class:`Explanation`: the summary, one line per node, and a
standalone HTML page (the graph drawing is in ``graph_dot``)."""

from __future__ import annotations

import html
import shutil
from typing import TYPE_CHECKING

from ..errors import RasfxError
from .graph_dot import svg_body
from .views import NodeView, human_bytes, human_flops, input_str, shape_list

if TYPE_CHECKING:
    from .diff import StageDiff
    from .explanation import Explanation

NODE_HEADER = ["name", "op", "shape", "tokens", "mode", "pass", "module", "note"]


class Colors:
    _MODE = {"active": "32", "A": "32", "full": "34", "F": "34"}

    def __init__(self, on: bool):
        self.on = on

    def _wrap(self, code: str, s: str) -> str:
        return f"\033[{code}m{s}\033[0m" if self.on and code else s

    def bold(self, s: str) -> str:
        return self._wrap("1", s)

    def mode(self, key: str, s: str) -> str:
        return self._wrap(self._MODE.get(key, "2"), s)

    def pass_(self, s: str) -> str:
        return self._wrap("33", s)

    def diff(self, kind: str, s: str) -> str:
        return self._wrap({"+": "32", "-": "31", "~": "33"}[kind], s)

    def line(self, line: str, v: NodeView) -> str:
        code = {"A": "32", "F": "34"}.get(v.mode or "", "")
        if v.created_by:
            code = "33"
        return self._wrap(code, line)


def table_lines(rows: list) -> list[str]:
    if not rows:
        return []
    ncol = max(len(r) for r in rows)
    rows = [list(map(str, r)) + [""] * (ncol - len(r)) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(ncol)]
    # the last column is free text: no padding
    return ["  ".join(cell.ljust(widths[i]) if i < ncol - 1 else cell for i, cell in enumerate(r)).rstrip()
            for r in rows]



def summary_text(exp: Explanation, *, timings: bool = True, color: bool = False) -> str:
    """Counts, token region, sites and caches, conservative ops, counters, FLOPs, timings."""
    c = Colors(color)
    out: list[str] = []
    st = exp.stats(timings=timings)
    out.append(c.bold(f"rasfx: {exp.header()}"))
    for note in exp.notes:
        out.append(f"note: {note}")
    if exp.filters_str():
        out.append(f"filter: {exp.filters_str()} (counters are for the whole graph)")
    if exp.inputs:
        out.append("inputs: " + ", ".join(input_str(i) for i in exp.inputs))
    out.append("")

    def section(title):
        out.append(c.bold(title))

    def row(key, value):
        out.append(f"  {key:<24}{value}")

    if exp.stage != "captured":
        section("tokens")
        row("image tokens N", str(exp.num_tokens))
        conds = st["conditioning"]
        if conds:
            row("conditioning lengths", "; ".join(
                f"{d['length']} (sequence N+{d['length']}, image segment at offset "
                f"{'/'.join(str(o) for o in d['image_offsets']) or '?'})" for d in conds))
        else:
            row("conditioning lengths", "none (no sequence mixes conditioning and image tokens)")
        row(f"active at ratio {exp.ratio:g}", f"n = {exp.active_tokens}")
        row("batch", str(exp.cc.batch))
        out.append("")

    section("graph")
    counts = st["nodes"]
    row("nodes", str(counts["total"]))
    row("by kind", ", ".join(f"{k} {v}" for k, v in counts["by_category"].items()) or "-")
    if counts["by_mode"]:
        row("by mode", ", ".join(f"{c.mode(k, k if k != '-' else 'no token axis')} {v}"
                                 for k, v in counts["by_mode"].items()))
    if exp.variant is not None:
        row("added by passes", ", ".join(f"{c.pass_(k)} {v}" for k, v in counts["by_pass"].items()) or "none")
    out.append("")

    if exp.stage != "captured":
        section("token-wise region")
        reg = st["region"]
        if reg is None:
            row("active nodes", "none" + (" under the filter" if exp.filters_str() else ""))
        else:
            row("active nodes", str(reg["active_nodes"]))
            row("first active node", f"{reg['first']['name']}  {reg['first']['op']}  ({reg['first']['module'] or '-'})")
            row("last active node", f"{reg['last']['name']}  {reg['last']['op']}  ({reg['last']['module'] or '-'})")
            row("gathers (F -> A)", ", ".join(f"{p} -> {q}" for p, q in reg["gathers"]) or "none")
        out.append("")

        sites = exp.sites()
        section(f"token-mixing sites ({len(sites)})")
        if not sites:
            out.append("  none")
        table = [[s["kind"], f"{s['producer']} -> {s['consumer']}", shape_list(s["shape"], s["dtype"]),
                  human_bytes(s["bytes"]), s["module"] or "-", s["reason"]] for s in sites]
        out.extend("  " + line for line in table_lines(table))
        out.append("")

    if exp.variant is not None:
        caches = exp.caches()
        section(f"caches ({len(caches)}, {human_bytes(st['cache_bytes'])} per cache slot)")
        if not caches:
            out.append("  none")
        table = [[x["name"], x["kind"], f"{x['producer']} -> {x['consumer']}", shape_list(x["shape"], x["dtype"]),
                  human_bytes(x["bytes"]), x["module"] or "-"] for x in caches]
        out.extend("  " + line for line in table_lines(table))
        out.append("")

    if exp.stage != "captured":
        cons = exp.conservative()
        section(f"conservative ops ({len(cons)})")
        if not cons:
            out.append("  none: every op touching the active tokens has a rule")
        table = [[x["node"], x["target"], x["module"] or "-", x["reason"]] for x in cons]
        out.extend("  " + line for line in table_lines(table))
        out.append("")
    tokenwise = exp.tokenwise_modules()
    if tokenwise:
        section(f"modules run as one token-wise op ({len(tokenwise)}; eager, on the active tokens, no CUDA graph)")
        out.extend("  " + line for line in table_lines([[x["module"], x["class"], x["reason"]] for x in tokenwise]))
        out.append("")

    section("pass counters (whole graph)")
    cnt = exp.counters()
    row("capture", ", ".join(f"{k} {v}" for k, v in cnt["capture"].items()) or "-")
    if cnt["variant"]:
        row(f"{exp.variant.name} variant", ", ".join(f"{k} {v}" for k, v in cnt["variant"].items()))
    out.append("")

    fl = st["flops"]
    section(f"estimated cost (matmul, attention, conv FLOPs; batch {exp.cc.batch})")
    row("dense", human_flops(fl["dense"]))
    if exp.stage != "captured":
        share = fl["at_ratio"] / fl["dense"] if fl["dense"] else 1.0
        speed = f", {1 / share:.2f}x fewer" if share > 0 else ""
        row(f"at ratio {exp.ratio:g} (n={fl['n']})", f"{human_flops(fl['at_ratio'])} ({100 * share:.1f}% of dense{speed})")
        for cat, d in fl["by_category"].items():
            row(f"  {cat}", f"{human_flops(d['dense'])} -> {human_flops(d['at_ratio'])}")
        if fl["once_per_prompt"]:
            row("once per prompt", f"{human_flops(fl['once_per_prompt'])} (hoisted out of every step)")
    if exp.variant is not None:
        row("cache memory", f"{human_bytes(st['cache_bytes'])} per cache slot ({len(exp.caches())} caches)")
    out.append("")

    if timings:
        section("capture timings")
        tm = st["timings"]
        row("seconds", ", ".join(f"{k} {v:.2f}" for k, v in tm.items()) or "-")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def node_row(v: NodeView) -> list[str]:
    """A node's row in the text and HTML tables (``NODE_HEADER``)."""
    return [v.name, v.op, v.shape_str(), v.tokens_str() if v.tokens is not None else "", v.mode_str(),
            v.created_by or "", v.module, v.note]


def nodes_text(exp: Explanation, *, color: bool = False) -> str:
    """One line per node: name, op, shape (``n`` = active tokens), token axes, mode,
    the pass that created it, module path, note."""
    c = Colors(color)
    views = exp.nodes()
    lines = [f"# rasfx: {exp.header()}: {len(views)} nodes"
             + (f" (filter: {exp.filters_str()})" if exp.filters_str() else "")]
    if exp.stage != "captured":
        lines.append(f"# N = {exp.num_tokens} image tokens; 'n' in a shape is the active token count; "
                     "tokens dK:N+c@o = token axis at dim K, c conditioning tokens, image segment at offset o")
    table = table_lines([NODE_HEADER] + [node_row(v) for v in views])
    lines.append("# " + table[0])
    for v, line in zip(views, table[1:]):
        lines.append("  " + (c.line(line, v) if color else line))
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _graph_html(exp: Explanation, svg: bool | None, all_nodes: bool) -> str:
    if svg is None:
        svg = shutil.which("dot") is not None and len(exp.nodes()) <= 4000
    if not svg:
        return ('<p class="muted">Graphviz <code>dot</code> is not installed, so the graph is shown as '
                'the node table below (colours by mode).</p>')
    try:
        return svg_body(exp.to_svg(all_nodes=all_nodes))
    except RasfxError as e:
        return f'<p class="muted">graph not drawn: {html.escape(str(e))}</p>'


def html_page(exp: Explanation, *, svg: bool | None = None, timings: bool = True, full: bool = True,
              diff: StageDiff | None = None, all_nodes: bool = False) -> str:
    """A standalone page (no external JS/CSS): summary, graph (inline SVG when Graphviz
    ``dot`` exists, else the node table), nodes, sites, caches, conservative ops,
    counters, and a diff when given."""
    views, sites, caches, cons, cnt = exp.nodes(), exp.sites(), exp.caches(), exp.conservative(), exp.counters()
    node_filter = ('<input id="rasfx-filter" placeholder="filter rows (name, op, module, pass)" '
                   'oninput="rasfxFilter(this.value)">')
    sections = [("summary", "Summary", html_kv(summary_pairs(exp, timings)))]
    if diff is not None:
        sections.append(("diff", "", diff.to_html_fragment()))
    sections += [
        ("graph", "Graph", _graph_html(exp, svg, all_nodes)),
        ("nodes", "Nodes", node_filter + html_table(NODE_HEADER, [node_row(v) for v in views],
                                                    [row_class(v) for v in views], "rasfx-nodes")),
        ("sites", f"Token-mixing sites ({len(sites)})", html_table(
            ["kind", "producer", "consumer", "shape", "bytes", "module", "reason"],
            [[s["kind"], s["producer"], s["consumer"], shape_list(s["shape"], s["dtype"]), human_bytes(s["bytes"]),
              s["module"], s["reason"]] for s in sites])),
        ("caches", f"Caches ({len(caches)})", html_table(
            ["name", "kind", "producer", "consumer", "shape", "bytes"],
            [[x["name"], x["kind"], x["producer"], x["consumer"], shape_list(x["shape"], x["dtype"]),
              human_bytes(x["bytes"])] for x in caches])),
        ("conservative", f"Conservative ops ({len(cons)})", html_table(
            ["node", "target", "module", "reason"], [[x["node"], x["target"], x["module"], x["reason"]] for x in cons])),
        ("counters", "Pass counters", html_kv([(f"{exp.variant_name} variant" if k == "variant" else k,
                                                ", ".join(f"{n} {v}" for n, v in counts.items()))
                                               for k, counts in cnt.items() if counts])),
    ]
    body = [f"<h1>rasfx: {html.escape(exp.header())}</h1>"]
    body += [f'<p class="note">{html.escape(n)}</p>' for n in exp.notes]
    if exp.filters_str():
        body.append(f'<p class="note">filter: {html.escape(exp.filters_str())}</p>')
    body.append("<nav>" + " ".join(f'<a href="#{sid}">{sid}</a>' for sid, _, _ in sections) + "</nav>")
    body += [f'<section id="{sid}">' + (f"<h2>{html.escape(title)}</h2>" if title else "") + f"{content}</section>"
             for sid, title, content in sections]
    fragment = f'<style>{CSS}</style><div class="rasfx">' + "\n".join(body) + f"</div><script>{JS}</script>"
    if not full:
        return fragment
    return page(f"rasfx: {exp.header()}", fragment)


def page(title: str, fragment: str) -> str:
    """A standalone HTML document around ``fragment``."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"></head>\n'
            f"<body>{fragment}</body></html>\n")


def summary_pairs(exp: Explanation, timings: bool) -> list:
    st = exp.stats(timings=timings)
    pairs = [("model", f"{exp.model_name} ({exp.model_class}, {exp.source})"), ("stage", exp.stage)]
    if exp.inputs:
        pairs.append(("inputs", ", ".join(input_str(i) for i in exp.inputs)))
    if exp.stage != "captured":
        pairs.append(("image tokens N", str(exp.num_tokens)))
        pairs.append((f"active at ratio {exp.ratio:g}", f"n = {exp.active_tokens}"))
        pairs.append(("conditioning lengths", ", ".join(str(d["length"]) for d in st["conditioning"]) or "none"))
    counts = st["nodes"]
    pairs.append(("nodes", f"{counts['total']}: " + ", ".join(f"{k} {v}" for k, v in counts["by_category"].items())))
    if counts["by_mode"]:
        pairs.append(("by mode", ", ".join(f"{k if k != '-' else 'no token axis'} {v}"
                                           for k, v in counts["by_mode"].items())))
    if counts["by_pass"]:
        pairs.append(("added by passes", ", ".join(f"{k} {v}" for k, v in counts["by_pass"].items())))
    reg = st["region"]
    if reg:
        pairs.append(("token-wise region", f"{reg['first']['name']} ({reg['first']['module'] or '-'}) ... "
                                           f"{reg['last']['name']} ({reg['last']['module'] or '-'})"))
    fl = st["flops"]
    pairs.append(("FLOPs dense", human_flops(fl["dense"])))
    if exp.stage != "captured" and fl["dense"]:
        pairs.append((f"FLOPs at ratio {exp.ratio:g}",
                      f"{human_flops(fl['at_ratio'])} ({100 * fl['at_ratio'] / fl['dense']:.1f}% of dense)"))
    if exp.variant is not None:
        pairs.append(("cache memory", f"{human_bytes(st['cache_bytes'])} per cache slot"))
    if timings:
        pairs.append(("capture timings", ", ".join(f"{k} {v:.2f} s" for k, v in st["timings"].items())))
    return pairs


def row_class(v: NodeView) -> str:
    cls = {"A": "mode-a", "F": "mode-f", "-": "mode-x"}.get(v.mode or "", "")
    return (cls + " created").strip() if v.created_by else cls


def html_table(header: list, rows: list, row_classes: list | None = None, table_id: str | None = None) -> str:
    if not rows:
        return '<p class="muted">none</p>'
    tid = f' id="{table_id}"' if table_id else ""
    parts = [f"<table{tid}><thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        cls = row_classes[i] if row_classes else ""
        cls_attr = f' class="{cls}"' if cls else ""
        parts.append(f"<tr{cls_attr}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def html_kv(pairs: list) -> str:
    return ('<table class="kv"><tbody>' + "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in pairs)
        + "</tbody></table>")


CSS = """
.rasfx{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;font-size:13px;color:#222;max-width:100%}
.rasfx h1{font-size:18px;margin:8px 0}.rasfx h2{font-size:15px;margin:18px 0 6px;border-bottom:1px solid #ddd}
.rasfx h3{font-size:13px;margin:12px 0 4px}.rasfx nav a{margin-right:10px}
.rasfx table{border-collapse:collapse;margin:4px 0;font-family:Menlo,Consolas,monospace;font-size:12px}
.rasfx th,.rasfx td{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}
.rasfx thead th{background:#f3f3f3;position:sticky;top:0}.rasfx table.kv th{background:#f7f7f7}
.rasfx tr.mode-a td{background:#e8f5e9}.rasfx tr.mode-f td{background:#e3f2fd}.rasfx tr.mode-x td{color:#666}
.rasfx tr.created td:first-child{border-left:4px solid #e65100}
.rasfx tr.added td{background:#e8f5e9}.rasfx tr.removed td{background:#ffebee}.rasfx tr.changed td{background:#fff8e1}
.rasfx .muted{color:#777}.rasfx .note{color:#555;font-style:italic}
.rasfx #graph svg{max-width:100%;height:auto;border:1px solid #eee}
.rasfx input#rasfx-filter{width:320px;margin:4px 0;padding:3px}
"""

JS = """
function rasfxFilter(q){q=q.toLowerCase();var rows=document.querySelectorAll('#rasfx-nodes tbody tr');
for(var i=0;i<rows.length;i++){rows[i].style.display=rows[i].textContent.toLowerCase().indexOf(q)>=0?'':'none';}}
document.documentElement.setAttribute('data-rasfx-ready','1');
"""
