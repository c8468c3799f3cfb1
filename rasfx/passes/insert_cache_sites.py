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
values. Where an attention K/V operand is, up to views (view / reshape / transpose /
permute), a concatenation (a joint text + image sequence) or a projection (``linear`` with a
2-D or contiguous 3-D input) read by that attention alone, and the cache's layout is the
operand's, the producer writes straight into the cache (``cat.out``, ``addmm.out`` /
``mm.out``: the same kernel ``linear`` runs, so the values are bit-identical) and attention
reads the cache through the same views: no full copy per operand. Other operands are copied
(``cache_write_``). Invariants: every cache is a new graph input of the full shape; one cache
per (value, site kind); the consumer sees a tensor of exactly the captured full shape.
Counters: ``attention_sites``, ``cache_sites``, ``cat_into_cache``, ``linear_into_cache``.
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
            counts.update(_attention_site(ctx, consumer, attn))
            counts["attention_sites"] += 1
            sites = [s for s in sites if s.kind != "attention"]
        for site in sites:
            producer = ctx.nodes[site.producer]
            if site.producer not in generic_memo:
                cache = ctx.add_cache(site.kind, site.producer, site.consumer, site.shape, site.dtype,
                                      site.device, site.axis.dim, site.stride)
                index = None if ctx.dense else ctx.token_index(site.axis, producer)
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


# Ops that only re-view their first argument (undone by `_undo`).
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unflatten.int,
          aten.flatten.using_ints, aten.unsqueeze.default, aten.squeeze.dim, aten.transpose.int,
          aten.permute.default)


def _inverse(dims) -> list:
    inv = [0] * len(dims)
    for i, d in enumerate(dims):
        inv[d % len(dims)] = i
    return inv


def _into_cache(operand, cache_node, contiguous_attention: bool):
    """``(producer, views)`` when ``operand`` = views(producer), read only by this attention, with
    a producer that can write into the cache (``cat``, ``linear``) and a cache whose layout,
    seen back through the views, is the producer's contiguous layout; else None."""
    spec = cache_node.meta["rasfx_cache"]
    val = operand.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype != spec.dtype:
        return None
    views, node = [], operand
    while isinstance(node, torch.fx.Node) and node.target in _VIEWS and len(node.users) == 1:
        views.append(node)
        node = node.args[0]
    if not isinstance(node, torch.fx.Node) or len(node.users) != 1 or not _writable(node):
        return None
    # the layout the cache will have (CacheSpec.allocate)
    contiguous = spec.stride is None or (contiguous_attention and spec.kind == "attention")
    stride = torch.empty(spec.shape, device="meta").stride() if contiguous else spec.stride
    if tuple(stride) != tuple(val.stride()):
        return None
    try:  # undo the views on a meta tensor with the cache's layout
        t = torch.empty_strided(tuple(val.shape), tuple(stride), dtype=val.dtype, device="meta")
        for view in views:
            fn, args = _undo(view, t)
            t = fn(*args)
    except RuntimeError:  # a view that cannot be undone on this layout
        return None
    pval = node.meta["val"]
    if tuple(t.shape) != tuple(pval.shape) or not t.is_contiguous() or not pval.is_contiguous():
        return None
    return node, views[::-1]


