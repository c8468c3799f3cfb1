"""One-line region-adaptive sampling for diffusers pipelines.

    rasfx.enable(pipe, rasfx.RASConfig(ratio=0.25))
    image = pipe(prompt, num_inference_steps=28).images[0]
    print(rasfx.stats(pipe))
    rasfx.disable(pipe)                      # the pipeline is exactly as before

How it hooks in, without copying any pipeline code:

* ``pipe.transformer`` (and ``pipe.transformer_2`` where present) stays the same object; its
  ``forward`` gets an instance-level wrapper that runs the call through a ``RASModule``
  (``rasfx.transform(model)``, weights shared) after choosing the state slot and the active set
  of the current step. Calls the ``RASModule`` makes into the model itself (graph capture) reach
  the original forward.
* Slots: a pipeline that calls the transformer separately per CFG branch wraps each call in
  ``self.transformer.cache_context("cond" | "uncond")`` (models with diffusers' ``CacheMixin``);
  that method is wrapped too, so each branch gets its own slot (caches). A second call in the
  same step and branch (e.g. SD3 skip-layer guidance) gets a slot of its own as well. A batched
  CFG call (``torch.cat([latents] * 2)``) shares one active set between the two halves.
* ``pipe.scheduler.step`` is wrapped to see the noise prediction after CFG (the tensor the
  scheduler integrates) and the step boundary; ``scheduler.set_timesteps`` marks the start of a
  run. The number of steps is ``len(scheduler.timesteps)`` minus the scheduler's begin index at
  the first transformer call of a run (one scheduler step per transformer evaluation, so
  second-order schedulers that call ``step`` twice per step count both evaluations).
* The first call of a run goes through the ``RASModule`` (dense) to learn the number of image
  tokens and the token map; the plan of the run is built then. A dense step after which no RAS
  step follows calls the original forward (no caches are written that nobody reads), and so does
  every step of a run whose config allows no RAS step (``ratio=1.0``): such a run is the plain
  pipeline, bit for bit. With an eager runner, a dense step whose next step is dense calls the
  original forward too: a dense step rewrites every cache, so only the dense step right before a
  RAS step (the last warm-up step, a reset) has to write them. In the CUDA-graph and compiled
  modes such steps run rasfx's dense graph instead, which is replayed / compiled where the
  original forward is not. When a run ends the caches' contents are invalidated, not freed: the
  next image reuses the memory, CUDA graphs and compiled functions (``rasfx.release`` frees them).
* Flux-style packed latents (``[B, M, C * k]``): the layout of a packed row is read from the
  pipeline's own ``_pack_latents`` (run on a tensor of channel and pixel ids); the std is taken
  over the ``C`` latent channels of each of the ``k`` latent pixels of a row, exactly as on the
  unpacked latents. Calls to ``_unpack_latents`` are observed to lay the per-token stats out on
  the image grid for heatmaps.

Inactive tokens: the ``RASModule`` returns full-shape outputs whose inactive entries are the
values of the last step that computed them, so the scheduler integrates the paper's estimated
full noise ``N^``: active tokens move along the fresh direction, inactive ones keep the trajectory
of their last computed step (paper 3.2). The module caches each CFG branch's raw output and CFG
is linear, so the combined noise equals CFG of the cached branches, which is the official
code's cached combined noise whenever the guidance scale is constant.

Schedulers: any diffusers scheduler works, since only ``step``'s inputs are read. First-order
flow matching (``FlowMatchEulerDiscreteScheduler``) is the paper's setting. Multistep solvers
(DPM-Solver++, UniPC) keep a history of model outputs; for an inactive token the reused output
enters that history again, so the higher-order correction sees a repeated value for it, which is
exactly as accurate as the reuse itself. Stochastic schedulers (DDPM, Euler ancestral, SDE
solvers) add fresh noise to every latent pixel on every step; that is untouched, and the
selection reads only the noise prediction, so runs stay reproducible with a seeded generator.
Second-order schedulers (Heun) call the transformer twice per step: each evaluation is one RAS
step.

Refused with an ``UnsupportedModelError``: accelerate offload hooks and diffusers' hook-based
features on the transformer (they replace forwards and move weights at run time; keep the
transformer on its device). Not handled: ``torch.compile``d transformers (enable RAS before
compiling anything around it; ``TransformConfig(mode="compile+cuda_graph")`` compiles rasfx's graphs).
A replaced ``pipe.scheduler`` is followed at the next transformer call.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import math
import time
import warnings
import weakref
from collections import Counter
from typing import Any, Callable, Iterator, Optional

import torch

from ..config import RASConfig
from ..errors import ArgumentTypeError, RasfxError, RASWarning, UsageError
from ..module import refuse_foreign_hooks
from ..sampler import (
    PixelLayout,
    RegionSampler,
    StepPlan,
    active_mask,
    build_plan,
    index_for_batch,
    step_kinds,
)
from ..run_stats import RunStats, StepStats, build_seconds, ran_modes, step_flops_share
from ..steps import StepSparsity, element_mask

__all__ = ["enable", "disable", "enabled", "release", "stats", "is_enabled", "RASWarning"]

log = logging.getLogger("rasfx")

_MODEL_ATTRS = ("transformer", "transformer_2")
_MISSING = object()
_STATES: "weakref.WeakKeyDictionary[Any, _PipelineState]" = weakref.WeakKeyDictionary()
_LAST_STATS: "weakref.WeakKeyDictionary[Any, RunStats]" = weakref.WeakKeyDictionary()


class _LayoutError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------
# Patching instance attributes and undoing it exactly


class _Patch:
    """Sets ``obj.__dict__[name]`` and restores the previous entry (or its absence).

    Holds ``obj`` weakly, so the per-pipeline state never keeps the pipeline alive.
    """

    def __init__(self, obj: Any, name: str, value: Any) -> None:
        self.obj_ref = weakref.ref(obj)
        self.name = name
        self.previous = obj.__dict__.get(name, _MISSING)
        obj.__dict__[name] = value

    def restore(self) -> None:
        obj = self.obj_ref()
        if obj is None:
            return
        if self.previous is _MISSING:
            obj.__dict__.pop(self.name, None)
        else:
            obj.__dict__[self.name] = self.previous


def _is_ours(fn: Any) -> bool:
    return getattr(fn, "__rasfx_wrapper__", False)


# ------------------------------------------------------------------------------------------
# Timing without per-step synchronisation


class _StepTimer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.start: Any = None
        self.end: Any = None

    def begin(self) -> None:
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start = time.perf_counter()

    def finish(self) -> None:
        if self.cuda:
            self.end = torch.cuda.Event(enable_timing=True)
            self.end.record()
        else:
            self.end = time.perf_counter()

    def seconds(self) -> float:
        if self.start is None or self.end is None:
            return 0.0
        if self.cuda:
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3
        return self.end - self.start


# ------------------------------------------------------------------------------------------
# State


class _ModelHook:
    def __init__(self, name: str, model: torch.nn.Module, ras: Any) -> None:
        self.name = name
        self.model = model
        self.ras = ras
        self.original_forward = model.forward
        self.original_cache_context = getattr(model, "cache_context", None)
        self.contexts: list[str] = []


class _Run:
    """One pipeline call: from the first transformer call after ``set_timesteps`` to the last step."""

    def __init__(self, state: "_PipelineState", num_steps: int) -> None:
        self.config = state.config
        self.num_steps = num_steps
        self.kinds = step_kinds(state.config, num_steps)  # raises on explicit resets out of range
        # No RAS step can happen: the transformer runs unmodified (no capture, no caches).
        self.all_dense = state.config.ratio >= 1.0 or not any(self.kinds)
        self.plan: Optional[StepPlan] = None
        self.sampler: Optional[RegionSampler] = None
        self.token_map: Optional[torch.Tensor] = None
        self.num_tokens: Optional[int] = None
        self.fallback: Optional[str] = None
        # Step sparsity (skipped steps, extrapolated noise): None when the config asks for none.
        self.steps = StepSparsity(state.config, self.kinds) if state.config.step_sparsity else None
        self.outputs: dict[tuple[str, str], Any] = {}  # last computed output per slot (returned on skips)
        self.step = 0
        self.finished = False
        # (step, dense, active tokens, timer, skipped: bool or a 0-dim device tensor)
        self.records: list[tuple[int, bool, int, _StepTimer, Any]] = []
        self.unpack_call: Optional[tuple[tuple, dict]] = None  # args of the pipeline's _unpack_latents
        self.notes: list[str] = []
        self.work_before = state.work_counts()  # rasfx's work (exports, graph captures, compiles) so far
        self.work: Optional[dict] = None  # ... done during this run, once it finished
        self.mode: Optional[str] = None  # the execution mode the runner resolves to (routes dense steps)
        self.ran_before = state.ran_counts()  # what the runners ran so far: (graph, mode) -> calls
        self.ran: Optional[Counter] = None  # ... during this run, once it finished
        self.original_forwards = 0  # transformer calls that ran the model's own forward
        self.capture: Any = None  # the CompiledCapture the plan was built from (for the FLOP model)
        self.run_timer: Optional[_StepTimer] = None  # first transformer call -> last scheduler step
        self.forward_timers: list[_StepTimer] = []  # one per transformer call
        self._reset_step()

    def _reset_step(self) -> None:
        self.forwards = 0
        self.step_dense = True
        self.step_ras_forwards = 0
        self.calls: dict[tuple[str, str], int] = {}
        self.timer: Optional[_StepTimer] = None
        self.skip: Any = None  # this step skipped: None (not decided yet), a bool, or a 0-dim device tensor
        self.step_work = False  # a forward of this step ran the model

    def skip_decision(self, step: int) -> Any:
        """Whether ``step`` is skipped, decided once at its first transformer call: a scheduled skip
        (``True``), the adaptive rule's decision (a 0-dim device tensor, or read on the host with
        ``skip_sync``), else ``False``."""
        if self.skip is None:
            steps = self.steps
            skip: Any = False
            if steps is not None:
                if steps.scheduled_skip(step):
                    skip = True
                elif (decision := steps.decision(step)) is not None:
                    skip = bool(decision) if self.config.skip_sync else decision  # skip_sync: one host read
            self.skip = skip
        return self.skip

    def bypass(self, step: int, eager: bool) -> bool:
        """Whether ``step`` runs the original forward and writes no caches: every step of an
        all-dense run; a dense step after which no RAS step follows; with an ``eager`` runner
        also a dense step whose next step is dense (the next one rewrites every cache)."""
        if self.all_dense or (self.fallback is not None and self.plan is not None):
            return True
        if self.plan is None or not self.plan.is_dense(step):
            return False
        return not self.plan.ras_step_after(step) or (eager and not self.plan.needs_cache_after(step))


class _PipelineState:
    def __init__(self, pipe: Any, config: RASConfig, hooks: list[_ModelHook]) -> None:
        self.config = config
        self.hooks = hooks
        self.pipe_ref = weakref.ref(pipe)
        self.scheduler = pipe.scheduler
        self.patches: list[_Patch] = []
        self.scheduler_patches: list[_Patch] = []
        self.last_run: Optional[_Run] = None  # the last finished run that recorded steps
        self.inside = False
        self.run: Optional[_Run] = None
        self.pixel_scale = _pixel_scale(pipe)
        self.original_step = self.scheduler.step
        self.original_set_timesteps = getattr(self.scheduler, "set_timesteps", None)
        self.original_unpack = getattr(type(pipe), "_unpack_latents", None)
        self.original_pack = getattr(type(pipe), "_pack_latents", None)
        self.latent_channels = _latent_channels(pipe)
        self.layout_cache: Optional[tuple] = None

    # -------------------------------------------------------------- run lifecycle
    def work_counts(self) -> dict:
        """rasfx's work so far, summed over the transformed models (see ``RASModule.work_counts``)."""
        total: dict = {}
        for hook in self.hooks:
            counts = getattr(hook.ras, "work_counts", None)
            for k, v in (counts() if counts is not None else {}).items():
                total[k] = total.get(k, 0) + v
        return total

    def ran_counts(self) -> Counter:
        """What the transformed models' runners ran so far: (graph, mode) -> calls."""
        total: Counter = Counter()
        for hook in self.hooks:
            total.update(getattr(getattr(hook.ras, "runner", None), "ran", {}))
        return total

    def fallbacks(self) -> dict[str, str]:
        """Graph -> why it ran in another mode than the one asked for (all runners)."""
        return {g: why for hook in self.hooks for g, why in getattr(getattr(hook.ras, "runner", None),
                                                                        "fallbacks", {}).items()}

    def end_run(self) -> None:
        """The run is over: its work is counted, and the caches' contents are invalidated
        (``reset``: nothing is freed, the next image reuses the memory, graphs and compiled
        functions; ``rasfx.release(pipe)`` frees them)."""
        run = self.run
        if run is not None and not run.finished:
            run.finished = True
            if run.run_timer is not None:
                run.run_timer.finish()
            after = self.work_counts()
            run.work = {k: v - run.work_before.get(k, 0) for k, v in after.items()}
            run.ran = self.ran_counts() - run.ran_before
            built = [f"{run.work[k]} {what}" for k, what in (("exports", "exports"), ("graph_captures", "CUDA graphs"),
                                                              ("compiles", "compiled shapes")) if run.work.get(k)]
            if built:  # once per new input signature: the first image of a shape pays for it
                log.info("rasfx: this image built %s (%.1f s: export %.1f, passes %.1f, CUDA-graph capture %.1f, "
                         "compile %.1f); later images of this shape reuse them", ", ".join(built),
                         build_seconds(run.work), run.work.get("export_s", 0.0), run.work.get("passes_s", 0.0),
                         run.work.get("graph_capture_s", 0.0), run.work.get("compile_s", 0.0))
            if run.records:
                self.last_run = run
            run.outputs.clear()
            if run.steps is not None:
                run.steps.release()
        for hook in self.hooks:
            hook.ras.reset()

    def current_run(self) -> _Run:
        """The run in progress, or a new one (caches invalidated) at the first call of a run."""
        run = self.run
        if run is None or run.finished:
            num_steps = _num_steps(self.scheduler)
            for hook in self.hooks:
                hook.ras.reset()
            self.run = None
            run = self.run = _Run(self, num_steps)  # may raise: explicit reset steps outside the run
        return run

    def follow_scheduler(self) -> None:
        """``pipe.scheduler`` was replaced after ``enable`` (``pipe.scheduler = X.from_config(...)``):
        move the scheduler patches to the new one; a run in progress ends."""
        pipe = self.pipe_ref()
        scheduler = getattr(pipe, "scheduler", None) if pipe is not None else None
        if scheduler is None or scheduler is self.scheduler:
            return
        if _is_ours(scheduler.__dict__.get("step")):
            raise RasfxError(
                "rasfx: the new pipe.scheduler is RAS-enabled through another pipeline that shares it; give each "
                "pipeline its own scheduler"
            )
        if self.run is not None and not self.run.finished:
            self.end_run()
        for p in reversed(self.scheduler_patches):
            p.restore()
        self.patches = [p for p in self.patches if p not in self.scheduler_patches]
        self.scheduler = scheduler
        self.original_step = scheduler.step
        self.original_set_timesteps = getattr(scheduler, "set_timesteps", None)
        self.scheduler_patches = _patch_scheduler(self)
        self.patches.extend(self.scheduler_patches)

    # -------------------------------------------------------------- forward
    def forward(self, hook: _ModelHook, args: tuple, kwargs: dict) -> Any:
        if self.inside:  # the RASModule capturing / calling into the model itself
            return hook.original_forward(*args, **kwargs)
        self.follow_scheduler()
        if getattr(self.scheduler, "timesteps", None) is None:  # not inside a denoising loop
            return hook.original_forward(*args, **kwargs)
        run = self.current_run()
        step = run.step
        device = _device_of(args, kwargs, hook.model)
        if run.run_timer is None:
            run.run_timer = _StepTimer(device)
            run.run_timer.begin()
            runner = getattr(hook.ras, "runner", None)
            run.mode = runner.resolved_mode(device) if runner is not None else "custom transform"
        if run.timer is None:
            run.timer = _StepTimer(device)
            run.timer.begin()
        timer = _StepTimer(device)
        timer.begin()
        try:
            return self._forward(run, step, hook, args, kwargs)
        finally:
            timer.finish()
            run.forward_timers.append(timer)

    def _forward(self, run: _Run, step: int, hook: _ModelHook, args: tuple, kwargs: dict) -> Any:
        run.forwards += 1
        context = hook.contexts[-1] if hook.contexts else "default"
        key = (hook.name, context)
        ordinal = run.calls.get(key, 0)
        run.calls[key] = ordinal + 1
        slot = context if ordinal == 0 else f"{context}#{ordinal}"
        if run.skip_decision(step) is True:  # a skipped step: the scheduler integrates an estimate
            previous = run.outputs.get((hook.name, slot))
            if previous is not None:
                return previous
            run.notes.append(f"step {step}: no earlier output of {hook.name} [{slot}] to stand in for a skip; computed")
        run.step_work = True
        out = self._compute(run, step, hook, slot, args, kwargs)
        if run.steps is not None:
            run.outputs[(hook.name, slot)] = out
        return out

    def _compute(self, run: _Run, step: int, hook: _ModelHook, slot: str, args: tuple, kwargs: dict) -> Any:
        # A custom transform without a runner wraps the model eagerly.
        eager = run.mode in ("eager", "custom transform")
        if run.bypass(step, eager):
            run.original_forwards += 1
            return hook.original_forward(*args, **kwargs)

        index = None
        if run.sampler is not None and run.fallback is None:
            active = run.sampler.active_for(step)
            if active is not None:
                batch = _batch_of(args, kwargs)
                try:
                    index = index_for_batch(active, batch) if batch is not None else active[0]
                except ValueError as e:
                    run.notes.append(f"step {step}: {e}; ran dense")
                    index = None
        ras = hook.ras
        self.inside = True
        try:
            with ras.cache_context(slot):
                ras.set_active(index, check=False)
                out = ras(*args, **kwargs)
                dense = bool(ras.last_forward_dense)
        finally:
            self.inside = False
        run.step_dense = run.step_dense and dense
        if not dense:
            run.step_ras_forwards += 1
        if run.plan is None:
            self._plan_run(run, ras)
        return out

    def _plan_run(self, run: _Run, ras: Any) -> None:
        n = ras.num_image_tokens
        if not isinstance(n, int) or n < 1:
            run.fallback = "the transformed model reported no image tokens"
            run.plan = build_plan(self.config.replace(ratio=1.0), run.num_steps, 1)
            warnings.warn(f"rasfx: {run.fallback}; this run is dense", RASWarning, stacklevel=4)
            return
        run.num_tokens = n
        run.plan = build_plan(self.config, run.num_steps, n)
        current = getattr(ras, "_current_capture", None)  # a custom transform may have no capture
        run.capture = current() if current is not None else None
        try:
            run.token_map = ras.token_map()
        except Exception as e:  # the module could not derive a map: RAS cannot score tokens
            run.fallback = f"no token map ({e})"
            warnings.warn(f"rasfx: {run.fallback}; this run is dense", RASWarning, stacklevel=4)

    # -------------------------------------------------------------- scheduler
    def step(self, args: tuple, kwargs: dict) -> Any:
        run = self.run
        if run is None or run.finished or run.forwards == 0:
            return self.original_step(*args, **kwargs)  # not part of a RAS run (manual use)
        noise = args[0] if args else kwargs.get("model_output")
        step = run.step
        if isinstance(noise, torch.Tensor) and run.plan is not None and run.fallback is None:
            if run.sampler is None and run.token_map is not None:
                try:
                    layout = self.layout_for(noise, run.token_map, run.plan.num_tokens)
                    run.sampler = RegionSampler(self.config, run.plan, layout)
                except _LayoutError as e:
                    run.fallback = str(e)
                    warnings.warn(f"rasfx: {e}; this run is dense", RASWarning, stacklevel=3)
        skipped = run.skip if run.skip is not None else False
        ran_dense = run.step_dense or run.step_ras_forwards == 0
        if isinstance(noise, torch.Tensor) and run.steps is not None:
            noise = self._integrate(run, step, noise, ran_dense, skipped, args, kwargs)
            if args:
                args = (noise, *args[1:])
            else:
                kwargs = {**kwargs, "model_output": noise}
        if isinstance(noise, torch.Tensor) and run.sampler is not None and run.fallback is None:
            run.sampler.observe(step, noise.detach(), ran_dense=ran_dense, skipped=skipped)
        out = self.original_step(*args, **kwargs)
        if run.timer is not None:
            run.timer.finish()
        dense = run.step_dense or run.fallback is not None or run.plan is None or run.plan.is_dense(step)
        if run.plan is None:
            active = 0
        else:
            active = run.plan.num_tokens if dense else run.plan.active[step]
        if skipped is True and not run.step_work:
            dense, active = False, 0
        run.records.append((step, dense, active, run.timer or _StepTimer(torch.device("cpu")), skipped))
        run.step += 1
        run._reset_step()
        if run.step >= run.num_steps:
            self.end_run()
        return out

    def _integrate(self, run: _Run, step: int, noise: torch.Tensor, ran_dense: bool, skipped: Any, args: tuple,
                   kwargs: dict) -> torch.Tensor:
        """The noise the scheduler integrates under step sparsity (an estimate on skipped steps and,
        with ``inactive_estimate="extrapolate"``, on the inactive tokens of a RAS step)."""
        assert run.steps is not None
        computed = None
        sampler = run.sampler
        if sampler is not None and not ran_dense and skipped is not True:
            active = sampler.active_for(step)
            if active is not None:
                computed = element_mask(sampler.layout, active_mask(active, sampler.plan.num_tokens), noise.shape)
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        return run.steps.integrate(step, noise, computed, skipped, step if timestep is None else timestep)

    def layout_for(self, noise: torch.Tensor, token_map: torch.Tensor, num_tokens: int) -> PixelLayout:
        """The pixel layout of this run, reused while the token map and latent shape stay the same
        (building one reads the token map on the host once)."""
        key = (tuple(noise.shape), noise.device, num_tokens)
        cached = self.layout_cache
        if cached is not None and cached[0] is token_map and cached[1] == key:
            return cached[2]
        layout = _layout(self, noise, token_map, num_tokens)
        self.layout_cache = (token_map, key, layout)
        return layout

    # -------------------------------------------------------------- stats
    def reported_run(self) -> Optional[_Run]:
        """The run ``rasfx.stats`` reports: the one in progress once it recorded a step, else
        the last finished one."""
        if self.run is not None and self.run.records:
            return self.run
        return self.last_run

    def build_stats(self, run: _Run) -> RunStats:
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
            work = {k: v - run.work_before.get(k, 0) for k, v in self.work_counts().items()}
        ran = run.ran if run.ran is not None else self.ran_counts() - run.ran_before
        mode, modes, mode_notes = ran_modes(ran, run.original_forwards, self.fallbacks(), run.mode or "")
        out = RunStats(config=self.config, num_steps=run.num_steps, num_tokens=n, steps=steps,
                       pixel_scale=self.pixel_scale, notes=list(run.notes) + mode_notes, mode=mode, modes=modes,
                       work=work, run_time_s=run.run_timer.seconds() if run.finished and run.run_timer else 0.0,
                       transformer_time_s=sum(t.seconds() for t in run.forward_timers),
                       flops_source="graph" if run.capture is not None else "token share")
        if discarded:
            out.notes.append(f"{discarded} skipped steps were computed and their noise replaced by the estimate "
                             "(RASConfig.skip_sync=False decides on the device: no time saved)")
        if run.fallback is not None:
            out.notes.append(f"ran dense: {run.fallback}")
        if run.all_dense:
            out.notes.append("every step dense by configuration: the transformer ran unmodified")
        sampler = run.sampler
        if sampler is not None and sampler.computed is not None:
            out.computed_steps = sampler.computed.detach().cpu()
            out.noise_std = None if sampler.noise_std is None else sampler.noise_std.detach().cpu()
            if sampler.longest_streak is not None:
                out.longest_inactive_streak = int(sampler.longest_streak.max())
            out.token_grid = self._token_grid(run, sampler.layout, out.notes)
        return out

    def _token_grid(self, run: _Run, layout: PixelLayout, notes: list[str]) -> Optional[torch.Tensor]:
        """Token of every latent pixel on the latent grid. Packed latents: the run's own
        ``_unpack_latents`` call, replayed on a tensor of token ids."""
        if layout.packed_perm is None:
            return None if layout.grid_token is None else layout.grid_token.detach().cpu()
        if run.unpack_call is None or self.original_unpack is None or run.token_map is None:
            notes.append("latent grid unknown (the pipeline did not unpack its latents): heatmaps use a square layout")
            return None
        args, kwargs = run.unpack_call
        d = layout.packed_perm.numel()
        try:
            ids = run.token_map.detach().cpu()[:1, :, :d].to(torch.float64)
            grid = self.original_unpack(ids, *args, **kwargs)
            return grid[0, 0].round().to(torch.long)
        except Exception as e:
            notes.append(f"no token grid for heatmaps ({e})")
            return None


