"""Show what the rasfx compiler did to a model (``rasfx.explain``; ``rasfx inspect`` on the
command line).

``explain(model, inputs)`` captures the model for one input signature (the forward is not
run) and returns an :class:`Explanation` of one *stage* of the compiler:

- ``captured``: the ATen graph from ``torch.export`` (after ``strip_asserts``);
- ``analyzed``: the same graph with the token analysis (token axes of every tensor) and the
  region plan (``active``: runs on the active tokens only, ``full``: full length, ``-``: no
  token axis);
- ``transformed``: the runnable graph of one variant (``shared`` by default: one active set
  for the whole batch; ``rowwise``; ``dense``) with the nodes the passes added (gathers,
  caches, cache-aware attention, index arithmetic);
- ``fused``: the graph after the fusion passes, where this build of rasfx has them;
- ``lowered``: what ``torch.compile`` receives in the compile modes: the variant with its cache
  ops lowered to in-place ATen writes (``passes/lower_cache_ops.py``).

Views: :meth:`Explanation.summary` (counts, token region, token-mixing sites and caches,
conservative ops, pass counters, estimated FLOPs and cache memory, timings),
:meth:`~Explanation.text` (one line per node), :meth:`~Explanation.to_json`,
:meth:`~Explanation.to_dot` / :meth:`~Explanation.to_svg` (Graphviz), :meth:`~Explanation.to_html`
(a standalone page; also ``_repr_html_`` for notebooks) and :meth:`~Explanation.diff`
between two stages, grouped by the pass that made each change.

FLOP estimates count matrix products (``linear``, ``mm``, ``bmm``, ``matmul``, ``einsum``),
attention (``QK^T`` and ``PV``) and convolutions from the captured shapes; at a ratio ``r``
with ``n = round(r * N)`` active tokens (at least 1), an active node's FLOPs scale with its
output's token axis (``n + c`` of ``N + c`` rows); attention also scales with its keys when
they are active rather than read from a cache (``kv_cache=False``). Elementwise ops are
not counted.

JSON schema (``to_json()``, ``rasfx inspect --format json``), ``"schema": "rasfx.explain/1"``::

    {
      "schema": "rasfx.explain/1", "rasfx_version": str,
      "model": {"name": str, "class": str, "source": str},
      "stage": "captured"|"analyzed"|"transformed"|"fused"|"lowered", "variant": "shared"|"rowwise"|"dense",
      "filters": {"module": str|null, "op": str|null},
      "inputs": [{"name": str, "shape": [int], "dtype": str} | {"name": str, "value": str}],
      "num_tokens": int, "batch": int, "ratio": float, "active_tokens": int,
      "nodes": [{
          "name": str, "op": str,            # op: "aten::linear", "rasfx::ras_attention", "input", "param", ...
          "target": str, "graph_op": "placeholder"|"call_function"|"get_attr"|"output",
          "category": str,                   # matmul, attention, conv, norm, reduction, view, elementwise, rasfx, input, ...
          "shapes": [[int]|null] | null,     # full (captured) shape of each tensor output
          "active_shapes": [[int|str]|null] | null,   # token dims as "n" / "n+c" for active nodes
          "dtypes": [str|null] | null,
          "mode": "A"|"F"|"-"|null,          # null at stage captured
          "token_axes": [[{"dim": int, "extra": int, "offset": int|null}]|null] | null,
          "module": str,                     # module path, "" = the model itself
          "created_by": str|null,            # pass that added the node (null: captured node)
          "inputs": [str], "note": str
      }],
      "sites": [{"producer", "consumer", "kind", "axis": {...}, "shape", "dtype", "bytes", "reason", "module"}],
      "caches": [{"name", "kind", "producer", "consumer", "shape", "dtype", "dim", "bytes"}],
      "conservative": [{"node", "target", "reason", "module"}],
      "counters": {"capture": {str: int}, "variant": {str: int}},
      "summary": {"nodes": {...}, "region": {...}|null, "conditioning": [...], "flops": {...},
                  "cache_bytes": int, "timings": {str: float}}
    }

The ``shared`` variant is what a RAS step runs; ``caches`` are per cache slot (each CFG
branch with its own ``cache_context`` holds one set).
"""

from __future__ import annotations

import dataclasses
import difflib
import html
import json
import math
import operator
import re
import shutil
import subprocess
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch
from torch import fx

from . import ops as _ops
from .errors import ArgumentTypeError, RasfxError, UnsupportedModelError
from .stages import FORMATS, STAGES, VARIANTS

__all__ = [
    "DOT_BINARY_HINT",
    "FORMATS",
    "JSON_SCHEMA",
    "STAGES",
    "VARIANTS",
    "ExplainError",
    "Explanation",
    "NodeView",
    "StageDiff",
    "ToolMissingError",
    "explain",
]

aten = torch.ops.aten

_VARIANT_STAGES = ("transformed", "fused", "lowered")  # stages that show a runnable graph variant
_PER_VARIANT = ("transformed", "lowered")  # ... and depend on --variant
SCHEMA = "rasfx.explain/1"
DIFF_SCHEMA = "rasfx.diff/1"
DOT_BINARY_HINT = (
    "install Graphviz (apt-get install graphviz, brew install graphviz or conda install graphviz); "
    "--format dot writes the graph source without it"
)

#: order in which diff groups are listed (the compiler's pass order)
PASS_ORDER = (
    "strip_asserts", "analyze_tokens", "plan_regions", "variant inputs", "insert_gathers",
    "resize_token_shapes", "insert_cache_sites",
)


class ExplainError(RasfxError, ValueError):
    """A bad request to ``explain`` (unknown stage, variant or format, a filter that
    matches nothing)."""


class ToolMissingError(RasfxError, RuntimeError):
    """An external tool (Graphviz ``dot``) is needed and missing."""


# ===================================================================================== helpers


def _dtype_str(dtype) -> str:
    s = str(dtype).replace("torch.", "")
    return {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64", "int64": "i64",
            "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "bool",
            "complex64": "c64", "complex128": "c128"}.get(s, s)


def _itemsize(dtype) -> int:
    try:
        return torch.empty((), dtype=dtype, device="meta").element_size()
    except Exception:  # pragma: no cover - exotic dtypes
        return 4


def human_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def human_flops(n: float) -> str:
    n = float(n)
    for unit in ("FLOP", "kFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP"):
        if abs(n) < 1000 or unit == "PFLOP":
            return f"{int(n)} FLOP" if unit == "FLOP" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} PFLOP"  # pragma: no cover


