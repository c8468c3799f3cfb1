"""The token map of a capture: which image token produced each element of the model's output,
derived by running the graph tail after the output cache on a tensor of token ids."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .errors import UnsupportedModelError
from .passes.token_analysis import model_line
from .planned_capture import PlannedCapture

aten = torch.ops.aten


def derive_token_map(cc: PlannedCapture) -> torch.Tensor:
    """Run the graph tail after the output caches on tensors of token ids."""
    variant = cc.variant("shared")
    outs = [c for c in variant.caches if c.kind == "output"]
    if not outs:
        raise UnsupportedModelError("the model output does not come from image tokens; no token map")
    return _probe_tail(cc, variant, outs)


def _site_ids(cc: PlannedCapture, spec) -> torch.Tensor:
    """Token ids along the token axis of the output cache ``spec`` (-1: conditioning positions)."""
    shape = [1] * len(spec.shape)
    shape[spec.dim] = spec.shape[spec.dim]
    n_img = cc.num_tokens
    site = next(s for s in cc.plan.sites if s.producer == spec.producer)
    offsets = site.axis.offset if isinstance(site.axis.offset, tuple) else (site.axis.offset or 0,)
    if len(offsets) > 1 or site.axis.extra:  # image segment of a concatenated axis starts at its offset
        if len(offsets) > 1:
            raise UnsupportedModelError(f"token map: the output cache {spec.name} holds its image segment at another "
                                        "offset in each row")
        pos = torch.arange(spec.shape[spec.dim], dtype=torch.float64) - offsets[0]
        ids = torch.where((pos >= 0) & (pos < n_img), pos, torch.full_like(pos, -1.0))
    else:
        ids = torch.arange(spec.shape[spec.dim], dtype=torch.float64)
        ids = torch.where(ids < n_img, ids, torch.full_like(ids, -1.0))
    return ids.view(shape).expand(spec.shape).contiguous()


_TRANSPOSED_CONVS = (aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input)


def _unpatchify_ids(node: fx.Node, env: dict) -> torch.Tensor | None:
    """The ids after a transposed convolution whose kernel equals its stride (an unpatchify,
    ACE-Step's ``ConvTranspose1d``: token ``t`` of ``[B, D, N]`` makes positions ``t * p`` to
    ``t * p + p - 1`` of ``[B, C, N * p]``), from the ids of its input (the same in every
    channel: one token a position); None for any other node, or ids that differ by channel."""
    args: list[Any] = [*node.args, *[None] * 9]  # the ATen schema's tensors, int lists and flags
    if node.target in _TRANSPOSED_CONVS:
        stride, padding, out_padding, dilation = args[3], args[4], args[5], args[7]
    elif node.target is aten.convolution.default and args[6]:
        stride, padding, dilation, out_padding = args[3], args[4], args[5], args[7]
    else:
        return None
    x, weight = args[0], args[1]
    if x not in env or not isinstance(weight, fx.Node):
        return None
    ids, kernel = env[x], [int(k) for k in weight.meta["val"].shape[2:]]
    if (list(stride or [1]) != kernel or any(padding or []) or any(out_padding or [])
            or any(d != 1 for d in dilation or []) or not torch.equal(ids, ids[:, :1].expand_as(ids))):
        return None
    out = ids[:, :1]
    for d, k in enumerate(kernel):
        out = out.repeat_interleave(k, dim=2 + d)
    return out.expand(node.meta["val"].shape).contiguous()


def _probe_tail(cc: PlannedCapture, variant, outs: list) -> torch.Tensor:
    """Every output cache holds its token ids; the ops after them that read only such ids are
    run (a model whose tail joins several caches, Lumina 2's per-sample output rows stacked);
    an op that mixes ids with other values is left out, and an error only if the first output
    needs it."""
    graph = variant.gm.graph
    env: dict[fx.Node, Any] = {}
    for spec in outs:
        start = next(n for n in graph.nodes if n.op == "placeholder" and n.name == spec.name)
        env[start] = _site_ids(cc, spec)
    mixed: list[fx.Node] = []
    for node in graph.nodes:
        if node in env or node.op != "call_function":
            continue
        if not any(a in env for a in node.all_input_nodes):
            continue
        if node.target is torch.ops.rasfx.cache_write_.default:
            continue
        spread = _unpatchify_ids(node, env)
        if spread is not None:
            env[node] = spread
            continue
        if any(a not in env for a in node.all_input_nodes):
            mixed.append(node)
            continue
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
        ancestors, todo = set(), [node]
        while todo:
            n = todo.pop()
            if n not in ancestors:
                ancestors.add(n)
                todo.extend(n.all_input_nodes)
        mixed = [n for n in mixed if n in ancestors]
        if mixed:
            raise UnsupportedModelError(
                f"token map: after the output cache, {mixed[0].target} at {model_line(mixed[0])} combines the "
                "tokens' outputs with other values (as a conv over the unpatchified image, U-ViT's final_layer, "
                "mixes neighbouring tokens), so no output element is known to come from one token; the forwards "
                "run, but the sampler needs the token map (rasfx.enable runs such a model dense): end the model "
                "at unpatchify, or give PixelLayout.channels_first a token grid of the model's own patch layout")
        raise UnsupportedModelError("token map: the first output is not derived from the image tokens")
    result = env[node]
    if not torch.equal(result, result.round()):
        raise UnsupportedModelError("token map: the output tail is not a pure data movement")
    return result.round().to(torch.int64).to(outs[0].device)