# ------------------------------------------------------------------------------------------
# Helpers that know about diffusers


def _num_steps(scheduler: Any) -> int:
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        raise UsageError(
            "rasfx: the scheduler has no timesteps; call scheduler.set_timesteps(...) before the "
            "first transformer call of a run"
        )
    begin = getattr(scheduler, "begin_index", None)
    n = len(timesteps) - (int(begin) if isinstance(begin, int) else 0)
    return max(1, n)


def _pixel_scale(pipe: Any) -> int:
    for name in ("vae_scale_factor", "vae_scale_factor_spatial"):
        v = getattr(pipe, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return 1


def _latent_channels(pipe: Any) -> Optional[int]:
    cfg = getattr(getattr(pipe, "vae", None), "config", None)
    for name in ("latent_channels", "z_dim"):
        v = getattr(cfg, name, None) if cfg is not None else None
        if isinstance(v, int) and v > 0:
            return v
    return None


def _batch_of(args: tuple, kwargs: dict) -> Optional[int]:
    x = kwargs.get("hidden_states")
    if not isinstance(x, torch.Tensor):
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if not isinstance(x, torch.Tensor):
        x = next((v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim() >= 3), None)
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() >= 1 else None


def _device_of(args: tuple, kwargs: dict, model: torch.nn.Module) -> torch.device:
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v.device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _packed_structure(state: _PipelineState, d: int) -> tuple[torch.Tensor, int, int]:
    """``(perm, C, k)`` of a packed latent row of ``d`` values: ``k`` pixels of ``C`` channels.

    ``perm`` reorders the row into ``(k, C)`` order. Read from the pipeline's ``_pack_latents``
    run on a tensor of (pixel, channel) ids; without one, diffusers' convention (channel-major,
    ``d = c * k + j``) with ``C`` = the VAE's latent channels.
    """
    c = state.latent_channels
    if c is None or d % c:
        c = d
    k = d // c
    pack = state.original_pack
    q = math.isqrt(k)
    if pack is not None and k > 1 and q * q == k:
        try:
            h = w = 2 * q
            pix = torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w).expand(1, c, h, w)
            ch = torch.arange(c, dtype=torch.float64).view(1, c, 1, 1).expand(1, c, h, w)
            packed = pack((pix * c + ch).contiguous(), 1, c, h, w)
            if packed.dim() == 3 and packed.shape[-1] == d:
                v = packed[0].round().to(torch.long)
                chan, pixel = v % c, v // c
                ref = None
                for m in range(v.shape[0]):
                    uniq = torch.unique(pixel[m])  # sorted
                    if uniq.numel() != k:
                        ref = None
                        break
                    j = torch.searchsorted(uniq, pixel[m])
                    sig = j * c + chan[m]
                    if ref is None:
                        ref = sig
                    elif not torch.equal(ref, sig):
                        ref = None
                        break
                if ref is not None and torch.equal(ref.sort().values, torch.arange(d)):
                    perm = torch.empty(d, dtype=torch.long)
                    perm[ref] = torch.arange(d)
                    return perm, c, k
        except Exception:
            pass
    return torch.arange(d).view(c, k).t().reshape(-1), c, k