def _strip_model_prefix(path: str) -> str:
    path = path.replace("L['self'].", "").replace("L__self___", "")
    if path == "model":
        return ""
    return path.removeprefix("model.")


def op_name(node: fx.Node) -> str:
    """A short, stable name of a node's operation: ``aten::linear``, ``aten::add.Tensor``,
    ``rasfx::ras_attention``, ``getitem``, ``output``..."""
    if node.op == "output":
        return "output"
    if node.op == "get_attr":
        return "get_attr"
    if node.op == "placeholder":
        return "placeholder"
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        ns, base, overload = t.namespace, t._opname, t._overloadname
        return f"{ns}::{base}" + ("" if overload == "default" else f".{overload}")
    if isinstance(t, torch._ops.OpOverloadPacket):
        return str(t).replace(".", "::", 1)
    name = getattr(t, "__name__", str(t))
    mod = getattr(t, "__module__", "") or ""
    if mod.startswith("rasfx"):
        return f"rasfx::{name}"
    if mod in ("_operator", "operator"):
        return name
    return f"{mod}.{name}" if mod else name


_MATMUL = {aten.linear.default, aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
           aten.matmul.default, aten.einsum.default}
_CONV = {getattr(aten, n).default for n in ("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d",
                                             "conv_transpose2d", "conv_transpose3d") if hasattr(aten, n)
         and hasattr(getattr(aten, n), "default")}
_CONV_TRANSPOSE = {getattr(aten, n).default for n in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
                   if hasattr(aten, n) and hasattr(getattr(aten, n), "default")}
for _name in ("conv1d", "conv2d", "conv3d"):
    _pkt = getattr(aten, _name, None)
    if _pkt is not None and hasattr(_pkt, "padding"):
        _CONV.add(_pkt.padding)


def _category(node: fx.Node, role: str | None) -> str:
    from .passes import op_rules

    if node.op == "placeholder":
        return {"param": "parameter", "buffer": "buffer", "const": "constant", "user": "input",
                "index": "rasfx input", "cache": "rasfx input", "hoisted": "rasfx input"}.get(role or "", "input")
    if node.op == "output":
        return "output"
    if node.op != "call_function":
        return node.op
    t = node.target
    if t in op_rules.SDPA_OPS or t is torch.ops.rasfx.ras_attention.default:
        return "attention"
    if t in _MATMUL:
        return "matmul"
    if t in _CONV:
        return "conv"
    if op_rules.NORM_OPS and t in op_rules.NORM_OPS:
        return "norm"
    if t in op_rules.REDUCE_OPS:
        return "reduction"
    if t in op_rules.VIEW_OPS or t in op_rules.SPLIT_OPS or t in op_rules.CAT_OPS:
        return "view"
    if op_rules.is_pointwise(t):
        return "elementwise"
    mod = getattr(t, "__module__", "") or ""
    if mod.startswith("rasfx") or (isinstance(t, torch._ops.OpOverload) and t.namespace == "rasfx"):
        return "rasfx"
    if t in (operator.mul, operator.add, operator.sub, operator.floordiv):
        return "scalar"
    return "other"


def _tensors_of(val) -> list | None:
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)) and val and any(isinstance(v, torch.Tensor) for v in val):
        return [v if isinstance(v, torch.Tensor) else None for v in val]
    return None


def _axes_list(info) -> list | None:
    """meta["rasfx_tokens"] as a list (one entry per tensor output)."""
    if info is None:
        return None
    if isinstance(info, tuple):
        return [info]
    if isinstance(info, list):
        return [tuple(e) if e is not None else None for e in info]
    return None


def _axis_str(ax) -> str:
    size = "N" if ax.extra == 0 else f"N+{ax.extra}"
    off = "" if ax.extra == 0 else ("@?" if ax.offset is None else f"@{ax.offset}")
    return f"d{ax.dim}:{size}{off}"


def _dim_str(size, ax, active: bool):
    if not active:
        return int(size)
    return "n" if ax.extra == 0 else f"n+{ax.extra}"


def _arg_leaves(obj, path="") -> list:
    """(path, value) leaves of node args; nodes become ("node", name)."""
    out = []
    if isinstance(obj, fx.Node):
        out.append((path, ("node", obj.name)))
    elif isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            out.extend(_arg_leaves(x, f"{path}[{i}]"))
    elif isinstance(obj, dict):
        for k, x in obj.items():
            out.extend(_arg_leaves(x, f"{path}.{k}"))
    else:
        out.append((path, ("const", repr(obj))))
    return out


def _leaf_str(leaf) -> str:
    return leaf[1]


# ===================================================================================== node views


@dataclass
class NodeView:
    """What ``explain`` shows about one graph node (see the JSON schema in the module doc)."""

    name: str
    op: str
    target: str
    graph_op: str
    category: str
    shapes: list | None
    dtypes: list | None
    tokens: list | None  # per output: tuple of Axis, or None; None at stage captured
    mode: str | None
    module: str
    created_by: str | None
    inputs: list
    note: str = ""
    role: str | None = None
    args: list = field(default_factory=list, repr=False)  # [(path, leaf)], for diffs
    val_id: int | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.mode == "A"

    def shape_str(self) -> str:
        if self.shapes is None:
            return "-"
        parts = []
        for k, shape in enumerate(self.shapes):
            if shape is None:
                parts.append("-")
                continue
            dims = self._dims(k, shape)
            dt = self.dtypes[k] if self.dtypes and k < len(self.dtypes) and self.dtypes[k] else ""
            parts.append(f"{dt}[{', '.join(str(d) for d in dims)}]")
        return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"

    def _dims(self, k: int, shape) -> list:
        axes = self.tokens[k] if self.tokens and k < len(self.tokens) and self.tokens[k] else ()
        by_dim = {a.dim: a for a in axes}
        return [_dim_str(s, by_dim[d], self.active) if d in by_dim else int(s) for d, s in enumerate(shape)]

    def active_shapes(self) -> list | None:
        if self.shapes is None:
            return None
        return [None if s is None else self._dims(k, s) for k, s in enumerate(self.shapes)]

    def tokens_str(self) -> str:
        if not self.tokens or not any(self.tokens):
            return "-"
        if len(self.tokens) == 1:
            return ",".join(_axis_str(a) for a in self.tokens[0])
        return "|".join(",".join(_axis_str(a) for a in e) if e else "-" for e in self.tokens)

    def mode_str(self) -> str:
        return {"A": "active", "F": "full", "-": "-", None: ""}[self.mode]

    def as_dict(self) -> dict:
        return {
            "name": self.name, "op": self.op, "target": self.target, "graph_op": self.graph_op,
            "category": self.category,
            "shapes": None if self.shapes is None else [None if s is None else [int(d) for d in s] for s in self.shapes],
            "active_shapes": self.active_shapes() if self.active else None,
            "dtypes": self.dtypes,
            "mode": self.mode,
            "token_axes": None if self.tokens is None else [
                None if e is None else [{"dim": a.dim, "extra": a.extra, "offset": a.offset} for a in e]
                for e in self.tokens
            ],
            "module": self.module, "created_by": self.created_by, "inputs": list(self.inputs), "note": self.note,
        }


