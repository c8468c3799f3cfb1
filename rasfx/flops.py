"""The FLOP model of a capture: what ``rasfx inspect`` prints as the estimated cost and what
``rasfx.stats`` reports as each step's share of the dense FLOPs (one model, so the two agree).

It counts matrix products (``linear``, ``mm``, ``bmm``, ``matmul``, ``einsum``), attention
(``QK^T`` and ``PV``) and convolutions from the captured shapes; elementwise ops are not
counted. With ``n`` of ``N`` image tokens active, a node the region plan runs on the active
tokens scales with its output's token axes (``n + c`` of ``N + c`` rows for a sequence with
``c`` conditioning tokens); attention also scales with its keys when they are active rather
than read from a cache (``kv_cache=False``). Nodes that run at full length (conservative
ops, the convolution of a patch embedding, everything before the first gather) count in
full, and the step-invariant prologue (``TransformConfig.hoist_invariants``) counts once per
prompt, not per step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .passes import op_rules
from .passes.token_info import Axis, first_output_axes

__all__ = ["CONV_OPS", "CostedNode", "FlopEstimate", "FlopModel", "cost_category", "node_flops"]

aten = torch.ops.aten


def _default_overloads(names: tuple[str, ...]) -> set[Any]:
    return {getattr(aten, n).default for n in names if hasattr(aten, n) and hasattr(getattr(aten, n), "default")}


CONV_TRANSPOSE_OPS = _default_overloads(("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"))
CONV_OPS = _default_overloads(("conv1d", "conv2d", "conv3d", "convolution")) | CONV_TRANSPOSE_OPS
for _name in ("conv1d", "conv2d", "conv3d"):
    _packet = getattr(aten, _name, None)
    if _packet is not None and hasattr(_packet, "padding"):
        CONV_OPS.add(_packet.padding)


def _attention_ops() -> set[Any]:
    return set(op_rules.SDPA_OPS) | {torch.ops.rasfx.ras_attention.default}


def cost_category(target: Any) -> str | None:
    """``matmul``, ``attention`` or ``conv`` for the ops the model counts; None for the others."""
    if target in _attention_ops():
        return "attention"
    if target in op_rules.MATMUL_OPS:
        return "matmul"
    if target in CONV_OPS:
        return "conv"
    return None


class _UnknownShape(Exception):
    """An operand of a counted node has no recorded tensor shape (the node counts 0)."""


def _shape(x: object) -> tuple[int, ...]:
    """The shape of a graph node's tensor value (``_UnknownShape`` when it has none)."""
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise _UnknownShape(x)
    return tuple(int(s) for s in val.shape)


def node_flops(node: fx.Node) -> int:
    """FLOPs (2 per multiply-add) of a matrix product, attention or convolution node, from
    the captured shapes; 0 for other ops (and for a node whose shapes are unknown)."""
    try:
        return _flops(node.target, node.args, node)
    except (_UnknownShape, LookupError, TypeError, AttributeError):
        return 0


def _flops(t: Any, a: Any, node: fx.Node) -> int:
    if t is aten.linear.default:
        return 2 * math.prod(_shape(node)) * _shape(a[1])[1]
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
        return 2 * math.prod(_shape(node)) * _shape(a[0])[-1]
    if t is aten.einsum.default:
        lhs = str(a[0]).replace(" ", "").split("->")[0].split(",")
        sizes: dict[str, int] = {}
        for sub, op in zip(lhs, a[1]):
            shp = _shape(op)
            if "." in sub or len(sub) != len(shp):
                return 0
            sizes.update(zip(sub, shp))
        return 2 * math.prod(sizes.values())
    if t is aten.scaled_dot_product_attention.default or t is torch.ops.rasfx.ras_attention.default:
        q, k, v = _shape(a[0]), _shape(a[1]), _shape(a[2])
        if t is torch.ops.rasfx.ras_attention.default:  # the full-length keys and values: its caches
            with contextlib.suppress(_UnknownShape):
                k, v = _shape(a[3]), _shape(a[4])
        return 2 * math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])
    if t in CONV_OPS:
        w = _shape(a[1])
        if t in CONV_TRANSPOSE_OPS or (t is aten.convolution.default and len(a) > 6 and a[6]):
            return 2 * math.prod(_shape(a[0])) * math.prod(w[1:])
        return 2 * math.prod(_shape(node)) * math.prod(w[1:])
    return 0