def _layout(state: _PipelineState, noise: torch.Tensor, token_map: torch.Tensor, num_tokens: int) -> PixelLayout:
    """Map the scheduler's latents to latent pixels and tokens, from the module's token map."""
    tm = token_map.to(noise.device)
    if noise.dim() >= 4:
        if tm.dim() != noise.dim() or tuple(tm.shape[2:]) != tuple(noise.shape[2:]):
            raise _LayoutError(
                f"cannot map the scheduler's latents {tuple(noise.shape)} to the model output "
                f"{tuple(tm.shape)} (different grids)"
            )
        spatial = tm[0, 0]
        if not bool((tm[0] == spatial).all()):
            raise _LayoutError("the channels of one latent pixel come from different tokens")
        return PixelLayout.channels_first(spatial, num_tokens, channels=noise.shape[1])
    if noise.dim() == 3:
        d = noise.shape[-1]
        if tm.dim() != 3 or tm.shape[1] != noise.shape[1] or tm.shape[2] < d:
            raise _LayoutError(
                f"cannot map the scheduler's packed latents {tuple(noise.shape)} to the model output "
                f"{tuple(tm.shape)}"
            )
        perm, c, k = _packed_structure(state, d)
        perm = perm.to(noise.device)
        rows = tm[0, :, :d].index_select(-1, perm).view(-1, k, c)
        if not bool((rows == rows[:, :, :1]).all()):
            raise _LayoutError("the channels of one packed latent pixel come from different tokens")
        return PixelLayout.packed(rows[:, :, 0], perm, num_tokens, channels=c)
    raise _LayoutError(f"latents of shape {tuple(noise.shape)} are neither [B, C, *grid] nor packed [B, M, D]")