def _module_matches(path: str, prefix: str) -> bool:
    """Prefix match on module path components: ``transformer_blocks.3`` matches
    ``transformer_blocks.3`` and ``transformer_blocks.3.attn``, not ``transformer_blocks.30``."""
    prefix = prefix.strip().rstrip(".")
    if prefix in ("", "*"):
        return True
    return path == prefix or path.startswith(prefix + ".")


def _op_matches(view: NodeView, pattern: str) -> bool:
    p = pattern.lower()
    return p in view.op.lower() or p in view.target.lower()


def _block_of(module: str) -> str | None:
    """The transformer block a module path lies in: the path up to its first numeric component."""
    parts = module.split(".") if module else []
    for i, part in enumerate(parts):
        if part.isdigit() and i > 0:
            return ".".join(parts[: i + 1])
    return None


# ===================================================================================== explanation


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
        if stage in _VARIANT_STAGES:
            self._variant = self._load_variant()

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
            from .graph_build import Variant, copy_graph_module
            from .passes import lower_cache_ops

            # compiled runners allocate contiguous attention caches, which the dense variant's
            # in-place cache fills depend on: build the variant as they do
            if not cc.contiguous_attention:
                cc = dataclasses.replace(cc, contiguous_attention=True, variants={}, timings={})
            base = cc.variant(self.variant_name)
            gm = copy_graph_module(base.gm)
            return Variant(base.name, gm, base.caches, base.counters + lower_cache_ops(gm))
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
            tokens = _axes_list(node.meta.get("rasfx_tokens")) if annotated else None
            mode = cc.plan.mode.get(node.name) if annotated and not new else None
            note = ""
            created_by = None
            module = module_of_captured.get(node.name, "")
            if new:
                created_by = _infer_pass(node)
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
                    from .passes import Axis
                    axis = Axis(spec.dim, axis.extra, axis.offset)
                return ("F", [(axis,) if axis is not None else ()], [list(spec.shape)], [_dtype_str(spec.dtype)],
                        module_of.get(spec.consumer, ""),
                        f"{spec.kind} cache: {spec.producer} -> {spec.consumer}, full length")
            if role == "index":
                rows = [self.cc.batch, "n"] if self.variant_name == "rowwise" else ["n"]
                return ("-", None, None, None, "", f"active token positions, i64{rows}".replace("'", ""))
            return ("-", tokens, shapes, dtypes, "", "")
        if t is _ops.gather_tokens:
            producer = node.args[0]
            axes = _axes_list(producer.meta.get("rasfx_tokens")) or [()]
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
            return ("A", _axes_list(node.meta.get("rasfx_tokens")), shapes, dtypes,
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
        views = {v.name: v for v in self._captured_node_views()}
        keep = {v.name for v in views.values() if self._keep(v)}
        N, n = self.num_tokens, self.active_tokens
        out = {"dense": 0, "at_ratio": 0, "once_per_prompt": 0, "ratio": self.ratio, "n": n, "N": N,
               "by_category": {}}
        site_edges = {(x.producer, x.consumer) for x in self.cc.plan.sites}
        # nodes the step-invariant prologue computes once per prompt (its copies keep their names)
        hoisted = self._variant.hoisted if self._variant is not None else None
        once = {m.name for m in hoisted.prologue.graph.nodes if m.op == "call_function"} if hoisted else set()
        for node in self.cc.capture.graph_module.graph.nodes:
            if node.op != "call_function" or node.name not in keep:
                continue
            dense = node_flops(node)
            if not dense:
                continue
            v = views[node.name]
            scale = _active_share(v, n, N)
            if v.mode == "A" and v.category == "attention" and len(node.args) > 1:
                # keys: active rows unless this attention reads them from a cache (full length)
                k = node.args[1]
                kv = views.get(k.name) if isinstance(k, fx.Node) else None
                if kv is not None and (k.name, node.name) not in site_edges:
                    scale *= _active_share(kv, n, N)
            active = int(round(dense * scale)) if self.stage != "captured" else dense
            if node.name in once:
                out["once_per_prompt"] += dense
                active = 0
            cat = out["by_category"].setdefault(v.category, {"dense": 0, "at_ratio": 0})
            cat["dense"] += dense
            cat["at_ratio"] += active
            out["dense"] += dense
            out["at_ratio"] += active
        return out

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
        if self._variant is not None and self.stage in _PER_VARIANT:
            where += f", variant {self.variant_name}"
        return f"{self.model_name} ({self.model_class}): {where}"

    def _filters_str(self) -> str:
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
                close = difflib.get_close_matches(self.op_filter, ops, n=3, cutoff=0.4)
                hint = (f"; did you mean {', '.join(close)}?" if close else "")
            raise ExplainError(f"no node matches the filter ({self._filters_str()}){hint}")

    def summary(self, *, timings: bool = True, color: bool = False) -> str:
        """Counts, token region, sites and caches, conservative ops, counters, FLOPs, timings."""
        c = _Colors(color)
        out: list[str] = []
        st = self.stats(timings=timings)
        out.append(c.bold(f"rasfx: {self.header()}"))
        for note in self.notes:
            out.append(f"note: {note}")
        if self._filters_str():
            out.append(f"filter: {self._filters_str()} (counters are for the whole graph)")
        if self.inputs:
            out.append("inputs: " + ", ".join(_input_str(i) for i in self.inputs))
        out.append("")

        def section(title):
            out.append(c.bold(title))

        def row(key, value):
            out.append(f"  {key:<24}{value}")

        if self.stage != "captured":
            section("tokens")
            row("image tokens N", str(self.num_tokens))
            conds = st["conditioning"]
            if conds:
                row("conditioning lengths", "; ".join(
                    f"{d['length']} (sequence N+{d['length']}, image segment at offset "
                    f"{'/'.join(str(o) for o in d['image_offsets']) or '?'})" for d in conds))
            else:
                row("conditioning lengths", "none (no sequence mixes conditioning and image tokens)")
            row(f"active at ratio {self.ratio:g}", f"n = {self.active_tokens}")
            row("batch", str(self.cc.batch))
            out.append("")

        section("graph")
        counts = st["nodes"]
        row("nodes", str(counts["total"]))
        row("by kind", ", ".join(f"{k} {v}" for k, v in counts["by_category"].items()) or "-")
        if counts["by_mode"]:
            row("by mode", ", ".join(f"{c.mode(k, k if k != '-' else 'no token axis')} {v}"
                                     for k, v in counts["by_mode"].items()))
        if self._variant is not None:
            row("added by passes", ", ".join(f"{c.pass_(k)} {v}" for k, v in counts["by_pass"].items()) or "none")
        out.append("")

        if self.stage != "captured":
            section("token-wise region")
            reg = st["region"]
            if reg is None:
                row("active nodes", "none" + (" under the filter" if self._filters_str() else ""))
            else:
                row("active nodes", str(reg["active_nodes"]))
                row("first active node", f"{reg['first']['name']}  {reg['first']['op']}  ({reg['first']['module'] or '-'})")
                row("last active node", f"{reg['last']['name']}  {reg['last']['op']}  ({reg['last']['module'] or '-'})")
                row("gathers (F -> A)", ", ".join(f"{p} -> {q}" for p, q in reg["gathers"]) or "none")
            out.append("")

            sites = self.sites()
            section(f"token-mixing sites ({len(sites)})")
            if not sites:
                out.append("  none")
            table = [[s["kind"], f"{s['producer']} -> {s['consumer']}", _shape_list(s["shape"], s["dtype"]),
                      human_bytes(s["bytes"]), s["module"] or "-", s["reason"]] for s in sites]
            out.extend("  " + line for line in _table(table))
            out.append("")

        if self._variant is not None:
            caches = self.caches()
            section(f"caches ({len(caches)}, {human_bytes(st['cache_bytes'])} per cache slot)")
            if not caches:
                out.append("  none")
            table = [[x["name"], x["kind"], f"{x['producer']} -> {x['consumer']}", _shape_list(x["shape"], x["dtype"]),
                      human_bytes(x["bytes"]), x["module"] or "-"] for x in caches]
            out.extend("  " + line for line in _table(table))
            out.append("")

        if self.stage != "captured":
            cons = self.conservative()
            section(f"conservative ops ({len(cons)})")
            if not cons:
                out.append("  none: every op touching the active tokens has a rule")
            table = [[x["node"], x["target"], x["module"] or "-", x["reason"]] for x in cons]
            out.extend("  " + line for line in _table(table))
            out.append("")

        section("pass counters (whole graph)")
        cnt = self.counters()
        row("capture", ", ".join(f"{k} {v}" for k, v in cnt["capture"].items()) or "-")
        if cnt["variant"]:
            row(f"{self._variant.name} variant", ", ".join(f"{k} {v}" for k, v in cnt["variant"].items()))
        out.append("")

        fl = st["flops"]
        section(f"estimated cost (matmul, attention, conv FLOPs; batch {self.cc.batch})")
        row("dense", human_flops(fl["dense"]))
        if self.stage != "captured":
            share = fl["at_ratio"] / fl["dense"] if fl["dense"] else 1.0
            speed = f", {1 / share:.2f}x fewer" if share > 0 else ""
            row(f"at ratio {self.ratio:g} (n={fl['n']})", f"{human_flops(fl['at_ratio'])} ({100 * share:.1f}% of dense{speed})")
            for cat, d in fl["by_category"].items():
                row(f"  {cat}", f"{human_flops(d['dense'])} -> {human_flops(d['at_ratio'])}")
            if fl["once_per_prompt"]:
                row("once per prompt", f"{human_flops(fl['once_per_prompt'])} (hoisted out of every step)")
        if self._variant is not None:
            row("cache memory", f"{human_bytes(st['cache_bytes'])} per cache slot ({len(self.caches())} caches)")
        out.append("")

        if timings:
            section("capture timings")
            tm = st["timings"]
            row("seconds", ", ".join(f"{k} {v:.2f}" for k, v in tm.items()) or "-")
            out.append("")
        return "\n".join(out).rstrip() + "\n"

    def text(self, *, color: bool = False) -> str:
        """One line per node: name, op, shape (``n`` = active tokens), token axes, mode,
        the pass that created it, module path, note."""
        c = _Colors(color)
        views = self.nodes()
        header = ["name", "op", "shape", "tokens", "mode", "pass", "module", "note"]
        rows = [[v.name, v.op, v.shape_str(), v.tokens_str() if v.tokens is not None else "",
                 v.mode_str(), v.created_by or "", v.module, v.note] for v in views]
        lines = [f"# rasfx: {self.header()}: {len(views)} nodes"
                 + (f" (filter: {self._filters_str()})" if self._filters_str() else "")]
        if self.stage != "captured":
            lines.append(f"# N = {self.num_tokens} image tokens; 'n' in a shape is the active token count; "
                         "tokens dK:N+c@o = token axis at dim K, c conditioning tokens, image segment at offset o")
        table = _table([header] + rows)
        lines.append("# " + table[0])
        for v, line in zip(views, table[1:]):
            if color:
                line = c.line(line, v)
            lines.append("  " + line)
        return "\n".join(line.rstrip() for line in lines) + "\n"

    def as_dict(self, *, timings: bool = True) -> dict:
        from . import __version__

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
            "counters": self.counters(),
            "summary": self.stats(timings=timings),
        }

    def to_json(self, *, indent: int | None = 1, timings: bool = True) -> str:
        return json.dumps(self.as_dict(timings=timings), indent=indent, default=_json_default) + "\n"

    def to_dot(self) -> str:
        """Graphviz source: one cluster per transformer block, nodes coloured by mode
        (active green, full blue, no token axis grey; nodes added by passes outlined in
        orange). Parameter and buffer inputs are left out."""
        views = [v for v in self.nodes() if v.category not in ("parameter", "buffer", "constant")]
        names = {v.name for v in views}
        hidden = sum(1 for v in self.nodes() if v.category in ("parameter", "buffer", "constant"))
        lines = ["digraph rasfx {"]
        title = f"rasfx: {self.header()}" + (f" (filter: {self._filters_str()})" if self._filters_str() else "")
        title += f"\\nN = {self.num_tokens} image tokens; {hidden} parameter/buffer inputs not drawn"
        lines.append(f'  graph [label="{_dot_escape(title)}", labelloc=t, fontname="Helvetica", fontsize=12, '
                     'rankdir=TB, nodesep=0.15, ranksep=0.25];')
        lines.append('  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=9, '
                     'fillcolor="#ffffff", color="#777777", margin="0.08,0.03", height=0.3];')
        lines.append('  edge [color="#888888", arrowsize=0.5];')
        clusters: OrderedDict[str | None, list] = OrderedDict()
        for v in views:
            clusters.setdefault(_block_of(v.module), []).append(v)
        for k, (block, members) in enumerate(clusters.items()):
            indent = "  "
            if block is not None:
                lines.append(f'  subgraph "cluster_{k}" {{')
                lines.append(f'    label="{_dot_escape(block)}"; style="rounded,filled"; fillcolor="#fafafa"; '
                             'color="#bbbbbb"; fontsize=10;')
                indent = "    "
            for v in members:
                lines.append(f"{indent}{_dot_id(v.name)} [{_dot_node_attrs(v)}];")
            if block is not None:
                lines.append("  }")
        for v in views:
            for src in v.inputs:
                if src in names:
                    lines.append(f"  {_dot_id(src)} -> {_dot_id(v.name)};")
        lines.append('  subgraph "cluster_legend" {')
        lines.append('    label="legend"; fontsize=10; style="rounded"; color="#bbbbbb";')
        for key, ident, text in (("A", "a", "active (n tokens)"), ("F", "f", "full length (N)"),
                                 ("-", "x", "no token axis")):
            lines.append(f'    "legend_{ident}" [label="{text}", fillcolor="{_MODE_FILL[key]}"];')
        lines.append('    "legend_p" [label="added by a pass", fillcolor="#ffffff", color="#e65100", penwidth=2];')
        lines.append("  }")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def to_svg(self, timeout: float = 300.0) -> str:
        """SVG through Graphviz's ``dot`` (``ToolMissingError`` without it)."""
        return render_svg(self.to_dot(), timeout=timeout)

    def to_html(self, *, svg: bool | None = None, timings: bool = True, full: bool = True,
                diff: StageDiff | None = None) -> str:
        """A standalone page (no external JS/CSS): summary, graph (inline SVG when Graphviz
        ``dot`` exists, else the node table), nodes, sites, caches, conservative ops,
        counters, and a diff when given."""
        views = self.nodes()
        if svg is None:
            svg = shutil.which("dot") is not None and len(views) <= 4000
        graph_html = ""
        if svg:
            try:
                graph_html = _svg_body(self.to_svg())
            except (ToolMissingError, RasfxError) as e:
                graph_html = f'<p class="muted">graph not drawn: {html.escape(str(e))}</p>'
        if not graph_html:
            graph_html = ('<p class="muted">Graphviz <code>dot</code> is not installed, so the graph is shown as '
                          'the node table below (colours by mode).</p>')
        body = ['<div class="rasfx">']
        body.append(f"<h1>rasfx: {html.escape(self.header())}</h1>")
        if self.notes:
            body.extend(f'<p class="note">{html.escape(n)}</p>' for n in self.notes)
        if self._filters_str():
            body.append(f'<p class="note">filter: {html.escape(self._filters_str())}</p>')
        body.append('<nav><a href="#summary">summary</a> <a href="#graph">graph</a> <a href="#nodes">nodes</a> '
                    '<a href="#sites">sites</a> <a href="#caches">caches</a> <a href="#conservative">conservative</a> '
                    '<a href="#counters">counters</a>' + (' <a href="#diff">diff</a>' if diff else "") + "</nav>")
        body.append('<section id="summary"><h2>Summary</h2>')
        body.append(_html_kv(self._summary_pairs(timings)))
        body.append("</section>")
        if diff is not None:
            body.append('<section id="diff">' + diff.to_html_fragment() + "</section>")
        body.append(f'<section id="graph"><h2>Graph</h2>{graph_html}</section>')
        body.append('<section id="nodes"><h2>Nodes</h2>'
                    '<input id="rasfx-filter" placeholder="filter rows (name, op, module, pass)" '
                    'oninput="rasfxFilter(this.value)">')
        rows = [[v.name, v.op, v.shape_str(), v.tokens_str() if v.tokens is not None else "", v.mode_str(),
                 v.created_by or "", v.module, v.note] for v in views]
        body.append(_html_table(["name", "op", "shape", "tokens", "mode", "pass", "module", "note"], rows,
                                row_classes=[_row_class(v) for v in views], table_id="rasfx-nodes"))
        body.append("</section>")
        sites = self.sites()
        body.append(f'<section id="sites"><h2>Token-mixing sites ({len(sites)})</h2>')
        body.append(_html_table(["kind", "producer", "consumer", "shape", "bytes", "module", "reason"],
                                [[s["kind"], s["producer"], s["consumer"], _shape_list(s["shape"], s["dtype"]),
                                  human_bytes(s["bytes"]), s["module"], s["reason"]] for s in sites]))
        body.append("</section>")
        caches = self.caches()
        body.append(f'<section id="caches"><h2>Caches ({len(caches)})</h2>')
        body.append(_html_table(["name", "kind", "producer", "consumer", "shape", "bytes"],
                                [[x["name"], x["kind"], x["producer"], x["consumer"],
                                  _shape_list(x["shape"], x["dtype"]), human_bytes(x["bytes"])] for x in caches]))
        body.append("</section>")
        cons = self.conservative()
        body.append(f'<section id="conservative"><h2>Conservative ops ({len(cons)})</h2>')
        body.append(_html_table(["node", "target", "module", "reason"],
                                [[x["node"], x["target"], x["module"], x["reason"]] for x in cons]))
        body.append("</section>")
        cnt = self.counters()
        body.append('<section id="counters"><h2>Pass counters</h2>')
        body.append(_html_kv([("capture", ", ".join(f"{k} {v}" for k, v in cnt["capture"].items()))]
                             + ([(f"{self.variant_name} variant", ", ".join(f"{k} {v}" for k, v in cnt["variant"].items()))]
                                if cnt["variant"] else [])))
        body.append("</section></div>")
        fragment = f"<style>{_CSS}</style>" + "\n".join(body) + f"<script>{_JS}</script>"
        if not full:
            return fragment
        title = html.escape(f"rasfx: {self.header()}")
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
                f'<meta name="viewport" content="width=device-width, initial-scale=1"></head>\n'
                f"<body>{fragment}</body></html>\n")

    def _summary_pairs(self, timings: bool) -> list:
        st = self.stats(timings=timings)
        pairs = [("model", f"{self.model_name} ({self.model_class}, {self.source})"), ("stage", self.stage)]
        if self.inputs:
            pairs.append(("inputs", ", ".join(_input_str(i) for i in self.inputs)))
        if self.stage != "captured":
            pairs.append(("image tokens N", str(self.num_tokens)))
            pairs.append((f"active at ratio {self.ratio:g}", f"n = {self.active_tokens}"))
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
        if self.stage != "captured" and fl["dense"]:
            pairs.append((f"FLOPs at ratio {self.ratio:g}",
                          f"{human_flops(fl['at_ratio'])} ({100 * fl['at_ratio'] / fl['dense']:.1f}% of dense)"))
        if self._variant is not None:
            pairs.append(("cache memory", f"{human_bytes(st['cache_bytes'])} per cache slot"))
        if timings:
            pairs.append(("capture timings", ", ".join(f"{k} {v:.2f} s" for k, v in st["timings"].items())))
        return pairs

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


