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

The package: :mod:`~rasfx.pipeline.controller` (the run controller: per-pipeline state, what
each transformer and scheduler call does), :mod:`~rasfx.pipeline.run` (the state of one run),
:mod:`~rasfx.pipeline.latents` (latent layouts), :mod:`~rasfx.pipeline.patching` (undoable
instance patches), :mod:`~rasfx.pipeline.reporting` (``RunStats``) and
:mod:`~rasfx.pipeline.contract` (``rasfx.RASModuleProtocol``, what a custom ``transform=`` must
return; checked at :func:`enable`). This module holds the public functions.

Why instance patches and not diffusers' ``HookRegistry`` / ``ModelHook``: a ``ModelHook`` on the
transformer could replace two of the five patches (``forward`` and ``cache_context``); the
scheduler's ``step`` / ``set_timesteps`` and the pipeline's ``_unpack_latents`` are not modules
and keep their patches, so it would add a second mechanism rather than replace one. It would
also break three guarantees (checked with diffusers 0.42): ``HookRegistry.remove_hook`` leaves
``forward`` and ``_diffusers_hook`` behind as instance attributes of the model, so
:func:`disable` would no longer restore the pipeline exactly; the hooked ``forward`` is a local
closure, so pickling an enabled pipeline fails instead of storing the plain one; and a registry
with hooks on the transformer is what rasfx refuses (diffusers' caches, group offloading and
layerwise casting replace forwards at run time), a check that would have to tell rasfx's own hook
from foreign ones on every forward. The CFG branch name reaches stateful hooks only through
private functions that changed across diffusers releases (``HookRegistry._set_context`` in
earlier ones, ``_set_cache_context`` with a ``CacheContext`` in 0.42); wrapping the public
``cache_context`` method reads it the same way on all of them.
"""

from __future__ import annotations

import contextlib
import importlib
import weakref
from typing import Any, Callable, Iterator, Optional

import torch

from ..config import RASConfig
from ..errors import ArgumentTypeError, RASWarning, UsageError
from ..model_structure import refuse_foreign_hooks
from ..run_stats import RunStats
from .contract import check_ras_module
from .controller import PipelineController, TransformerHook
from .patching import is_ours

__all__ = ["enable", "disable", "enabled", "release", "stats", "is_enabled", "RASWarning"]

_MODEL_ATTRS = ("transformer", "transformer_2")
_STATES: "weakref.WeakKeyDictionary[Any, PipelineController]" = weakref.WeakKeyDictionary()
_LAST_STATS: "weakref.WeakKeyDictionary[Any, RunStats]" = weakref.WeakKeyDictionary()


def _resolve_transform(transform: Optional[Callable], transform_config: Any = None) -> Callable:
    if transform is not None:
        if transform_config is not None:
            raise UsageError("rasfx.enable: pass either transform= or transform_config=, not both")
        return transform
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
    parallel: Any = None,
) -> Any:
    """Attach region-adaptive sampling to a diffusers pipeline; returns ``pipe``.

    ``transform_config``: a ``rasfx.TransformConfig`` for the transformer (e.g.
    ``TransformConfig(mode="cuda_graph")`` for speed on a GPU).
    ``transform``: a custom model transform instead of ``rasfx.transform``; it must return a
    module with the members of ``rasfx.RASModuleProtocol`` (checked here: ``ArgumentTypeError``
    names the missing ones). The pipeline's objects stay the same; only instance attributes
    are added (all removed again by :func:`disable`).
    ``parallel``: a ``rasfx.ParallelConfig``: run the transformer across the ranks of a
    ``torch.distributed`` group, the tokens of every step shared equally (context parallelism;
    every rank makes the same pipeline calls; docs/parallel.md). Every rank calls ``enable``.
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
        if is_ours(m.__dict__.get("forward")):
            raise UsageError(
                f"rasfx.enable: pipe.{n} is already RAS-enabled through another pipeline that shares it; "
                "disable that one first"
            )
    if is_ours(scheduler.__dict__.get("step")):
        raise UsageError(
            "rasfx.enable: pipe.scheduler is already RAS-enabled through another pipeline that shares it; "
            "give each pipeline its own scheduler or disable the other one first"
        )
    make = _resolve_transform(transform, transform_config)
    hooks = [TransformerHook(n, m, check_ras_module(make(m), f"pipe.{n}")) for n, m in models]
    runtime = None
    if parallel is not None:  # context parallelism (rasfx/parallel): forms rasfx's process group
        from ..parallel.runtime import ParallelRuntime

        runtime = ParallelRuntime(parallel)
        try:
            for hook in hooks:
                runtime.attach(hook.ras)
        except BaseException:
            runtime.close()
            raise
    state = PipelineController(pipe, config, hooks, runtime)
    state.install(pipe)
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
        state.uninstall()
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
    state.release_modules()
    return pipe


@contextlib.contextmanager
def enabled(
    pipe: Any,
    config: Optional[RASConfig] = None,
    *,
    transform_config: Any = None,
    transform: Optional[Callable] = None,
    parallel: Any = None,
) -> Iterator[Any]:
    """``with rasfx.enabled(pipe, cfg): ...`` enables RAS for the block and disables it after."""
    enable(pipe, config, transform_config=transform_config, transform=transform, parallel=parallel)
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
