"""Region selection, token budgets, step schedules and starvation prevention (pure torch).

This module knows nothing about diffusers. It turns a :class:`~rasfx.config.RASConfig` into a
per-run :class:`StepPlan` (which steps are dense, how many image tokens each RAS step computes),
scores image tokens from the noise prediction the scheduler sees, and keeps the per-run state
(:class:`RegionSampler`) that picks the active tokens of the next step.

Algorithm (paper, Sections 3.2-3.3, with the official code's defects fixed):

* Metric. For every latent pixel, the standard deviation over channels (or the L2 norm) of the
  noise prediction after classifier-free guidance; a token's score is the mean over the latent
  pixels it produced (a scatter-mean through the token map that the compiled module derives from
  the graph, so any patch size, packing, non-square or video grid works).
* Ranking. Low std marks the main subject (fast-update region), which is computed. The metric is
  turned into a normalised rank ``q`` in [0, 1] per batch row, and a *region priority* in [0, 1]
  ``min(q / (1 - h), (1 - q) / h)`` with ``h = high_ratio``: the dropped tokens are the ``h``
  share from the top of the ranking and the ``1 - h`` share from the bottom, exactly the official
  ``high_ratio`` split, and ``h = 0`` and ``h = 1`` are plain limits of the same formula.
* Starvation. ``priority = region_priority + k * D`` where ``D`` counts the *consecutive* RAS
  steps a token has been dropped. This is the paper's ``R * exp(k * D)`` in log form with the
  sign that makes a long-dropped token *more* likely to be computed (the official code multiplies
  the score of the tokens it caches, so ``D`` pushed a dropped token to be dropped again), with
  ``log R`` replaced by its normalised rank so the term has the same strength on every image.
  Because the region part lies in [0, 1], no token stays inactive for more than
  ``ceil(1 / k) + floor((N - 1) / n_min)`` consecutive RAS steps (:func:`starvation_bound`;
  proof in its docstring, checked by the tests).
* Selection. ``topk`` of the priority on the device, indices sorted per row; nothing reads a
  tensor back to the host, so a step never synchronises (the tests run it on the meta device,
  where any ``.item()``, ``.tolist()`` or ``bool(tensor)`` raises).
* Schedule. Dense warm-up steps, dense error-reset steps, then a static or progressively reduced
  (``dynamic``) active count whose mean over the RAS steps is ``ratio``; counts are multiples of a
  bucket so few shapes occur. The selection made after step ``t`` applies to step ``t + 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .config import RASConfig
from .errors import ConfigError, UsageError

__all__ = [
    "REFERENCE_STEPS",
    "DEFAULT_WARMUP",
    "DEFAULT_RESETS",
    "default_warmup",
    "step_kinds",
    "bucket_size",
    "ras_budgets",
    "StepPlan",
    "build_plan",
    "PixelLayout",
    "pixel_scores",
    "token_scores",
    "normalized_rank",
    "region_priority",
    "selection_priority",
    "select_tokens",
    "active_mask",
    "update_drops",
    "starvation_bound",
    "index_for_batch",
    "RegionSampler",
]

#: The paper's reference schedule: 28 steps, 4 dense warm-up steps, dense resets at 12 and 20.
REFERENCE_STEPS = 28
DEFAULT_WARMUP = 4
DEFAULT_RESETS = (12, 20)


def _scaled(step: int, num_steps: int) -> int:
    """``step`` of the 28-step reference schedule scaled to ``num_steps`` (round half up)."""
    return int(math.floor(step * num_steps / REFERENCE_STEPS + 0.5))


def default_warmup(num_steps: int) -> int:
    """4 of 28 steps scaled to the run, at least 1 (step 0 has no noise to select from)."""
    return max(1, _scaled(DEFAULT_WARMUP, num_steps))


def step_kinds(config: RASConfig, num_steps: int) -> tuple[bool, ...]:
    """Per step: ``True`` for a RAS step, ``False`` for a dense one (warm-up or reset).

    Raises ``rasfx.ConfigError`` (a ``ValueError`` naming ``RASConfig.reset_steps``) when an explicit reset step lies
    outside the run; scaled default resets never raise.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise UsageError(f"number of denoising steps must be an int >= 1, got {num_steps!r}")
    warmup = config.warmup if config.warmup is not None else default_warmup(num_steps)
    ras = [i >= warmup for i in range(num_steps)]
    if config.reset_steps is None:
        for r in sorted({_scaled(s, num_steps) for s in DEFAULT_RESETS}):
            if not 0 <= r < num_steps or not ras[r]:
                continue
            before = 0
            while r - before - 1 >= 0 and ras[r - before - 1]:
                before += 1
            if before >= 2 and r + 1 < num_steps and ras[r + 1]:
                ras[r] = False
    else:
        outside = [r for r in config.reset_steps if r >= num_steps]
        if outside:
            raise ConfigError(
                f"RASConfig.reset_steps {list(config.reset_steps)} do not fit a {num_steps}-step run: "
                f"{outside} out of range (valid steps are 0..{num_steps - 1}); pass reset_steps=None "
                f"to scale the default resets to the step count"
            )
        for r in config.reset_steps:
            ras[r] = False
    return tuple(ras)


