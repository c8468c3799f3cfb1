"""Gather the active tokens where the active region begins.

Rewrites every edge ``F value -> A consumer`` of the plan into
``F value -> gather_tokens(value, index, dim, rank) -> A consumer``. One gather per
(value, consumer rank) is shared by all consumers. Positional tables and RoPE
frequencies are gathered the same way when they meet active tensors; sequences that
concatenate conditioning and image tokens are gathered with an index that keeps every
conditioning position.

Invariants: only edges listed in the plan change; the dense variant has no gathers.
Counter: ``gathers`` (gather nodes inserted).
"""

from __future__ import annotations

from .. import ops
from .context import RewriteContext
from .token_analysis import ROWS, token_axes


def insert_gathers(ctx: RewriteContext) -> int:
    if ctx.dense:
        return 0
    graph = ctx.gm.graph
    memo = {}
    for producer_name, consumer_name in ctx.plan.gathers:
        producer, consumer = ctx.nodes[producer_name], ctx.nodes[consumer_name]
        axis = token_axes(producer)[0]  # an attention mask's query axis (its key axis stays full)
        val = consumer.meta.get("val")
        rank = val.dim() if hasattr(val, "dim") else producer.meta["val"].dim()
        key = (producer_name, rank if ctx.variant == "rowwise" else 0)
        if key not in memo:
            index = ctx.token_index(axis, producer.meta.get(ROWS))
            with graph.inserting_after(producer):
                memo[key] = graph.call_function(ops.gather_tokens, (producer, index, axis.dim, rank))
            memo[key].meta["rasfx_created_by"] = "insert_gathers"
        consumer.replace_input_with(producer, memo[key])
    return len(memo)
