"""The token map of a capture: which image token produced each element of the model's output,
derived by running the graph tail after the output cache on a tensor of token ids.

One approximation is made, and recorded: a convolution that keeps the spatial size after
unpatchify (U-ViT's 3x3 ``final_layer``) mixes neighbouring tokens' outputs; each of its output
positions is taken as the token at that position. Its note (op and model line) is kept in
``PlannedCapture.token_map_notes``; ``RASModule.token_map`` warns with it (``RASWarning``, once
per capture) and ``rasfx.explain`` / ``rasfx inspect`` list it among their notes."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .errors import RASWarning, UnsupportedModelError
from .passes.token_analysis import model_line
from .planned_capture import PlannedCapture

aten = torch.ops.aten


def token_map_of(cc: PlannedCapture) -> torch.Tensor:
    """The capture's token map, derived on first use; the notes of its approximations go to
    ``cc.token_map_notes`` and are warned once, when it is derived (by ``RASModule.token_map``
    or by ``rasfx.explain``, whichever comes first)."""
    if cc.token_map is None:
        cc.token_map, cc.token_map_notes = derive_token_map(cc)
        for note in cc.token_map_notes:
            warnings.warn(f"rasfx: {note}", RASWarning, stacklevel=3)
    return cc.token_map


def derive_token_map(cc: PlannedCapture) -> tuple[torch.Tensor, list[str]]:
    """Run the graph tail after the output caches on tensors of token ids: the map, and one
    note per approximation it makes (a convolution over neighbouring tokens' outputs)."""
    variant = cc.variant("shared")
    outs = [c for c in variant.caches if c.kind == "output"]
    if not outs:
        raise UnsupportedModelError("the model output does not come from image tokens; no token map")
    result, smoothed = _probe_tail(cc, variant, outs)
    notes = [f"token map: {n.target} at {model_line(n)} mixes neighbouring tokens' outputs (a pixel near a "
             "patch border also reads the next token's); each output position is taken as the token at that "
             "position" for n in smoothed]
    return result, notes


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


_CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
          aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding)


def _same_size_conv_ids(node: fx.Node, env: dict) -> tuple[torch.Tensor, bool] | None:
    """The ids after a non-transposed convolution that keeps the spatial size (stride 1,
    dilation 1, 'same' padding: a local smoothing of the unpatchified image, U-ViT's 3x3
    ``final_layer``), from ids of its input that are the same in every channel: each output
    position gets the token at that position, in every output channel. With whether that is an
    approximation (a kernel larger than 1 also reads the neighbouring tokens' outputs near a
    patch border; a 1x1 kernel is exact). None for any other node."""
    args: list[Any] = [*node.args, *[None] * 9]  # the ATen schema's tensors, int lists and flags
    if node.target not in _CONVS and not (node.target is aten.convolution.default and not args[6]):
        return None
    x, weight, bias, stride, dilation = args[0], args[1], args[2], args[3], args[5]
    if x not in env or not isinstance(weight, fx.Node) or weight in env or bias in env:
        return None
    ids, kernel, out_shape = env[x], weight.meta["val"].shape[2:], node.meta["val"].shape
    if (ids.dim() != len(out_shape) or ids.shape[2:] != out_shape[2:] or any(s != 1 for s in stride or [])
            or any(d != 1 for d in dilation or []) or not torch.equal(ids, ids[:, :1].expand_as(ids))):
        return None
    return ids[:, :1].expand(out_shape).contiguous(), any(k != 1 for k in kernel)


def _probe_tail(cc: PlannedCapture, variant, outs: list) -> tuple[torch.Tensor, list[fx.Node]]:
    """Every output cache holds its token ids; the ops after them that read only such ids are
    run (a model whose tail joins several caches, Lumina 2's per-sample output rows stacked);
    an op that mixes ids with other values is left out, and an error only if the first output
    needs it. A convolution that keeps the spatial size maps each position to its own token
    (``_same_size_conv_ids``); those of them on the first output's path that mix neighbours
    are returned with the map."""
    graph = variant.gm.graph
    env: dict[fx.Node, Any] = {}
    for spec in outs:
        start = next(n for n in graph.nodes if n.op == "placeholder" and n.name == spec.name)
        env[start] = _site_ids(cc, spec)
    mixed: list[fx.Node] = []
    smoothed: list[fx.Node] = []
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
        same = _same_size_conv_ids(node, env)
        if same is not None:
            env[node] = same[0]
            if same[1]:
                smoothed.append(node)
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
    ancestors, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in ancestors:
            ancestors.add(n)
            todo.extend(n.all_input_nodes)
    if node not in env:
        mixed = [n for n in mixed if n in ancestors]
        if mixed:
            raise UnsupportedModelError(
                f"token map: after the output cache, {mixed[0].target} at {model_line(mixed[0])} combines the "
                "tokens' outputs with other values (as a strided conv or a matmul over the positions does), so no "
                "output element is known to come from one token; the forwards run, but the sampler needs the "
                "token map (rasfx.enable runs such a model dense): end the model at unpatchify, or give "
                "PixelLayout.channels_first a token grid of the model's own patch layout")
        raise UnsupportedModelError("token map: the first output is not derived from the image tokens")
    result = env[node]
    if not torch.equal(result, result.round()):
        raise UnsupportedModelError("token map: the output tail is not a pure data movement")
    return result.round().to(torch.int64).to(outs[0].device), [n for n in smoothed if n in ancestors]
