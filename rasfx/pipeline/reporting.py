"""``RunStats`` of a pipeline run: what ``rasfx.stats(pipe)`` returns.

Built from a :class:`~rasfx.pipeline.run.Run`'s step records after (or during) the run: per step
its kind, active tokens, FLOP share (from the capture's FLOP model, else the token share) and wall
time; the run's work (exports, graph captures, compiles), the modes its graphs ran in, the
sampler's per-pixel counts and the token grid for heatmaps.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Optional

import torch

from ..config import RASConfig
from ..run_stats import RunStats, StepStats, ran_modes, step_flops_share
from ..sampler import PixelLayout
from .run import Run


def build_stats(run: Run, config: RASConfig, *, pixel_scale: int, work_now: dict, ran_now: Counter,
                fallbacks: dict[str, str], unpack: Optional[Callable[..., Any]], parallel: Any = None) -> RunStats:
    """``work_now`` / ``ran_now``: rasfx's work and the runners' calls so far (used while the run
    is in progress); ``fallbacks``: graph -> why it ran in another mode; ``unpack``: the
    pipeline class's own ``_unpack_latents`` (lays packed latents out on the image grid);
    ``parallel``: the run's ``rasfx.parallel.ParallelStats`` (context parallelism) or None."""
    n = run.num_tokens or 0
    share = step_flops_share(run.capture, n)
    steps, discarded = [], 0
    for i, dense, active, timer, skipped in run.records:
        skip = bool(skipped)  # a device decision (skip_sync=False) is read here, after the run
        discarded += skipped is not True and skip
        steps.append(StepStats(
            index=i,
            dense=dense,
            active_tokens=active,
            num_tokens=n,
            flops_fraction=1.0 if dense else share(active) if n and active else 0.0,  # a skip that computed nothing: 0
            wall_time_s=timer.seconds(),
            kind="skip" if skip else "dense" if dense else "ras",
        ))
    work = run.work
    if work is None:  # in progress: what it did so far
        work = {k: v - run.work_before.get(k, 0) for k, v in work_now.items()}
    ran = run.ran if run.ran is not None else ran_now - run.ran_before
    mode, modes, mode_notes = ran_modes(ran, run.original_forwards, fallbacks, run.mode or "")
    out = RunStats(config=config, num_steps=run.num_steps, num_tokens=n, steps=steps,
                   pixel_scale=pixel_scale, notes=list(run.notes) + mode_notes, mode=mode, modes=modes,
                   work=work, run_time_s=run.run_timer.seconds() if run.finished and run.run_timer else 0.0,
                   transformer_time_s=sum(t.seconds() for t in run.forward_timers),
                   flops_source="graph" if run.capture is not None else "token share", parallel=parallel)
    if discarded:
        out.notes.append(f"{discarded} skipped steps were computed and their noise replaced by the estimate "
                         "(RASConfig.skip_sync=False decides on the device: no time saved)")
    if run.fallback is not None:
        out.notes.append(f"ran dense: {run.fallback}")
    if run.all_dense and parallel is None:
        out.notes.append("every step dense by configuration: the transformer ran unmodified")
    sampler = run.sampler
    if sampler is not None and sampler.computed is not None:
        out.computed_steps = sampler.computed.detach().cpu()
        out.noise_std = None if sampler.noise_std is None else sampler.noise_std.detach().cpu()
        if sampler.longest_streak is not None:
            out.longest_inactive_streak = int(sampler.longest_streak.max())
        out.token_grid = _token_grid(run, sampler.layout, unpack, out.notes)
    return out


def _token_grid(run: Run, layout: PixelLayout, unpack: Optional[Callable[..., Any]],
                notes: list[str]) -> Optional[torch.Tensor]:
    """Token of every latent pixel on the latent grid. Packed latents: the run's own
    ``_unpack_latents`` call, replayed on a tensor of token ids."""
    if layout.packed_perm is None:
        return None if layout.grid_token is None else layout.grid_token.detach().cpu()
    if run.unpack_call is None or unpack is None or run.token_map is None:
        notes.append("latent grid unknown (the pipeline did not unpack its latents): heatmaps use a square layout")
        return None
    args, kwargs = run.unpack_call
    d = layout.packed_perm.numel()
    try:
        ids = run.token_map.detach().cpu()[:1, :, :d].to(torch.float64)
        grid = unpack(ids, *args, **kwargs)
        return grid[0, 0].round().to(torch.long)
    except Exception as e:
        notes.append(f"no token grid for heatmaps ({e})")
        return None