def _resolve_transform(transform: Optional[Callable], transform_config: Any = None) -> Callable:
    if transform is not None:
        if transform_config is not None:
            raise UsageError("rasfx.enable: pass either transform= or transform_config=, not both")
        return transform
    import importlib

    mod = importlib.import_module("rasfx.transform")
    return lambda model: mod.transform(model, transform_config)


# ------------------------------------------------------------------------------------------
# Public API


def is_enabled(pipe: Any) -> bool:
    """Whether ``rasfx.enable`` is active on ``pipe``."""
    return pipe in _STATES


def enable(
    pipe: Any,
    config: Optional[RASConfig] = None,
    *,
    transform_config: Any = None,
    transform: Optional[Callable] = None,
) -> Any:
    """Attach region-adaptive sampling to a diffusers pipeline; returns ``pipe``.

    ``transform_config``: a ``rasfx.TransformConfig`` for the transformer (e.g.
    ``TransformConfig(mode="cuda_graph")`` for speed on a GPU).
    ``transform``: a custom model transform instead of ``rasfx.transform``; it must return a
    module with the ``RASModule`` contract. The pipeline's objects stay the same; only instance attributes
    are added (all removed again by :func:`disable`).
    """
    config = RASConfig() if config is None else config
    if not isinstance(config, RASConfig):
        raise ArgumentTypeError(f"rasfx.enable: config must be a rasfx.RASConfig, got {type(config).__name__}")
    if pipe in _STATES:
        raise UsageError("rasfx.enable: RAS is already enabled on this pipeline; call rasfx.disable(pipe) first")
    models = [(n, m) for n in _MODEL_ATTRS if isinstance(m := getattr(pipe, n, None), torch.nn.Module)]
    if not models:
        raise UsageError(
            f"rasfx.enable: {type(pipe).__name__} has no `transformer` module; RAS needs a diffusion "
            "transformer pipeline"
        )
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None or not callable(getattr(scheduler, "step", None)):
        raise UsageError(f"rasfx.enable: {type(pipe).__name__} has no scheduler with a step() method")
    for n, m in models:
        refuse_foreign_hooks(m)
        if _is_ours(m.__dict__.get("forward")):
            raise UsageError(
                f"rasfx.enable: pipe.{n} is already RAS-enabled through another pipeline that shares it; "
                "disable that one first"
            )
    if _is_ours(scheduler.__dict__.get("step")):
        raise UsageError(
            "rasfx.enable: pipe.scheduler is already RAS-enabled through another pipeline that shares it; "
            "give each pipeline its own scheduler or disable the other one first"
        )
    make = _resolve_transform(transform, transform_config)
    hooks = [_ModelHook(n, m, make(m)) for n, m in models]
    state = _PipelineState(pipe, config, hooks)

    patches: list[_Patch] = []
    try:
        for hook in hooks:
            patches.append(_Patch(hook.model, "forward", _forward_wrapper(state, hook)))
            if hook.original_cache_context is not None:
                patches.append(_Patch(hook.model, "cache_context", _context_wrapper(hook, hook.original_cache_context)))
        state.scheduler_patches = _patch_scheduler(state)
        patches.extend(state.scheduler_patches)
        if state.original_unpack is not None:
            patches.append(_Patch(pipe, "_unpack_latents", _unpack_wrapper(state, pipe, state.original_unpack)))
    except Exception:
        for p in reversed(patches):
            p.restore()
        raise
    state.patches = patches
    _STATES[pipe] = state
    return pipe