def _active_share(v: NodeView, n: int, N: int) -> float:
    """Share of the rows an active node computes along its token axes (1 for other nodes)."""
    scale = 1.0
    if v.mode == "A" and v.tokens and v.tokens[0]:
        for ax in v.tokens[0]:
            scale *= (n + ax.extra) / (N + ax.extra)
    return scale


def _pass_rank(name: str):
    return (PASS_ORDER.index(name) if name in PASS_ORDER else len(PASS_ORDER), name)


def _infer_pass(node: fx.Node) -> str:
    """The pass that added ``node`` to a variant (its ``rasfx_created_by``, or inferred for
    the nodes the rewrite context adds)."""
    cb = node.meta.get("rasfx_created_by")
    if cb:
        return str(cb)
    if node.op == "placeholder":
        if "rasfx_cache" in node.meta:
            return "insert_cache_sites"
        return "variant inputs"
    t = node.target
    if t is _ops.active_count or t in (operator.mul, operator.add):
        return "resize_token_shapes"
    if t is _ops.sequence_index:
        if any(u.target is _ops.gather_tokens for u in node.users):
            return "insert_gathers"
        return "insert_cache_sites"
    if t is _ops.gather_tokens:
        return "insert_gathers"
    if t in (torch.ops.rasfx.cache_write_.default, torch.ops.rasfx.ras_attention.default):
        return "insert_cache_sites"
    return "unknown pass"


