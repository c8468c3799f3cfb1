"""What context parallelism did in one run: ``rasfx.stats(pipe).parallel``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["ForwardRecord", "ParallelStepStats", "ParallelStats", "step_stats"]


@dataclass
class ForwardRecord:
    """One forward on this rank: ``active`` image tokens (``n``, summed over batch rows with per-row
    sets), each rank computing ``share`` of them (``s``, with padding), ``contiguous`` the active
    tokens per rank had the sequence been cut into contiguous blocks (a device tensor until read),
    ``received``: bytes this rank received, by cache kind."""

    step: int
    dense: bool
    world: int
    active: int
    share: int
    contiguous: object
    received: dict


@dataclass(frozen=True)
class ParallelStepStats:
    """One denoising step across the group (its forwards summed, e.g. the two CFG branches).

    ``active_tokens``: image tokens computed by the group (every token on a dense step);
    ``tokens_per_rank``: rows each rank computed (equal on every rank, padding included);
    ``imbalance``: ``max / mean`` work per rank of rasfx's equal shares (1.0 = perfect);
    ``contiguous_imbalance``: the same for the same active tokens on contiguous blocks of the
    sequence (what sharding the sequence would give); ``bytes_per_rank``: bytes each rank
    received in the step's all-gathers, ``bytes_by_kind`` split by cache kind (``attention``: the
    keys/values of the active tokens; ``output``: the output rows, gathered once per forward)."""

    index: int
    kind: str
    world: int
    active_tokens: int
    tokens_per_rank: int
    imbalance: float
    contiguous_imbalance: float
    bytes_per_rank: int
    bytes_by_kind: dict


@dataclass
class ParallelStats:
    """Context parallelism in one run: the group (``world`` ranks; this process is ``rank``;
    ``backend``), ``regroups`` (times rasfx's process group was formed again after a failure,
    cumulative) and one :class:`ParallelStepStats` per step that ran the transformer."""

    world: int
    rank: int
    backend: str
    regroups: int = 0
    steps: list[ParallelStepStats] = field(default_factory=list)

    def _of(self, kind: str) -> list[ParallelStepStats]:
        return [s for s in self.steps if s.kind == kind]

    @property
    def max_imbalance(self) -> float:
        """Worst ``imbalance`` over the RAS steps (1.0 without RAS steps)."""
        return max((s.imbalance for s in self._of("ras")), default=1.0)

    @property
    def max_contiguous_imbalance(self) -> float:
        """Worst ``contiguous_imbalance`` over the RAS steps (the comparison)."""
        return max((s.contiguous_imbalance for s in self._of("ras")), default=1.0)

    @property
    def ras_bytes_per_step(self) -> Optional[float]:
        """Mean bytes per rank of a RAS step (None without RAS steps)."""
        ras = self._of("ras")
        return sum(s.bytes_per_rank for s in ras) / len(ras) if ras else None

    @property
    def dense_bytes_per_step(self) -> Optional[float]:
        """Mean bytes per rank of a dense step (dense context parallelism; None without one)."""
        dense = self._of("dense")
        return sum(s.bytes_per_rank for s in dense) / len(dense) if dense else None

    def summary(self) -> str:
        ras, dense = self.ras_bytes_per_step, self.dense_bytes_per_step
        lines = [f"context parallel: {self.world} ranks ({self.backend}), this is rank {self.rank}; RAS steps: "
                 f"imbalance {self.max_imbalance:.3f} (contiguous blocks of the sequence: "
                 f"{self.max_contiguous_imbalance:.3f}); received per rank and step: "
                 f"RAS {_mib(ras)}, dense {_mib(dense)}" + (f"; group formed again {self.regroups}x"
                                                            if self.regroups else "")]
        lines += [f"  step {s.index:3d}: {s.kind:5s} {s.tokens_per_rank:6d} tokens/rank of {s.active_tokens}, "
                  f"imbalance {s.imbalance:.3f} (contiguous {s.contiguous_imbalance:.3f}), "
                  f"{s.bytes_per_rank} B received" for s in self.steps]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _mib(x: Optional[float]) -> str:
    return "-" if x is None else f"{x / 2**20:.3f} MiB"


def step_stats(records: list[ForwardRecord]) -> list[ParallelStepStats]:
    """Per step (in order of the records), the forwards of that step summed."""
    by_step: dict[int, list[ForwardRecord]] = {}
    for r in records:
        by_step.setdefault(r.step, []).append(r)
    out = []
    for step, recs in by_step.items():
        world = recs[0].world
        active = sum(r.active for r in recs)
        share = sum(r.share for r in recs)
        counts = [0] * world
        for r in recs:
            for i, c in enumerate(r.contiguous.tolist() if hasattr(r.contiguous, "tolist") else r.contiguous):
                counts[i] += int(c)
        kinds: dict = {}
        for r in recs:
            for k, b in r.received.items():
                kinds[k] = kinds.get(k, 0) + int(b)
        mean = active / world if active else 0.0
        out.append(ParallelStepStats(
            index=step, kind="dense" if all(r.dense for r in recs) else "ras", world=world, active_tokens=active,
            tokens_per_rank=share, imbalance=share / mean if mean else 1.0,
            contiguous_imbalance=max(counts) / mean if mean else 1.0, bytes_per_rank=sum(kinds.values()),
            bytes_by_kind=kinds))
    return out
