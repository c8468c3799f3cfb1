"""``rasfx.ParallelConfig``: how one transformed model runs across the ranks of a process group."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError

__all__ = ["ParallelConfig", "BACKENDS", "ATTENTION"]

#: Process-group backends rasfx's own group may use (``None``: the default group's).
BACKENDS = ("gloo", "nccl")

#: How attention is shared: ``heads`` (all-to-all by heads, each rank caches ``1 / R`` of the
#: heads), ``rows`` (all-gather of the active keys/values, every rank caches every head), ``auto``
#: (``heads`` where a site allows it and keeps the byte bound, else ``rows``).
ATTENTION = ("auto", "heads", "rows")


@dataclass(frozen=True)
class ParallelConfig:
    """Context parallelism with region-adaptive sampling: every rank of the group holds the whole
    model and makes the same pipeline call (same latents, same seed); each forward computes an
    equal share of the tokens on each rank (docs/parallel.md).

    Attributes:
        timeout_s: seconds a collective of rasfx's process group may wait for the other ranks.
            A rank that raises stops taking part; the others raise ``rasfx.ParallelError`` when
            this expires instead of hanging, and the next pipeline call forms the group again.
            Keep it above the slowest step (the first step of a new resolution exports and
            compiles: minutes on a large model).
        join_timeout_s: seconds the rendezvous at the start of every pipeline run waits for the
            other ranks (it may wait for a rank still timing out in a collective of the last
            run). ``None``: ``2 * timeout_s + 30``.
        backend: backend of rasfx's process group, one of :data:`BACKENDS`; ``None`` (default):
            the default group's (``nccl`` under ``torchrun`` on GPUs, ``gloo`` on CPUs).
        ranks: global ranks that share the tokens (every other rank must not call the
            pipeline with this config); ``None`` (default): every rank of the default group.
        attention: how each cache-aware attention is shared, one of :data:`ATTENTION`.
            ``"heads"``: one all-to-all gives each rank the queries, keys and values of every
            active token for ``H / R`` heads, whose K/V cache it alone holds (``1 / R`` of the
            cache memory per rank; fewer bytes than ``rows`` from 3 ranks on); needs the heads
            divisible by ``R`` and no attention mask. ``"rows"``: the active keys/values are
            all-gathered and every rank holds the whole cache (any attention). ``"auto"``
            (default): ``heads`` where a site allows it and that keeps a RAS step's bytes within
            the active share of the dense step's at no more bytes than ``rows`` (no conditioning
            rows at the site, or 3 to 4 ranks; ``rasfx.passes.exchange_active_rows.
            auto_splits_by_heads``), ``rows`` elsewhere.
    """

    timeout_s: float = 600.0
    join_timeout_s: Optional[float] = None
    backend: Optional[str] = None
    ranks: Optional[tuple[int, ...]] = None
    attention: str = "auto"

    def __post_init__(self) -> None:
        for name in ("timeout_s", "join_timeout_s"):
            value = getattr(self, name)
            if value is None and name == "join_timeout_s":
                continue
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"ParallelConfig.{name} must be a positive number of seconds, got {value!r}")
        if self.attention not in ATTENTION:
            raise ConfigError(f"ParallelConfig.attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ConfigError(f"ParallelConfig.backend must be one of {BACKENDS} or None (the default group's), "
                              f"got {self.backend!r}")
        if self.ranks is not None:
            ranks = self.ranks
            if isinstance(ranks, (str, bytes)) or not isinstance(ranks, (tuple, list)) or not ranks or not all(
                    isinstance(r, numbers.Integral) and not isinstance(r, bool) and r >= 0 for r in ranks):
                raise ConfigError(f"ParallelConfig.ranks must be a non-empty tuple of global ranks (ints >= 0) or "
                                  f"None (every rank), got {ranks!r}")
            if len(set(ranks)) != len(ranks):
                raise ConfigError(f"ParallelConfig.ranks lists a rank twice: {tuple(ranks)}")
            object.__setattr__(self, "ranks", tuple(sorted(int(r) for r in ranks)))

    @property
    def rendezvous_timeout_s(self) -> float:
        """What the rendezvous at the start of a run waits (``join_timeout_s`` or its default)."""
        return float(self.join_timeout_s) if self.join_timeout_s is not None else 2.0 * self.timeout_s + 30.0