# ===================================================================================== diff


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
        va = f" ({a.variant_name})" if a.variant is not None and a.stage in _PER_VARIANT else ""
        vb = f" ({b.variant_name})" if b.variant is not None and b.stage in _PER_VARIANT else ""
        return f"{a.model_name} ({a.model_class}): {a.stage}{va} -> {b.stage}{vb}"

    def _counts(self, entries) -> str:
        c = Counter(e.kind for e in entries)
        return f"+{c.get('+', 0)} added, -{c.get('-', 0)} removed, ~{c.get('~', 0)} changed"

    def summary(self, *, color: bool = False) -> str:
        col = _Colors(color)
        out = [col.bold(f"rasfx diff: {self.title()}")]
        filt = self.a._filters_str()
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
        col = _Colors(color)
        out = [self.summary(color=color).rstrip()]
        for name, entries in self.groups().items():
            out.append("")
            out.append(col.bold(f"{name}: {self._counts(entries)}"))
            rows = [[e.kind, e.node, e.op, e.detail] for e in entries]
            for e, line in zip(entries, _table(rows)):
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
            parts.append(_html_table(["", "node", "op", "detail"], [[e.kind, e.node, e.op, e.detail] for e in entries],
                                     row_classes=[{"+": "added", "-": "removed", "~": "changed"}[e.kind]
                                                  for e in entries]))
        return "\n".join(parts)

    def to_html(self) -> str:
        title = html.escape(f"rasfx diff: {self.title()}")
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title></head>\n'
                f'<body><style>{_CSS}</style><div class="rasfx"><section id="diff">{self.to_html_fragment()}'
                f"</section></div></body></html>\n")

    def _repr_html_(self) -> str:
        return f'<style>{_CSS}</style><div class="rasfx">{self.to_html_fragment()}</div>'

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


