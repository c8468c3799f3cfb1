"""The token map of a capture: which image token produced each element of the model's output,
derived by running the graph tail after the output cache on a tensor of token ids."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .errors import UnsupportedModelError
from .planned_capture import PlannedCapture

aten = torch.ops.aten


def derive_token_map(cc: PlannedCapture) -> torch.Tensor:
    """Run the graph tail after the output cache on a tensor of token ids."""
    variant = cc.variant("shared")
    outs = [c for c in variant.caches if c.kind == "output"]
    if not outs:
        raise UnsupportedModelError("the model output does not come from image tokens; no token map")
    errors = []
    for spec in outs:  # the output site that feeds the first output
        try:
            return _probe_tail(cc, variant, spec)
        except (RuntimeError, UnsupportedModelError) as e:
            errors.append(str(e))
    raise UnsupportedModelError("; ".join(errors))


def _probe_tail(cc: PlannedCapture, variant, spec) -> torch.Tensor:
    graph = variant.gm.graph
    start = next(n for n in graph.nodes if n.op == "placeholder" and n.name == spec.name)
    tail: dict[fx.Node, Any] = {}
    shape = [1] * len(spec.shape)
    shape[spec.dim] = spec.shape[spec.dim]
    n_img = cc.num_tokens
    ids = torch.arange(spec.shape[spec.dim], dtype=torch.float64)
    ids = torch.where(ids < n_img, ids, torch.full_like(ids, -1.0))  # conditioning positions -> -1
    # image segment of a concatenated output axis starts at its offset
    site = next(s for s in cc.plan.sites if s.producer == spec.producer)
    if site.axis.extra:
        pos = torch.arange(spec.shape[spec.dim], dtype=torch.float64) - site.axis.offset
        ids = torch.where((pos >= 0) & (pos < n_img), pos, torch.full_like(pos, -1.0))
    tail[start] = ids.view(shape).expand(spec.shape).contiguous()
    env = tail
    for node in graph.nodes:
        if node in env or node.op != "call_function":
            continue
        if not any(a in env for a in node.all_input_nodes):
            continue
        if node.target is torch.ops.rasfx.cache_write_.default:
            continue
        if any(a not in env for a in node.all_input_nodes):
            raise UnsupportedModelError(f"token map: the output tail mixes in {node.name}; cannot derive the token map")
        args, kwargs = pytree.tree_map_only(fx.Node, lambda a: env[a], (node.args, node.kwargs))
        if node.target in (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout):
            env[node] = args[0]
            continue
        env[node] = node.target(*args, **kwargs)
    output = next(n for n in graph.nodes if n.op == "output")
    flat = pytree.tree_leaves(output.args[0])
    first = cc.capture.user_output_positions[0]
    node = flat[first]
    if node not in env:
        raise UnsupportedModelError("token map: the first output is not derived from the image tokens")
    result = env[node]
    if not torch.equal(result, result.round()):
        raise UnsupportedModelError("token map: the output tail is not a pure data movement")
    return result.round().to(torch.int64).to(spec.device)