def disable(pipe: Any) -> Any:
    """Remove RAS from ``pipe``: every patched attribute is restored and every cache freed.

    Afterwards the pipeline is exactly as before :func:`enable` (same objects, no extra
    attributes, identical outputs). The last run's stats stay available through :func:`stats`.
    """
    state = _STATES.pop(pipe, None)
    if state is None:
        raise UsageError("rasfx.disable: RAS is not enabled on this pipeline (nothing to disable)")
    try:
        run = state.reported_run()
        if run is not None:
            _LAST_STATS[pipe] = state.build_stats(run)
    finally:
        for p in reversed(state.patches):
            p.restore()
        for hook in state.hooks:
            _release(hook.ras)
        state.patches = []
        state.run = state.last_run = None
    return pipe


def release(pipe: Any) -> Any:
    """Free the GPU memory that RAS holds between images of ``pipe`` (caches, captured CUDA
    graphs, compiled functions), keeping it enabled: the next image builds them again (its
    first step captures graphs / compiles again). :func:`disable` frees them too."""
    state = _STATES.get(pipe)
    if state is None:
        raise UsageError("rasfx.release: RAS is not enabled on this pipeline (rasfx.enable(pipe, ...) first)")
    if state.run is not None and not state.run.finished:
        state.end_run()
    for hook in state.hooks:
        _release(hook.ras)
    return pipe