# ===================================================================================== FLOPs


def _shape(x) -> tuple | None:
    if isinstance(x, fx.Node):
        val = x.meta.get("val")
        if isinstance(val, torch.Tensor):
            return tuple(int(s) for s in val.shape)
    return None


def node_flops(node: fx.Node) -> int:
    """FLOPs (2 per multiply-add) of a matrix product, attention or convolution node, from
    the captured shapes; 0 for other ops."""
    t, a = node.target, node.args
    out = _shape(node)
    try:
        if t is aten.linear.default:
            w = _shape(a[1])
            return 2 * math.prod(out) * w[1] if out and w else 0
        if t is aten.mm.default:
            x, y = _shape(a[0]), _shape(a[1])
            return 2 * x[0] * x[1] * y[1]
        if t is aten.addmm.default:
            x, y = _shape(a[1]), _shape(a[2])
            return 2 * x[0] * x[1] * y[1]
        if t is aten.bmm.default:
            x, y = _shape(a[0]), _shape(a[1])
            return 2 * x[0] * x[1] * x[2] * y[2]
        if t is aten.baddbmm.default:
            x, y = _shape(a[1]), _shape(a[2])
            return 2 * x[0] * x[1] * x[2] * y[2]
        if t is aten.matmul.default:
            x = _shape(a[0])
            return 2 * math.prod(out or (1,)) * x[-1]
        if t is aten.einsum.default:
            eq = a[0].replace(" ", "")
            lhs = eq.split("->")[0].split(",")
            sizes: dict = {}
            for sub, op in zip(lhs, a[1]):
                shp = _shape(op)
                if shp is None or "." in sub or len(sub) != len(shp):
                    return 0
                sizes.update(zip(sub, shp))
            return 2 * math.prod(sizes.values())
        if t is aten.scaled_dot_product_attention.default or t is torch.ops.rasfx.ras_attention.default:
            q, k, v = _shape(a[0]), _shape(a[1]), _shape(a[2])
            if t is torch.ops.rasfx.ras_attention.default:
                k, v = _shape(a[3]) or k, _shape(a[4]) or v
            lq, d, lk, dv = q[-2], q[-1], k[-2], v[-1]
            batch = math.prod(q[:-2])
            return 2 * batch * lq * lk * (d + dv)
        if t in _CONV:
            w = _shape(a[1])
            if out is None or w is None:
                return 0
            if t in _CONV_TRANSPOSE or (t is aten.convolution.default and len(a) > 6 and a[6]):
                x = _shape(a[0])
                return 2 * math.prod(x) * math.prod(w[1:]) if x else 0
            return 2 * math.prod(out) * math.prod(w[1:])
    except (TypeError, IndexError, AttributeError):
        return 0
    return 0


