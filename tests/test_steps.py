"""Step sparsity (rasfx.steps): skipped steps, extrapolated noise, the adaptive skip rule.

The pipeline tests run tiny diffusers pipelines through rasfx with ``StandInRAS`` (a dense stand-in
of the ``RASModule`` contract, tests/test_pipeline.py) and compare them with ``ReferenceSteps``, a
hand-written sampler on the *plain* pipeline: it counts the steps itself, does not call the
transformer on a skipped step, and integrates at every step the noise the rules define, from its
own per-element history of computed noise (fresh noise on computed tokens; the last computed
value, or its first-order extrapolation, elsewhere).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

import rasfx  # noqa: E402
import rasfx.pipeline as rp  # noqa: E402
from rasfx.config import RASConfig  # noqa: E402
from rasfx.errors import ConfigError  # noqa: E402
from rasfx.sampler import PixelLayout, RegionSampler, build_plan, step_kinds  # noqa: E402
from rasfx.steps import StepSparsity, element_mask, extrapolate, skip_schedule  # noqa: E402
from test_multistep import _flow_unipc, _latents_per_step  # noqa: E402
from test_pipeline import StandInRAS, build_flux, build_sd3  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8
BASE = dict(ratio=0.5, warmup=2, reset_steps=(5,))  # dense 0, 1, 5; RAS-kind 2, 3, 4, 6, 7
RAS_KIND = [2, 3, 4, 6, 7]


# ------------------------------------------------------------------------------ config


BAD = [
    ("skip_steps", "3"), ("skip_steps", (2, -1)), ("skip_steps", (1.5,)), ("skip_steps", 3),
    ("skip_every", 1), ("skip_every", 0), ("skip_every", 2.0), ("skip_every", True),
    ("skip_threshold", -0.1), ("skip_threshold", float("nan")), ("skip_threshold", float("inf")),
    ("skip_threshold", "0.1"),
    ("skip_estimate", "linear"), ("inactive_estimate", "taylor"), ("inactive_estimate", None),
]


@pytest.mark.parametrize("field, value", BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_invalid_step_sparsity_fields_raise_naming_the_field(field, value):
    with pytest.raises(ConfigError) as e:
        RASConfig(**{field: value})
    assert f"RASConfig.{field}" in str(e.value) and repr(value) in str(e.value)
    with pytest.raises(ValueError, match=f"RASConfig.{field}"):
        RASConfig().replace(**{field: value})


@pytest.mark.parametrize("kwargs, needle", [
    (dict(skip_steps=(3,), skip_every=2), "skip_steps and skip_every"),
    (dict(skip_every=2, skip_threshold=0.1), "skip_every and skip_threshold"),
    (dict(skip_sync=True), "skip_sync=True applies to the adaptive rule only"),
    (dict(skip_sync=1, skip_threshold=0.1), "RASConfig.skip_sync must be a bool"),
    (dict(skip_max_consecutive=2), "set skip_threshold, or drop skip_max_consecutive"),
    (dict(skip_max_consecutive=0, skip_threshold=0.1), "RASConfig.skip_max_consecutive must be"),
    (dict(skip_estimate="extrapolate"), "set skip_steps, skip_every or skip_threshold, or drop skip_estimate"),
])
def test_inconsistent_step_sparsity_options_name_the_fix(kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        RASConfig(**kwargs)


def test_defaults_are_off_and_valid_values_are_normalised():
    cfg = RASConfig()
    assert not cfg.step_sparsity and cfg.skip_steps is None and cfg.skip_threshold is None
    cfg = RASConfig(skip_steps=[7, 3, 3], skip_estimate="extrapolate")
    assert cfg.skip_steps == (3, 7) and cfg.step_sparsity
    cfg = RASConfig(skip_threshold=1, skip_max_consecutive=2, skip_sync=True)
    assert cfg.skip_threshold == 1.0 and isinstance(cfg.skip_threshold, float)
    assert RASConfig(inactive_estimate="extrapolate").step_sparsity


def test_skip_schedule_every_k_restarts_at_dense_steps_and_explicit_steps_are_checked():
    kinds = step_kinds(RASConfig(**BASE), STEPS)
    assert [i for i, k in enumerate(kinds) if k] == RAS_KIND
    assert skip_schedule(RASConfig(**BASE, skip_every=2), kinds) == tuple(i in (3, 7) for i in range(STEPS))
    assert skip_schedule(RASConfig(**BASE, skip_every=3), kinds) == tuple(i == 4 for i in range(STEPS))
    assert skip_schedule(RASConfig(**BASE, skip_steps=(2, 7)), kinds) == tuple(i in (2, 7) for i in range(STEPS))
    assert skip_schedule(RASConfig(**BASE), kinds) == (False,) * STEPS
    with pytest.raises(ConfigError, match=r"RASConfig.skip_steps .* include warm-up or reset steps \[1, 5\]"):
        skip_schedule(RASConfig(**BASE, skip_steps=(1, 3, 5)), kinds)
    with pytest.raises(ConfigError, match=r"RASConfig.skip_steps .*8-step run: \[9\] out of range"):
        skip_schedule(RASConfig(**BASE, skip_steps=(3, 9)), kinds)


def test_explicit_skip_on_a_dense_step_raises_when_the_run_starts():
    pipe, kw = build_sd3(0)
    with rasfx.enabled(pipe, RASConfig(**BASE, skip_steps=(0,)), transform=StandInRAS):
        with pytest.raises(ConfigError, match="never skipped"):
            _run(pipe, kw)


# ------------------------------------------------------------------------------ pure torch pieces


def test_extrapolate_is_first_order_in_time_and_reuses_without_two_values():
    a, b = torch.tensor([2.0, 2.0, 5.0]), torch.tensor([1.0, 4.0, 0.0])
    t_a = torch.tensor([800.0, 800.0, 600.0])
    t_b = torch.tensor([900.0, 1000.0, float("nan")])
    got = extrapolate(a, b, t_a, t_b, torch.tensor(700.0))
    # element 0: slope 1 per 100 -> 3; element 1: slope -2 per 200 -> 1; element 2: one value -> reuse
    assert torch.equal(got, torch.tensor([3.0, 1.0, 5.0]))
    same_time = extrapolate(a, b, t_a, t_a.clone(), torch.tensor(700.0))
    assert torch.equal(same_time, a)


def test_element_mask_channels_first_and_packed():
    grid, patch = (4, 6), 2
    hh, ww = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    tok = (hh // patch) * (grid[1] // patch) + ww // patch
    n = int(tok.max()) + 1
    token_mask = torch.rand(2, n) > 0.5
    got = element_mask(PixelLayout.channels_first(tok, n, 3), token_mask, torch.Size((2, 3, *grid)))
    want = torch.stack([token_mask[r][tok] for r in range(2)])[:, None].expand(2, 3, *grid)
    assert torch.equal(got.expand(2, 3, *grid), want)
    # packed rows of k=4 pixels x C=3 channels, channel-major (d = c * k + j); one token per pixel here
    m, k, c = 5, 4, 3
    perm = torch.arange(k * c).view(c, k).t().reshape(-1)
    pix_tok = torch.arange(m * k).view(m, k) % 7
    token_mask = torch.rand(2, 7) > 0.5
    got = element_mask(PixelLayout.packed(pix_tok, perm, 7, c), token_mask, torch.Size((2, m, k * c)))
    d = torch.arange(k * c)
    want = token_mask[:, pix_tok[:, d % k]]  # element d of row r is channel d // k of pixel d % k
    assert torch.equal(got, want)


def test_no_sync_path_runs_on_the_meta_device():
    """The adaptive rule, the estimates and the sampler's accounting of a device decision run on the
    meta device, where any read of a tensor on the host raises: the no-sync path never synchronises,
    and the decision stays a tensor."""
    cfg = RASConfig(**BASE, skip_threshold=0.5, skip_estimate="extrapolate", inactive_estimate="extrapolate")
    hh, ww = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    tok = (hh // 2) * 4 + ww // 2
    plan = build_plan(cfg, STEPS, 16)
    sampler = RegionSampler(cfg, plan, PixelLayout.channels_first(tok, 16, 4).to("meta"))
    steps = StepSparsity(cfg, step_kinds(cfg, STEPS))
    timesteps = torch.linspace(1000, 100, STEPS, device="meta")
    with pytest.raises(RuntimeError):
        bool(torch.zeros((), device="meta"))
    decisions = []
    for i in range(STEPS):
        noise = torch.empty(2, 4, 8, 8, device="meta")
        skipped = steps.decision(i)
        active = sampler.active_for(i)
        computed = None if active is None else element_mask(
            sampler.layout, torch.zeros(2, 16, dtype=torch.bool, device="meta").scatter_(1, active, True), noise.shape)
        out = steps.integrate(i, noise, computed, False if skipped is None else skipped, timesteps[i])
        assert out.shape == noise.shape and out.device.type == "meta"
        sampler.observe(i, out, ran_dense=active is None, skipped=False if skipped is None else skipped)
        decisions.append(skipped)
    assert [d is not None for d in decisions] == [i in RAS_KIND for i in range(STEPS)]
    assert all(isinstance(d, torch.Tensor) and d.dtype == torch.bool and d.device.type == "meta"
               for d in decisions if d is not None)


@pytest.mark.gpu
def test_no_sync_path_makes_no_host_sync_on_cuda():
    dev = torch.device("cuda")
    cfg = RASConfig(**BASE, skip_threshold=0.5, inactive_estimate="extrapolate")
    hh, ww = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    tok = ((hh // 2) * 4 + ww // 2).to(dev)
    sampler = RegionSampler(cfg, build_plan(cfg, STEPS, 16), PixelLayout.channels_first(tok, 16, 4).to(dev))
    steps = StepSparsity(cfg, step_kinds(cfg, STEPS))
    timesteps = torch.linspace(1000, 100, STEPS, device=dev)
    noises = [torch.randn(2, 4, 8, 8, device=dev) for _ in range(STEPS)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(STEPS):
            skipped = steps.decision(i)
            skipped = False if skipped is None else skipped
            active = sampler.active_for(i)
            computed = None if active is None else element_mask(
                sampler.layout, torch.zeros(2, 16, dtype=torch.bool, device=dev).scatter_(1, active, True),
                noises[i].shape)
            out = steps.integrate(i, noises[i], computed, skipped, timesteps[i])
            sampler.observe(i, out, ran_dense=active is None, skipped=skipped)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------------ the hand-written reference


class ReferenceSteps:
    """Hand-written step-sparse sampling on the plain pipeline.

    ``ras_sets[step]``: the active token indices the RAS run computed at ``step`` (absent: dense);
    ``element_token``: the image token of every latent element (``[C, H, W]`` or ``[M, D]``);
    ``skip``: the skipped steps, or ``threshold`` for the adaptive rule (decided here on the host).
    """

    def __init__(self, pipe, element_token, *, skip=(), ras_sets=None, skip_estimate="reuse",
                 inactive_estimate="reuse", threshold=None, candidates=()):
        self.pipe, self.element_token = pipe, element_token
        self.skip, self.ras_sets = set(skip), dict(ras_sets or {})
        self.skip_estimate, self.inactive_estimate = skip_estimate, inactive_estimate
        self.threshold, self.candidates = threshold, set(candidates)
        self.step, self.history = 0, None  # per element: (a, b, t_a, t_b) of the last two computed values
        self.change, self.error = math.nan, 0.0
        self.forwards, self.skipped = 0, []
        self.previous_outputs: dict[int, object] = {}
        self.calls_this_step = 0

    def skipping(self) -> bool:
        if self.threshold is None:
            return self.step in self.skip
        return self.step in self.candidates and self.error + self.change < self.threshold

    def forward(self, original):
        def call(*args, **kwargs):
            ordinal = self.calls_this_step
            self.calls_this_step += 1
            if self.skipping():
                return self.previous_outputs[ordinal]
            self.forwards += 1
            out = original(*args, **kwargs)
            self.previous_outputs[ordinal] = out
            return out
        return call

    def estimate(self, kind, t):
        a, b, t_a, t_b = self.history
        if kind == "reuse":
            return a
        factor = (t - t_a) / (t_a - t_b)
        factor = torch.where(torch.isfinite(factor), factor, torch.zeros_like(factor))
        return (a.double() + (a.double() - b.double()) * factor).to(a.dtype)

    def scheduler_step(self, original):
        def step(model_output, timestep, sample, *args, **kwargs):
            t = float(timestep)
            skip = self.skipping()
            if self.history is None:
                nan = torch.full(model_output.shape, math.nan, dtype=torch.float64)
                self.history = (model_output, model_output, nan, nan)
            if skip:
                noise = self.estimate(self.skip_estimate, t)
                fresh = torch.zeros(model_output.shape, dtype=torch.bool)
                self.skipped.append(self.step)
                self.error += self.change
            else:
                index = self.ras_sets.get(self.step)
                if index is None:
                    fresh = torch.ones(model_output.shape, dtype=torch.bool)
                else:
                    rows = model_output.shape[0]
                    token_active = torch.zeros(rows, int(self.element_token.max()) + 1, dtype=torch.bool)
                    token_active[:, index.reshape(-1) if index.dim() == 1 else index] = True
                    fresh = torch.stack([token_active[r][self.element_token] for r in range(rows)])
                noise = torch.where(fresh, model_output, self.estimate(self.inactive_estimate, t))
            a, b, t_a, t_b = self.history
            self.history = (torch.where(fresh, model_output, a), torch.where(fresh, a, b),
                            torch.where(fresh, t, t_a), torch.where(fresh, t_a, t_b))
            if not skip:
                a, b, _, t_b = self.history
                valid = fresh & torch.isfinite(t_b)
                num = ((a.double() - b.double()).abs() * valid).flatten(1).sum(1)
                den = (a.double().abs() * valid).flatten(1).sum(1)
                self.change, self.error = float((num / den).max()), 0.0
            self.step += 1
            self.calls_this_step = 0
            return original(noise, timestep, sample, *args, **kwargs)
        return step

    def run(self, kw):
        pipe = self.pipe
        pipe.transformer.forward = self.forward(pipe.transformer.forward)
        pipe.scheduler.step = self.scheduler_step(pipe.scheduler.step)
        try:
            return _run(pipe, kw)
        finally:
            del pipe.transformer.forward, pipe.scheduler.step


def _run(pipe, kw):
    return _latents_per_step(pipe, kw, STEPS)


class RecordingStandIn(StandInRAS):
    """``StandInRAS`` that counts the model's forwards and records the active set of every RAS step."""

    def __init__(self, model):
        super().__init__(model)
        self.forwards, self.sets, self.step = 0, {}, 0

    def forward(self, *args, **kwargs):
        self.forwards += 1
        index = self._slot()["index"]
        out = super().forward(*args, **kwargs)
        if not self._slot()["dense"]:
            self.sets[self.step] = index.clone()
        return out