@dataclass(frozen=True)
class CostedNode:
    """One node the model counts: its dense FLOPs and the token axes they scale with when
    ``n`` tokens are active (empty: full cost at any ``n``)."""

    name: str
    category: str
    dense: int
    axes: tuple[Axis, ...] = ()
    once_per_prompt: bool = False

    def at(self, n: int, num_tokens: int) -> int:
        """FLOPs with ``n`` of ``num_tokens`` image tokens active (0 for prologue nodes)."""
        if self.once_per_prompt:
            return 0
        scale = 1.0
        for ax in self.axes:
            scale *= (n + ax.extra) / (num_tokens + ax.extra)
        return int(round(self.dense * scale))


@dataclass(frozen=True)
class FlopEstimate:
    """FLOPs of one forward: ``dense`` (every token), ``at_ratio`` (``n`` active tokens; the
    prologue not counted), ``once_per_prompt`` (the prologue), per category."""

    dense: int
    at_ratio: int
    once_per_prompt: int
    n: int
    N: int
    by_category: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def share(self) -> float:
        """``at_ratio / dense`` (1.0 for a graph without counted ops)."""
        return self.at_ratio / self.dense if self.dense else 1.0


class FlopModel:
    """The counted nodes of one capture (a ``PlannedCapture``).

    ``hoisted``: the step-invariant prologue of the graph variant that runs (its nodes count
    once per prompt); ``planned=False`` ignores the region plan (every node at full cost: the
    captured graph); ``names``: count only these nodes (explain's module / op filters).
    """

    def __init__(self, cc: Any, hoisted: Any = None, *, planned: bool = True,
                 names: Container[str] | None = None) -> None:
        self.num_tokens = int(cc.num_tokens)
        plan = cc.plan
        cached = {(s.producer, s.consumer) for s in plan.sites}
        once = {m.name for m in hoisted.prologue.graph.nodes if m.op == "call_function"} if hoisted else set()
        attention = _attention_ops()
        nodes: list[CostedNode] = []
        for node in cc.capture.graph_module.graph.nodes:
            if node.op != "call_function" or (names is not None and node.name not in names):
                continue
            dense = node_flops(node)
            category = cost_category(node.target)
            if not dense or category is None:
                continue
            axes: tuple[Axis, ...] = ()
            if planned and plan.mode.get(node.name) == "A":
                axes = first_output_axes(node)
                key = node.args[1] if node.target in attention and len(node.args) > 1 else None
                if isinstance(key, fx.Node) and plan.mode.get(key.name) == "A" and (key.name, node.name) not in cached:
                    axes += first_output_axes(key)  # keys computed on the active tokens only (kv_cache=False)
            nodes.append(CostedNode(node.name, category, dense, axes, node.name in once))
        self.nodes = nodes

    def estimate(self, n: int) -> FlopEstimate:
        """FLOPs of one forward with ``n`` active image tokens."""
        dense = at = once = 0
        by_category: dict[str, dict[str, int]] = {}
        for c in self.nodes:
            active = c.at(n, self.num_tokens)
            cat = by_category.setdefault(c.category, {"dense": 0, "at_ratio": 0})
            cat["dense"] += c.dense
            cat["at_ratio"] += active
            dense += c.dense
            at += active
            once += c.dense if c.once_per_prompt else 0
        return FlopEstimate(dense, at, once, n, self.num_tokens, by_category)

    def share(self, n: int) -> float:
        """Estimated share of the dense FLOPs of a forward with ``n`` active image tokens."""
        return self.estimate(n).share