# ===================================================================================== rendering


class _Colors:
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


def _table(rows: list) -> list[str]:
    if not rows:
        return []
    ncol = max(len(r) for r in rows)
    rows = [list(map(str, r)) + [""] * (ncol - len(r)) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(ncol)]
    # the last column is free text: no padding
    return ["  ".join(cell.ljust(widths[i]) if i < ncol - 1 else cell for i, cell in enumerate(r)).rstrip()
            for r in rows]


def _shape_list(shape, dtype) -> str:
    return f"{dtype}[{', '.join(str(s) for s in shape)}]"


def _input_str(d: dict) -> str:
    if "shape" in d:
        return f"{d['name']} {_shape_list(d['shape'], _dtype_str(d['dtype']))}"
    return f"{d['name']}={d['value']}"


def describe_inputs(kwargs: dict) -> list[dict]:
    """JSON-able description of forward kwargs (shapes and dtypes, short reprs)."""
    out = []
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            out.append({"name": k, "shape": [int(s) for s in v.shape], "dtype": str(v.dtype).replace("torch.", "")})
        elif isinstance(v, (tuple, list)) and v and all(isinstance(x, torch.Tensor) for x in v):
            out.append({"name": k, "value": "(" + ", ".join(
                _shape_list(list(x.shape), _dtype_str(x.dtype)) for x in v) + ")"})
        else:
            r = repr(v)
            out.append({"name": k, "value": r if len(r) <= 60 else r[:57] + "..."})
    return out


def _compress(roots: list) -> list:
    """['transformer_blocks.0', 'transformer_blocks.1', 'x'] -> ['transformer_blocks.0..1', 'x']."""
    groups: OrderedDict[str, list] = OrderedDict()
    for r in roots:
        base, _, idx = r.rpartition(".")
        if base and idx.isdigit():
            groups.setdefault(base, []).append(int(idx))
        else:
            groups.setdefault(r, [])
    out = []
    for base, idxs in groups.items():
        if idxs:
            idxs.sort()
            out.append(f"{base}.{idxs[0]}" + (f"..{idxs[-1]}" if len(idxs) > 1 else ""))
        else:
            out.append(base)
    return out


def _json_default(o):
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    return str(o)


_MODE_FILL = {"A": "#c8e6c9", "F": "#bbdefb", "-": "#eeeeee", None: "#ffffff"}


def _dot_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\\\\n", "\\n")


