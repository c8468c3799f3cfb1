"""What happened in one RAS run, and PNG heatmaps of it (paper Figures 10 and 11).

:class:`RunStats` is filled by :mod:`rasfx.pipeline` (``rasfx.stats(pipe)``); it holds plain CPU
tensors and Python numbers, so it stays valid after the pipeline is disabled or runs again.

FLOPs estimate: a step's ``flops_fraction`` is the share of image tokens it computed
(``active / N``). Everything that runs per image token (patch embedding, q/k/v and output
projections, MLPs, norms and attention *queries*) scales with it; conditioning tokens, the
attention over the full cached key set and the timestep embedding do not, so the true fraction
of transformer FLOPs on a RAS step is slightly higher than this token share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, Optional, Union

import torch

from .errors import UsageError

__all__ = ["StepStats", "RunStats", "heatmap_image", "save_heatmap"]


@dataclass(frozen=True)
class StepStats:
    """One denoising step.

    ``dense``: the step's forwards computed every image token. ``active_tokens``: image tokens
    computed (``num_tokens`` on dense steps). ``flops_fraction``: estimated share of the dense
    transformer FLOPs (the token share, see the module doc). ``wall_time_s``: from the step's
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

    ``mode``: the execution mode that ran (``eager``, ``cuda_graph``, ``compile``,
    ``compile+cuda_graph``; ``TransformConfig(mode="auto")`` resolves to CUDA graphs for CUDA
    tensors). ``work``: what rasfx built during this run (``exports``, ``graph_captures``,
    ``compiles`` and their seconds ``export_s``, ``passes_s``, ``graph_capture_s``,
    ``compile_s``): all zero on an image whose input signature was seen before.
    ``run_time_s``: the denoising loop (first transformer call to the end of the last scheduler
    step; 0 while the run is in progress); ``transformer_time_s``: the transformer calls in it.
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
    work: dict = field(default_factory=dict)
    run_time_s: float = 0.0
    transformer_time_s: float = 0.0

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
            f"estimated transformer FLOPs {self.flops_fraction:.3f} of dense, wall time {self.wall_time_s:.3f} s, "
            f"longest inactive streak {self.longest_inactive_streak} steps",
            f"mode {self.mode or '?'}; built in this run: {self.exports} exports, {self.graph_captures} CUDA graphs, "
            f"{self.compiles} compiled shapes ({build_seconds(self.work):.2f} s)",
        ]
        if self.run_time_s:
            lines.append(f"denoising loop {self.run_time_s:.3f} s: transformer {self.transformer_time_s:.3f} s, "
                         f"rest of the pipeline {self.run_time_s - self.transformer_time_s:.3f} s")
        lines += [
            f"  step {s.index:3d}: {'dense' if s.dense else 'RAS  '} {s.active_tokens:6d}/{s.num_tokens} "
            f"tokens, ~{s.flops_fraction:.3f} FLOPs, {1e3 * s.wall_time_s:8.2f} ms"
            for s in self.steps
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def build_seconds(work: dict) -> float:
    """Seconds rasfx spent building (exports, passes, CUDA-graph captures, compilation) in ``work``
    (``RunStats.work``); a compilation during a CUDA-graph capture is counted once."""
    return sum(float(work.get(k, 0.0)) for k in ("export_s", "passes_s", "graph_capture_s")) + (
        0.0 if work.get("graph_captures") else float(work.get("compile_s", 0.0)))


# A perceptually ordered colour map (viridis anchor colours, linearly interpolated).
_VIRIDIS = torch.tensor(
    [
        [68, 1, 84],
        [72, 40, 120],
        [62, 74, 137],
        [49, 104, 142],
        [38, 130, 142],
        [31, 158, 137],
        [53, 183, 121],
        [109, 205, 89],
        [180, 222, 44],
        [253, 231, 37],
    ],
    dtype=torch.float32,
)


def _colorize(values: torch.Tensor) -> torch.Tensor:
    """``[H, W]`` floats -> ``[H, W, 3]`` uint8, min-max normalised (constant maps are mid-grey)."""
    v = values.to(torch.float32)
    lo, hi = float(v.min()), float(v.max())
    t = (v - lo) / (hi - lo) if hi > lo else torch.full_like(v, 0.5)
    pos = t.clamp(0, 1) * (len(_VIRIDIS) - 1)
    i0 = pos.floor().long().clamp(max=len(_VIRIDIS) - 2)
    w = (pos - i0.to(torch.float32)).unsqueeze(-1)
    rgb = _VIRIDIS[i0] * (1 - w) + _VIRIDIS[i0 + 1] * w
    return rgb.round().clamp(0, 255).to(torch.uint8)


def _mosaic(frames: torch.Tensor) -> torch.Tensor:
    """``[F, H, W]`` -> ``[rows * H, cols * W]`` tiled row-major; unused tiles take the minimum."""
    f, h, w = frames.shape
    cols = int(math.ceil(math.sqrt(f)))
    rows = int(math.ceil(f / cols))
    out = torch.full((rows * h, cols * w), float(frames.min()), dtype=frames.dtype)
    for k in range(f):
        r, c = divmod(k, cols)
        out[r * h : (r + 1) * h, c * w : (c + 1) * w] = frames[k]
    return out


def heatmap_image(
    stats: RunStats,
    which: str = "computed",
    *,
    row: int = 0,
    frame: Optional[int] = None,
    size: Optional[tuple[int, int]] = None,
):
    """A PIL image of a per-token map, upsampled (nearest) to image resolution.

    ``which``: ``"computed"`` (steps each token was computed, Figure 10) or ``"std"`` (last noise
    std, Figure 11). Video grids ``[F, H, W]`` show frame ``frame``, or a mosaic of all latent frames
    when ``frame`` is None. ``size`` = ``(width, height)`` overrides the output size (default: the
    latent grid times ``stats.pixel_scale``).
    """
    from PIL import Image

    grid = stats.grid_map(which, row)
    if grid.dim() == 3:
        grid = _mosaic(grid) if frame is None else grid[frame]
    elif grid.dim() != 2:
        raise UsageError(f"cannot draw a token grid of shape {tuple(grid.shape)}")
    rgb = _colorize(grid)
    img = Image.fromarray(rgb.numpy())
    if size is None:
        scale = max(1, int(stats.pixel_scale))
        size = (img.width * scale, img.height * scale)
    return img.resize(tuple(size), resample=Image.NEAREST)


def save_heatmap(
    stats: RunStats,
    path: Union[str, PathLike],
    which: str = "computed",
    *,
    row: int = 0,
    frame: Optional[int] = None,
    size: Optional[tuple[int, int]] = None,
) -> str:
    """Write :func:`heatmap_image` as a PNG to ``path``; returns the path."""
    img = heatmap_image(stats, which, row=row, frame=frame, size=size)
    img.save(path, format="PNG")
    return str(path)
