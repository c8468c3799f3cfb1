"""Lower the cache-aware nodes to ATen ops before ``torch.compile`` (compile modes only).

Rewrites, in a copy of a variant's graph:
- ``rasfx::ras_attention(q, k, v, k_cache, v_cache, index, ...)`` -> write ``k``/``v`` into
  the caches (``index_copy_`` for a shared index ``[n]``, ``scatter_`` for per-row indices
  ``[B, n]``, ``copy_`` when dense) followed by ``scaled_dot_product_attention(q, k_cache,
  v_cache, ...)`` (dense: SDPA reads the fresh ``k``/``v``);
- ``rasfx::cache_write_(cache, x, index, dim)`` -> the same in-place write.

Why: the custom ops are opaque to Inductor, so the fresh rows are first materialised by a
fused kernel and then copied into the cache by a separate index kernel. As plain in-place
writes into graph inputs, Inductor stores the rows straight from the kernel that produces
them (the norm / RoPE / transpose / text-image concatenation before attention) into the
cache: the paper's scatter-in-the-epilogue, done by the compiler, with no extra launch.

Invariants: same results as the custom ops (they run the same ATen calls eagerly); the
caches are mutated in place (graph inputs), before any reader; the fused nodes of the
Triton fusion pass are left alone. Counter: ``lowered``.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from ..ops import write_rows_

aten = torch.ops.aten


def _write(graph: fx.Graph, cache, x, index, dim: int) -> fx.Node:
    """In-place ``cache[..., index, ...] = x`` along ``dim``; returns the write node."""
    if index is None:
        node = graph.call_function(aten.copy_.default, (cache, x))
    else:
        node = graph.call_function(_rows_write_, (cache, x, index, dim))
    node.meta["rasfx_created_by"] = "lower_cache_ops"
    return node


def _rows_write_(cache: torch.Tensor, x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    # Traced by dynamo into index_copy_ / scatter_ (the custom ops' own semantics).
    write_rows_(cache, x, index, dim)
    return cache


def lower_cache_ops(gm: fx.GraphModule) -> Counter:
    counts: Counter = Counter()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.rasfx.ras_attention.default:
            names = ("q", "k", "v", "k_cache", "v_cache", "index", "attn_mask", "dropout_p", "is_causal",
                     "scale", "enable_gqa")
            defaults = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
            a = {**defaults, **dict(zip(names, node.args)), **node.kwargs}
            dim = a["k"].meta["val"].dim() - 2
            with graph.inserting_before(node):
                kc = _write(graph, a["k_cache"], a["k"], a["index"], dim)
                vc = _write(graph, a["v_cache"], a["v"], a["index"], dim)
                keys, values = (a["k"], a["v"]) if a["index"] is None else (kc, vc)
                kwargs = {"attn_mask": a["attn_mask"], "dropout_p": a["dropout_p"], "is_causal": a["is_causal"],
                          "scale": a["scale"]}
                if a["enable_gqa"]:
                    kwargs["enable_gqa"] = True
                sdpa = graph.call_function(aten.scaled_dot_product_attention.default, (a["q"], keys, values),
                                           kwargs)
            sdpa.meta.update(node.meta)
            sdpa.meta["rasfx_created_by"] = "lower_cache_ops"
            node.replace_all_uses_with(sdpa)
            graph.erase_node(node)
            counts["lowered"] += 1
        elif node.target is torch.ops.rasfx.cache_write_.default:
            cache, x, index, dim = node.args
            with graph.inserting_before(node):
                _write(graph, cache, x, index, dim)
            graph.erase_node(node)
            counts["lowered"] += 1
    graph.lint()
    gm.recompile()
    return counts