def _release(ras: Any) -> None:
    release = getattr(ras, "release", None)  # a custom transform may only know reset()
    (release if release is not None else ras.reset)()


@contextlib.contextmanager
def enabled(
    pipe: Any,
    config: Optional[RASConfig] = None,
    *,
    transform_config: Any = None,
    transform: Optional[Callable] = None,
) -> Iterator[Any]:
    """``with rasfx.enabled(pipe, cfg): ...`` enables RAS for the block and disables it after."""
    enable(pipe, config, transform_config=transform_config, transform=transform)
    try:
        yield pipe
    finally:
        disable(pipe)


def stats(pipe: Any) -> RunStats:
    """Stats of the last run of ``pipe`` (while enabled, or the last one before :func:`disable`)."""
    state = _STATES.get(pipe)
    run = state.reported_run() if state is not None else None
    if state is not None and run is not None:
        return state.build_stats(run)
    if pipe in _LAST_STATS:
        return _LAST_STATS[pipe]
    raise UsageError("rasfx.stats: no denoising step has run with RAS on this pipeline yet; call pipe(...) "
                     "after rasfx.enable(pipe, ...) first")


# ------------------------------------------------------------------------------------------
# Wrappers


class _Wrapper:
    """A patched method: calls ``fn``, looks like ``original`` (name, signature, docs).

    ``copy.deepcopy`` of the patched object (e.g. ``copy.deepcopy(pipe.transformer)``) must
    not carry the patch along: the copy would run the *original* object's RAS state and
    weights. The copy gets back what the attribute was before the patch.
    """

    __rasfx_wrapper__ = True

    def __init__(self, fn: Callable, original: Callable, owner: Any, name: str) -> None:
        functools.update_wrapper(self, original)
        self._fn = fn
        self._owner = weakref.ref(owner)
        self._name = name
        self._previous = owner.__dict__.get(name, _MISSING)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __reduce__(self) -> Any:
        """Pickling a patched object (``pickle.dumps(pipe)`` while RAS is enabled) stores what
        the attribute was before the patch: the unpickled pipeline is the plain one."""
        if self._previous is not _MISSING:
            return (_identity, (self._previous,))
        owner = self._owner()
        if owner is None:
            raise RasfxError("rasfx: cannot pickle a RAS wrapper whose object is gone")
        return (_unpatched, (owner, self._name))

    def __deepcopy__(self, memo: dict) -> Any:
        if self._previous is not _MISSING:
            return copy.deepcopy(self._previous, memo)
        owner = self._owner()
        twin = memo.get(id(owner)) if owner is not None else None
        if twin is None:  # the wrapper copied on its own: nothing to rebind to
            return self
        # The twin's instance attribute becomes its class's method, bound to the twin.
        return _unpatched(twin, self._name)


