"""The run controller: one per RAS-enabled pipeline, driven by the calls it patches.

:class:`PipelineController` owns the pipeline's patches (:mod:`rasfx.pipeline.patching`) and
decides, call by call, what each transformer call runs: it learns the start of a run from
``scheduler.set_timesteps`` and the first transformer call, gives each call its slot (the model's
``cache_context`` branch, and an ordinal for a repeated call in the same step) and the step's
active set, routes dense steps to the model's own forward where no cache needs writing, plans the
run after its first call, builds the sampler from the first noise prediction the scheduler
integrates, and ends the run after its last scheduler step. Per-run state lives in
:class:`~rasfx.pipeline.run.Run`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from collections import Counter
from typing import Any, Callable, Iterator, Optional

import torch

from ..config import RASConfig
from ..errors import RasfxError, RASWarning
from ..run_stats import RunStats, build_seconds
from ..sampler import PixelLayout, RegionSampler, active_mask, build_plan, index_for_batch
from ..steps import element_mask
from .latents import LayoutError, latent_channels, latent_layout, pixel_scale
from .patching import Patch, Wrapper, is_ours
from .reporting import build_stats
from .run import Run, StepTimer, num_steps

log = logging.getLogger("rasfx")


class TransformerHook:
    """rasfx's hold on one transformer of the pipeline (``pipe.transformer`` or
    ``pipe.transformer_2``): the model, its transformed module, its own ``forward`` and
    ``cache_context`` (what the patches call through to) and the stack of ``cache_context``
    names the pipeline has entered. An instance-attribute patch, not a diffusers ``ModelHook``
    (the package docstring says why)."""

    def __init__(self, name: str, model: torch.nn.Module, ras: Any) -> None:
        self.name = name
        self.model = model
        self.ras = ras
        self.original_forward = model.forward
        self.original_cache_context = getattr(model, "cache_context", None)
        self.contexts: list[str] = []


class PipelineController:
    """The per-pipeline state of ``rasfx.enable`` and the run state machine (see the module
    docstring). ``hooks``: one :class:`TransformerHook` per transformer; ``parallel``: a
    ``rasfx.parallel.ParallelRuntime`` (context parallelism) or None."""

    def __init__(self, pipe: Any, config: RASConfig, hooks: list[TransformerHook], parallel: Any = None) -> None:
        self.config = config
        self.hooks = hooks
        self.parallel = parallel
        self.pipe_ref = weakref.ref(pipe)
        self.scheduler = pipe.scheduler
        self.patches: list[Patch] = []
        self.scheduler_patches: list[Patch] = []
        self.last_run: Optional[Run] = None  # the last finished run that recorded steps
        self.inside = False
        self.run: Optional[Run] = None
        self.pixel_scale = pixel_scale(pipe)
        self.original_step = self.scheduler.step
        self.original_set_timesteps = getattr(self.scheduler, "set_timesteps", None)
        self.original_unpack = getattr(type(pipe), "_unpack_latents", None)
        self.original_pack = getattr(type(pipe), "_pack_latents", None)
        self.latent_channels = latent_channels(pipe)
        self.layout_cache: Optional[tuple] = None

    # -------------------------------------------------------------- patches
    def install(self, pipe: Any) -> None:
        """Patch the transformers' ``forward`` and ``cache_context``, the scheduler's ``step`` and
        ``set_timesteps`` and the pipeline's ``_unpack_latents``: all of them, or none."""
        patches: list[Patch] = []
        try:
            for hook in self.hooks:
                patches.append(Patch(hook.model, "forward", _forward_wrapper(self, hook)))
                if hook.original_cache_context is not None:
                    patches.append(Patch(hook.model, "cache_context",
                                         _context_wrapper(hook, hook.original_cache_context)))
            self.scheduler_patches = _patch_scheduler(self)
            patches.extend(self.scheduler_patches)
            if self.original_unpack is not None:
                patches.append(Patch(pipe, "_unpack_latents", _unpack_wrapper(self, pipe, self.original_unpack)))
        except Exception:
            for p in reversed(patches):
                p.restore()
            raise
        self.patches = patches

    def uninstall(self) -> None:
        """Restore every patched attribute, free what the transformed modules hold and drop the
        runs: the pipeline is as before ``install``."""
        for p in reversed(self.patches):
            p.restore()
        if self.parallel is not None:
            self.parallel.close()
        self.release_modules()
        self.patches = []
        self.run = self.last_run = None

    def release_modules(self) -> None:
        """Free the transformed modules' caches, CUDA graphs and compiled functions."""
        for hook in self.hooks:
            release = getattr(hook.ras, "release", None)  # a custom transform may only know reset()
            (release if release is not None else hook.ras.reset)()

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

    def current_run(self) -> Run:
        """The run in progress, or a new one (caches invalidated) at the first call of a run."""
        run = self.run
        if run is None or run.finished:
            n = num_steps(self.scheduler)
            for hook in self.hooks:
                hook.ras.reset()
            self.run = None
            records = self.parallel.begin_run() if self.parallel is not None else None  # a rendezvous of the ranks
            # may raise: explicit reset steps outside the run
            run = self.run = Run(self.config, n, self.work_counts(), self.ran_counts())
            run.parallel_records = records
        return run

    def follow_scheduler(self) -> None:
        """``pipe.scheduler`` was replaced after ``enable`` (``pipe.scheduler = X.from_config(...)``):
        move the scheduler patches to the new one; a run in progress ends."""
        pipe = self.pipe_ref()
        scheduler = getattr(pipe, "scheduler", None) if pipe is not None else None
        if scheduler is None or scheduler is self.scheduler:
            return
        if is_ours(scheduler.__dict__.get("step")):
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
    def forward(self, hook: TransformerHook, args: tuple, kwargs: dict) -> Any:
        if self.inside:  # the RASModule capturing / calling into the model itself
            return hook.original_forward(*args, **kwargs)
        self.follow_scheduler()
        if getattr(self.scheduler, "timesteps", None) is None:  # not inside a denoising loop
            return hook.original_forward(*args, **kwargs)
        run = self.current_run()
        step = run.step
        device = _device_of(args, kwargs, hook.model)
        if run.run_timer is None:
            run.run_timer = StepTimer(device)
            run.run_timer.begin()
            runner = getattr(hook.ras, "runner", None)
            run.mode = runner.resolved_mode(device) if runner is not None else "custom transform"
        if run.timer is None:
            run.timer = StepTimer(device)
            run.timer.begin()
        timer = StepTimer(device)
        timer.begin()
        try:
            return self._forward(run, step, hook, args, kwargs)
        finally:
            timer.finish()
            run.forward_timers.append(timer)

    def _forward(self, run: Run, step: int, hook: TransformerHook, args: tuple, kwargs: dict) -> Any:
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

    def _compute(self, run: Run, step: int, hook: TransformerHook, slot: str, args: tuple, kwargs: dict) -> Any:
        # A custom transform without a runner wraps the model eagerly.
        eager = run.mode in ("eager", "custom transform")
        if self.parallel is not None:  # context parallelism: every step runs rasfx's graphs, dense ones too
            self.parallel.step = step
        elif run.bypass(step, eager):
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

    def _plan_run(self, run: Run, ras: Any) -> None:
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
                except LayoutError as e:
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
        run.records.append((step, dense, active, run.timer or StepTimer(torch.device("cpu")), skipped))
        run.advance()
        if run.step >= run.num_steps:
            if self.parallel is not None:
                self.parallel.finish_run()
            self.end_run()
        return out

    def _integrate(self, run: Run, step: int, noise: torch.Tensor, ran_dense: bool, skipped: Any, args: tuple,
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
        layout = latent_layout(self, noise, token_map, num_tokens)
        self.layout_cache = (token_map, key, layout)
        return layout

    # -------------------------------------------------------------- stats
    def reported_run(self) -> Optional[Run]:
        """The run ``rasfx.stats`` reports: the one in progress once it recorded a step, else
        the last finished one."""
        if self.run is not None and self.run.records:
            return self.run
        return self.last_run

    def build_stats(self, run: Run) -> RunStats:
        """``RunStats`` of ``run`` (finished, or in progress: what it did so far)."""
        parallel = None if self.parallel is None else self.parallel.stats(run.parallel_records or [])
        return build_stats(run, self.config, pixel_scale=self.pixel_scale, work_now=self.work_counts(),
                           ran_now=self.ran_counts(), fallbacks=self.fallbacks(), unpack=self.original_unpack,
                           parallel=parallel)


def _batch_of(args: tuple, kwargs: dict) -> Optional[int]:
    """Batch size of a transformer call: the first dim of ``hidden_states`` (or of the first tensor)."""
    x = kwargs.get("hidden_states")
    if not isinstance(x, torch.Tensor):
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if not isinstance(x, torch.Tensor):
        x = next((v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim() >= 3), None)
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() >= 1 else None


def _device_of(args: tuple, kwargs: dict, model: torch.nn.Module) -> torch.device:
    """Device of a transformer call: its first tensor argument's, else the model's."""
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v.device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------
# The patched callables (each a ``Wrapper`` around the original)


def _forward_wrapper(controller: PipelineController, hook: TransformerHook) -> Callable:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return controller.forward(hook, args, kwargs)

    return Wrapper(forward, hook.original_forward, hook.model, "forward")


def _context_wrapper(hook: TransformerHook, original: Callable[..., Any]) -> Callable:
    """``original``: the model's own ``cache_context``."""

    @contextlib.contextmanager
    def cache_context(name: str, *args: Any, **kwargs: Any) -> Iterator[None]:
        with original(name, *args, **kwargs):
            hook.contexts.append(str(name) if name else "default")
            try:
                yield
            finally:
                hook.contexts.pop()

    return Wrapper(cache_context, original, hook.model, "cache_context")


def _step_wrapper(controller: PipelineController) -> Callable:
    def step(*args: Any, **kwargs: Any) -> Any:
        return controller.step(args, kwargs)

    return Wrapper(step, controller.original_step, controller.scheduler, "step")


def _patch_scheduler(controller: PipelineController) -> list[Patch]:
    patches = [Patch(controller.scheduler, "step", _step_wrapper(controller))]
    if controller.original_set_timesteps is not None:
        patches.append(Patch(controller.scheduler, "set_timesteps", _set_timesteps_wrapper(controller, controller.original_set_timesteps)))
    return patches


def _set_timesteps_wrapper(controller: PipelineController, original: Callable[..., Any]) -> Callable:
    """``original``: the scheduler's own ``set_timesteps``."""

    def set_timesteps(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if controller.run is not None and not controller.run.finished:
            controller.end_run()  # a new run starts; drop an interrupted run's caches
        return out

    return Wrapper(set_timesteps, original, controller.scheduler, "set_timesteps")


def _unpack_wrapper(controller: PipelineController, pipe: Any, original: Callable[..., Any]) -> Callable:
    """``original``: the pipeline class's own ``_unpack_latents``."""

    def unpack(latents: Any, *args: Any, **kwargs: Any) -> Any:
        if controller.run is not None:
            controller.run.unpack_call = (args, kwargs)
        return original(latents, *args, **kwargs)

    return Wrapper(unpack, original, pipe, "_unpack_latents")