def _rasfx_run(pipe, kw, cfg):
    made = []

    def make(model):
        made.append(RecordingStandIn(model))
        return made[0]

    original_forward = type(pipe.transformer).forward
    plain_forwards = []

    def counting(self, *args, **kwargs):
        plain_forwards.append(1)
        return original_forward(self, *args, **kwargs)

    type(pipe.transformer).forward = counting  # bypassed dense steps call the original forward
    try:
        with rasfx.enabled(pipe, cfg, transform=make):
            seen = []

            def keep(p, i, t, kwargs):
                seen.append(kwargs["latents"].clone())
                made[0].step = i + 1
                return {}

            pipe.set_progress_bar_config(disable=True)
            pipe(**kw, num_inference_steps=STEPS, output_type="latent", generator=torch.Generator().manual_seed(0),
                 callback_on_step_end=keep)
            stats = rasfx.stats(pipe)
            records = list(rp._STATES[pipe].last_run.records)
    finally:
        type(pipe.transformer).forward = original_forward
    return seen, stats, made[0].sets, len(plain_forwards), records


def _element_token(name, latents):
    if name == "sd3":  # [C, H, W], patch 2, row-major patch grid
        c, h, w = latents.shape[1:]
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        return ((hh // 2) * (w // 2) + ww // 2).expand(c, h, w)
    m, d = latents.shape[1:]  # Flux, patch 1: packed row m is token m
    return torch.arange(m)[:, None].expand(m, d)


BUILD = {"sd3": build_sd3, "flux": build_flux}


def _assert_same(got, want, tol=0.0):
    assert len(got) == len(want) == STEPS
    for step, (g, w) in enumerate(zip(got, want)):
        if tol == 0.0:
            assert torch.equal(g, w), f"step {step}: latents differ by {float((g - w).abs().max()):.2e}"
        else:
            err = float((g - w).abs().max() / w.abs().max())
            assert err <= tol, f"step {step}: latents differ by {err:.2e}"


# ------------------------------------------------------------------------------ pipelines


@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("rule", [dict(ratio=0.5, skip_steps=(3, 6)), dict(ratio=1.0, skip_every=2)],
                         ids=["ras-skip_steps", "dense-skip_every"])
def test_scheduled_skips_reuse_the_last_noise_like_the_hand_reference(name, rule):
    pipe, kw = BUILD[name](0)
    cfg = RASConfig(**{**BASE, **rule})
    skipped = [i for i, s in enumerate(skip_schedule(cfg, step_kinds(cfg, STEPS))) if s]
    got, stats, sets, plain_forwards, _ = _rasfx_run(pipe, kw, cfg)
    assert stats.skipped_steps == skipped and len(skipped) == 2
    assert all(stats.steps[i].active_tokens == 0 and stats.steps[i].flops_fraction == 0.0 for i in skipped)
    assert stats.dense_steps == ([0, 1, 5] if cfg.ratio < 1 else [i for i in range(STEPS) if i not in skipped])
    assert all(s.kind in ("dense", "ras") for s in stats.steps if s.index not in skipped)
    ref = ReferenceSteps(pipe, _element_token(name, got[0]), skip=skipped, ras_sets=sets)
    want = ref.run(kw)
    _assert_same(got, want)
    # one model evaluation per computed step (one batched CFG call a step): the skipped steps called nothing
    assert plain_forwards == ref.forwards == STEPS - len(skipped)
    assert not torch.equal(got[-1], _run(pipe, kw)[-1])  # skipping changed the result: the test has teeth


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_extrapolation_of_skipped_steps_and_inactive_tokens_matches_the_hand_reference(name):
    pipe, kw = BUILD[name](0)
    cfg = RASConfig(**BASE, skip_every=2, skip_estimate="extrapolate", inactive_estimate="extrapolate")
    got, stats, sets, _, _ = _rasfx_run(pipe, kw, cfg)
    assert stats.skipped_steps == [3, 7] and stats.ras_steps == [2, 4, 6]
    ref = ReferenceSteps(pipe, _element_token(name, got[0]), skip=[3, 7], ras_sets=sets,
                         skip_estimate="extrapolate", inactive_estimate="extrapolate")
    _assert_same(got, ref.run(kw), tol=1e-5)
    reuse = ReferenceSteps(pipe, _element_token(name, got[0]), skip=[3, 7], ras_sets=sets).run(kw)
    assert float((got[-1] - reuse[-1]).abs().max()) > 1e-4  # the extrapolation made a difference


def test_multistep_scheduler_with_skips_matches_the_hand_reference():
    pipe, kw = build_sd3(0, _flow_unipc())
    cfg = RASConfig(**BASE, skip_steps=(3, 6), skip_estimate="extrapolate")
    got, stats, sets, _, _ = _rasfx_run(pipe, kw, cfg)
    assert stats.skipped_steps == [3, 6]
    ref = ReferenceSteps(pipe, _element_token("sd3", got[0]), skip=[3, 6], ras_sets=sets, skip_estimate="extrapolate")
    _assert_same(got, ref.run(kw), tol=1e-5)


@pytest.mark.parametrize("sync", [False, True])
def test_adaptive_threshold_zero_never_skips_and_huge_skips_every_allowed_step(sync):
    pipe, kw = build_sd3(0)
    base, _, _, _, _ = _rasfx_run(pipe, kw, RASConfig(**BASE))
    never, stats, _, _, records = _rasfx_run(pipe, kw, RASConfig(**BASE, skip_threshold=0.0, skip_sync=sync))
    assert stats.skipped_steps == [] and stats.ras_steps == RAS_KIND
    _assert_same(never, base)
    decisions = [r[4] for r in records]
    if sync:
        assert all(d is False for d in decisions)
    else:  # the no-sync path: a device tensor per candidate step, never read during the run
        assert [isinstance(d, torch.Tensor) for d in decisions] == [i in RAS_KIND for i in range(STEPS)]

    always, stats, _, plain_forwards, records = _rasfx_run(pipe, kw, RASConfig(**BASE, skip_threshold=1e30,
                                                                                skip_sync=sync))
    assert stats.skipped_steps == RAS_KIND and stats.dense_steps == [0, 1, 5]
    want = ReferenceSteps(pipe, _element_token("sd3", always[0]), skip=RAS_KIND).run(kw)
    _assert_same(always, want)  # caches written by a discarded step are never read here: same images
    if sync:
        assert stats.flops_fraction == 3 / STEPS and not stats.notes
    else:
        assert stats.flops_fraction > 3 / STEPS and "no time saved" in " ".join(stats.notes)
        assert all(isinstance(r[4], torch.Tensor) for r in records if r[0] in RAS_KIND)


def test_adaptive_rule_follows_the_error_budget_like_the_hand_reference():
    """Dense-or-skip (ratio 1.0) with the adaptive rule: the skipped steps and the images equal a
    hand-written sampler that measures the relative change between its last two computed noise
    predictions and accumulates it over the skips."""
    pipe, kw = build_sd3(0)
    cfg = RASConfig(ratio=1.0, warmup=2, reset_steps=(5,), skip_sync=True, skip_threshold=0.0)
    # the relative change per computed step of a run that never skips, to pick a threshold that skips some
    probe = ReferenceSteps(pipe, None, threshold=0.0, candidates=RAS_KIND)
    changes = []
    real = probe.scheduler_step

    def spy(original):
        inner = real(original)

        def step(*args, **kwargs):
            out = inner(*args, **kwargs)
            changes.append(probe.change)
            return out
        return step

    probe.scheduler_step = spy
    probe.run(kw)
    threshold = 2.5 * sorted(c for c in changes if math.isfinite(c))[0]
    got, stats, _, _, _ = _rasfx_run(pipe, kw, cfg.replace(skip_threshold=threshold))
    ref = ReferenceSteps(pipe, None, threshold=threshold, candidates=RAS_KIND)
    want = ref.run(kw)
    assert stats.skipped_steps == ref.skipped and 0 < len(ref.skipped) < len(RAS_KIND)
    _assert_same(got, want)
    capped, stats, _, _, _ = _rasfx_run(pipe, kw, cfg.replace(skip_threshold=1e30, skip_max_consecutive=1))
    assert stats.skipped_steps == [2, 4, 6]  # never two in a row


def test_real_transform_skips_steps_and_reports_them(monkeypatch):
    pipe, kw = build_flux(0)
    with rasfx.enabled(pipe, RASConfig(**BASE, skip_every=2, inactive_estimate="extrapolate"),
                       transform_config=rasfx.TransformConfig(mode="eager")):
        ras = rp._STATES[pipe].hooks[0].ras
        module_steps, done = [], []
        real_forward = type(ras).forward

        def spy(self, *args, **kwargs):
            module_steps.append(len(done))
            return real_forward(self, *args, **kwargs)

        monkeypatch.setattr(type(ras), "forward", spy)
        pipe.set_progress_bar_config(disable=True)
        got = pipe(**kw, num_inference_steps=STEPS, output_type="latent",
                   callback_on_step_end=lambda p, i, t, k: done.append(i) or {}).images
        s = rasfx.stats(pipe)
    assert [st.kind for st in s.steps] == ["dense", "dense", "ras", "skip", "ras", "dense", "ras", "skip"]
    assert s.skipped_steps == [3, 7] and s.flops_fraction < (STEPS - 2) / STEPS
    # step 0 learns the tokens, 1 and 5 write the caches for the next RAS step; 3 and 7 are skipped
    assert module_steps == [0, 1, 2, 4, 5, 6]
    assert torch.isfinite(got).all()