def _identity(x: Any) -> Any:
    return x


def _unpatched(owner: Any, name: str) -> Any:
    """The class's method ``name`` bound to ``owner`` (what the attribute was before rasfx)."""
    return inspect.getattr_static(type(owner), name).__get__(owner, type(owner))


def _forward_wrapper(state: _PipelineState, hook: _ModelHook) -> Callable:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return state.forward(hook, args, kwargs)

    return _Wrapper(forward, hook.original_forward, hook.model, "forward")


def _context_wrapper(hook: _ModelHook, original: Callable[..., Any]) -> Callable:
    """``original``: the model's own ``cache_context``."""

    @contextlib.contextmanager
    def cache_context(name: str, *args: Any, **kwargs: Any) -> Iterator[None]:
        with original(name, *args, **kwargs):
            hook.contexts.append(str(name) if name else "default")
            try:
                yield
            finally:
                hook.contexts.pop()

    return _Wrapper(cache_context, original, hook.model, "cache_context")


def _step_wrapper(state: _PipelineState) -> Callable:
    def step(*args: Any, **kwargs: Any) -> Any:
        return state.step(args, kwargs)

    return _Wrapper(step, state.original_step, state.scheduler, "step")


def _patch_scheduler(state: _PipelineState) -> list[_Patch]:
    patches = [_Patch(state.scheduler, "step", _step_wrapper(state))]
    if state.original_set_timesteps is not None:
        patches.append(_Patch(state.scheduler, "set_timesteps", _set_timesteps_wrapper(state, state.original_set_timesteps)))
    return patches


def _set_timesteps_wrapper(state: _PipelineState, original: Callable[..., Any]) -> Callable:
    """``original``: the scheduler's own ``set_timesteps``."""

    def set_timesteps(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if state.run is not None and not state.run.finished:
            state.end_run()  # a new run starts; drop an interrupted run's caches
        return out

    return _Wrapper(set_timesteps, original, state.scheduler, "set_timesteps")


def _unpack_wrapper(state: _PipelineState, pipe: Any, original: Callable[..., Any]) -> Callable:
    """``original``: the pipeline class's own ``_unpack_latents``."""

    def unpack(latents: Any, *args: Any, **kwargs: Any) -> Any:
        if state.run is not None:
            state.run.unpack_call = (args, kwargs)
        return original(latents, *args, **kwargs)

    return _Wrapper(unpack, original, pipe, "_unpack_latents")
