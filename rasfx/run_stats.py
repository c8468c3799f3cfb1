"""What happened in one RAS run (heatmaps of it: :mod:`rasfx.heatmaps`).

:class:`RunStats` is filled by :mod:`rasfx.pipeline` (``rasfx.stats(pipe)``); it holds plain CPU
tensors and Python numbers, so it stays valid after the pipeline is disabled or runs again.

FLOPs estimate: a RAS step's ``flops_fraction`` is the transformed graph's own estimate at the
step's active token count, the numbers ``rasfx inspect`` prints (:mod:`rasfx.flops`: matrix
products, attention and convolutions from the captured shapes). What the region plan runs at
full length (the patch embedding's convolution, conservative ops, attention over the cached
keys, conditioning tokens) counts in full, so the share is above the token share ``active / N``;
the step-invariant prologue counts once per prompt. A dense step counts 1. A custom transform
(``rasfx.enable(..., transform=...)``) has no graph: its steps count the token share
(``RunStats.flops_source``).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .errors import UsageError

__all__ = ["StepStats", "RunStats", "ran_modes", "step_flops_share"]


@dataclass(frozen=True)
class StepStats:
    """One denoising step.

    ``dense``: the step's forwards computed every image token. ``active_tokens``: image tokens
    computed (``num_tokens`` on dense steps). ``flops_fraction``: estimated share of the dense
    transformer FLOPs (see the module doc). ``wall_time_s``: from the step's
    first transformer call to the end of ``scheduler.step`` (CUDA events on GPU, so no step
    synchronises; ``perf_counter`` on CPU). ``kind``: what the step did, ``"dense"``, ``"ras"`` or
    ``"skip"`` (step sparsity: the scheduler integrated an estimated noise; a skip that did not call
    the transformer has ``active_tokens == 0``); derived from ``dense`` when not given.
    """

    index: int
    dense: bool
    active_tokens: int
    num_tokens: int
    flops_fraction: float
    wall_time_s: float
    kind: str = ""

    def __post_init__(self) -> None:
        if not self.kind:
            object.__setattr__(self, "kind", "dense" if self.dense else "ras")


@dataclass
class RunStats:
    """Stats of the last run of a RAS-enabled pipeline.

    ``computed_steps`` (``[R, N]``, int): per latent row and image token, how many steps computed
    that token (paper Figure 10). ``noise_std`` (``[R, N]``, float): per token, mean over its latent
    pixels of the channel std of the last step's noise prediction (Figure 11).
    ``longest_inactive_streak``: the longest run of consecutive steps any token stayed inactive.
    ``token_grid``: the image token of every latent pixel on the latent grid (``[H, W]`` or
    ``[F, H, W]``), ``None`` when the grid is unknown; ``pixel_scale``: image pixels per latent
    pixel (the VAE's spatial factor).

    ``mode``: the execution mode rasfx's graphs ran in (``eager``, ``cuda_graph``, ``compile``,
    ``compile+cuda_graph``; several, comma-separated, when graphs ran in different modes;
    ``TransformConfig(mode="auto")`` resolves to CUDA graphs for CUDA tensors). ``modes``: the
    mode of each graph that ran (``"dense"``, ``"shared [64]"``: variant and active index
    shape; ``"original forward"``: steps that ran the model's own forward); a graph that did
    not run in the mode asked for (a failed CUDA-graph capture, CUDA graphs asked for on CPU
    tensors) is named in ``notes``, and rasfx warned (``RASWarning``) when it happened.
    ``flops_source``: ``"graph"`` (the FLOP model, see the module doc) or ``"token share"``. ``work``: what rasfx built during this run (``exports``, ``graph_captures``,
    ``compiles`` and their seconds ``export_s``, ``passes_s``, ``graph_capture_s``,
    ``compile_s``): all zero on an image whose input signature was seen before.
    ``run_time_s``: the denoising loop (first transformer call to the end of the last scheduler
    step; 0 while the run is in progress); ``transformer_time_s``: the transformer calls in it.
    ``parallel``: with context parallelism (``rasfx.enable(..., parallel=rasfx.ParallelConfig())``)
    a ``rasfx.parallel.ParallelStats``: per step the tokens per rank, the imbalance (and what
    contiguous sharding of the same active set would give) and the bytes received; else None.
    """

    config: Any
    num_steps: int
    num_tokens: int
    steps: list[StepStats] = field(default_factory=list)
    computed_steps: Optional[torch.Tensor] = None
    noise_std: Optional[torch.Tensor] = None
    longest_inactive_streak: int = 0
    token_grid: Optional[torch.Tensor] = None
    pixel_scale: int = 1
    notes: list[str] = field(default_factory=list)
    mode: str = ""
    modes: dict[str, str] = field(default_factory=dict)
    flops_source: str = "graph"
    work: dict = field(default_factory=dict)
    run_time_s: float = 0.0
    transformer_time_s: float = 0.0
    parallel: Any = None

    @property
    def exports(self) -> int:
        """Captures of the model with torch.export during this run (0 on a warm image)."""
        return int(self.work.get("exports", 0))

    @property
    def graph_captures(self) -> int:
        """CUDA graphs captured during this run (0 on a warm image)."""
        return int(self.work.get("graph_captures", 0))

    @property
    def compiles(self) -> int:
        """Shapes compiled by torch.compile during this run (0 on a warm image)."""
        return int(self.work.get("compiles", 0))

    @property
    def dense_steps(self) -> list[int]:
        return [s.index for s in self.steps if s.kind == "dense"]

    @property
    def ras_steps(self) -> list[int]:
        return [s.index for s in self.steps if s.kind == "ras"]

    @property
    def skipped_steps(self) -> list[int]:
        """Steps that integrated an estimated noise instead of the computed one (step sparsity)."""
        return [s.index for s in self.steps if s.kind == "skip"]

    @property
    def flops_fraction(self) -> float:
        """Estimated share of the dense run's transformer FLOPs over the recorded steps."""
        if not self.steps:
            return 1.0
        return sum(s.flops_fraction for s in self.steps) / len(self.steps)

    @property
    def ras_ratio(self) -> float:
        """Mean active token share over the RAS steps (1.0 without RAS steps)."""
        ras = [s for s in self.steps if s.kind == "ras"]
        if not ras:
            return 1.0
        return sum(s.active_tokens / s.num_tokens for s in ras) / len(ras)

    @property
    def wall_time_s(self) -> float:
        return sum(s.wall_time_s for s in self.steps)

    def token_values(self, which: str = "computed", row: int = 0) -> torch.Tensor:
        """``[N]`` per-token values of ``which`` in ``{"computed", "std"}`` for latent row ``row``."""
        if which == "computed":
            values = self.computed_steps
        elif which == "std":
            values = self.noise_std
        else:
            raise UsageError(f"which must be 'computed' or 'std', got {which!r}")
        if values is None:
            raise UsageError(f"this run recorded no per-token {which!r} values (see RunStats.notes)")
        return values[row].to(torch.float32)

    def grid_map(self, which: str = "computed", row: int = 0) -> torch.Tensor:
        """Per-token values laid out on the latent grid (``[H, W]`` or ``[F, H, W]``).

        Without a known grid, tokens are laid out row-major on the most square ``h x w``
        factorisation of ``N``.
        """
        values = self.token_values(which, row)
        if self.token_grid is not None:
            return values[self.token_grid.to(torch.long)]
        n = values.numel()
        h = int(math.isqrt(n))
        while n % h:
            h -= 1
        return values.reshape(h, n // h)

    def summary(self) -> str:
        lines = [
            f"{self.num_steps} steps, {self.num_tokens} image tokens: {len(self.ras_steps)} RAS steps "
            f"(mean active share {self.ras_ratio:.3f}), dense steps {self.dense_steps}",
            f"estimated transformer FLOPs {self.flops_fraction:.3f} of dense ({self.flops_source}), "
            f"wall time {self.wall_time_s:.3f} s, longest inactive streak {self.longest_inactive_streak} steps",
            f"mode {self.mode or '?'}{self._modes_detail()}; built in this run: {self.exports} exports, "
            f"{self.graph_captures} CUDA graphs, {self.compiles} compiled shapes ({build_seconds(self.work):.2f} s)",
        ]
        if self.run_time_s:
            lines.append(f"denoising loop {self.run_time_s:.3f} s: transformer {self.transformer_time_s:.3f} s, "
                         f"rest of the pipeline {self.run_time_s - self.transformer_time_s:.3f} s")
        lines += [
            f"  step {s.index:3d}: {'dense' if s.kind == 'dense' else 'skip ' if s.kind == 'skip' else 'RAS  '} {s.active_tokens:6d}/{s.num_tokens} "
            f"tokens, ~{s.flops_fraction:.3f} FLOPs, {1e3 * s.wall_time_s:8.2f} ms"
            for s in self.steps
        ]
        if self.parallel is not None:
            lines.append(self.parallel.summary())
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _modes_detail(self) -> str:
        """`` (dense: eager, shared [6]: cuda_graph)`` when the graphs ran in different modes."""
        if len(set(self.modes.values())) < 2:
            return ""
        return " (" + ", ".join(f"{graph}: {mode}" for graph, mode in self.modes.items()) + ")"

    def __str__(self) -> str:
        return self.summary()


def build_seconds(work: dict) -> float:
    """Seconds rasfx spent building (exports, passes, CUDA-graph captures, compilation) in ``work``
    (``RunStats.work``); a compilation during a CUDA-graph capture is counted once."""
    return sum(float(work.get(k, 0.0)) for k in ("export_s", "passes_s", "graph_capture_s")) + (
        0.0 if work.get("graph_captures") else float(work.get("compile_s", 0.0)))


def step_flops_share(capture: Any, num_tokens: int) -> Callable[[int], float]:
    """``share(active)``: the estimated share of the dense FLOPs of a forward with ``active``
    image tokens, from the FLOP model of ``capture`` (a ``PlannedCapture``; the prologue of
    the graph variant a RAS step runs counts once per prompt), or the token share without one."""
    if capture is None or not num_tokens:
        return lambda active: active / num_tokens if num_tokens else 1.0
    from .flops import FlopModel

    variant = next((capture.variants[v] for v in ("shared", "rowwise", "dense") if v in capture.variants), None)
    model = FlopModel(capture, variant.hoisted if variant is not None else None)
    return functools.lru_cache(maxsize=None)(model.share)


def ran_modes(ran: Counter, original_forwards: int, fallbacks: dict[str, str],
              resolved: str) -> tuple[str, dict[str, str], list[str]]:
    """``(mode, modes, notes)`` of a run (see ``RunStats``) from what the runners ran during
    it (``(graph, mode) -> calls``), the calls of the model's own forward, the runners'
    fallbacks (graph -> why) and the mode the runner resolves to (used when no graph ran)."""
    modes = {graph: mode for (graph, mode), calls in ran.items() if calls > 0}
    distinct = list(dict.fromkeys(modes.values()))
    if original_forwards:
        modes["original forward"] = "eager"
    mode = ", ".join(distinct) or ("eager" if original_forwards and resolved != "custom transform" else resolved)
    by_reason: dict[str, list[str]] = {}
    for graph, why in fallbacks.items():
        if graph in modes:
            by_reason.setdefault(why, []).append(graph)
    notes = [f"graph{'s' if len(graphs) > 1 else ''} {', '.join(graphs)} ran {modes[graphs[0]]}, not the mode "
             f"asked for: {why}" for why, graphs in by_reason.items()]
    return mode, modes, notes
