"""User-facing configuration of region-adaptive sampling (RAS).

`RASConfig` only describes *what* to do; `rasfx.sampler` turns it into a per-run plan once the
number of denoising steps and the number of image tokens are known, and `rasfx.pipeline`
attaches it to a diffusers pipeline.

Every field is validated when the config is built (``rasfx.ConfigError``, a ``ValueError``,
naming the field). Fields that
depend on the run (explicit ``reset_steps`` against the run's step count) are checked when the
run starts, again with a ``ValueError`` naming the field.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

from .errors import ConfigError

__all__ = ["RASConfig", "METRICS", "SCHEDULES", "ESTIMATES"]

#: Region metrics. ``std``: per latent pixel standard deviation over channels of the noise
#: prediction the scheduler sees (the paper's default); ``l2``: per pixel L2 norm over channels;
#: ``random``: a uniformly random ranking per step (the paper's Table 4 baseline).
METRICS = ("std", "l2", "random")

#: Budget schedules. ``static``: the same active count on every RAS step; ``dynamic``: the
#: paper's progressively reduced ratio (Section 3.3): the active count falls linearly over the
#: RAS steps from ``ratio * (1 + dynamic_range)`` to ``ratio * (1 - dynamic_range)``, so the
#: average over the RAS steps stays ``ratio``.
SCHEDULES = ("static", "dynamic")

#: How a noise value that is not computed on a step is estimated (step sparsity, see
#: :mod:`rasfx.steps`). ``reuse``: the value of the last step that computed it; ``extrapolate``:
#: first order from the last two steps that computed it (TaylorSeer-style), per token.
ESTIMATES = ("reuse", "extrapolate")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class RASConfig:
    """How region-adaptive sampling runs.

    Attributes:
        ratio: average share of image tokens the transformer computes on a RAS step, in (0, 1].
            1.0 means every step is dense (identical output to the plain pipeline).
        metric: region metric, one of :data:`METRICS`. Low std (or low L2) marks the main
            subject, which is computed (paper, Section 3.2).
        starvation_scale: ``k`` >= 0. A token dropped ``D`` consecutive RAS steps gets
            ``k * D`` added to its selection priority, whose metric part lies in [0, 1] (a
            normalised rank). With ``k > 0`` no token stays inactive for more than
            ``ceil(1 / k) + floor((N - 1) / n_min)`` consecutive steps
            (:func:`rasfx.sampler.starvation_bound`). ``k = 0`` ranks by the metric alone.
        warmup: number of dense steps at the start (>= 1: step 0 has no noise to select
            from). ``None``: 4 of 28 steps, scaled to the run's step count (at least 1).
        reset_steps: step indices that run dense to reset accumulated error. ``None``: steps 12
            and 20 of 28, scaled to the run's step count; a scaled reset is kept only if at least
            two RAS steps precede it since the last dense step and at least one RAS step follows
            it, so few-step runs are never all-dense by accident. An explicit sequence is used as
            given and must lie inside the run (checked when the run starts); ``()`` disables
            resets.
        schedule: one of :data:`SCHEDULES`.
        dynamic_range: relative spread of the ``dynamic`` schedule in [0, 1); it is reduced when
            ``ratio * (1 + dynamic_range)`` would exceed 1.
        high_ratio: share of the *dropped* tokens taken from the top of the metric ranking (the
            highest std); the rest are taken from the bottom (as the official ``high_ratio``).
            1.0 (default) drops the highest-std tokens and computes the lowest-std ones; 0.0
            drops from the bottom only.
        round_to: active counts are multiples of this bucket so only a few shapes occur (CUDA
            graph and compile friendly). ``None``: ``min(64, max(1, N // 16))`` for ``N`` image
            tokens, i.e. 64 for real resolutions and a 1/16 fraction on tiny inputs. The bucket is
            capped at ``N``; the active count is never 0 and never above ``N``.
        seed: seed of the ``random`` metric (a generator on the latents' device).

    Step sparsity (:mod:`rasfx.steps`; all off by default): a RAS-kind step (not warm-up, not a
    reset) may be *skipped*: the transformer is not called and the scheduler integrates an
    estimate of the noise. At most one of the three rules may be set.

    Attributes:
        skip_steps: explicit step indices to skip; each must be a RAS-kind step of the run
            (checked when the run starts: warm-up and reset steps are never skipped).
        skip_every: ``k >= 2``: skip the ``k``-th, ``2k``-th, ... step of every stretch of RAS-kind
            steps between dense steps.
        skip_threshold: adaptive rule, a number >= 0: skip a RAS-kind step while the error budget
            (the relative L1 change of the noise between the last two computed steps, accumulated
            over the skips since the last computed step) stays below it. 0 never skips.
        skip_max_consecutive: adaptive rule only: at most this many steps skipped in a row
            (``None``: only the budget limits them).
        skip_sync: adaptive rule only. ``False`` (default): the decision stays on the device; the
            step is computed and its noise replaced by the estimate where the rule says skip (no
            host synchronisation, same graphs, no time saved). ``True``: the decision is read on the
            host at the step's first transformer call (one synchronisation per candidate step) and
            a skipped step does not call the transformer.
        skip_estimate: the noise of a skipped step, one of :data:`ESTIMATES`.
        inactive_estimate: the noise of the inactive tokens of a RAS step, one of
            :data:`ESTIMATES` (``reuse`` is the paper's).
    """

    ratio: float = 0.5
    metric: str = "std"
    starvation_scale: float = 0.1
    warmup: int | None = None
    reset_steps: tuple[int, ...] | None = None
    schedule: str = "static"
    dynamic_range: float = 0.5
    high_ratio: float = 1.0
    round_to: int | None = None
    seed: int = 0
    skip_steps: tuple[int, ...] | None = None
    skip_every: int | None = None
    skip_threshold: float | None = None
    skip_max_consecutive: int | None = None
    skip_sync: bool = False
    skip_estimate: str = "reuse"
    inactive_estimate: str = "reuse"

    def __post_init__(self) -> None:
        if not _is_real(self.ratio) or not math.isfinite(float(self.ratio)) or not 0.0 < float(self.ratio) <= 1.0:
            raise ConfigError(f"RASConfig.ratio must be a number in (0, 1], got {self.ratio!r}")
        object.__setattr__(self, "ratio", float(self.ratio))

        if self.metric not in METRICS:
            raise ConfigError(f"RASConfig.metric must be one of {METRICS}, got {self.metric!r}")

        k = self.starvation_scale
        if not _is_real(k) or not math.isfinite(float(k)) or float(k) < 0.0:
            raise ConfigError(f"RASConfig.starvation_scale must be a finite number >= 0, got {k!r}")
        object.__setattr__(self, "starvation_scale", float(k))

        if self.warmup is not None:
            if not _is_int(self.warmup) or int(self.warmup) < 1:
                raise ConfigError(
                    f"RASConfig.warmup must be None or an int >= 1 (step 0 has no noise to select "
                    f"tokens from), got {self.warmup!r}"
                )
            object.__setattr__(self, "warmup", int(self.warmup))

        self._check_step_indices("reset_steps")

        if self.schedule not in SCHEDULES:
            raise ConfigError(f"RASConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")

        d = self.dynamic_range
        if not _is_real(d) or not 0.0 <= float(d) < 1.0:
            raise ConfigError(f"RASConfig.dynamic_range must be a number in [0, 1), got {d!r}")
        object.__setattr__(self, "dynamic_range", float(d))

        h = self.high_ratio
        if not _is_real(h) or not 0.0 <= float(h) <= 1.0:
            raise ConfigError(f"RASConfig.high_ratio must be a number in [0, 1], got {h!r}")
        object.__setattr__(self, "high_ratio", float(h))

        if self.round_to is not None:
            if not _is_int(self.round_to) or int(self.round_to) < 1:
                raise ConfigError(f"RASConfig.round_to must be None or an int >= 1, got {self.round_to!r}")
            object.__setattr__(self, "round_to", int(self.round_to))

        if not _is_int(self.seed):
            raise ConfigError(f"RASConfig.seed must be an int, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))
        self._check_step_sparsity()

    def _check_step_indices(self, name: str) -> None:
        """``None`` or a sequence of step indices (ints >= 0), stored sorted without repeats."""
        steps = getattr(self, name)
        if steps is None:
            return
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
            raise ConfigError(f"RASConfig.{name} must be None or a sequence of ints, got {steps!r}")
        for s in steps:
            if not _is_int(s) or int(s) < 0:
                raise ConfigError(f"RASConfig.{name} must hold ints >= 0, got {s!r} in {steps!r}")
        object.__setattr__(self, name, tuple(sorted({int(s) for s in steps})))

    def _check_step_sparsity(self) -> None:
        self._check_step_indices("skip_steps")
        if self.skip_every is not None:
            if not _is_int(self.skip_every) or int(self.skip_every) < 2:
                raise ConfigError(
                    f"RASConfig.skip_every must be None or an int >= 2 (1 would skip every step between dense "
                    f"steps: use fewer steps instead), got {self.skip_every!r}"
                )
            object.__setattr__(self, "skip_every", int(self.skip_every))
        thr = self.skip_threshold
        if thr is not None:
            if not _is_real(thr) or not math.isfinite(float(thr)) or float(thr) < 0.0:
                raise ConfigError(f"RASConfig.skip_threshold must be None or a finite number >= 0, got {thr!r}")
            object.__setattr__(self, "skip_threshold", float(thr))
        rules = [n for n in ("skip_steps", "skip_every", "skip_threshold") if getattr(self, n) is not None]
        if len(rules) > 1:
            raise ConfigError(f"RASConfig: set at most one skip rule, got {' and '.join(rules)}; keep one of them")
        m = self.skip_max_consecutive
        if m is not None:
            if not _is_int(m) or int(m) < 1:
                raise ConfigError(f"RASConfig.skip_max_consecutive must be None or an int >= 1, got {m!r}")
            if thr is None:
                raise ConfigError(
                    f"RASConfig.skip_max_consecutive={m!r} applies to the adaptive rule only: set skip_threshold, "
                    "or drop skip_max_consecutive"
                )
            object.__setattr__(self, "skip_max_consecutive", int(m))
        if not isinstance(self.skip_sync, bool):
            raise ConfigError(f"RASConfig.skip_sync must be a bool, got {self.skip_sync!r}")
        if self.skip_sync and thr is None:
            raise ConfigError(
                "RASConfig.skip_sync=True applies to the adaptive rule only (scheduled skips never synchronise): "
                "set skip_threshold, or drop skip_sync"
            )
        for name in ("skip_estimate", "inactive_estimate"):
            if getattr(self, name) not in ESTIMATES:
                raise ConfigError(f"RASConfig.{name} must be one of {ESTIMATES}, got {getattr(self, name)!r}")
        if self.skip_estimate != "reuse" and not rules:
            raise ConfigError(
                f"RASConfig.skip_estimate={self.skip_estimate!r} applies to skipped steps, but no step is skipped: "
                "set skip_steps, skip_every or skip_threshold, or drop skip_estimate"
            )

    @property
    def step_sparsity(self) -> bool:
        """Whether any step-sparsity option is on (a skip rule or an extrapolated estimate)."""
        return (self.skip_steps is not None or self.skip_every is not None or self.skip_threshold is not None
                or self.inactive_estimate != "reuse")

    def replace(self, **changes: Any) -> "RASConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
