"""The collective ops of a context-parallel graph variant, and the communicator they use.

``passes/exchange_active_rows.py`` puts three ops into the ``parallel_shared`` /
``parallel_rowwise`` variants; their graph input ``ras_index`` is then the *group plan*
``[R, s]`` (``[R, B, s]`` with per-row sets): row ``r`` holds the ``s`` image tokens rank ``r``
computes (:func:`rasfx.parallel.sharding.split_shares`).

* ``rasfx::cp_local_share(plan)``: this rank's share ``plan[rank]`` (what the token-wise region
  gathers and computes);
* ``rasfx::cp_cache_write_(cache, x, plan, dim, before, after, kind)``: ``x`` holds this rank's
  fresh rows along ``dim``: ``before`` conditioning rows, its ``s`` image rows, ``after``
  conditioning rows. The conditioning rows are computed by every rank (same values) and written
  locally; the image rows of every rank are all-gathered (``(R - 1) * s`` rows received) and
  written at the plan's positions. Afterwards every rank's cache holds what the one-process step
  writes. The output cache before unpatchify is this op: the output rows are gathered once;
* ``rasfx::cp_attention(q, k, v, k_cache, v_cache, plan, before, after, ...)``: the same
  exchange for keys and values (one collective for both), then this rank's queries attend to
  the full caches locally (``ParallelConfig(attention="rows")``: every rank holds the whole
  K/V cache);
* ``rasfx::cp_attention_heads(...)``: attention split by heads instead (``attention="heads"``,
  Ulysses-style): one all-to-all gives each rank the queries, keys and values of *every* rank's
  image rows for its ``H / R`` heads; its K/V cache holds those heads only (``1 / R`` of the
  memory); it attends with the queries of all active tokens (and of the conditioning tokens) on
  its heads, and a second all-to-all returns each rank's rows for all heads. The conditioning
  rows' outputs travel to every rank (their share of the bytes); their attention is not repeated
  on every rank.

The ops are ``torch.library`` custom ops (single nodes with fake kernels for ``torch.compile``);
they take no process group: they use the :class:`Communicator` the runtime sets around the graph
call (:func:`using`), so one graph serves every rank and survives a re-formed group.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import weakref
from collections import Counter
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..errors import ParallelError
from ..ops import _canonical_layout, attention_output_like, write_rows_

__all__ = ["Communicator", "using", "current"]

# all_gather_into_tensor is deprecated in favour of all_gather_single (torch >= 2.9)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


GROUP_DESTROYED = ("rasfx: the context-parallel process group was destroyed (torch.distributed.destroy_process_group); "
                   "after init_process_group again, call rasfx.enable(pipe, cfg, parallel=...) (or attach) again")


class Communicator:
    """What the collective ops need: rasfx's process group, this rank in it, and the bytes the
    ops received (by cache kind, counted when the op's Python runs: eager and compiled modes;
    a replayed CUDA graph does not run it, the runtime's ``ForwardRecord`` counts those).

    The group is held weakly (torch's registry owns it, see ``rasfx.parallel.runtime``); after
    ``destroy_process_group()`` the ops raise ``ParallelError``."""

    def __init__(self, group: Any, rank: int, world: int, timeout_s: float = 0.0, failure: Any = None) -> None:
        self.group = group
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.failure = failure  # () -> str: the failure another rank posted ('' if none)
        self.received: Counter = Counter()

    @property
    def group(self) -> Any:
        group = self._ref()
        if group is None:
            raise ParallelError(GROUP_DESTROYED)
        return group

    @group.setter
    def group(self, group: Any) -> None:
        self._ref = weakref.ref(group)


_CURRENT: contextvars.ContextVar[Optional[Communicator]] = contextvars.ContextVar("rasfx_parallel", default=None)


@contextlib.contextmanager
def using(comm: Communicator) -> Iterator[Communicator]:
    """Run the graph calls of the block with ``comm``."""
    token = _CURRENT.set(comm)
    try:
        yield comm
    finally:
        _CURRENT.reset(token)


def current() -> Communicator:
    comm = _CURRENT.get()
    if comm is None:
        raise ParallelError(
            "a context-parallel graph variant ran outside rasfx's parallel runtime: run it through a RASModule "
            "attached with rasfx.parallel.attach(...) or rasfx.enable(pipe, cfg, parallel=rasfx.ParallelConfig())"
        )
    return comm


def _plan_positions(plan: Tensor, offset: int) -> Tensor:
    """Positions of the gathered rows (rank-major): ``[R * s]``, or ``[B, R * s]`` per row."""
    if plan.dim() == 2:
        flat = plan.reshape(-1)
    else:
        flat = plan.permute(1, 0, 2).reshape(plan.shape[1], -1)
    return flat + offset if offset else flat


def _gather_rows(parts: list[Tensor], dim: int, kind: str) -> list[Tensor]:
    """All-gather the rows along ``dim`` of each tensor of ``parts`` (rank-major, one collective
    when they share shape and dtype); each result has ``R * s`` rows along ``dim`` (a view)."""
    comm = current()
    stackable = len(parts) > 1 and all(p.shape == parts[0].shape and p.dtype == parts[0].dtype for p in parts)
    groups = [parts] if stackable or len(parts) == 1 else [[p] for p in parts]
    out: list[Tensor] = []
    for group in groups:
        src = torch.stack([p.movedim(dim, 0) for p in group], 1).contiguous()  # [s, k, ...]
        dst = src.new_empty((comm.world * src.shape[0], *src.shape[1:]))
        try:
            _all_gather(dst, src, group=comm.group)
        except Exception as e:  # a timeout (another rank stopped) or a broken connection
            raise ParallelError(_collective_failure(comm, e)) from e
        comm.received[kind] += (comm.world - 1) * src.numel() * src.element_size()
        out += [dst.select(1, i).movedim(0, dim) for i in range(len(group))]
    return out


def _collective_failure(comm: Communicator, error: Exception) -> str:
    posted = ""
    try:
        posted = comm.failure() if comm.failure is not None else ""
    except Exception:  # the store itself is gone: say what we know
        posted = ""
    first = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    why = f"; {posted}" if posted else " (another rank stopped or failed; its own error says why)"
    return (f"rasfx: rank {comm.rank} of {comm.world}: a collective of the context-parallel group failed or timed out "
            f"after {comm.timeout_s:g} s{why}. Every rank raises; the next pipeline call forms the group again. "
            f"If a step legitimately takes longer (first step of a new resolution), raise "
            f"ParallelConfig(timeout_s=...). ({type(error).__name__}: {first})")


def _exchange(caches: list[Tensor], fresh: list[Tensor], plan: Tensor, dim: int, before: int, after: int,
              kind: str) -> None:
    """Write the conditioning rows of ``fresh`` locally and every rank's image rows everywhere."""
    s = plan.shape[-1]
    image = []
    for cache, x in zip(caches, fresh):
        if before:
            cache.narrow(dim, 0, before).copy_(x.narrow(dim, 0, before))
        if after:
            cache.narrow(dim, cache.shape[dim] - after, after).copy_(x.narrow(dim, before + s, after))
        image.append(x.narrow(dim, before, s))
    positions = _plan_positions(plan, before)
    for cache, rows in zip(caches, _gather_rows(image, dim, kind)):
        write_rows_(cache, rows, positions, dim)


def _all_to_all(chunks: list[Tensor], kind: str) -> list[Tensor]:
    """Send ``chunks[j]`` (equal sizes, one dtype) to rank ``j``; returns what each rank sent here."""
    comm = current()
    send = torch.stack([c.reshape(-1) for c in chunks]).contiguous()  # [R, m]
    recv = torch.empty_like(send)
    try:
        dist.all_to_all_single(recv, send, group=comm.group)
    except Exception as e:
        raise ParallelError(_collective_failure(comm, e)) from e
    comm.received[kind] += (comm.world - 1) * send[0].numel() * send.element_size()
    return list(recv.unbind(0))


def _head_slice(x: Tensor, rank: int, world: int) -> Tensor:
    h = x.shape[1] // world
    return x.narrow(1, rank * h, h)


@torch.library.custom_op("rasfx::cp_local_share", mutates_args=())
def cp_local_share(plan: Tensor) -> Tensor:
    """This rank's share of the group plan: ``plan[rank]``."""
    return plan[current().rank].clone()


@cp_local_share.register_fake
def _(plan):
    return plan.new_empty(plan.shape[1:])


@torch.library.custom_op("rasfx::cp_cache_write_", mutates_args=("cache",))
def cp_cache_write_(cache: Tensor, x: Tensor, plan: Tensor, dim: int, before: int, after: int, kind: str) -> None:
    """``rasfx::cache_write_`` across the group: every rank's fresh image rows land in every
    rank's ``cache``; the conditioning rows (computed by every rank) are written locally."""
    dim = dim % cache.dim()
    _exchange([cache], [x], plan, dim, before, after, kind)


@cp_cache_write_.register_fake
def _(cache, x, plan, dim, before, after, kind):
    return None


@torch.library.custom_op("rasfx::cp_attention", mutates_args=("k_cache", "v_cache"))
def cp_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    plan: Tensor,
    before: int,
    after: int,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``rasfx::ras_attention`` across the group: the fresh keys/values of every rank's image
    rows are exchanged (one all-gather), the conditioning rows written locally; this rank's
    queries attend to the full caches."""
    _exchange([k_cache, v_cache], [k, v], plan, k.dim() - 2, before, after, "attention")
    kwargs = {"enable_gqa": True} if enable_gqa else {}
    out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=attn_mask, dropout_p=dropout_p,
                                         is_causal=is_causal, scale=scale, **kwargs)
    return _canonical_layout(out)


@cp_attention.register_fake
def _(q, k, v, k_cache, v_cache, plan, before, after, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
      enable_gqa=False):
    return attention_output_like(q, v)


@torch.library.custom_op("rasfx::cp_attention_heads", mutates_args=("k_cache", "v_cache"))
def cp_attention_heads(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    plan: Tensor,
    before: int,
    after: int,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Cache-aware attention split by heads across the group. ``q``, ``k``, ``v``: ``[B, H, L, D]``
    rows of this rank (``before`` conditioning rows, its ``s`` image rows, ``after``); ``k_cache``,
    ``v_cache``: ``[B, H_kv / R, N + c, D]``, the heads of this rank (heads ``r * H / R ...``)."""
    comm = current()
    world, rank, s = comm.world, comm.rank, plan.shape[-1]
    c = before + after
    # 1. conditioning keys / values of this rank's heads: computed here already
    for cache, x in ((k_cache, k), (v_cache, v)):
        mine = _head_slice(x, rank, world)
        if before:
            cache.narrow(2, 0, before).copy_(mine.narrow(2, 0, before))
        if after:
            cache.narrow(2, cache.shape[2] - after, after).copy_(mine.narrow(2, before + s, after))
    # 2. image rows: rank j gets heads j of q, k, v of every rank's share
    parts = (q, k, v)
    shapes = [(x.shape[0], x.shape[1] // world, s, x.shape[3]) for x in parts]
    chunks = [torch.cat([_head_slice(x, j, world).narrow(2, before, s).reshape(-1) for x in parts])
              for j in range(world)]
    received = _all_to_all(chunks, "attention")
    sizes = [math.prod(shape) for shape in shapes]
    rows = [[piece.view(shape) for piece, shape in zip(r.split(sizes), shapes)] for r in received]  # [rank][q/k/v]
    q_img, k_img, v_img = (torch.cat([rows[i][p] for i in range(world)], dim=2) for p in range(3))
    positions = _plan_positions(plan, before)
    write_rows_(k_cache, k_img, positions, 2)
    write_rows_(v_cache, v_img, positions, 2)
    # 3. every active query (and the conditioning queries) on this rank's heads
    q_mine = _head_slice(q, rank, world)
    queries = torch.cat([q_mine.narrow(2, 0, before), q_img, q_mine.narrow(2, before + s, after)], dim=2)
    if enable_gqa:
        out = F.scaled_dot_product_attention(queries, k_cache, v_cache, scale=scale, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(queries, k_cache, v_cache, scale=scale)  # [B, H/R, c + R*s, Dv]
    # 4. back: rank j gets its rows of these heads, and the conditioning rows (every rank computes them on)
    cond = torch.cat([out.narrow(2, 0, before), out.narrow(2, before + world * s, after)], dim=2)
    back = _all_to_all([torch.cat([out.narrow(2, before + j * s, s).reshape(-1), cond.reshape(-1)])
                        for j in range(world)], "attention")
    b, h, _, dv = out.shape
    img_size = b * h * s * dv
    heads = [(r[:img_size].view(b, h, s, dv), r[img_size:].view(b, h, c, dv)) for r in back]
    img = torch.cat([x for x, _ in heads], dim=1)  # [B, H, s, Dv]
    cond_all = torch.cat([y for _, y in heads], dim=1)  # [B, H, c, Dv]
    result = torch.cat([cond_all.narrow(2, 0, before), img, cond_all.narrow(2, before, after)], dim=2)
    return _canonical_layout(result)


@cp_attention_heads.register_fake
def _(q, k, v, k_cache, v_cache, plan, before, after, scale=None, enable_gqa=False):
    return attention_output_like(q, v)
