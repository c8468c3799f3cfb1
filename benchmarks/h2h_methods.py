"""The models and methods of ``head_to_head.py``: loading either shapes model, the noise shape,
the rasfx settings (RAS and the combined sampler) and diffusers' cache hooks with what they need
to run on these pipelines (a ``CacheMixin`` transformer, a per-step cache context, MagCache's
calibration), and the linear-layer work counter that prices the hooks.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from ras_ablations import ABLATIONS, TRANSFORM_ABLATIONS  # benchmarks/ras_ablations.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the evaluation classifier (trained on the shapes data; it judges images of either model)
DEFAULT_CLASSIFIER = os.path.join(ROOT, "models", "shapes-dit", "classifier.safetensors")
#: diffusers cache families in the order their settings are interleaved (so a budget cut keeps one of each)
CACHE_FAMILIES = ("FirstBlockCache", "TaylorSeer lite", "TaylorSeer", "MagCache", "FasterCache", "PyramidAttentionBroadcast",
                  "SeaCache")


@dataclass
class Method:
    """One sampler setting. ``kind``: ``dense`` (``steps`` steps), ``rasfx`` (``fields`` of a
    ``RASConfig``, ``transform`` options of a ``TransformConfig``) or ``cache`` (``make``: a
    diffusers cache config factory; ``hook``: its family)."""

    family: str  # dense | RAS | combined | diffusers
    name: str
    kind: str
    steps: int
    fields: dict = field(default_factory=dict)
    transform: Optional[dict] = None
    make: Optional[Callable[[], Any]] = None
    hook: Optional[str] = None


# ----------------------------------------------------------------------------------------------
# Models


def load_pipeline(folder: str, device: torch.device, dtype: torch.dtype):
    """Either shapes model through ``shapes_pipeline.load_pipeline`` (it dispatches on the folder's
    ``model_index.json``: ``ShapesPipeline`` for ``models/shapes-dit``, ``LatentShapesPipeline``
    for ``models/shapes-latent-dit``), on ``device`` in ``dtype``."""
    from rasfx.errors import UsageError
    from shapes_pipeline import load_pipeline as load_either  # examples/shapes_pipeline.py

    if not os.path.isdir(folder):
        raise UsageError(f"--model {folder!r} is not a model folder; pass models/shapes-dit or models/shapes-latent-dit")
    return load_either(folder, device=device, dtype=dtype)


def noise_shape(pipe) -> tuple[int, ...]:
    """(C, H, W) of one image's initial noise: pixels (3, 64, 64) for ``ShapesPipeline``, unpacked
    latents (C, 16, 16) for ``LatentShapesPipeline`` (the pipelines' ``noise_shape(batch)``)."""
    return tuple(int(x) for x in pipe.noise_shape(1)[1:])


def check_classifier(path: str) -> str:
    """``path`` if it is a file, else a ``UsageError`` that names the shipped one."""
    from rasfx.errors import UsageError

    if not os.path.isfile(path):
        raise UsageError(f"--classifier {path!r} is not a file; the evaluation classifier of both shapes models is "
                         f"{os.path.relpath(DEFAULT_CLASSIFIER, ROOT)}")
    return path


# ----------------------------------------------------------------------------------------------
# Methods


def dense_methods(steps: Sequence[int]) -> list[Method]:
    return [Method("dense", f"dense {k} steps", "dense", k) for k in steps]


def ras_methods(ratios: Sequence[float], steps: int, ablations: Sequence[str]) -> list[Method]:
    """RAS with the default ``RASConfig`` at ``ratios`` (the first is expected to be the default
    0.5), and each ablation variant of ``ablations`` (names of ``ras_ablations.ABLATIONS``) at
    each; the verdicts take the RAS family's best of them within a budget."""
    out = [Method("RAS", f"RAS {r:g}", "rasfx", steps, dict(ratio=r)) for r in ratios]
    for ablation in ablations:
        if ablation == "default":
            continue
        _, label, overrides, _ = next(a for a in ABLATIONS if a[0] == ablation)
        out += [Method("RAS", f"RAS {r:g} ({label})", "rasfx", steps, dict(overrides, ratio=r),
                       transform=TRANSFORM_ABLATIONS.get(ablation)) for r in ratios]
    return out


def compute_every(k: int, steps: int, fields: dict) -> dict:
    """``fields`` with ``skip_steps`` that skip every RAS-kind step but each ``k``-th of its stretch
    (TaylorSeer's ``cache_interval`` placement: one computed step in ``k``)."""
    from rasfx import RASConfig
    from rasfx.sampler import step_kinds

    kinds = step_kinds(RASConfig(**{k: v for k, v in fields.items() if k in ("warmup", "reset_steps")}), steps)
    skip, position = [], 0
    for i, ras in enumerate(kinds):
        position = position + 1 if ras else 0
        if ras and position % k:
            skip.append(i)
    return dict(fields, skip_steps=tuple(skip))


def dense_every(k: int, steps: int, fields: dict) -> dict:
    """``fields`` with ``reset_steps`` that make every ``k``-th step after the warm-up dense: the
    RAS steps between them are at most ``k - 1`` steps from a dense one."""
    from rasfx.sampler import default_warmup

    warmup = fields.get("warmup") or default_warmup(steps)
    return dict(fields, reset_steps=tuple(range(warmup + k - 1, steps, k)))


def combined_methods(steps: int, settings_count: Optional[int] = None) -> list[Method]:
    """The combined sampler (token sparsity + step sparsity, ``RASConfig``'s skip fields), settings
    that span about 30-60 % of a dense run of ``steps``. The first seven try both estimates, for
    the skipped steps and a RAS step's inactive tokens alike (``reuse``: the last computed
    prediction; ``extrapolate``: linear, from the last two computed predictions, per element, in
    timestep units); the next nine give theirs: skipped steps extrapolated and inactive tokens
    reused (the split the first head-to-head pointed to), with TaylorSeer's placement of the
    computed steps (3 full steps, then one in ``k``); the last three skip nothing and run RAS
    steps between dense ones every ``k``-th step, their inactive tokens extrapolated.
    ``settings_count``: the first so many settings (all by default)."""
    lite = dict(warmup=max(1, round(3 * steps / 28)), reset_steps=())  # TaylorSeer's 3 full steps, no resets
    split = dict(skip_estimate="extrapolate", inactive_estimate="reuse")
    placed = [  # (name, fields): estimates given
        ("dense + compute every 3rd, extrapolate", compute_every(3, steps, dict(lite, ratio=1.0, skip_estimate="extrapolate"))),
        ("dense + compute every 2nd, extrapolate", compute_every(2, steps, dict(lite, ratio=1.0, skip_estimate="extrapolate"))),
        ("RAS 0.75 inverted + compute every 2nd, extrapolate / reuse",
         compute_every(2, steps, dict(lite, ratio=0.75, high_ratio=0.0, **split))),
        ("RAS 0.5 inverted + compute every 2nd, extrapolate / reuse",
         compute_every(2, steps, dict(lite, ratio=0.5, high_ratio=0.0, **split))),
        ("dense + compute every 4th, extrapolate", compute_every(4, steps, dict(lite, ratio=1.0, skip_estimate="extrapolate"))),
        ("RAS 0.5 inverted + skip every 2nd, extrapolate / reuse", dict(ratio=0.5, high_ratio=0.0, skip_every=2, **split)),
        # no skipped step: RAS steps between dense ones, their inactive tokens extrapolated from at
        # most k - 1 steps back (where reuse fell behind when tokens stayed inactive for long)
        ("RAS 0.25 inverted between dense every 3rd, inactive extrapolated",
         dense_every(3, steps, dict(lite, ratio=0.25, high_ratio=0.0, inactive_estimate="extrapolate"))),
        ("RAS 0.25 between dense every 3rd, inactive extrapolated",
         dense_every(3, steps, dict(lite, ratio=0.25, inactive_estimate="extrapolate"))),
        ("RAS 0.125 inverted between dense every 4th, inactive extrapolated",
         dense_every(4, steps, dict(lite, ratio=0.125, high_ratio=0.0, inactive_estimate="extrapolate"))),
    ]
    both = [  # (name, fields): each estimate tried for both
        ("RAS 0.5 + skip every 2nd", dict(ratio=0.5, skip_every=2)),
        ("RAS 0.25 + skip every 2nd", dict(ratio=0.25, skip_every=2)),
        ("RAS 0.75 + skip every 2nd", dict(ratio=0.75, skip_every=2)),
        ("RAS 0.5 + skip every 3rd", dict(ratio=0.5, skip_every=3)),
        ("dense + skip every 2nd", dict(ratio=1.0, skip_every=2)),
        ("RAS 0.5 + adaptive skip 0.3", dict(ratio=0.5, skip_threshold=0.3, skip_sync=True)),
        ("dense + adaptive skip 0.3", dict(ratio=1.0, skip_threshold=0.3, skip_sync=True)),
    ]
    settings = [(name, fields, True) for name, fields in both] + [(name, fields, False) for name, fields in placed]
    out = []
    for name, fields, each_estimate in settings[:settings_count]:
        if not each_estimate:
            out.append(Method("combined", name, "rasfx", steps, fields))
            continue
        for estimate in ("extrapolate", "reuse"):
            inactive = {} if fields["ratio"] >= 1.0 else dict(inactive_estimate=estimate)
            out.append(Method("combined", f"{name}, {estimate}", "rasfx", steps,
                              dict(fields, skip_estimate=estimate, **inactive)))
    return out


def cache_methods(steps: int, step_context: "StepContext", mag_ratios: Optional[list[float]],
                  settings_count: int = 3, packed_tokens: bool = False) -> tuple[list[Method], list[dict]]:
    """diffusers' cache hooks (``diffusers.hooks``) through ``enable_cache``, up to
    ``settings_count`` settings of each family (2-3 defined), interleaved by family; and the hooks that do not apply, with
    the reason. ``packed_tokens``: the transformer returns (B, N, C) tokens (Flux), not a BCHW
    image: FasterCache's approximation of the unconditional branch (an FFT of the BCHW output)
    cannot run there, so it keeps only its attention reuse (``is_guidance_distilled=True``, the
    config's switch for "no unconditional-branch approximation")."""
    from diffusers.hooks import (
        FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig, SeaCacheConfig,
        TaylorSeerCacheConfig,
    )
    from diffusers.hooks.faster_cache import _UNCOND_COND_INPUT_KWARGS_IDENTIFIERS

    timestep = step_context.timestep
    before = max(1, round(3 * steps / 28))  # TaylorSeer's default: 3 full steps (of 28)
    # FasterCache splits the batched [uncond, cond] keyword inputs; these pipelines also batch pooled_projections
    uncond_cond = list(_UNCOND_COND_INPUT_KWARGS_IDENTIFIERS) + ["pooled_projections"]
    families: dict[str, list[tuple[str, Callable[[], Any]]]] = {
        "FirstBlockCache": [(f"FirstBlockCache {t:g}", lambda t=t: FirstBlockCacheConfig(threshold=t))
                            for t in (0.1, 0.2, 0.05)],
        "TaylorSeer": [(f"TaylorSeer interval {n}", lambda n=n: TaylorSeerCacheConfig(
            cache_interval=n, disable_cache_before_step=before, taylor_factors_dtype=torch.float32)) for n in (2, 5)],
        # lite: whole blocks skipped, the output projection predicted (a step cache)
        "TaylorSeer lite": [(f"TaylorSeer lite interval {n}", lambda n=n: TaylorSeerCacheConfig(
            cache_interval=n, disable_cache_before_step=before, taylor_factors_dtype=torch.float32, use_lite_mode=True))
            for n in (2, 3, 5)],
        "FasterCache": [(f"FasterCache attention every {n}", lambda n=n: FasterCacheConfig(
            spatial_attention_block_skip_range=n, tensor_format="BCHW", current_timestep_callback=timestep,
            attention_weight_callback=lambda _: 0.5, _unconditional_conditional_input_kwargs_identifiers=uncond_cond,
            is_guidance_distilled=packed_tokens)) for n in (2, 3)],
        "PyramidAttentionBroadcast": [(f"PAB attention every {n}" + (", all steps" if span else ""),
                                       lambda n=n, span=span: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=n, current_timestep_callback=timestep,
            **({"spatial_attention_timestep_skip_range": (-1, 1001)} if span else {})))
            for n, span in ((2, False), (3, True), (4, True))],
        "SeaCache": [(f"SeaCache {t:g}", lambda t=t: SeaCacheConfig(threshold=t, raw_vision_callback=raw_vision))
                     for t in (0.25, 0.5, 0.1)],
    }
    if mag_ratios is not None:
        families["MagCache"] = [(f"MagCache {t:g}", lambda t=t: MagCacheConfig(
            threshold=t, num_inference_steps=steps, mag_ratios=list(mag_ratios))) for t in (0.06, 0.12, 0.24)]
    if packed_tokens:
        families["FasterCache"] = [(name + " (attention reuse only)", make) for name, make in families["FasterCache"]]
    methods = []
    for i in range(settings_count):
        for fam in CACHE_FAMILIES:
            settings = families.get(fam, [])
            if i < len(settings):
                methods.append(Method("diffusers", settings[i][0], "cache", steps, make=settings[i][1], hook=fam))
    not_applicable = [dict(name="TextKVCache", reason="caches only NucleusMoEImageTransformerBlock's text K/V "
                           "projections (lossless); these models have no such block and it saves no image-token work")]
    return methods, not_applicable


