"""Resize the token-wise region: sizes baked for N tokens become sizes for n tokens.

Every int argument of an active node that the token analysis found to be ``a*N + b``
(view/reshape/expand sizes, slice bounds, split sizes) is replaced by a graph value
``a*n + b`` where ``n`` is read from the index's shape (a static int under
``torch.compile``; no device sync).

Invariants: only ints of ``A`` nodes change; ints that do not vary with the resolution
stay literal. Counter: ``resized_args``.
"""

from __future__ import annotations

import torch.utils._pytree as pytree

from .context import RewriteContext


def resize_token_shapes(ctx: RewriteContext) -> int:
    if ctx.dense:
        return 0
    count = 0
    for name, mode in ctx.plan.mode.items():
        if mode != "A":
            continue
        node = ctx.nodes[name]
        fits = node.meta.get("rasfx_ints") or {}
        if not fits:
            continue
        leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
        for pos, (a, b) in fits.items():
            leaves[pos] = ctx.active_size(a, b)
            count += 1
        node.args, node.kwargs = pytree.tree_unflatten(leaves, spec)
    return count