def _writable(node) -> bool:
    """A producer with an ``out=`` form that computes exactly what it computes now."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return False
    if node.target is aten.cat.default:
        return all(isinstance(p, torch.fx.Node) and p.meta["val"].dtype == val.dtype for p in node.args[0])
    if node.target is aten.linear.default:
        x = node.args[0].meta.get("val")
        # aten::linear runs addmm / mm on the flattened rows exactly for these inputs
        return isinstance(x, torch.Tensor) and (x.dim() == 2 or (x.dim() == 3 and x.is_contiguous()))
    return False


def _write_into(graph, producer, views, cache) -> torch.fx.Node:
    """Nodes computing ``producer`` into ``cache`` (through the undone views); returns the
    producer's value re-viewed like the attention operand (a view of the cache)."""
    target = cache
    for view in reversed(views):
        target = _created(graph.call_function(*_undo(view, target)))
    if producer.target is aten.cat.default:
        parts, dim = producer.args[0], producer.args[1] if len(producer.args) > 1 else 0
        out = _created(graph.call_function(aten.cat.out, (parts, dim), {"out": target}))
    else:
        x, weight = producer.args[0], producer.args[1]
        bias = producer.args[2] if len(producer.args) > 2 else producer.kwargs.get("bias")
        k, n = x.meta["val"].shape[-1], producer.meta["val"].shape[-1]
        x2 = _created(graph.call_function(aten.view.default, (x, [-1, k]))) if x.meta["val"].dim() != 2 else x
        wt = _created(graph.call_function(aten.t.default, (weight,)))
        out2 = _created(graph.call_function(aten.view.default, (target, [-1, n])))
        if bias is None:
            mm = _created(graph.call_function(aten.mm.out, (x2, wt), {"out": out2}))
        else:
            mm = _created(graph.call_function(aten.addmm.out, (bias, x2, wt), {"out": out2}))
        out = _created(graph.call_function(aten.view.default, (mm, list(producer.meta["val"].shape))))
    out.meta.update({k: v for k, v in producer.meta.items() if k != "rasfx_created_by"})
    for view in views:  # the operand's views, now over the cache
        out = _created(graph.call_function(view.target, (out, *view.args[1:]), dict(view.kwargs)))
        out.meta.update({k: v for k, v in view.meta.items() if k != "rasfx_created_by"})
    return out


def _created(node):
    node.meta["rasfx_created_by"] = "insert_cache_sites"
    return node


def _undo(view, t) -> tuple:
    """(target, args) of the node undoing ``view`` on ``t``."""
    if view.target is aten.transpose.int:
        return aten.transpose.int, (t, view.args[1], view.args[2])
    if view.target is aten.permute.default:
        return aten.permute.default, (t, _inverse(view.args[1]))
    return aten.view.default, (t, list(view.args[0].meta["val"].shape))  # shape-only views


def _fusable(node, sites) -> bool:
    """SDPA whose keys and values are both active values with a site here."""
    if node.target is not aten.scaled_dot_product_attention.default:
        return False
    producers = {s.producer for s in sites}
    return node.args[1].name in producers and node.args[2].name in producers


def _attention_site(ctx: RewriteContext, node, sites) -> Counter:
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
    index = None if ctx.dense else ctx.token_index(axis, k)
    counts: Counter = Counter()
    replaced: list = []
    with graph.inserting_before(node):
        if ctx.dense:
            # Dense step: fill both caches, attend to the fresh values. A producer that can
            # write into its cache does so and attention reads the cache (no copy).
            operands = []
            for operand, cache in zip((k, v), caches):
                into = _into_cache(operand, cache, ctx.contiguous_attention)
                if into is None:
                    _created(graph.call_function(torch.ops.rasfx.cache_write_.default,
                                                 (cache, operand, None, by_producer[operand.name].axis.dim)))
                    operands.append(operand)
                    continue
                counts["cat_into_cache" if into[0].target is aten.cat.default else "linear_into_cache"] += 1
                operands.append(_write_into(graph, into[0], into[1], cache))
                replaced += [*into[1][::-1], into[0]]
            fused = graph.call_function(
                aten.scaled_dot_product_attention.default, (q, *operands, mask, dropout_p, is_causal),
                {"scale": scale, "enable_gqa": enable_gqa} if enable_gqa else {"scale": scale},
            )
        else:
            fused = graph.call_function(
                torch.ops.rasfx.ras_attention.default,
                (q, k, v, caches[0], caches[1], index, mask, dropout_p, is_causal, scale, enable_gqa),
            )
    fused.meta.update(node.meta)
    fused.meta["rasfx_created_by"] = "insert_cache_sites"
    node.replace_all_uses_with(fused)
    graph.erase_node(node)
    ctx.nodes[node.name] = fused
    for dead in replaced:  # outermost view first, the producer last
        if not dead.users:
            graph.erase_node(dead)
    return counts
