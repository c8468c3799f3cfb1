"""Gather the active tokens where the active region begins.

Rewrites every edge ``F value -> A consumer`` of the plan into
``F value -> gather_tokens(value, index, dim, rank) -> A consumer``. One gather per
(value, consumer rank) is shared by all consumers. Positional tables and RoPE
frequencies are gathered the same way when they meet active tensors; sequences that
concatenate conditioning and image tokens are gathered with an index that keeps every
conditioning position. A gather reads its value after the in-place writes into it
that come before its first consumer (a sequence built by ``joint[i, a:b] = x[i]``).

Invariants: only edges listed in the plan change; the dense variant has no gathers.
Counter: ``gathers`` (gather nodes inserted).
"""

from __future__ import annotations

import torch

from .. import ops
from .context import RewriteContext
from .op_rules import INDEX_PUT_OPS, mutated_storages, storage_root
from .token_info import token_axes

aten = torch.ops.aten
INDEX_OPS = {aten.index.Tensor, *INDEX_PUT_OPS}


def insert_gathers(ctx: RewriteContext) -> int:
    if ctx.dense:
        return 0
    graph = ctx.gm.graph
    memo = {}
    order = {n: i for i, n in enumerate(graph.nodes)}
    writes = mutated_storages(graph)
    first_use: dict = {}  # gather key -> its earliest consumer
    for producer_name, consumer_name in ctx.plan.gathers:
        key = _key(ctx, producer_name, consumer_name)
        consumer = ctx.nodes[consumer_name]
        if key not in first_use or order[consumer] < order[first_use[key]]:
            first_use[key] = consumer
    for producer_name, consumer_name in ctx.plan.gathers:
        producer, consumer = ctx.nodes[producer_name], ctx.nodes[consumer_name]
        axis = token_axes(producer)[0]  # an attention mask's query axis (its key axis stays full)
        rank = gather_rank(consumer, producer)
        key = _key(ctx, producer_name, consumer_name)
        if key not in memo:
            index = ctx.token_index(axis, producer)
            before = order[first_use[key]]
            written = [w for w in writes.get(storage_root(producer), ()) if order[producer] < order[w] < before]
            # after the producer and its writes; a graph input's gather goes before its first consumer
            # (the index arithmetic follows the inputs)
            place = (graph.inserting_before(first_use[key]) if producer.op == "placeholder"
                     else graph.inserting_after(written[-1] if written else producer))
            with place:
                memo[key] = graph.call_function(ops.gather_tokens, (producer, index, axis.dim, rank))
            memo[key].meta["rasfx_created_by"] = "insert_gathers"
        consumer.replace_input_with(producer, memo[key])
    return len(memo)


def gather_rank(consumer, producer) -> int:
    """Rank of the frame the gathered value broadcasts in: the consumer's, but an embedding
    lookup's indices are one dim short of its output (Allegro's RoPE positions [1, N]), and an
    index (``table[idx]``, ``x[mask] = v``) lines up with the leading dims, in its own rank."""
    val = consumer.meta.get("val")
    if not hasattr(val, "dim"):
        return producer.meta["val"].dim()
    if consumer.target is aten.embedding.default and len(consumer.args) > 1 and consumer.args[1] is producer:
        return val.dim() - 1
    if consumer.target in INDEX_OPS and len(consumer.args) > 1 and producer in consumer.args[1]:
        return producer.meta["val"].dim()
    return val.dim()


def _key(ctx: RewriteContext, producer_name: str, consumer_name: str) -> tuple:
    """Gathers are shared per (value, consumer rank in the rowwise variant)."""
    rank = gather_rank(ctx.nodes[consumer_name], ctx.nodes[producer_name])
    return (producer_name, rank if ctx.variant == "rowwise" else 0)
