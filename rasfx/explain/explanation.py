"""The :class:`Explanation` of one compiler stage (``rasfx.explain``): node views, sites,
caches, conservative ops, counters and FLOP estimates; its renderers are in ``render``."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import operator
from collections import Counter

import torch
from torch import fx

from .. import ops as _ops
from ..errors import ExplainError, UnsupportedModelError
from ..flops import FlopModel
from ..stages import STAGES, VARIANTS
from ..token_map import token_map_of
from . import render
from .diff import StageDiff
from .graph_dot import dot_source, render_svg
from .schema import SCHEMA
from ..passes.token_info import per_output_axes
from .views import (
    PER_VARIANT, VARIANT_STAGES, NodeView, _arg_leaves, _block_of, _category, _compress, _dtype_str, created_by as pass_of, _itemsize,
    _json_default, _module_matches, _op_matches, _pass_rank, _strip_model_prefix, _tensors_of, op_name,
)

class Explanation:
    """One stage of the compiler for one captured input signature (see the module doc)."""

    def __init__(self, cc, *, stage: str = "transformed", variant: str = "shared", ratio: float = 0.25,
                 module: str | None = None, op: str | None = None, model_name: str | None = None,
                 model_class: str | None = None, source: str = "module", inputs: list | None = None,
                 notes: tuple = ()):
        if stage not in STAGES:
            raise ExplainError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        if variant not in VARIANTS:
            raise ExplainError(f"unknown variant {variant!r}; variants are {', '.join(VARIANTS)}")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
                or not 0.0 < float(ratio) <= 1.0:
            raise ExplainError(f"ratio must be a number in (0, 1], got {ratio!r}")
        self.cc = cc
        self.stage = stage
        self.variant_name = variant
        self.ratio = float(ratio)
        self.module_filter = module or None
        self.op_filter = op or None
        self.model_class = model_class or "model"
        self.model_name = model_name or self.model_class
        self.source = source
        self.inputs = list(inputs or [])
        self.notes = tuple(notes)
        self._views: list | None = None
        self._variant = None
        self._captured_views: list | None = None
        if stage in VARIANT_STAGES:
            self._variant = self._load_variant()
        self.notes += tuple(n for n in self._token_map_notes() if n not in self.notes)

    def _token_map_notes(self) -> list[str]:
        """What the token map approximates (``token_map.derive_token_map``), or why there is none:
        derived here at the stage that built the shared variant (``transformed``); at the other
        stages, the notes of a map already derived."""
        if self.stage == "transformed" and self.variant_name == "shared" and self.cc.token_map is None:
            try:
                token_map_of(self.cc)
            except Exception as e:  # as rasfx.enable does: a model without a map runs dense
                if isinstance(e, UnsupportedModelError):  # says why and what rasfx.enable does
                    return [str(e)]
                return [f"no token map ({type(e).__name__}: {e}); rasfx.enable runs this model dense"]
        return list(self.cc.token_map_notes)

    # ---------------------------------------------------------------- basic facts
    @property
    def num_tokens(self) -> int:
        return int(self.cc.num_tokens)

    @property
    def active_tokens(self) -> int:
        return max(1, min(self.num_tokens, int(round(self.ratio * self.num_tokens))))

    @property
    def plan(self):
        return self.cc.plan

    @property
    def variant(self):
        """The graph variant of the stage (``None`` at stages captured / analyzed)."""
        return self._variant

    def with_stage(self, stage: str, variant: str | None = None) -> Explanation:
        return Explanation(self.cc, stage=stage, variant=variant or self.variant_name, ratio=self.ratio,
                           module=self.module_filter, op=self.op_filter, model_name=self.model_name,
                           model_class=self.model_class, source=self.source, inputs=self.inputs, notes=self.notes)

    def filter(self, module: str | None = None, op: str | None = None) -> Explanation:
        """The same explanation restricted to nodes under a module path and/or of an op."""
        e = self.with_stage(self.stage)
        e.module_filter, e.op_filter = module or None, op or None
        return e

    def _load_variant(self):
        cc = self.cc
        if self.stage == "fused":
            return cc.variant("fused")
        if self.stage == "lowered":
            from ..planned_capture import GraphVariant, copy_graph_module
            from ..compiler import lower

            # compiled runners allocate contiguous attention caches, which the dense variant's
            # in-place cache fills depend on: build the variant as they do
            if not cc.contiguous_attention:
                cc = dataclasses.replace(cc, contiguous_attention=True, variants={}, timings={})
            base = cc.variant(self.variant_name)
            gm = copy_graph_module(base.gm)
            return GraphVariant(base.name, gm, base.caches, base.counters + lower(gm))
        return cc.variant(self.variant_name)

    @property
    def graph_module(self) -> fx.GraphModule:
        if self._variant is not None:
            return self._variant.gm
        return self.cc.capture.graph_module

    # ---------------------------------------------------------------- views
    def nodes(self, filtered: bool = True) -> list[NodeView]:
        """Node views of this stage, in graph order (filtered by module/op unless told not to)."""
        if self._views is None:
            self._views = self._build_views()
        if not filtered:
            return list(self._views)
        return [v for v in self._views if self._keep(v)]

    def _keep(self, v: NodeView) -> bool:
        if self.module_filter is not None and not _module_matches(v.module, self.module_filter):
            return False
        if self.op_filter is not None and not _op_matches(v, self.op_filter):
            return False
        return True

    def _captured_node_views(self) -> list[NodeView]:
        """Views of the analysed captured graph (for FLOPs and sites, whatever the stage)."""
        if self.stage == "analyzed":
            return self.nodes(filtered=False)
        if self._captured_views is None:
            self._captured_views = self.with_stage("analyzed").nodes(filtered=False)
        return self._captured_views

    def _build_views(self) -> list[NodeView]:
        cc = self.cc
        gm = self.graph_module
        cap_gm = cc.capture.graph_module
        captured_names = {n.name for n in cap_gm.graph.nodes}
        sources = {}
        placeholders = [n for n in cap_gm.graph.nodes if n.op == "placeholder"]
        for n, src in zip(placeholders, cc.capture.input_sources):
            sources[n.name] = src
        module_of_captured = {n.name: self._module_of(n, sources) for n in cap_gm.graph.nodes}
        annotated = self.stage != "captured"
        transformed = self._variant is not None
        val_owner = {id(n.meta["val"]): n.name for n in cap_gm.graph.nodes
                     if n.op == "call_function" and n.meta.get("val") is not None}
        sites_by_producer = {s.producer: s for s in cc.plan.sites}
        views = []
        for node in gm.graph.nodes:
            new = transformed and node.name not in captured_names
            role = None
            if node.op == "placeholder":
                if node.name in sources:
                    role = sources[node.name][0]
                elif "rasfx_cache" in node.meta:
                    role = "cache"
                elif node.name == "ras_index":
                    role = "index"
                elif node.meta.get("rasfx_created_by") == "hoist_invariants":
                    role = "hoisted"  # a value of the step-invariant prologue
            category = _category(node, role)
            shapes, dtypes = self._shapes(node)
            tokens = per_output_axes(node) if annotated else None
            mode = cc.plan.mode.get(node.name) if annotated and not new else None
            note = ""
            created_by = None
            module = module_of_captured.get(node.name, "")
            if new:
                created_by = pass_of(node)
                mode, tokens, shapes, dtypes, module, note = self._new_node_facts(
                    node, role, shapes, dtypes, tokens, sites_by_producer, module_of_captured, val_owner)
            elif annotated and node.op == "output":
                mode = "-"
            if annotated and mode is None:
                mode = "-"
            op = op_name(node)
            if node.op == "placeholder":
                op = {"param": "param", "buffer": "buffer", "const": "constant", "user": "input",
                      "index": "index input", "cache": "cache input",
                      "hoisted": "hoisted input"}.get(role or "", "input")
            views.append(NodeView(
                name=node.name, op=op, target=str(node.target) if node.op == "call_function" else node.op,
                graph_op=node.op, category=category, shapes=shapes, dtypes=dtypes, tokens=tokens, mode=mode,
                module=module, created_by=created_by, inputs=[a.name for a in node.all_input_nodes], note=note,
                role=role, args=_arg_leaves((list(node.args), dict(node.kwargs))) if node.op != "placeholder" else [],
                val_id=id(node.meta["val"]) if node.meta.get("val") is not None else None,
            ))
        return views

    def _module_of(self, node: fx.Node, sources: dict) -> str:
        if node.op == "placeholder":
            src = sources.get(node.name)
            if src and src[0] in ("param", "buffer"):
                return src[1].rpartition(".")[0]
            return ""
        stack = node.meta.get("nn_module_stack")
        if stack:
            path = list(stack.values())[-1][0]
            return _strip_model_prefix(str(path))
        return ""

    @staticmethod
    def _shapes(node: fx.Node):
        val = node.meta.get("val")
        ts = _tensors_of(val)
        if ts is None:
            return None, None
        return ([None if t is None else [int(s) for s in t.shape] for t in ts],
                [None if t is None else _dtype_str(t.dtype) for t in ts])

    def _new_node_facts(self, node, role, shapes, dtypes, tokens, sites_by_producer, module_of, val_owner):
        """mode, tokens, shapes, dtypes, module, note of a node added by the passes."""
        t = node.target
        users = list(node.users)
        module = ""
        if node.op == "placeholder":
            if role == "cache":
                spec = node.meta["rasfx_cache"]
                site = sites_by_producer.get(spec.producer)
                axis = site.axis if site is not None else None
                if axis is not None:
                    from ..passes import Axis
                    axis = Axis(spec.dim, axis.extra, axis.offset, axis.outer)
                return ("F", [(axis,) if axis is not None else ()], [list(spec.shape)], [_dtype_str(spec.dtype)],
                        module_of.get(spec.consumer, ""),
                        f"{spec.kind} cache: {spec.producer} -> {spec.consumer}, full length")
            if role == "index":
                rows = [self.cc.batch, "n"] if self.variant_name == "rowwise" else ["n"]
                return ("-", None, None, None, "", f"active token positions, i64{rows}".replace("'", ""))
            return ("-", tokens, shapes, dtypes, "", "")
        if t is _ops.gather_tokens:
            producer = node.args[0]
            axes = per_output_axes(producer) or [()]
            ps, pd = self._shapes(producer)
            consumer = users[0].name if users else ""
            return ("A", axes[:1], ps[:1] if ps else None, pd[:1] if pd else None,
                    module_of.get(consumer, module_of.get(producer.name, "")),
                    f"gathers the active rows of {producer.name}")
        if t is torch.ops.rasfx.cache_write_.default:
            cache, producer = node.args[0], node.args[1]
            return ("-", None, None, None, module_of.get(producer.name, ""),
                    f"writes the fresh rows of {producer.name} into {cache.name}")
        if t is torch.ops.rasfx.ras_attention.default:
            replaced = val_owner.get(id(node.meta.get("val")))
            return ("A", per_output_axes(node), shapes, dtypes,
                    module_of.get(replaced, "") if replaced else "",
                    f"replaces {replaced}: active queries, cached keys/values" if replaced
                    else "active queries, cached keys/values")
        if t is _ops.sequence_index:
            return ("-", None, None, None, "", "index of the active positions in a conditioning+image sequence")
        if t is _ops.active_count:
            return ("-", None, None, None, "", "n, the active token count (from the index shape)")
        if t in (operator.mul, operator.add):
            return ("-", None, None, None, "", "a token-count size (a*n + b)")
        # e.g. nodes of a fusion pass: take what the node carries
        replaced = val_owner.get(id(node.meta.get("val")))
        mode = self.cc.plan.mode.get(replaced, "-") if replaced else ("A" if tokens and any(tokens) else "-")
        stack = node.meta.get("nn_module_stack")
        module = _strip_model_prefix(str(list(stack.values())[-1][0])) if stack else (
            module_of.get(replaced, "") if replaced else "")
        return (mode, tokens, shapes, dtypes, module, f"replaces {replaced}" if replaced else "")

    # ---------------------------------------------------------------- numbers
    def flops(self) -> dict:
        """Estimated FLOPs of the matrix products, attention and convolutions (batch as
        captured): ``dense``, ``at_ratio`` (n active tokens) and per category."""
        keep = {v.name for v in self._captured_node_views() if self._keep(v)}
        est = self.flop_model(names=keep).estimate(self.active_tokens)
        return {"dense": est.dense, "at_ratio": est.at_ratio, "once_per_prompt": est.once_per_prompt,
                "ratio": self.ratio, "n": est.n, "N": est.N, "by_category": est.by_category}

    def flop_model(self, names: set[str] | None = None) -> FlopModel:
        """The FLOP model of this stage (:class:`rasfx.flops.FlopModel`): the region plan from
        stage ``analyzed`` on, the step-invariant prologue of the stage's graph variant."""
        hoisted = self._variant.hoisted if self._variant is not None else None
        return FlopModel(self.cc, hoisted, planned=self.stage != "captured", names=names)

    def caches(self) -> list[dict]:
        if self._variant is None:
            return []
        views = {v.name: v for v in self._captured_node_views()}
        rows = []
        for c in self._variant.caches:
            if not self._site_kept(c.producer, c.consumer, views):
                continue
            rows.append({"name": c.name, "kind": c.kind, "producer": c.producer, "consumer": c.consumer,
                         "shape": [int(s) for s in c.shape], "dtype": _dtype_str(c.dtype), "dim": int(c.dim),
                         "bytes": math.prod(c.shape) * _itemsize(c.dtype),
                         "module": views[c.consumer].module if c.consumer in views else ""})
        return rows

    def _site_kept(self, producer: str, consumer: str, views: dict) -> bool:
        if self.module_filter is None and self.op_filter is None:
            return True
        return any(name in views and self._keep(views[name]) for name in (producer, consumer))

    def _graph_order(self) -> dict:
        return {n.name: i for i, n in enumerate(self.cc.capture.graph_module.graph.nodes)}

    def sites(self) -> list[dict]:
        """Token-mixing sites of the plan, in graph order (consumer, then producer)."""
        if self.stage == "captured":
            return []
        views = {v.name: v for v in self._captured_node_views()}
        order = self._graph_order()
        rows = []
        for s in sorted(self.cc.plan.sites, key=lambda s: (order.get(s.consumer, len(order)),
                                                           order.get(s.producer, len(order)))):
            if not self._site_kept(s.producer, s.consumer, views):
                continue
            rows.append({"producer": s.producer, "consumer": s.consumer, "kind": s.kind,
                         "axis": {"dim": s.axis.dim, "extra": s.axis.extra, "offset": s.axis.offset},
                         "shape": [int(x) for x in s.shape], "dtype": _dtype_str(s.dtype),
                         "bytes": math.prod(s.shape) * _itemsize(s.dtype), "reason": s.reason,
                         "module": views[s.consumer].module if s.consumer in views else ""})
        return rows

    def conservative(self) -> list[dict]:
        if self.stage == "captured":
            return []
        views = {v.name: v for v in self._captured_node_views()}
        return [{"node": name, "target": target, "reason": reason,
                 "module": views[name].module if name in views else ""}
                for name, target, reason in self.cc.plan.conservative
                if name not in views or self._keep(views[name])]

    def tokenwise_modules(self) -> list[dict]:
        """The modules captured as one opaque token-wise op each (``TransformConfig.tokenwise_modules``,
        or chosen after a failed export), with why."""
        return [{"module": c.path, "class": c.cls, "reason": c.reason} for c in self.cc.tokenwise]

    def conditioning(self) -> list[dict]:
        """Sequences that hold conditioning tokens with the image tokens: extra length and
        where the image segment starts."""
        if self.stage == "captured":
            return []
        seen: Counter = Counter()
        for v in self._captured_node_views():
            for e in v.tokens or ():
                for a in e or ():
                    if a.extra:
                        seen[(a.extra, a.offset)] += 1
        by_extra: dict = {}
        for (extra, offset), count in seen.items():
            d = by_extra.setdefault(extra, {"length": extra, "image_offsets": set(), "tensors": 0})
            if offset is not None:
                d["image_offsets"].add(offset)
            d["tensors"] += count
        return [dict(d, image_offsets=sorted(d["image_offsets"])) for _, d in sorted(by_extra.items())]

    def region(self) -> dict | None:
        if self.stage == "captured":
            return None
        views = [v for v in self._captured_node_views() if self._keep(v)]
        active = [v for v in views if v.mode == "A"]
        if not active:
            return None

        def brief(v):
            return {"name": v.name, "op": v.op, "module": v.module}

        gathers = [[p, c] for p, c in self.cc.plan.gathers
                   if self.module_filter is None and self.op_filter is None or c in {v.name for v in views}]
        return {"first": brief(active[0]), "last": brief(active[-1]), "active_nodes": len(active),
                "gathers": gathers}

    def counters(self) -> dict:
        capture = {k: int(v) for k, v in sorted(self.cc.counters.items())}
        variant = {k: int(v) for k, v in sorted(self._variant.counters.items())} if self._variant else {}
        return {"capture": capture, "variant": variant}

    def timings(self) -> dict:
        return {k: round(float(v), 4) for k, v in self.cc.timings.items() if isinstance(v, (int, float))}

    def node_counts(self) -> dict:
        views = self.nodes()
        by_cat = Counter(v.category for v in views)
        by_mode = Counter(v.mode_str() for v in views if v.mode is not None)
        by_pass = Counter(v.created_by for v in views if v.created_by)
        return {"total": len(views), "by_category": dict(sorted(by_cat.items(), key=lambda kv: (-kv[1], kv[0]))),
                "by_mode": {k: by_mode.get(k, 0) for k in ("active", "full", "-")} if self.stage != "captured" else {},
                "by_pass": dict(sorted(by_pass.items(), key=lambda kv: _pass_rank(kv[0])))}

    def stats(self, timings: bool = True) -> dict:
        caches = self.caches()
        d = {
            "nodes": self.node_counts(),
            "region": self.region(),
            "conditioning": self.conditioning(),
            "flops": self.flops(),
            "cache_bytes": sum(c["bytes"] for c in caches),
        }
        if timings:
            d["timings"] = self.timings()
        return d

    # ---------------------------------------------------------------- outputs
    def header(self) -> str:
        where = f"stage {self.stage}"
        if self._variant is not None and self.stage in PER_VARIANT:
            where += f", variant {self.variant_name}"
        return f"{self.model_name} ({self.model_class}): {where}"

    def filters_str(self) -> str:
        parts = []
        if self.module_filter:
            parts.append(f"module {self.module_filter}")
        if self.op_filter:
            parts.append(f"op {self.op_filter}")
        return ", ".join(parts)

    def check_filters(self) -> None:
        """Raise ExplainError when a filter selects no node (with the paths that exist)."""
        if (self.module_filter or self.op_filter) and not self.nodes():
            all_views = self.nodes(filtered=False)
            hint = ""
            if self.module_filter:
                roots = sorted({_block_of(v.module) or v.module.split(".")[0] for v in all_views if v.module})
                close = difflib.get_close_matches(self.module_filter, roots, n=3, cutoff=0.5)
                hint = f"; modules: {', '.join(_compress(roots))}" + (f" (did you mean {close[0]}?)" if close else "")
            else:
                ops = sorted({v.op for v in all_views})
                close = difflib.get_close_matches(self.op_filter or "", ops, n=3, cutoff=0.4)
                hint = (f"; did you mean {', '.join(close)}?" if close else "")
            raise ExplainError(f"no node matches the filter ({self.filters_str()}){hint}")

    def summary(self, *, timings: bool = True, color: bool = False) -> str:
        """Counts, token region, sites and caches, conservative ops, counters, FLOPs, timings."""
        return render.summary_text(self, timings=timings, color=color)

    def text(self, *, color: bool = False) -> str:
        """One line per node: name, op, shape (``n`` = active tokens), token axes, mode,
        the pass that created it, module path, note."""
        return render.nodes_text(self, color=color)

    def as_dict(self, *, timings: bool = True) -> dict:
        from .. import __version__

        return {
            "schema": SCHEMA,
            "rasfx_version": __version__,
            "model": {"name": self.model_name, "class": self.model_class, "source": self.source},
            "stage": self.stage,
            "variant": self.variant_name,
            "filters": {"module": self.module_filter, "op": self.op_filter},
            "inputs": list(self.inputs),
            "num_tokens": self.num_tokens,
            "batch": int(self.cc.batch),
            "ratio": self.ratio,
            "active_tokens": self.active_tokens,
            "notes": list(self.notes),
            "nodes": [v.as_dict() for v in self.nodes()],
            "sites": self.sites(),
            "caches": self.caches(),
            "conservative": self.conservative(),
            "tokenwise_modules": self.tokenwise_modules(),
            "counters": self.counters(),
            "summary": self.stats(timings=timings),
        }

    def to_json(self, *, indent: int | None = 1, timings: bool = True) -> str:
        return json.dumps(self.as_dict(timings=timings), indent=indent, default=_json_default) + "\n"

    def to_dot(self, *, all_nodes: bool = False) -> str:
        """Graphviz source: nodes clustered by module (transformer blocks, then their
        submodules), coloured by mode (active green, full blue, no token axis grey; nodes added
        by passes outlined in orange). Parameter and buffer inputs are left out. Unless
        ``all_nodes``, shape-only ops (views, getitem) are folded into the edges and a run of
        blocks with the structure of the block before it is drawn as one box."""
        return dot_source(self, all_nodes=all_nodes)

    def to_svg(self, timeout: float = 300.0, *, all_nodes: bool = False) -> str:
        """SVG through Graphviz's ``dot`` (``ToolMissingError`` without it); ``all_nodes`` as in
        :meth:`to_dot`."""
        return render_svg(self.to_dot(all_nodes=all_nodes), timeout=timeout)

    def to_html(self, *, svg: bool | None = None, timings: bool = True, full: bool = True,
                diff: StageDiff | None = None, all_nodes: bool = False) -> str:
        """A standalone page (no external JS/CSS): summary, graph (inline SVG when Graphviz
        ``dot`` exists, else the node table), nodes, sites, caches, conservative ops,
        counters, and a diff when given."""
        return render.html_page(self, svg=svg, timings=timings, full=full, diff=diff, all_nodes=all_nodes)


    def _repr_html_(self) -> str:
        return self.to_html(full=False)

    def __repr__(self) -> str:
        return f"<Explanation {self.header()}: {len(self.nodes())} nodes, N={self.num_tokens}>"

    # ---------------------------------------------------------------- diff
    def diff(self, other_stage: str, variant: str | None = None) -> StageDiff:
        """What changed from this stage to ``other_stage``: nodes added, removed, changed,
        grouped by the pass that made the change."""
        other = self.with_stage(other_stage, variant)
        return StageDiff(self, other)
