"""Exchange the fresh rows of the active tokens between the ranks of a context-parallel group.

Runs on the ``parallel_shared`` / ``parallel_rowwise`` variants only (``rasfx.ParallelConfig``,
docs/parallel.md), after ``insert_cache_sites``. The variant's ``ras_index`` input becomes the
*group plan* ``[R, s]`` (``[R, B, s]`` with per-row sets): row ``r`` lists the ``s`` image tokens
rank ``r`` computes, equal shares of the step's active set (of every token on a dense step).

* every use of the index reads this rank's share instead (``rasfx::cp_local_share``): gathers,
  resized shapes and sequence indices, hence the whole token-wise region, run on ``s`` tokens;
* each ``rasfx::ras_attention`` becomes ``rasfx::cp_attention``: the fresh keys/values of the
  image rows of every rank are all-gathered and written into every rank's caches, the rows of
  the conditioning tokens (computed identically by every rank) are written locally, and the
  rank's queries attend to the full caches;
* each ``rasfx::cache_write_`` (the output cache before unpatchify, any other token-mixing
  operand) becomes ``rasfx::cp_cache_write_``, the same exchange for one cache.

Invariants: after each exchange every rank's cache holds exactly what the one-process forward
with the whole active set writes (the same rows, computed by one rank each); cached rows of
inactive tokens are never sent; nodes other than the index uses and the cache ops are
unchanged, so the variant's caches are the ``shared`` / ``rowwise`` variant's. The ops find the
process group at run time (``rasfx.parallel.exchange``), so the graph is the same on every rank.
Counter: ``exchanged_sites`` (cache ops that exchange rows; an attention site counts once).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .. import ops
from ..errors import UnsupportedModelError
from ..parallel import exchange  # noqa: F401  (registers the rasfx::cp_* ops)
from .context import RewriteContext

_RAS_ATTENTION = ("q", "k", "v", "k_cache", "v_cache", "index", "attn_mask", "dropout_p", "is_causal", "scale",
                  "enable_gqa")


def exchange_active_rows(ctx: RewriteContext) -> int:
    if ctx.dense or ctx.index is None:
        return 0
    graph = ctx.gm.graph
    plan = ctx.index
    # the share is read by gathers of graph inputs, which sit among the placeholders until the
    # context's finalize moves them up: move them now and compute the share before anything else
    first = next(n for n in graph.nodes if n.op != "placeholder")
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        first.prepend(node)
    with graph.inserting_before(first):
        share = graph.call_function(torch.ops.rasfx.cp_local_share.default, (plan,))
    share.meta["rasfx_created_by"] = "exchange_active_rows"
    plan.replace_all_uses_with(share, delete_user_cb=lambda user: user is not share)
    exchanged = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.rasfx.ras_attention.default:
            a = dict(zip(_RAS_ATTENTION, node.args)) | dict(node.kwargs)
            before, after = _segments(a["index"], share, ctx.num_tokens, node)
            args = (a["q"], a["k"], a["v"], a["k_cache"], a["v_cache"], plan, before, after, a.get("attn_mask"),
                    a.get("dropout_p", 0.0), a.get("is_causal", False), a.get("scale"), a.get("enable_gqa", False))
            _replace(graph, node, torch.ops.rasfx.cp_attention.default, args)
            exchanged += 1
        elif node.target is torch.ops.rasfx.cache_write_.default:
            cache, x, index, dim = node.args
            before, after = _segments(index, share, ctx.num_tokens, node)
            kind = cache.meta["rasfx_cache"].kind
            _replace(graph, node, torch.ops.rasfx.cp_cache_write_.default, (cache, x, plan, dim, before, after, kind))
            exchanged += 1
    return exchanged


def _segments(index, share: fx.Node, num_tokens: int, node: fx.Node) -> tuple[int, int]:
    """Conditioning rows before and after the image segment of the op's token axis."""
    if index is share:
        return 0, 0
    if isinstance(index, fx.Node) and index.target is ops.sequence_index and index.args[0] is share:
        _, offset, num_image, total = index.args
        assert num_image == num_tokens
        return int(offset), int(total) - int(offset) - int(num_image)
    raise UnsupportedModelError(
        f"context parallelism: the cache op {node.name} is indexed by {index!r}, not by the active index or a "
        "sequence built from it; run this model without rasfx.ParallelConfig (please report the model)"
    )


def _replace(graph: fx.Graph, node: fx.Node, target, args: tuple) -> None:
    with graph.inserting_before(node):
        new = graph.call_function(target, args)
    new.meta.update(node.meta)
    new.meta["rasfx_created_by"] = "exchange_active_rows"
    node.replace_all_uses_with(new)
    graph.erase_node(node)
