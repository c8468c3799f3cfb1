"""Resize the token-wise region: sizes baked for N tokens become sizes for n tokens.

Every int argument of an active node that the token analysis found to be ``a*N + b``
(view/reshape/expand sizes, slice bounds, split sizes) is replaced by a graph value
``a*n + b`` where ``n`` is read from the index's shape (a static int under
``torch.compile``; no device sync).

A ``squeeze`` of the token dim was a no-op at N tokens; it must stay one when n = 1, so
that dim is dropped from the squeeze.

Invariants: only ints of ``A`` nodes change; ints that do not vary with the resolution
stay literal. Counter: ``resized_args``.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from .context import RewriteContext
from .token_analysis import token_axes

aten = torch.ops.aten


def resize_token_shapes(ctx: RewriteContext) -> int:
    if ctx.dense:
        return 0
    count = 0
    for name, mode in ctx.plan.mode.items():
        if mode != "A":
            continue
        node = ctx.nodes[name]
        count += _keep_token_axis_in_squeeze(node)
        fits = node.meta.get("rasfx_ints") or {}
        if not fits:
            continue
        leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
        for pos, (a, b) in fits.items():
            leaves[pos] = ctx.active_size(a, b)
            count += 1
        node.args, node.kwargs = pytree.tree_unflatten(leaves, spec)
    return count


def _keep_token_axis_in_squeeze(node) -> int:
    if node.target not in (aten.squeeze.dim, aten.squeeze.dims):
        return 0
    src = node.args[0]
    rank = src.meta["val"].dim()
    token_dims = {a.dim for a in token_axes(src)}
    dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
    keep = [d for d in dims if d % rank not in token_dims]
    if len(keep) == len(dims):
        return 0
    node.target = aten.squeeze.dims
    node.args = (src, keep)
    return 1