def raw_vision(module: torch.nn.Module, args: tuple, kwargs: dict) -> Optional[list[torch.Tensor]]:
    """SeaCache's ``raw_vision_callback``: the transformer's input latents as (C, T=1, H, W) per
    batch row; (B, C, H, W) pixels or latents, or Flux-style packed (B, H*W, C) tokens on a square
    grid (``None`` otherwise: SeaCache then runs every step in full)."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(x, torch.Tensor):
        return None
    if x.dim() == 4:
        return list(x.unsqueeze(2).unbind(0))
    if x.dim() == 3:
        side = math.isqrt(x.shape[1])
        if side * side == x.shape[1]:
            return list(x.transpose(1, 2).reshape(x.shape[0], x.shape[2], 1, side, side).unbind(0))
    return None


# ----------------------------------------------------------------------------------------------
# What the hooks need


def cache_capable(pipe):
    """A second pipeline for the cache hooks: the same weights in a transformer of its own (its own
    scheduler; other parts shared), so the hooks and their step context never touch the transformer
    that rasfx captured (an added hook makes rasfx capture it again). Its class is the original one
    where that has diffusers' ``CacheMixin`` (Flux: the hooks go on a ``FluxTransformer2DModel``),
    else a subclass that adds it (SD3 has none), so the hooks apply through ``enable_cache``."""
    from diffusers.models.cache_utils import CacheMixin

    base = type(pipe.transformer)
    cls = base if issubclass(base, CacheMixin) else type(f"Cached{base.__name__}", (CacheMixin, base), {})
    model = cls.from_config(pipe.transformer.config).to(device=pipe.transformer.device, dtype=pipe.transformer.dtype)
    model.load_state_dict(pipe.transformer.state_dict())
    model.eval()
    parts = dict(pipe.components, transformer=model, scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config))
    accepts = inspect.signature(type(pipe).__init__).parameters
    extra = {k: getattr(pipe, k) for k in ("class_embeddings",) if k in accepts and k not in parts and hasattr(pipe, k)}
    out = type(pipe)(**parts, **extra)
    out.set_progress_bar_config(disable=True)
    return out


class StepContext:
    """Enters ``transformer.cache_context("cond", step_index=, sigma=, num_inference_steps=)``
    around every transformer call (the denoising loops of these pipelines do not), read from the
    scheduler as diffusers' Wan pipeline passes them; ``timestep()`` is the current step's timestep
    (0-1000) for FasterCache's and PAB's ``current_timestep_callback``. One batched [uncond, cond]
    call per step."""

    def __init__(self, transformer: torch.nn.Module, scheduler) -> None:
        self.scheduler = scheduler
        self._ctx = None
        self.handles = [transformer.register_forward_pre_hook(self._enter),
                        transformer.register_forward_hook(self._exit)]

    def step(self) -> int:
        i = self.scheduler.step_index  # None before the first scheduler.step of a run
        return 0 if i is None else int(i)

    def timestep(self) -> float:
        return float(self.scheduler.timesteps[min(self.step(), len(self.scheduler.timesteps) - 1)])

    def _enter(self, module: torch.nn.Module, args: tuple) -> None:
        i = self.step()
        self._ctx = module.cache_context("cond", step_index=i, sigma=float(self.scheduler.sigmas[i]),
                                         num_inference_steps=len(self.scheduler.timesteps))
        self._ctx.__enter__()

    def _exit(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.__exit__(None, None, None)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def diffusers_warnings():
    """The messages diffusers logs at warning level or above while entered (a list, filled in
    place), instead of printing them; e.g. SeaCache's "fail-open" (runs every step in full)."""
    import logging

    from diffusers.utils import logging as dlog

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    root, handler = dlog.get_logger("diffusers"), Collect(logging.WARNING)
    level = root.level
    dlog.disable_default_handler()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    try:
        yield messages
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        dlog.enable_default_handler()


