"""Node views for ``rasfx.explain``: what is shown about each graph node (op, category,
shapes, token axes, mode, module, the pass that added it) and the helpers that name them."""

from __future__ import annotations

import operator
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import fx

from ..flops import cost_category
from ..compiler import CAPTURE_PASSES, CREATED_BY, PASS_ORDER as COMPILER_ORDER
from ..passes import op_rules

CAPTURE_ORDER = tuple(p.name for p in CAPTURE_PASSES)

VARIANT_STAGES = ("transformed", "fused", "lowered")  # stages that show a runnable graph variant
PER_VARIANT = ("transformed", "lowered")  # ... and depend on --variant
#: order in which diff groups are listed (the compiler's pass order)
PASS_ORDER = (*CAPTURE_ORDER, "variant inputs", *(n for n in COMPILER_ORDER if n not in CAPTURE_ORDER))


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


def _category(node: fx.Node, role: str | None) -> str:
    if node.op == "placeholder":
        return {"param": "parameter", "buffer": "buffer", "const": "constant", "user": "input",
                "index": "rasfx input", "cache": "rasfx input", "hoisted": "rasfx input"}.get(role or "", "input")
    if node.op == "output":
        return "output"
    if node.op != "call_function":
        return node.op
    t = node.target
    costed = cost_category(t)
    if costed is not None:
        return costed
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


def _axis_str(ax) -> str:
    size = "N" if ax.extra == 0 else f"N+{ax.extra}"
    size = f"{ax.outer}xN" if ax.outer > 1 else size
    off = "" if ax.extra == 0 else ("@?" if ax.offset is None else f"@{ax.offset}")
    return f"d{ax.dim}:{size}{off}"


def _dim_str(size, ax, active: bool):
    if not active:
        return int(size)
    if ax.outer > 1:
        return f"{ax.outer}xn"
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


def _pass_rank(name: str):
    return (PASS_ORDER.index(name) if name in PASS_ORDER else len(PASS_ORDER), name)


def created_by(node: fx.Node) -> str:
    """The pass that added ``node`` to a variant: what ``compiler.run_passes`` (or the pass
    itself) stamped into its metadata; a graph input no pass claims is one of the variant's
    inputs."""
    stamp = node.meta.get(CREATED_BY)
    if stamp:
        return str(stamp)
    return "variant inputs" if node.op == "placeholder" else "unknown pass"


def shape_list(shape, dtype) -> str:
    return f"{dtype}[{', '.join(str(s) for s in shape)}]"


def input_str(d: dict) -> str:
    if "shape" in d:
        return f"{d['name']} {shape_list(d['shape'], _dtype_str(d['dtype']))}"
    return f"{d['name']}={d['value']}"


def describe_inputs(kwargs: dict) -> list[dict]:
    """JSON-able description of forward kwargs (shapes and dtypes, short reprs)."""
    out = []
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            out.append({"name": k, "shape": [int(s) for s in v.shape], "dtype": str(v.dtype).replace("torch.", "")})
        elif isinstance(v, (tuple, list)) and v and all(isinstance(x, torch.Tensor) for x in v):
            out.append({"name": k, "value": "(" + ", ".join(
                shape_list(list(x.shape), _dtype_str(x.dtype)) for x in v) + ")"})
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


