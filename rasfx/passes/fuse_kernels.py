"""Fuse gathers and cache writes into the neighbouring projections (Triton GeMMs).

Rewrites, in an active-token variant:
- ``y = linear(x, W, b); cache_write_(cache, y, index, 1)`` where the cache is the only
  reader of ``y`` -> ``linear_scatter_(cache, x, index, W, b)``: the projection's rows
  land in the cache from the GeMM epilogue (the output site before unpatchify, and any
  cached projection);
- ``g = gather_tokens(x, index, 1, rank); linear(g, W, b)`` -> ``gather_linear(x, index,
  W, b)``: the GeMM reads the active rows in place; ``g`` stays for other readers.

Only 3-D ``[B, tokens, features]`` operands with the token axis in dim 1 qualify, and only
projections big enough to matter (``min_features``); everything else keeps the unfused
path. Attention K/V sites are not fused: their cache holds keys after q/k-norm, RoPE and
the head split, which a plain projection epilogue cannot produce.

Invariants: results equal the unfused graph up to GeMM rounding; the graph stays
``torch.compile``-able (the fused ops are registered custom ops with fake kernels).
Counters: ``fused_scatter``, ``fused_gather``.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from .. import ops

aten = torch.ops.aten


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _linear_parts(node: fx.Node):
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return x, w, b


def _big(w: fx.Node, min_features: int) -> bool:
    val = _val(w)
    return val is not None and val.dim() == 2 and min(val.shape) >= min_features


def fuse_kernels(gm: fx.GraphModule, min_features: int = 256) -> Counter:
    counts: Counter = Counter()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.rasfx.cache_write_.default:
            cache, y, index, dim = node.args
            if (index is None or dim != 1 or not isinstance(y, fx.Node) or y.target is not aten.linear.default
                    or len(y.users) != 1):
                continue
            x, w, b = _linear_parts(y)
            if _val(x) is None or _val(x).dim() != 3 or _val(cache) is None and cache.op != "placeholder":
                continue
            if not _big(w, min_features):
                continue
            with graph.inserting_before(node):
                fused = graph.call_function(torch.ops.rasfx.linear_scatter_.default, (cache, x, index, w, b))
            fused.meta["rasfx_created_by"] = "fuse_kernels"
            graph.erase_node(node)
            graph.erase_node(y)
            counts["fused_scatter"] += 1
        elif node.target is ops.gather_tokens:
            x, index, dim, rank = node.args
            xv = _val(x)
            if dim != 1 or xv is None or xv.dim() != 3 or rank != 3:
                continue
            for user in list(node.users):
                if user.target is not aten.linear.default or user.args[0] is not node:
                    continue
                _, w, b = _linear_parts(user)
                if not _big(w, min_features):
                    continue
                with graph.inserting_before(user):
                    fused = graph.call_function(torch.ops.rasfx.gather_linear.default, (x, index, w, b))
                fused.meta.update(user.meta)
                fused.meta["rasfx_created_by"] = "fuse_kernels"
                user.replace_all_uses_with(fused)
                graph.erase_node(user)
                counts["fused_gather"] += 1
            if not node.users:
                graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return counts
