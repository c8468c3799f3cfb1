"""Turn every place that needs an active value at full length into a cache site.

For each site of the plan (``A`` value consumed where its token axis is contracted,
reduced, reshaped away, or by an opaque op or the graph output):
- attention (``scaled_dot_product_attention`` whose keys/values are active) becomes one
  ``rasfx::ras_attention`` node: fresh K/V rows written into per-site caches, queries
  attend to the full caches (the paper's K/V cache; keys/values as they enter attention,
  i.e. after q/k-norm and RoPE);
- any other site gets ``rasfx::cache_write_(cache, value, index, dim)`` and the consumer
  reads the full-length cache (fresh rows for active tokens, the most recent computed
  rows for the others). The output site before unpatchify is this case.

In the dense variant the same caches are filled completely and consumers read the fresh
values; where attention's K/V are a concatenation (a joint text + image sequence) read by the
attention alone, the concatenation writes into the cache (``cat.out``) and attention reads the
cache, which saves a full copy per operand. Invariants: every cache is a new graph input of the full shape; one cache per
(value, site kind); the consumer sees a tensor of exactly the captured full shape.
Counters: ``attention_sites``, ``cache_sites``, ``cat_into_cache``.
"""

from __future__ import annotations

from collections import Counter

import torch

from .context import RewriteContext

aten = torch.ops.aten


def insert_cache_sites(ctx: RewriteContext) -> Counter:
    graph = ctx.gm.graph
    counts: Counter = Counter()
    by_consumer: dict = {}
    for site in ctx.plan.sites:
        by_consumer.setdefault(site.consumer, []).append(site)
    generic_memo: dict = {}
    for consumer_name, sites in by_consumer.items():
        consumer = ctx.nodes[consumer_name]
        attn = [s for s in sites if s.kind == "attention"]
        if attn and _fusable(consumer, attn):
            writes = _attention_site(ctx, consumer, attn)
            if writes:
                counts["cat_into_cache"] += writes
            counts["attention_sites"] += 1
            sites = [s for s in sites if s.kind != "attention"]
        for site in sites:
            producer = ctx.nodes[site.producer]
            if site.producer not in generic_memo:
                cache = ctx.add_cache(site.kind, site.producer, site.consumer, site.shape, site.dtype,
                                      site.device, site.axis.dim, site.stride)
                index = None if ctx.dense else ctx.token_index(site.axis)
                with graph.inserting_after(producer):
                    write = graph.call_function(
                        torch.ops.rasfx.cache_write_.default, (cache, producer, index, site.axis.dim)
                    )
                write.meta["rasfx_created_by"] = "insert_cache_sites"
                # Consumers must run after the write: readers of the cache get it through
                # the write's position in the graph (fx keeps program order).
                generic_memo[site.producer] = (cache, write)
                counts["cache_sites"] += 1
            cache, _ = generic_memo[site.producer]
            if not ctx.dense:
                # The write sits right after the producer, hence before every consumer.
                consumer.replace_input_with(producer, cache)
    return counts


def _cat_into_cache(operand, cache_node) -> bool:
    """``operand`` is a ``cat`` read only by this attention, laid out like its cache."""
    spec = cache_node.meta["rasfx_cache"]
    val = operand.meta.get("val")
    return (
        operand.target is aten.cat.default
        and len(operand.users) == 1
        and isinstance(val, torch.Tensor)
        and val.is_contiguous()
        and (spec.stride is None or tuple(spec.stride) == tuple(val.stride()))
        and val.dtype == spec.dtype
        and all(isinstance(p, torch.fx.Node) and p.meta["val"].dtype == val.dtype for p in operand.args[0])
    )


def _fusable(node, sites) -> bool:
    """SDPA whose keys and values are both active values with a site here."""
    if node.target is not aten.scaled_dot_product_attention.default:
        return False
    producers = {s.producer for s in sites}
    return node.args[1].name in producers and node.args[2].name in producers


def _attention_site(ctx: RewriteContext, node, sites) -> None:
    graph = ctx.gm.graph
    args = list(node.args) + [None] * (8 - len(node.args))
    q, k, v, mask, dropout_p, is_causal = args[0], args[1], args[2], args[3], args[4], args[5]
    scale = node.kwargs.get("scale", args[6])
    enable_gqa = node.kwargs.get("enable_gqa", args[7] or False)
    mask = node.kwargs.get("attn_mask", mask)
    dropout_p = node.kwargs.get("dropout_p", 0.0 if dropout_p is None else dropout_p)
    is_causal = node.kwargs.get("is_causal", False if is_causal is None else is_causal)
    by_producer = {s.producer: s for s in sites}
    caches = []
    for operand in (k, v):
        site = by_producer[operand.name]
        caches.append(ctx.add_cache("attention", site.producer, site.consumer, site.shape, site.dtype,
                                    site.device, site.axis.dim, site.stride))
    axis = by_producer[k.name].axis
    index = None if ctx.dense else ctx.token_index(axis)
    with graph.inserting_before(node):
        if ctx.dense and all(_cat_into_cache(x, c) for x, c in zip((k, v), caches)):
            # Dense step of a joint attention (SD3: K = cat([image, text])): the concatenation
            # writes straight into the cache and attention reads the cache, instead of a cat
            # followed by a full copy into the cache.
            written = []
            for operand, cache in zip((k, v), caches):
                parts, dim = operand.args[0], operand.args[1] if len(operand.args) > 1 else 0
                written.append(graph.call_function(aten.cat.out, (parts, dim), {"out": cache}))
                written[-1].meta["val"] = operand.meta.get("val")
                written[-1].meta["rasfx_created_by"] = "insert_cache_sites"
            fused = graph.call_function(
                aten.scaled_dot_product_attention.default, (q, *written, mask, dropout_p, is_causal),
                {"scale": scale, "enable_gqa": enable_gqa} if enable_gqa else {"scale": scale},
            )
            writes = 2
        else:
            writes = 0
            fused = graph.call_function(
                torch.ops.rasfx.ras_attention.default,
                (q, k, v, caches[0], caches[1], index, mask, dropout_p, is_causal, scale, enable_gqa),
            )
    fused.meta.update(node.meta)
    fused.meta["rasfx_created_by"] = "insert_cache_sites"
    node.replace_all_uses_with(fused)
    graph.erase_node(node)
    ctx.nodes[node.name] = fused
    for operand in (k, v) if writes else ():
        if not operand.users:
            graph.erase_node(operand)
    return writes