def _dot_id(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dot_node_attrs(v: NodeView) -> str:
    label = f"{v.name}\\n{v.op}"
    if v.shapes is not None:
        label += f"\\n{v.shape_str()}"
    attrs = [f'label="{_dot_escape(label)}"', f'fillcolor="{_MODE_FILL.get(v.mode, "#ffffff")}"']
    tip = " | ".join(x for x in (v.module, v.tokens_str() if v.tokens is not None else "", v.note) if x and x != "-")
    if tip:
        attrs.append(f'tooltip="{_dot_escape(tip)}"')
    if v.created_by:
        attrs.append('color="#e65100", penwidth=2')
    if v.category in ("input", "rasfx input", "output"):
        attrs.append('shape=oval')
    return ", ".join(attrs)


def render_svg(dot_source: str, timeout: float = 300.0) -> str:
    exe = shutil.which("dot")
    if exe is None:
        raise ToolMissingError(f"the svg format needs Graphviz's `dot` program, which is not on PATH: {DOT_BINARY_HINT}")
    try:
        proc = subprocess.run([exe, "-Tsvg"], input=dot_source.encode(), capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ToolMissingError(f"`dot` did not finish within {timeout:.0f} s; use --module/--op to draw a part "
                               "of the graph, or --format dot") from None
    if proc.returncode != 0:
        raise RasfxError(f"`dot -Tsvg` failed: {proc.stderr.decode(errors='replace').strip()[:500]}")
    return proc.stdout.decode("utf-8", errors="replace")


def _svg_body(svg: str) -> str:
    i = svg.find("<svg")
    return svg[i:] if i >= 0 else svg


def _row_class(v: NodeView) -> str:
    cls = {"A": "mode-a", "F": "mode-f", "-": "mode-x"}.get(v.mode or "", "")
    return (cls + " created").strip() if v.created_by else cls


def _html_table(header: list, rows: list, row_classes: list | None = None, table_id: str | None = None) -> str:
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


def _html_kv(pairs: list) -> str:
    return ('<table class="kv"><tbody>' + "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in pairs)
        + "</tbody></table>")


_CSS = """
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

_JS = """
function rasfxFilter(q){q=q.toLowerCase();var rows=document.querySelectorAll('#rasfx-nodes tbody tr');
for(var i=0;i<rows.length;i++){rows[i].style.display=rows[i].textContent.toLowerCase().indexOf(q)>=0?'':'none';}}
document.documentElement.setAttribute('data-rasfx-ready','1');
"""


# ===================================================================================== JSON schema

_AXIS = {"type": "object", "required": ["dim", "extra", "offset"],
         "properties": {"dim": {"type": "integer"}, "extra": {"type": "integer"},
                        "offset": {"type": ["integer", "null"]}}}

#: JSON Schema (draft 2020-12) of ``Explanation.to_json()``.
JSON_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "rasfx.explain/1",
    "type": "object",
    "required": ["schema", "rasfx_version", "model", "stage", "variant", "filters", "inputs", "num_tokens", "batch",
                 "ratio", "active_tokens", "nodes", "sites", "caches", "conservative", "counters", "summary"],
    "properties": {
        "schema": {"const": SCHEMA},
        "rasfx_version": {"type": "string"},
        "model": {"type": "object", "required": ["name", "class", "source"]},
        "stage": {"enum": list(STAGES)},
        "variant": {"enum": list(VARIANTS)},
        "filters": {"type": "object", "required": ["module", "op"]},
        "inputs": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "num_tokens": {"type": "integer"}, "batch": {"type": "integer"},
        "ratio": {"type": "number"}, "active_tokens": {"type": "integer"},
        "nodes": {"type": "array", "items": {
            "type": "object",
            "required": ["name", "op", "target", "graph_op", "category", "shapes", "active_shapes", "dtypes", "mode",
                         "token_axes", "module", "created_by", "inputs", "note"],
            "properties": {
                "name": {"type": "string"}, "op": {"type": "string"}, "target": {"type": "string"},
                "graph_op": {"enum": ["placeholder", "call_function", "call_method", "call_module", "get_attr", "output"]},
                "category": {"type": "string"},
                "shapes": {"type": ["array", "null"], "items": {"type": ["array", "null"], "items": {"type": "integer"}}},
                "active_shapes": {"type": ["array", "null"]},
                "dtypes": {"type": ["array", "null"]},
                "mode": {"enum": ["A", "F", "-", None]},
                "token_axes": {"type": ["array", "null"], "items": {"type": ["array", "null"], "items": _AXIS}},
                "module": {"type": "string"}, "created_by": {"type": ["string", "null"]},
                "inputs": {"type": "array", "items": {"type": "string"}}, "note": {"type": "string"},
            }}},
        "sites": {"type": "array", "items": {"type": "object", "required": [
            "producer", "consumer", "kind", "axis", "shape", "dtype", "bytes", "reason", "module"],
            "properties": {"kind": {"enum": ["attention", "mixing", "opaque", "output"]}, "axis": _AXIS,
                           "bytes": {"type": "integer"}}}},
        "caches": {"type": "array", "items": {"type": "object", "required": [
            "name", "kind", "producer", "consumer", "shape", "dtype", "dim", "bytes"]}},
        "conservative": {"type": "array", "items": {"type": "object", "required": ["node", "target", "reason"]}},
        "counters": {"type": "object", "required": ["capture", "variant"]},
        "summary": {"type": "object", "required": ["nodes", "region", "conditioning", "flops", "cache_bytes"],
                    "properties": {"flops": {"type": "object", "required": ["dense", "at_ratio", "ratio", "n", "N"]}}},
    },
}


# ===================================================================================== entry point


def explain(model, inputs: dict | None = None, *, ratio: float = 0.25, stage: str = "transformed",
            variant: str = "shared", module: str | None = None, op: str | None = None,
            image_input: str | None = None, name: str | None = None, kv_cache: bool = True,
            **load_options) -> Explanation:
    """Capture ``model`` for ``inputs`` (its forward's keyword arguments) and explain one
    stage of the compiler.

    ``model`` may be a ``torch.nn.Module`` (with ``inputs``), a ``RASModule`` (``inputs``
    optional: its most recent capture is used), a ``CompiledCapture``, or a string as
    ``rasfx inspect`` takes it: a preset name (``"sd3-tiny"``), a diffusers model folder or
    ``config.json``, or ``"package.module:factory"`` (``load_options``: ``height``,
    ``width``, ``batch``, ``seed``, ``meta``, ``frames``). The forward is not run.

    ``ratio`` (in (0, 1]) sets the active count of the estimates; ``stage`` is one of
    ``captured``, ``analyzed``, ``transformed``, ``fused``; ``variant`` (``shared``,
    ``rowwise``, ``dense``) the graph variant of the ``transformed`` stage; ``module`` and
    ``op`` filter the nodes shown (module path prefix, op substring); ``kv_cache=False``
    plans attention over the active tokens only (``TransformConfig.kv_cache``; a
    ``RASModule`` uses its own config).
    """
    from .capture import bind_inputs, input_signature
    from .graph_build import CompiledCapture, compile_capture
    from .module import RASModule

    if stage not in STAGES:
        raise ExplainError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    if variant not in VARIANTS:
        raise ExplainError(f"unknown variant {variant!r}; variants are {', '.join(VARIANTS)}")
    source = "module"
    notes: tuple = ()
    if isinstance(model, str):
        if inputs is not None:
            raise ArgumentTypeError("explain(MODEL string) builds its own inputs; pass height/width/batch/seed instead")
        from .cli import capture_model

        loaded, cc = capture_model(model, image_input=image_input, kv_cache=kv_cache, **load_options)
        return Explanation(cc, stage=stage, variant=variant, ratio=ratio, module=module, op=op,
                           model_name=name or loaded.name, model_class=type(loaded.model).__name__,
                           source=loaded.source, inputs=describe_inputs(loaded.inputs), notes=loaded.notes)
    if load_options:
        raise ArgumentTypeError(f"explain() got options {sorted(load_options)} that only apply to a MODEL string")

    if isinstance(model, CompiledCapture):
        cc = model
        model_class = name or "model"
        return Explanation(cc, stage=stage, variant=variant, ratio=ratio, module=module, op=op, model_name=name,
                           model_class=model_class, source="capture")
    if isinstance(model, RASModule):
        ras = model
        if inputs is None:
            cc = ras._current_capture()
            if cc is None:
                raise ExplainError("this RASModule has not captured anything yet: pass the forward's inputs "
                                   "(explain(ras, inputs)) or call it once")
        else:
            kwargs = bind_inputs(ras.model, (), dict(inputs))
            cc = ras._get_capture(input_signature(ras.model, kwargs), kwargs)
        inner = ras.model
        desc = describe_inputs(inputs) if inputs is not None else []
        return Explanation(cc, stage=stage, variant=variant, ratio=ratio, module=module, op=op,
                           model_name=name or type(inner).__name__, model_class=type(inner).__name__,
                           source="RASModule", inputs=desc, notes=notes)
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(f"explain needs a torch.nn.Module, a RASModule or a MODEL string, "
                                    f"got {type(model).__name__}")
    if inputs is None or not isinstance(inputs, dict):
        raise ExplainError("explain(model, inputs): inputs must be the dict of keyword arguments of one forward")
    from .transform import TransformConfig, transform

    transform(model)  # the same model checks as rasfx.transform (U-Nets, already transformed, ...)
    kwargs = dict(inputs)
    cc = compile_capture(model, kwargs, image_input, input_signature(model, kwargs), kv_cache=kv_cache,
                         varying_inputs=TransformConfig().varying_inputs)  # the graphs as the runtime builds them
    return Explanation(cc, stage=stage, variant=variant, ratio=ratio, module=module, op=op,
                       model_name=name or type(model).__name__, model_class=type(model).__name__, source=source,
                       inputs=describe_inputs(kwargs), notes=notes)