class LinearWork:
    """Multiply-adds of every ``nn.Linear`` call under a module (forward hooks), while entered."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.macs, self.handles = module, 0, []

    def __enter__(self) -> "LinearWork":
        self.macs = 0
        self.handles = [m.register_forward_hook(self._count) for m in self.module.modules()
                        if isinstance(m, torch.nn.Linear)]
        return self

    def _count(self, module: torch.nn.Linear, args: tuple, output: Any) -> None:
        x = args[0]
        self.macs += (x.numel() // x.shape[-1]) * module.in_features * module.out_features

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def calibrate_magcache(sample: Callable[[], Any], transformer, steps: int) -> tuple[Optional[list[float]], str]:
    """MagCache's magnitude ratios for this model through its public calibration mode
    (``MagCacheConfig(calibrate=True)`` runs every step and prints the ratios at the end, the
    documented way to get them for a new model): one dense run of ``sample()``, printed list read
    back. Returns (ratios or None, what happened)."""
    from diffusers.hooks import MagCacheConfig

    printed = io.StringIO()
    transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        with contextlib.redirect_stdout(printed):
            sample()
    except Exception as e:  # the hook does not run on this model
        return None, f"calibration run failed: {type(e).__name__}: {e}"
    finally:
        transformer.disable_cache()
    lines = [ln.strip() for ln in printed.getvalue().splitlines() if ln.strip().startswith("[")]
    lists = [ast.literal_eval(ln) for ln in lines if not ln.startswith("[MagCache]")]
    if not lists or len(lists[-1]) != steps:
        return None, f"calibration printed no ratio list of {steps} values: {printed.getvalue()[-300:]!r}"
    return [float(x) for x in lists[-1]], f"calibrated on one dense {steps}-step run of separate noise"