def bucket_size(config: RASConfig, num_tokens: int) -> int:
    """Granularity of active counts for ``num_tokens`` image tokens, in [1, num_tokens]."""
    if num_tokens < 1:
        raise UsageError(f"num_tokens must be >= 1, got {num_tokens}")
    bucket = config.round_to if config.round_to is not None else min(64, max(1, num_tokens // 16))
    return max(1, min(bucket, num_tokens))


def _round_bucket(x: float, bucket: int, num_tokens: int) -> int:
    n = bucket * int(math.floor(x / bucket + 0.5))
    return min(num_tokens, max(bucket, n))


def ras_budgets(config: RASConfig, num_ras_steps: int, num_tokens: int) -> tuple[int, ...]:
    """Active image-token count of each RAS step, in order.

    ``static``: ``ratio * N`` rounded to the bucket on every step (one shape). ``dynamic``: a
    linear ramp from ``ratio * (1 + a)`` down to ``ratio * (1 - a)`` with
    ``a = min(dynamic_range, 1 / ratio - 1)``; rounding to the bucket carries the error to the next
    step so the mean stays on ``ratio``. Every count is in ``[bucket, N]``.
    """
    if num_ras_steps <= 0:
        return ()
    bucket = bucket_size(config, num_tokens)
    target = config.ratio * num_tokens
    if config.schedule == "static" or num_ras_steps == 1:
        return (_round_bucket(target, bucket, num_tokens),) * num_ras_steps
    spread = min(config.dynamic_range, 1.0 / config.ratio - 1.0)
    counts = []
    carry = 0.0
    for j in range(num_ras_steps):
        x = target * (1.0 + spread * (1.0 - 2.0 * j / (num_ras_steps - 1)))
        n = _round_bucket(x + carry, bucket, num_tokens)
        carry += x - n
        counts.append(n)
    return tuple(counts)


@dataclass(frozen=True)
class StepPlan:
    """What every step of one run does.

    ``active[i]`` is the number of image tokens step ``i`` computes; a step is dense when it
    computes all ``num_tokens`` (warm-up, resets, and RAS steps whose budget reaches ``N``).
    """

    num_steps: int
    num_tokens: int
    bucket: int
    active: tuple[int, ...]

    def is_dense(self, step: int) -> bool:
        """Steps past the planned run (a scheduler called more often than planned) are dense."""
        return step < 0 or step >= self.num_steps or self.active[step] >= self.num_tokens

    @property
    def dense(self) -> tuple[bool, ...]:
        return tuple(self.is_dense(i) for i in range(self.num_steps))

    @property
    def ras_steps(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_steps) if not self.is_dense(i))

    @property
    def min_active(self) -> int:
        """Smallest active count over the RAS steps (``num_tokens`` when there are none)."""
        return min((self.active[i] for i in self.ras_steps), default=self.num_tokens)

    def ras_step_after(self, step: int) -> bool:
        """Whether any RAS step comes after ``step`` (else no cache written from now on is read)."""
        return any(not self.is_dense(j) for j in range(step + 1, self.num_steps))

    def needs_cache_after(self, step: int) -> bool:
        """Whether step ``step + 1`` is a RAS step, which reads the caches ``step`` leaves. A dense
        step rewrites every cache, so of a run of dense steps only the last one before a RAS
        step has to write them."""
        return not self.is_dense(step + 1)

    @property
    def token_fraction(self) -> float:
        """Share of image-token evaluations over the whole run (dense steps count 1)."""
        return sum(self.active) / (self.num_tokens * self.num_steps)

    @property
    def ras_ratio(self) -> float:
        """Mean active share over the RAS steps (1.0 when there are none)."""
        steps = self.ras_steps
        if not steps:
            return 1.0
        return sum(self.active[i] for i in steps) / (self.num_tokens * len(steps))


def build_plan(config: RASConfig, num_steps: int, num_tokens: int) -> StepPlan:
    """The per-step plan of a run of ``num_steps`` steps over ``num_tokens`` image tokens."""
    kinds = step_kinds(config, num_steps)
    # ratio 1.0 is dense everywhere, whatever the bucket rounding would give
    ras_idx = [i for i, r in enumerate(kinds) if r] if config.ratio < 1.0 else []
    budgets = ras_budgets(config, len(ras_idx), num_tokens)
    active = [num_tokens] * num_steps
    for i, n in zip(ras_idx, budgets):
        active[i] = n
    return StepPlan(num_steps, num_tokens, bucket_size(config, num_tokens), tuple(active))


# --------------------------------------------------------------------------------------------
# Scores


class PixelLayout:
    """How the scheduler's latent tensor splits into latent pixels, and which token made each.

    A latent pixel is one channel vector (the paper takes the std over it). Two layouts exist:

    * channels first, ``[R, C, *grid]`` (SD3, PixArt, Lumina, Wan, ...): pixel ``p`` is position
      ``p`` of the flattened grid, ``pixel_token`` comes from the token map of the model output;
    * packed, ``[R, M, D]`` (Flux-style ``_pack_latents``): every row holds ``k`` latent pixels of
      ``C`` channels, ``D = k * C``; ``packed_perm`` reorders the last dim into ``(k, C)`` order.

    ``pixel_token[p]`` is the image token that produced pixel ``p``; ``grid_token`` (optional) is the
    token of every latent pixel on the 2D/3D latent grid, for heatmaps.
    """

    def __init__(
        self,
        *,
        num_tokens: int,
        channels: int,
        pixel_token: torch.Tensor,
        packed_perm: Optional[torch.Tensor] = None,
        grid_token: Optional[torch.Tensor] = None,
    ) -> None:
        pixel_token = pixel_token.reshape(-1).to(torch.long)
        if pixel_token.numel() == 0:
            raise UsageError("PixelLayout: no latent pixels")
        if int(pixel_token.min()) < -1 or int(pixel_token.max()) >= num_tokens:
            raise UsageError(f"PixelLayout: token indices must lie in [0, {num_tokens}) (or -1: no token)")
        self.num_tokens = int(num_tokens)
        self.channels = int(channels)
        # Pixels produced by no image token (-1) go to a spare bucket N that is dropped.
        self.pixel_token = torch.where(pixel_token < 0, torch.full_like(pixel_token, num_tokens), pixel_token)
        count = torch.bincount(self.pixel_token.cpu(), minlength=num_tokens + 1).to(torch.float32)
        self.pixel_count = count.clamp_min(1.0).to(pixel_token.device)
        self.packed_perm = None if packed_perm is None else packed_perm.to(torch.long).to(pixel_token.device)
        self.grid_token = grid_token

    @classmethod
    def channels_first(cls, spatial_token: torch.Tensor, num_tokens: int, channels: int) -> "PixelLayout":
        """Layout of ``[R, C, *grid]`` latents; ``spatial_token`` has the grid's shape."""
        return cls(
            num_tokens=num_tokens,
            channels=channels,
            pixel_token=spatial_token.reshape(-1),
            grid_token=spatial_token.to(torch.long),
        )

    @classmethod
    def packed(
        cls,
        row_pixel_token: torch.Tensor,
        packed_perm: torch.Tensor,
        num_tokens: int,
        channels: int,
        grid_token: Optional[torch.Tensor] = None,
    ) -> "PixelLayout":
        """Layout of ``[R, M, k * C]`` latents; ``row_pixel_token`` is ``[M, k]``."""
        m, k = row_pixel_token.shape
        if packed_perm.numel() != k * channels:
            raise UsageError(f"PixelLayout.packed: permutation of {packed_perm.numel()} for k={k}, C={channels}")
        return cls(
            num_tokens=num_tokens,
            channels=channels,
            pixel_token=row_pixel_token.reshape(-1),
            packed_perm=packed_perm,
            grid_token=grid_token,
        )

    @property
    def num_pixels(self) -> int:
        return int(self.pixel_token.numel())

    def to(self, device: torch.device | str) -> "PixelLayout":
        if self.pixel_token.device == torch.device(device):
            return self
        out = PixelLayout.__new__(PixelLayout)
        out.__dict__.update(self.__dict__)
        out.pixel_token = self.pixel_token.to(device)
        out.pixel_count = self.pixel_count.to(device)
        out.packed_perm = None if self.packed_perm is None else self.packed_perm.to(device)
        return out

    def pixels(self, noise: torch.Tensor) -> torch.Tensor:
        """``[R, P, C]`` channel vectors of every latent pixel of ``noise``."""
        rows = noise.shape[0]
        if self.packed_perm is None:
            x = noise.reshape(rows, noise.shape[1], -1).transpose(1, 2)
        else:
            x = noise.index_select(-1, self.packed_perm).reshape(rows, -1, self.channels)
        if x.shape[1] != self.num_pixels or x.shape[2] != self.channels:
            raise UsageError(
                f"PixelLayout: latents of shape {tuple(noise.shape)} do not match the layout "
                f"({self.num_pixels} pixels x {self.channels} channels)"
            )
        return x


def pixel_scores(noise: torch.Tensor, layout: PixelLayout, metric: str = "std") -> torch.Tensor:
    """``[R, P]`` per latent pixel: std over channels (``std``) or L2 norm (``l2``), float32."""
    x = layout.pixels(noise).to(torch.float32)
    if metric == "std":
        return x.std(dim=-1, correction=1 if x.shape[-1] > 1 else 0)
    if metric == "l2":
        return torch.linalg.vector_norm(x, dim=-1)
    raise UsageError(f"pixel_scores: metric must be 'std' or 'l2', got {metric!r}")


def token_scores(
    noise: torch.Tensor,
    layout: PixelLayout,
    metric: str = "std",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """``[R, N]`` token scores: the mean of the pixel scores over each token's pixels.

    ``random`` draws uniform scores from ``generator`` (on the latents' device).
    """
    rows = noise.shape[0]
    if metric == "random":
        return torch.rand((rows, layout.num_tokens), generator=generator, device=noise.device)
    per_pixel = pixel_scores(noise, layout, metric)
    sums = torch.zeros((rows, layout.num_tokens + 1), dtype=per_pixel.dtype, device=per_pixel.device)
    sums.index_add_(1, layout.pixel_token.to(per_pixel.device), per_pixel)
    return (sums / layout.pixel_count.to(per_pixel.device))[:, : layout.num_tokens]


# --------------------------------------------------------------------------------------------
# Selection


def normalized_rank(scores: torch.Tensor) -> torch.Tensor:
    """Per row, the rank of each score in ascending order divided by ``N - 1`` (in [0, 1])."""
    n = scores.shape[-1]
    rank = scores.argsort(dim=-1).argsort(dim=-1).to(torch.float32)
    return rank / max(n - 1, 1)


def region_priority(scores: torch.Tensor, high_ratio: float = 1.0) -> torch.Tensor:
    """Priority in [0, 1] from the metric alone; the top-``n`` are computed.

    With ``q`` the normalised rank, ``min(q / (1 - h), (1 - q) / h)``: the ``N - n`` lowest
    priorities are the ``h`` share of the dropped tokens from the top of the ranking and the
    ``1 - h`` share from the bottom. ``h = 1`` computes the lowest scores (main subject), ``h = 0``
    the highest.
    """
    q = normalized_rank(scores)
    if high_ratio >= 1.0:
        return 1.0 - q
    if high_ratio <= 0.0:
        return q
    return torch.minimum(q / (1.0 - high_ratio), (1.0 - q) / high_ratio)


def selection_priority(
    scores: torch.Tensor, drops: torch.Tensor, high_ratio: float = 1.0, starvation_scale: float = 0.1
) -> torch.Tensor:
    """``region_priority + k * D``: strictly increasing in the consecutive drop count ``D``."""
    return region_priority(scores, high_ratio) + starvation_scale * drops.to(torch.float32)


def select_tokens(
    scores: torch.Tensor,
    drops: torch.Tensor,
    n: int,
    *,
    high_ratio: float = 1.0,
    starvation_scale: float = 0.1,
) -> torch.Tensor:
    """``[R, n]`` sorted indices of the tokens to compute, per row; no host synchronisation."""
    if not 1 <= n <= scores.shape[-1]:
        raise UsageError(f"select_tokens: n must be in [1, {scores.shape[-1]}], got {n}")
    priority = selection_priority(scores, drops, high_ratio, starvation_scale)
    idx = priority.topk(n, dim=-1, sorted=False).indices
    return idx.sort(dim=-1).values


def active_mask(index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[R, N]`` boolean mask of the tokens in ``index`` (``[R, n]``)."""
    mask = torch.zeros((index.shape[0], num_tokens), dtype=torch.bool, device=index.device)
    return mask.scatter_(1, index, True)


def update_drops(drops: torch.Tensor, computed: torch.Tensor) -> torch.Tensor:
    """Consecutive drop counts after a step that computed the tokens in mask ``computed``."""
    return torch.where(computed, torch.zeros_like(drops), drops + 1)


def starvation_bound(num_tokens: int, min_active: int, starvation_scale: float) -> Optional[int]:
    """Longest possible run of consecutive RAS steps a token can stay inactive (None: unbounded).

    Claim: with ``k > 0``, ``n >= n_min`` tokens computed per RAS step and region priorities in
    [0, 1], a token is dropped at most ``c + floor((N - 1) / n_min)`` consecutive RAS steps, with
    ``c = ceil(1 / k)``.

    Proof. Let token ``j`` be dropped on RAS steps ``t0, ..., t0 + L - 1`` (a dense step computes
    every token, so a streak never spans one). At step ``t0 + s`` its drop count is ``s`` and its
    priority at least ``k s``. It is dropped, so each of the ``n`` selected tokens ``i`` has
    priority ``>= k s`` and, since its region part is at most 1, ``D_i >= s - 1/k``: token ``i``
    was not computed on any step of ``[t0 + c, t0 + s - 1]``. Hence for ``s >= c`` the tokens
    computed at step ``t0 + s`` were not computed at any earlier step ``t0 + s'`` with
    ``c <= s' < s``: the sets computed on steps ``t0 + c .. t0 + L - 1`` are pairwise disjoint,
    none contains ``j``, and each has ``>= n_min`` tokens, so ``n_min (L - c) <= N - 1``.
    """
    if min_active >= num_tokens:
        return 0
    if starvation_scale <= 0.0:
        return None
    return math.ceil(1.0 / starvation_scale) + (num_tokens - 1) // max(min_active, 1)


def index_for_batch(index: torch.Tensor, batch: int) -> torch.Tensor:
    """The ``set_active`` index of a transformer call of batch ``batch`` from per-row ``[R, n]``.

    ``R == 1``: the shared ``[n]`` form. ``batch == R``: per row (separate cond/uncond calls).
    ``batch == m * R``: repeated ``m`` times along the batch, because diffusers pipelines batch
    classifier-free guidance as ``torch.cat([x] * 2)``: rows ``b`` and ``b + R`` are one CFG pair
    and share one active set.
    """
    rows = index.shape[0]
    if rows == 1:
        return index[0]
    if batch == rows:
        return index
    if batch > 0 and batch % rows == 0:
        return index.repeat(batch // rows, 1)
    raise UsageError(f"a transformer batch of {batch} does not split into {rows} latent rows")


# --------------------------------------------------------------------------------------------
# Per-run state


class RegionSampler:
    """Per-run sampler state: drop counts, computed counts, the next step's active set.

    Drive it once per scheduler step with :meth:`observe` (after the step's forwards, with the
    noise prediction the scheduler sees); :meth:`active_for` then gives the ``[R, n]`` active set
    of the next step, or ``None`` for a dense step. Every tensor stays on the latents' device and
    no method synchronises with the host.
    """

    def __init__(self, config: RASConfig, plan: StepPlan, layout: PixelLayout) -> None:
        if layout.num_tokens != plan.num_tokens:
            raise UsageError(f"layout has {layout.num_tokens} tokens, plan {plan.num_tokens}")
        self.config = config
        self.plan = plan
        self.layout = layout
        self.rows: Optional[int] = None
        self.drops: Optional[torch.Tensor] = None  # [R, N] consecutive RAS-step drops
        self.computed: Optional[torch.Tensor] = None  # [R, N] steps that computed each token
        self.longest_streak: Optional[torch.Tensor] = None  # [R, N] longest inactive streak so far
        self.noise_std: Optional[torch.Tensor] = None  # [R, N] last per-token noise std
        self.next_active: Optional[torch.Tensor] = None  # [R, n] active set of the next step
        self.next_step: int = 0
        self._generator: Optional[torch.Generator] = None

    def _init(self, noise: torch.Tensor) -> None:
        rows, n, dev = noise.shape[0], self.plan.num_tokens, noise.device
        self.rows = rows
        self.layout = self.layout.to(dev)
        self.drops = torch.zeros((rows, n), dtype=torch.int32, device=dev)
        self.computed = torch.zeros((rows, n), dtype=torch.int32, device=dev)
        self.longest_streak = torch.zeros((rows, n), dtype=torch.int32, device=dev)
        if self.config.metric == "random":
            self._generator = torch.Generator(device=dev)
            self._generator.manual_seed(self.config.seed)

    def active_for(self, step: int) -> Optional[torch.Tensor]:
        """``[R, n]`` active indices of ``step``, or ``None`` when it runs dense."""
        if self.plan.is_dense(step) or self.next_active is None or step != self.next_step:
            return None
        return self.next_active

    def observe(
        self, step: int, noise: torch.Tensor, ran_dense: bool, skipped: "bool | torch.Tensor" = False
    ) -> None:
        """Account for step ``step`` and select the active set of step ``step + 1``.

        ``ran_dense``: whether the step's forwards computed every token (else they computed
        ``active_for(step)``). ``skipped`` (step sparsity, :mod:`rasfx.steps`): ``True`` when the
        step computed nothing, or a 0-dim boolean tensor (its computed noise was discarded where
        true); a skipped step counts no computed token and no drop, and the next active set is
        selected from ``noise`` (the estimate the scheduler integrated).
        """
        if self.drops is None or self.rows != noise.shape[0]:
            self._init(noise)
        assert self.drops is not None and self.computed is not None and self.longest_streak is not None
        if skipped is not True:
            active = None if ran_dense else self.active_for(step)
            if active is None:
                mask = torch.ones_like(self.drops, dtype=torch.bool)
                drops = torch.zeros_like(self.drops)
            else:
                mask = active_mask(active, self.plan.num_tokens)
                drops = update_drops(self.drops, mask)
            if isinstance(skipped, torch.Tensor):
                mask = mask & ~skipped
                drops = torch.where(skipped, self.drops, drops)
            self.computed += mask.to(self.computed.dtype)
            self.drops = drops
            self.longest_streak = torch.maximum(self.longest_streak, self.drops)

        std = token_scores(noise, self.layout, "std")
        self.noise_std = std
        nxt = step + 1
        self.next_step = nxt
        if nxt < self.plan.num_steps and not self.plan.is_dense(nxt):
            metric = self.config.metric
            scores = std if metric == "std" else token_scores(noise, self.layout, metric, self._generator)
            self.next_active = select_tokens(
                scores,
                self.drops,
                self.plan.active[nxt],
                high_ratio=self.config.high_ratio,
                starvation_scale=self.config.starvation_scale,
            )
        else:
            self.next_active = None
