"""Step sparsity: a step computes every token (dense), the region-selected tokens (RAS), or none (skip).

Pure torch; knows nothing about diffusers. :mod:`rasfx.pipeline` drives one :class:`StepSparsity`
per run from the scheduler's ``step`` (it sees the noise prediction the scheduler integrates, after
classifier-free guidance, and the step's timestep).

* **Estimates.** Per latent element, the noise values of the last two steps that *computed* it
  (``a``, ``b``) and their timesteps (``t_a``, ``t_b``) are kept. A skipped step integrates, per
  element, ``a`` (``"reuse"``) or the first-order extrapolation (``"extrapolate"``, TaylorSeer-style)
  ``a + (a - b) * (t - t_a) / (t_a - t_b)``, in the units of the timestep the pipeline passes to
  ``scheduler.step`` (the ratio is the same in any affine unit: sigmas, flow-matching timesteps);
  an element with a single computed value, or two at the same timestep, reuses ``a``. Inactive
  tokens of a RAS step may use the same extrapolation instead of the reused value the ``RASModule``
  returns (``RASConfig.inactive_estimate``). Tokens are computed on different steps, so ``t_a`` and
  ``t_b`` are per element.
* **Scheduled skips** (``RASConfig.skip_steps`` / ``skip_every``) are known on the host before the
  run: the transformer is not called on a skipped step (one evaluation saved per skipped step).
* **Adaptive skips** (``RASConfig.skip_threshold``, in the spirit of MagCache / FirstBlockCache): after
  every computed step, the relative L1 change of the noise on the elements it computed against
  their previous computed values, ``c = sum |a - b| / sum |a|`` (the largest over the latent rows),
  is taken on the device. A candidate step (a RAS-kind step: never warm-up or reset) is skipped when
  ``e + c < skip_threshold``, ``e`` being the error accumulated by the skips since the last computed
  step (each skip adds ``c``; a computed step sets ``e = 0``), and fewer than
  ``skip_max_consecutive`` steps were skipped in a row. Threshold 0 never skips.

  The decision is a 0-dim boolean tensor on the latents' device, made at the end of the previous
  step. Not calling the transformer needs it on the host: ``skip_sync=True`` reads it at the step's
  first transformer call (one host synchronisation per candidate step; on a GPU the device then
  idles while the host launches the step, which is short with CUDA graphs). ``skip_sync=False``
  (the default) never reads it: the step is computed as planned (same graphs, same buckets) and its
  noise replaced by the estimate with ``torch.where`` where the rule says skip, so the images follow
  the rule but no time is saved, and the step's K/V and output caches hold the computed values (a
  real skip leaves them as they were). Use it to calibrate a threshold without synchronising, then
  switch to ``skip_sync=True`` or to the schedule the rule picked (``rasfx.stats(pipe).skipped_steps``).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .config import RASConfig
from .errors import ConfigError
from .sampler import PixelLayout

__all__ = ["skip_schedule", "skip_candidates", "element_mask", "extrapolate", "StepSparsity"]

Skipped = Union[bool, torch.Tensor]


def skip_candidates(config: RASConfig, kinds: tuple[bool, ...]) -> tuple[bool, ...]:
    """Per step: whether the adaptive rule may skip it (``kinds`` from :func:`rasfx.sampler.step_kinds`:
    every RAS-kind step; warm-up and reset steps are never skipped)."""
    return tuple(kinds) if config.skip_threshold is not None else (False,) * len(kinds)


def skip_schedule(config: RASConfig, kinds: tuple[bool, ...]) -> tuple[bool, ...]:
    """Per step: whether the schedule skips it (``skip_steps`` or ``skip_every``), from the step kinds
    of the run (``True``: RAS-kind step, ``False``: warm-up or reset).

    ``skip_every=k`` skips the ``k``-th, ``2k``-th, ... step of every stretch of RAS-kind steps between
    dense steps. Explicit ``skip_steps`` outside the run or on a dense step raise ``rasfx.ConfigError``.
    """
    num_steps = len(kinds)
    skip = [False] * num_steps
    if config.skip_steps is not None:
        outside = [s for s in config.skip_steps if s >= num_steps]
        if outside:
            raise ConfigError(
                f"RASConfig.skip_steps {list(config.skip_steps)} do not fit a {num_steps}-step run: {outside} out "
                f"of range (valid steps are 0..{num_steps - 1})"
            )
        dense = [s for s in config.skip_steps if not kinds[s]]
        if dense:
            raise ConfigError(
                f"RASConfig.skip_steps {list(config.skip_steps)} include warm-up or reset steps {dense} of this "
                f"{num_steps}-step run, which are never skipped (dense steps: "
                f"{[i for i, k in enumerate(kinds) if not k]}); drop them, or change warmup / reset_steps"
            )
        for s in config.skip_steps:
            skip[s] = True
    elif config.skip_every is not None:
        position = 0
        for i, ras in enumerate(kinds):
            position = position + 1 if ras else 0
            skip[i] = ras and position % config.skip_every == 0
    return tuple(skip)


def element_mask(layout: PixelLayout, token_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Boolean mask of the latent elements (``shape``, the scheduler's latents) produced by the tokens
    in ``token_mask`` (``[R, N]``). Pixels that no token produced count as computed."""
    rows = token_mask.shape[0]
    padded = torch.cat([token_mask, torch.ones((rows, 1), dtype=torch.bool, device=token_mask.device)], dim=1)
    pixels = padded.index_select(1, layout.pixel_token.to(token_mask.device))  # [R, P]
    if layout.packed_perm is None:  # [R, C, *grid]: one pixel per grid position, all channels
        return pixels.view(rows, 1, *shape[2:])
    k = layout.num_pixels // shape[1]
    # element d of a packed row belongs to its pixel (d's position in the permutation) // C
    column_pixel = layout.packed_perm.to(token_mask.device).argsort() // layout.channels
    return pixels.view(rows, shape[1], k).gather(2, column_pixel.view(1, 1, -1).expand(rows, shape[1], -1))


