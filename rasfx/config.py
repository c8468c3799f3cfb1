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

__all__ = ["RASConfig", "METRICS", "SCHEDULES"]

#: Region metrics. ``std``: per latent pixel standard deviation over channels of the noise
#: prediction the scheduler sees (the paper's default); ``l2``: per pixel L2 norm over channels;
#: ``random``: a uniformly random ranking per step (the paper's Table 4 baseline).
METRICS = ("std", "l2", "random")

#: Budget schedules. ``static``: the same active count on every RAS step; ``dynamic``: the
#: paper's progressively reduced ratio (Section 3.3): the active count falls linearly over the
#: RAS steps from ``ratio * (1 + dynamic_range)`` to ``ratio * (1 - dynamic_range)``, so the
#: average over the RAS steps stays ``ratio``.
SCHEDULES = ("static", "dynamic")


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

        if self.reset_steps is not None:
            steps = self.reset_steps
            if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
                raise ConfigError(f"RASConfig.reset_steps must be None or a sequence of ints, got {steps!r}")
            for s in steps:
                if not _is_int(s) or int(s) < 0:
                    raise ConfigError(f"RASConfig.reset_steps must hold ints >= 0, got {s!r} in {steps!r}")
            object.__setattr__(self, "reset_steps", tuple(sorted({int(s) for s in steps})))

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

    def replace(self, **changes: Any) -> "RASConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
