"""Exchange the fresh rows of the active tokens between the ranks of a context-parallel group.

Runs on the ``parallel_shared`` / ``parallel_rowwise`` variants only (``rasfx.ParallelConfig``,
docs/parallel.md), after ``insert_cache_sites``; ``spec`` is ``"<R>:<attention>"`` (the group's
size and ``ParallelConfig.attention``). The variant's ``ras_index`` input becomes the *group
plan* ``[R, s]`` (``[R, B, s]`` with per-row sets): row ``r`` lists the ``s`` image tokens rank
``r`` computes, equal shares of the step's active set (of every token on a dense step).

* every use of the index reads this rank's share instead (``rasfx::cp_local_share``): gathers,
  resized shapes and sequence indices, hence the whole token-wise region, run on ``s`` tokens;
* each ``rasfx::ras_attention`` becomes ``rasfx::cp_attention`` (``attention="rows"``): the
  fresh keys/values of the image rows of every rank are all-gathered and written into every
  rank's caches, the rows of the conditioning tokens (computed identically by every rank) are
  written locally, and the rank's queries attend to the full caches; or, with ``"heads"`` (and
  ``"auto"`` where the site allows it: ``[B, H, L, D]`` operands of one dtype, ``H`` and the
  key/value heads divisible by ``R``, no mask, dropout or causal flag, queries laid out like the
  keys) and :func:`auto_splits_by_heads` prefers it (issue #21's byte bound),
  ``rasfx::cp_attention_heads``: an all-to-all by heads, the site's caches shrunk to the
  rank's ``H / R`` heads (their ``CacheSpec`` replaced);
* each ``rasfx::cache_write_`` (the output cache before unpatchify, any other token-mixing
  operand) becomes ``rasfx::cp_cache_write_``, the same exchange for one cache.

Invariants: after each exchange every rank's cache holds exactly what the one-process forward
with the whole active set writes (the same rows, computed by one rank each); cached rows of
inactive tokens are never sent; nodes other than the index uses and the cache ops are
unchanged, so the variant's caches are the ``shared`` / ``rowwise`` variant's but for the head-
sharded ones. The ops find the process group at run time (``rasfx.parallel.exchange``), so the
graph is the same on every rank. Counters: ``exchanged_sites`` (cache ops that exchange rows; an
attention site counts once), ``head_sharded_sites`` (attention sites split by heads).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch
import torch.fx as fx

from .. import ops
from ..errors import UnsupportedModelError
from ..parallel import exchange  # noqa: F401  (registers the rasfx::cp_* ops)
from .context import RewriteContext
from .token_analysis import token_axes

_RAS_ATTENTION = ("q", "k", "v", "k_cache", "v_cache", "index", "attn_mask", "dropout_p", "is_causal", "scale",
                  "enable_gqa")


def exchange_active_rows(ctx: RewriteContext, spec: str) -> Counter:
    counts: Counter = Counter()
    if ctx.dense or ctx.index is None:
        return counts
    world_text, _, attention = spec.partition(":")
    world = int(world_text)
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
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.rasfx.ras_attention.default:
            a = dict(zip(_RAS_ATTENTION, node.args)) | dict(node.kwargs)
            before, after = _segments(a["index"], share, ctx.num_tokens, node)
            by_heads = attention == "heads" or (attention == "auto" and auto_splits_by_heads(world, before + after))
            if by_heads and _splits_by_heads(a, world):
                for cache in (a["k_cache"], a["v_cache"]):
                    _shard_heads(ctx, cache, world)
                args = (a["q"], a["k"], a["v"], a["k_cache"], a["v_cache"], plan, before, after, a.get("scale"),
                        a.get("enable_gqa", False))
                _replace(graph, node, torch.ops.rasfx.cp_attention_heads.default, args)
                counts["head_sharded_sites"] += 1
            elif attention == "heads":
                raise UnsupportedModelError(
                    f"ParallelConfig(attention='heads'): the attention {node.name} cannot be split by heads across "
                    f"{world} ranks (heads not divisible by {world}, an attention mask, or another layout); use "
                    "attention='auto' (splits what it can, all-gathers the rest) or 'rows'")
            else:
                args = (a["q"], a["k"], a["v"], a["k_cache"], a["v_cache"], plan, before, after, a.get("attn_mask"),
                        a.get("dropout_p", 0.0), a.get("is_causal", False), a.get("scale"),
                        a.get("enable_gqa", False))
                _replace(graph, node, torch.ops.rasfx.cp_attention.default, args)
            counts["exchanged_sites"] += 1
        elif node.target is torch.ops.rasfx.cache_write_.default:
            cache, x, index, dim = node.args
            before, after = _segments(index, share, ctx.num_tokens, node)
            kind = cache.meta["rasfx_cache"].kind
            _replace(graph, node, torch.ops.rasfx.cp_cache_write_.default, (cache, x, plan, dim, before, after, kind))
            counts["exchanged_sites"] += 1
    return counts


def auto_splits_by_heads(world: int, conditioning: int) -> bool:
    """Whether ``attention="auto"`` splits a site with ``conditioning`` rows by heads on ``world``
    ranks. Per rank and site a step of ``s`` rows (``s_d`` on a dense step) receives, in units of
    one row of ``1 / R`` of the heads, ``(R - 1) (4 s + c)`` by heads (Q, K, V, outputs of the
    image rows, outputs of the ``c`` conditioning rows) and ``(R - 1) 2 R s`` by rows (K, V,
    every head, no conditioning row). Rows scale with the active share exactly. Heads keep a RAS
    step within ``(R s + c) / (R s_d + c)`` of the dense step (issue #21's bound) iff
    ``c (R - 4) (s_d - s) <= 0``, and on 2 ranks they send more than rows whenever ``c > 0``.
    So: by heads where the site has no conditioning rows (equal bytes on 2 ranks, fewer from 3,
    ``1 / R`` of the cache memory) or on 3 to 4 ranks; by rows elsewhere. ``attention="heads"``
    splits every site it can (the cache memory), ``"rows"`` none."""
    return conditioning == 0 or 3 <= world <= 4


def _splits_by_heads(a: dict, world: int) -> bool:
    """Whether a ``ras_attention`` site can run as ``cp_attention_heads`` on ``world`` ranks."""
    if a.get("attn_mask") is not None or a.get("dropout_p", 0.0) or a.get("is_causal", False):
        return False
    vals = [a[x].meta.get("val") for x in ("q", "k", "v")]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in vals) or len({t.dtype for t in vals}) != 1:
        return False
    q, k, v = vals
    if q.shape[1] % world or k.shape[1] % world or v.shape[1] != k.shape[1]:
        return False
    axes = [token_axes(a[x]) for x in ("q", "k")]
    return all(len(ax) == 1 and ax[0].dim == 2 for ax in axes) and axes[0][0] == axes[1][0]


def _shard_heads(ctx: RewriteContext, cache: fx.Node, world: int) -> None:
    """The cache holds ``1 / world`` of the heads (dim 1), contiguous."""
    spec = cache.meta["rasfx_cache"]
    shape = list(spec.shape)
    shape[1] //= world
    sharded = dataclasses.replace(spec, shape=tuple(shape), stride=None)
    ctx.caches[ctx.caches.index(spec)] = sharded
    cache.meta["rasfx_cache"] = sharded


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