def extrapolate(a: torch.Tensor, b: torch.Tensor, t_a: torch.Tensor, t_b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``a + (a - b) * (t - t_a) / (t_a - t_b)`` in float32, cast to ``a``'s dtype; ``a`` where the factor
    is not finite (no second value, ``t_b`` NaN, or ``t_a == t_b``)."""
    factor = (t - t_a) / (t_a - t_b)
    factor = torch.where(torch.isfinite(factor), factor, torch.zeros_like(factor))
    a32 = a.to(torch.float32)
    return (a32 + (a32 - b.to(torch.float32)) * factor).to(a.dtype)


class StepSparsity:
    """Per-run state of step sparsity: the noise history, the estimates and the skip decisions.

    ``kinds``: per step, ``True`` for a RAS-kind step (see :func:`rasfx.sampler.step_kinds`). Every
    tensor stays on the latents' device; no method reads one back to the host.
    """

    def __init__(self, config: RASConfig, kinds: tuple[bool, ...]) -> None:
        self.config = config
        self.num_steps = len(kinds)
        self.scheduled = skip_schedule(config, kinds)  # raises on explicit skip steps that cannot be skipped
        self.candidates = skip_candidates(config, kinds)
        self.a: Optional[torch.Tensor] = None  # last computed value per element
        self.b: Optional[torch.Tensor] = None  # the one before
        self.t_a: Optional[torch.Tensor] = None  # float32 timestep of a (NaN: none yet)
        self.t_b: Optional[torch.Tensor] = None
        self.change: Optional[torch.Tensor] = None  # 0-dim: relative change at the last computed step
        self.error: Optional[torch.Tensor] = None  # 0-dim: error accumulated by skips since then
        self.run_length: Optional[torch.Tensor] = None  # 0-dim int: consecutive skipped steps
        self.pending: dict[int, torch.Tensor] = {}  # step -> 0-dim bool decision of the adaptive rule

    @property
    def adaptive(self) -> bool:
        return self.config.skip_threshold is not None

    def scheduled_skip(self, step: int) -> bool:
        return 0 <= step < self.num_steps and self.scheduled[step]

    def decision(self, step: int) -> Optional[torch.Tensor]:
        """The adaptive rule's 0-dim boolean decision for ``step`` (None: not a candidate, or no
        history yet)."""
        return self.pending.get(step)

    def integrate(
        self,
        step: int,
        noise: torch.Tensor,
        computed: Optional[torch.Tensor],
        skipped: Skipped,
        timestep: Union[torch.Tensor, float],
    ) -> torch.Tensor:
        """The noise the scheduler integrates at ``step``, and the history updated.

        ``noise``: what the step's forwards gave (after guidance). ``computed``: mask (broadcastable
        to ``noise``) of the elements they computed, ``None`` for all. ``skipped``: ``True`` (the
        forwards did not run), ``False``, or a 0-dim boolean tensor (computed, replaced where true).
        """
        t = _time(timestep, noise.device)
        if self.a is None:
            self._init(noise)
        a, b, t_a, t_b = self.a, self.b, self.t_a, self.t_b
        assert a is not None and b is not None and t_a is not None and t_b is not None
        cfg = self.config
        if skipped is True:
            out = extrapolate(a, b, t_a, t_b, t) if cfg.skip_estimate == "extrapolate" else a.clone()
            self._account_skip(True)
            self._decide(step + 1)
            return out
        full = torch.ones((), dtype=torch.bool, device=noise.device)
        fresh = full if computed is None else computed
        if isinstance(skipped, torch.Tensor):
            fresh = fresh & ~skipped
        out = noise
        if computed is not None and cfg.inactive_estimate == "extrapolate":
            out = torch.where(computed, out, extrapolate(a, b, t_a, t_b, t))
        if isinstance(skipped, torch.Tensor):
            estimate = extrapolate(a, b, t_a, t_b, t) if cfg.skip_estimate == "extrapolate" else a
            out = torch.where(skipped, estimate, out)
        fresh = fresh.expand(noise.shape)
        self.b = torch.where(fresh, a, b)
        self.t_b = torch.where(fresh, t_a, t_b)
        self.a = torch.where(fresh, noise, a)
        self.t_a = torch.where(fresh, t, t_a)
        if self.adaptive:
            change = _relative_change(self.a, self.b, fresh & torch.isfinite(self.t_b))
            if isinstance(skipped, torch.Tensor) and self.change is not None:
                change = torch.where(skipped, self.change, change)
            self._account_skip(skipped)
            self.change = change
        self._decide(step + 1)
        return out

    def release(self) -> None:
        """Drop the history (the run is over); the decisions made stay readable."""
        self.a = self.b = self.t_a = self.t_b = None

    # ------------------------------------------------------------------ internals
    def _init(self, noise: torch.Tensor) -> None:
        dev = noise.device
        self.a = noise.detach().clone()
        self.b = noise.detach().clone()
        nan = torch.full(noise.shape, float("nan"), dtype=torch.float32, device=dev)
        self.t_a, self.t_b = nan, nan.clone()
        self.change = torch.full((), float("nan"), dtype=torch.float32, device=dev)
        self.error = torch.zeros((), dtype=torch.float32, device=dev)
        self.run_length = torch.zeros((), dtype=torch.int32, device=dev)

    def _account_skip(self, skipped: Skipped) -> None:
        if not self.adaptive:
            return
        assert self.error is not None and self.run_length is not None and self.change is not None
        if skipped is True:
            self.error = self.error + self.change
            self.run_length = self.run_length + 1
        elif skipped is False:
            self.error = torch.zeros_like(self.error)
            self.run_length = torch.zeros_like(self.run_length)
        else:
            self.error = torch.where(skipped, self.error + self.change, torch.zeros_like(self.error))
            self.run_length = torch.where(skipped, self.run_length + 1, torch.zeros_like(self.run_length))

    def _decide(self, step: int) -> None:
        """Make the adaptive decision for ``step`` (from the state after ``step - 1``)."""
        if not self.adaptive or not 0 <= step < self.num_steps or not self.candidates[step]:
            return
        assert self.error is not None and self.change is not None and self.run_length is not None
        assert self.config.skip_threshold is not None  # self.adaptive
        skip = (self.error + self.change) < float(self.config.skip_threshold)  # NaN change: False
        if self.config.skip_max_consecutive is not None:
            skip = skip & (self.run_length < self.config.skip_max_consecutive)
        self.pending[step] = skip


def _time(timestep: Union[torch.Tensor, float], device: torch.device) -> torch.Tensor:
    """0-dim float32 timestep on ``device``, without a host synchronisation (a device tensor stays
    there; a host number is written by a fill, not copied)."""
    if isinstance(timestep, torch.Tensor):
        if timestep.device == device:
            return timestep.reshape(-1)[0].to(torch.float32)
        timestep = float(timestep.reshape(-1)[0])  # a host tensor
    return torch.full((), float(timestep), dtype=torch.float32, device=device)


def _relative_change(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """0-dim float32: the largest over latent rows of ``sum |a - b| / sum |a|`` over ``valid`` elements
    (NaN or inf where a row has none)."""
    w = valid.to(torch.float32)
    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    num = ((a32 - b32).abs() * w).flatten(1).sum(1)
    den = (a32.abs() * w).flatten(1).sum(1)
    return (num / den).max()
