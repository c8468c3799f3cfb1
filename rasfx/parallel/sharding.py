"""How the tokens of one forward are shared among the ranks, and what that costs (pure torch).

Every rank derives the same active set (same latents, same selection), so the shares need no
communication: :func:`split_shares` cuts the position-ordered active list into ``R`` contiguous
pieces whose sizes differ by at most one, and pads each to ``s = ceil(n / R)`` with repeats of
its own last token (a repeated token is computed twice by one rank, from the same inputs, and
written twice with the same value). A dense step shares every token the same way: dense context
parallelism. The work of a rank is ``s`` rows, so the imbalance ``max / mean`` is
``R * s / n <= 1 + (R - 1) / n``: 1.0 when ``R`` divides ``n``, at most 1.02 from ``n >= 50 (R - 1)``.

:func:`contiguous_counts` is the comparison the docs report: how many of the same active tokens
fall into each rank's contiguous block of the sequence, which is what sharding the sequence
(diffusers' Ulysses / ring context parallelism) gives a rank to compute. The active tokens cluster
on the subject, so those counts are far from equal.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["share_size", "share_table", "split_shares", "contiguous_counts"]


def share_size(n: int, world: int) -> int:
    """Rows each rank computes for ``n`` active tokens: ``ceil(n / world)``."""
    return -(-n // world)


@functools.lru_cache(maxsize=256)
def share_table(n: int, world: int) -> tuple[tuple[int, ...], ...]:
    """Per rank, the positions in the active list it computes (``s`` each). Rank ``r`` takes the
    ``r``-th contiguous piece (the first ``n mod R`` pieces are one longer), padded with its own
    last position; a rank without any (``n < R``) repeats the list's last token."""
    q, rem = divmod(n, world)
    s = share_size(n, world)
    table = []
    start = 0
    for r in range(world):
        count = q + (r < rem)
        own = list(range(start, start + count)) or [n - 1]
        table.append(tuple(own + [own[-1]] * (s - len(own))))
        start += count
    return tuple(table)


def split_shares(index: Tensor, world: int) -> Tensor:
    """The group plan of an active index: ``[n] -> [R, s]``, ``[B, n] -> [R, B, s]`` (per batch
    row, each row cut the same way). No device synchronisation: the cut depends on ``n`` only."""
    table = _table_on(index.shape[-1], world, index.device)  # [R, s]
    if index.dim() == 1:
        return index[table]
    return index[:, table].permute(1, 0, 2).contiguous()


@functools.lru_cache(maxsize=64)
def _table_on(n: int, world: int, device: torch.device) -> Tensor:
    """:func:`share_table` as a tensor on ``device``, made once (no host-to-device copy per forward)."""
    return torch.tensor(share_table(n, world), dtype=torch.long, device=device)


def contiguous_counts(index: Tensor, num_tokens: int, world: int) -> Tensor:
    """Active tokens in each rank's contiguous block of the ``num_tokens`` positions (the blocks
    a dense step shares), summed over batch rows: ``[R]`` on ``index``'s device."""
    q, rem = divmod(num_tokens, world)
    bounds = torch.tensor([r * q + min(r, rem) for r in range(1, world)], dtype=index.dtype, device=index.device)
    owner = torch.bucketize(index.reshape(-1), bounds, right=True)
    return torch.bincount(owner, minlength=world)
