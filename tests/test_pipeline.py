"""RAS on real diffusers pipelines built from tiny random components (nothing is downloaded).

Every pipeline runs twice over: through the real compiler (``rasfx.transform``) and through
``StandInRAS``, a dense stand-in of the ``RASModule`` contract that runs the model densely and
then emulates the output cache (inactive tokens return the output of the last step that
computed them). The stand-in pins down what the integration itself must do, independently of
the compiler, and records every ``set_active`` call for the tests that check which index each
slot received.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")  # diffusers pipelines import transformers classes

from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderKLWan,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    LuminaNextDiT2DModel,
    LuminaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)

import rasfx.pipeline as rp  # noqa: E402
from rasfx.pipeline.latents import latent_channels, packed_structure  # noqa: E402
from rasfx.config import RASConfig  # noqa: E402
from rasfx.errors import ArgumentTypeError, ConfigError  # noqa: E402
from rasfx.sampler import PixelLayout, starvation_bound, token_scores  # noqa: E402
from rasfx.heatmaps import heatmap_image, save_heatmap  # noqa: E402


# ------------------------------------------------------------------------------ stand-in module


class StandInRAS(torch.nn.Module):
    """The ``RASModule`` contract, computed densely with an emulated output cache."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self._slots: dict[str, dict] = {}
        self._slot_name = "default"
        self._token_map = None
        self.calls: list[tuple[str, object]] = []  # (slot, index) of every set_active

    @contextlib.contextmanager
    def cache_context(self, name: str):
        previous, self._slot_name = self._slot_name, name
        try:
            yield self
        finally:
            self._slot_name = previous

    def _slot(self) -> dict:
        return self._slots.setdefault(self._slot_name, {"sig": None, "out": None, "index": None, "dense": True})

    def set_active(self, index, check: bool = True) -> None:
        self._slot()["index"] = index
        self.calls.append((self._slot_name, None if index is None else index.clone()))

    def reset(self) -> None:
        self._slots.clear()

    @property
    def num_image_tokens(self):
        return None if self._token_map is None else int(self._token_map.max()) + 1

    @property
    def last_forward_dense(self) -> bool:
        return self._slot()["dense"]

    def token_map(self) -> torch.Tensor:
        if self._token_map is None:
            raise RuntimeError("no forward yet")
        return self._token_map

    def _map(self, sample: torch.Tensor) -> torch.Tensor:
        if sample.dim() == 3:  # packed tokens [B, N, D]: row n is token n
            tok = torch.arange(sample.shape[1]).view(1, -1, 1)
            return tok.expand(sample.shape).contiguous()
        grid = sample.shape[2:]
        p = self.model.config.patch_size
        patch = tuple(p) if isinstance(p, (tuple, list)) else (p,) * len(grid)
        tgrid = [g // q for g, q in zip(grid, patch)]
        coords = torch.meshgrid(*[torch.arange(g) // q for g, q in zip(grid, patch)], indexing="ij")
        tok = torch.zeros(grid, dtype=torch.long)
        for c, size in zip(coords, tgrid):
            tok = tok * size + c
        return tok.expand(sample.shape).contiguous()

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        sample = out[0] if isinstance(out, tuple) else out.sample
        tm = self._map(sample).to(sample.device)
        self._token_map = tm
        x = kwargs.get("hidden_states", args[0] if args else None)
        sig = (tuple(x.shape), x.dtype)
        slot = self._slot()
        if slot["sig"] != sig:
            slot.update(sig=sig, out=None, index=None)
        index = slot["index"]
        dense = index is None or slot["out"] is None
        if not dense:
            b = sample.shape[0]
            idx = index if index.dim() == 2 else index.unsqueeze(0).expand(b, -1)
            n_tok = int(tm.max()) + 1
            active = torch.zeros(b, n_tok, dtype=torch.bool).scatter_(1, idx, True)
            keep = torch.gather(active, 1, tm.reshape(b, -1)).view_as(sample)
            sample = torch.where(keep, sample, slot["out"])
        slot["out"] = sample
        slot["dense"] = dense
        return (sample,) + tuple(out[1:]) if isinstance(out, tuple) else type(out)(sample=sample)


_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def _real_transform(model):
    """``rasfx.transform``, one RASModule per model so its captures are reused across enables."""
    import rasfx

    if model not in _COMPILED:
        _COMPILED[model] = rasfx.transform(model)
    return _COMPILED[model]


TRANSFORMS = {"standin": StandInRAS, "rasfx": _real_transform}


# ------------------------------------------------------------------------------ tiny pipelines


def _vae(latent_channels=4):
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,
        shift_factor=0.0,
        scaling_factor=1.0,
    )


def build_sd3(seed=0, scheduler=None):
    torch.manual_seed(seed)
    tr = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=32,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=tr, scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), vae=_vae(),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None,
    )
    kw = dict(
        prompt_embeds=torch.randn(1, 5, 16), negative_prompt_embeds=torch.randn(1, 5, 16),
        pooled_prompt_embeds=torch.randn(1, 8), negative_pooled_prompt_embeds=torch.randn(1, 8),
        height=32, width=32, guidance_scale=3.0,
    )
    return pipe, kw


def build_flux(seed=0):
    torch.manual_seed(seed)
    tr = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
    )
    pipe = FluxPipeline(
        transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
    )
    kw = dict(prompt_embeds=torch.randn(1, 5, 16), pooled_prompt_embeds=torch.randn(1, 8), height=32, width=32,
              guidance_scale=3.0)
    return pipe, kw


def build_pixart(seed=0, scheduler=None):
    torch.manual_seed(seed)
    tr = PixArtTransformer2DModel(
        sample_size=16, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, cross_attention_dim=16, caption_channels=16, norm_num_groups=4,
        use_additional_conditions=False,
    )
    pipe = PixArtSigmaPipeline(
        transformer=tr, scheduler=scheduler or DPMSolverMultistepScheduler(), vae=_vae(4), text_encoder=None,
        tokenizer=None,
    )
    kw = dict(
        prompt_embeds=torch.randn(1, 5, 16), prompt_attention_mask=torch.ones(1, 5),
        negative_prompt_embeds=torch.randn(1, 5, 16), negative_prompt_attention_mask=torch.ones(1, 5),
        negative_prompt=None, height=32, width=32, use_resolution_binning=False, guidance_scale=3.0,
    )
    return pipe, kw


def build_lumina(seed=0):
    torch.manual_seed(seed)
    tr = LuminaNextDiT2DModel(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=16, num_layers=1, num_attention_heads=2,
        num_kv_heads=1, multiple_of=16, cross_attention_dim=16, learn_sigma=True, qk_norm=True,
    )
    pipe = LuminaPipeline(
        transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4), text_encoder=None, tokenizer=None
    )
    # LuminaPipeline assumes a VAE factor of 8: 64 px -> an 8 x 8 latent, 16 tokens of patch 2
    kw = dict(
        prompt_embeds=torch.randn(1, 5, 16), prompt_attention_mask=torch.ones(1, 5),
        negative_prompt_embeds=torch.randn(1, 5, 16), negative_prompt_attention_mask=torch.ones(1, 5),
        negative_prompt=None, height=64, width=64, guidance_scale=3.0,
    )
    return pipe, kw


def build_wan(seed=0):
    torch.manual_seed(seed)
    tr = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=16, num_layers=1, rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )
    sched = UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)
    pipe = WanPipeline(transformer=tr, scheduler=sched, vae=vae, text_encoder=None, tokenizer=None)
    kw = dict(prompt_embeds=torch.randn(1, 5, 16), negative_prompt_embeds=torch.randn(1, 5, 16), height=32,
              width=32, num_frames=5, guidance_scale=3.0)
    return pipe, kw


BUILDERS = {"sd3": build_sd3, "flux": build_flux, "pixart": build_pixart, "lumina": build_lumina, "wan": build_wan}


_PIPES: dict = {}


def tiny(name, seed=0):
    """A shared tiny pipeline (built once per module; every test leaves it disabled)."""
    key = (name, seed)
    if key not in _PIPES:
        _PIPES[key] = BUILDERS[name](seed)
    pipe, kw = _PIPES[key]
    return pipe, dict(kw)


def generate(pipe, kw, steps=6, seed=0, **extra):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**{**kw, **extra}, num_inference_steps=steps, output_type="np",
               generator=torch.Generator().manual_seed(seed))
    return np.asarray(out.images if hasattr(out, "images") else out.frames)


def snapshot(*objs):
    """Attribute names of each object, and the identity of its module / method attributes."""
    return [
        (sorted(vars(o)), {k: id(v) for k, v in vars(o).items() if isinstance(v, torch.nn.Module) or callable(v)})
        for o in objs
    ]


def same_objects(a, b):
    return a == b


def _ras_of(pipe, name="transformer"):
    state = rp._STATES[pipe]
    return next(h.ras for h in state.hooks if h.name == name)


# Tiny models: one intra-op thread is much faster than two on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=list(TRANSFORMS))
def transform(request):
    return TRANSFORMS[request.param]


# ------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("name", list(BUILDERS))
def test_pipeline_ratio_one_identical_ratio_low_differs_disable_restores(name, transform):
    pipe, kw = tiny(name)
    parts = [pipe, pipe.transformer, pipe.scheduler]
    plain = generate(pipe, kw)
    assert np.isfinite(plain).all()
    before = snapshot(*parts)  # after one run: a run itself adds state (e.g. the step index)

    rp.enable(pipe, RASConfig(ratio=1.0), transform=transform)
    assert np.array_equal(generate(pipe, kw), plain), "ratio 1.0 must reproduce the plain pipeline exactly"
    s = rp.stats(pipe)
    assert s.ras_steps == [] and s.flops_fraction == 1.0 and len(s.steps) == 6
    if transform is StandInRAS:  # no RAS step can happen: the module is not even called
        assert _ras_of(pipe).calls == []
    rp.disable(pipe)
    assert same_objects(snapshot(*parts), before)

    cfg = RASConfig(ratio=0.25, warmup=1, reset_steps=())
    rp.enable(pipe, cfg, transform=transform)
    ras_out = generate(pipe, kw)
    assert np.isfinite(ras_out).all()
    assert not np.array_equal(ras_out, plain)
    s = rp.stats(pipe)
    n = s.num_tokens
    assert s.dense_steps == [0] and s.ras_steps == [1, 2, 3, 4, 5]
    assert all(st.active_tokens < n for st in s.steps[1:])
    assert s.flops_fraction < 1.0
    assert s.computed_steps is not None and s.computed_steps.shape[1] == n
    assert int(s.computed_steps[0].sum()) == sum(st.active_tokens for st in s.steps)
    bound = starvation_bound(n, min(st.active_tokens for st in s.steps), cfg.starvation_scale)
    assert s.longest_inactive_streak <= bound
    assert rp._STATES[pipe].hooks[0].ras is not None
    rp.disable(pipe)

    assert same_objects(snapshot(*parts), before), "disable must remove every attribute it added"
    assert np.array_equal(generate(pipe, kw), plain)
    assert rp.stats(pipe).ras_steps == [1, 2, 3, 4, 5]  # the last run's stats outlive disable


def _cuda_graph_transform(model):
    """``rasfx.transform`` with a CUDA-graph runner made to report the CUDA-graph mode on CPU
    tensors (where it really runs the graphs plainly and reports ``eager``): the pipeline routes
    the steps as it would on a GPU."""
    import rasfx

    ras = rasfx.transform(model, rasfx.TransformConfig(mode="cuda_graph"))
    assert ras.runner.resolved_mode(torch.device("cpu")) == "eager"
    ras.runner.resolved_mode = lambda device: "cuda_graph"
    return ras


@pytest.mark.parametrize("make, mode", [(StandInRAS, "eager"), (_real_transform, "eager"),
                                        (_cuda_graph_transform, "cuda_graph")],
                         ids=["standin", "rasfx", "rasfx-cuda_graph"])
def test_dense_steps_run_through_the_module_unchanged(make, mode, monkeypatch):
    """Warm-up steps match the plain latents. Eagerly, of the warm-up steps only the first (it
    learns the token count) and the last (it writes the caches the first RAS step reads) go
    through the transformed module; the others run the original forward (a dense step rewrites
    every cache). In the CUDA-graph / compiled modes every one does: the original forward is
    neither replayed nor compiled."""
    pipe, kw = tiny("sd3")
    seen: dict[str, list] = {"plain": [], "ras": []}

    def recorder(key):
        def cb(p, i, t, kwargs):
            seen[key].append(kwargs["latents"].clone())
            return {}

        return cb

    generate(pipe, kw, callback_on_step_end=recorder("plain"))
    with rp.enabled(pipe, RASConfig(ratio=0.5, warmup=4, reset_steps=()), transform=make):
        module_steps = []
        real_forward = type(_ras_of(pipe)).forward

        def spy(self, *args, **kwargs):
            module_steps.append(len(seen["ras"]))  # the index of the step being computed
            return real_forward(self, *args, **kwargs)

        monkeypatch.setattr(type(_ras_of(pipe)), "forward", spy)
        generate(pipe, kw, callback_on_step_end=recorder("ras"))
    assert module_steps == ([0, 3, 4, 5] if mode == "eager" else [0, 1, 2, 3, 4, 5])
    for i in range(4):
        assert torch.equal(seen["ras"][i], seen["plain"][i]), f"dense step {i} differs"
    assert not torch.equal(seen["ras"][-1], seen["plain"][-1])


def test_batched_prompts_get_per_row_sets_and_cfg_pairs_share_them():
    pipe, kw = tiny("sd3")
    kw = {**kw, "prompt_embeds": torch.randn(2, 5, 16), "negative_prompt_embeds": torch.randn(2, 5, 16),
          "pooled_prompt_embeds": torch.randn(2, 8), "negative_pooled_prompt_embeds": torch.randn(2, 8)}
    with rp.enabled(pipe, RASConfig(ratio=0.5, warmup=1, reset_steps=()), transform=StandInRAS):
        out = generate(pipe, kw, steps=4)
        calls = [(s, i) for s, i in _ras_of(pipe).calls if i is not None]
    assert np.isfinite(out).all() and out.shape[0] == 2
    assert len(calls) == 3  # steps 1..3
    for slot, index in calls:
        assert slot == "default"
        assert index.shape == (4, 32)  # CFG batch of 2 rows x 2; 64 tokens at ratio 0.5
        assert torch.equal(index[0], index[2]) and torch.equal(index[1], index[3])  # uncond/cond pairs
        assert torch.equal(index, index.sort(dim=-1).values)
    assert any(not torch.equal(i[0], i[1]) for _, i in calls), "different prompts select different tokens"


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_separate_cond_uncond_calls_use_separate_slots(name):
    pipe, kw = tiny(name)
    if name == "flux":  # true CFG: the pipeline calls the transformer once per branch
        kw = {**kw, "negative_prompt_embeds": torch.randn(1, 5, 16),
              "negative_pooled_prompt_embeds": torch.randn(1, 8), "true_cfg_scale": 2.0}
    with rp.enabled(pipe, RASConfig(ratio=0.5, warmup=1, reset_steps=()), transform=StandInRAS):
        out = generate(pipe, kw, steps=4)
        ras = _ras_of(pipe)
        calls = list(ras.calls)
    assert np.isfinite(out).all()
    slots = [s for s, _ in calls]
    assert slots == ["cond", "uncond"] * 4
    for step in range(1, 4):
        (_, a), (_, b) = calls[2 * step], calls[2 * step + 1]
        assert a is not None and torch.equal(a, b), "both branches of a step share one active set"
    assert calls[0][1] is None and calls[1][1] is None


def test_second_call_in_a_step_gets_its_own_slot():
    """SD3 skip-layer guidance calls the transformer twice per step in the same context."""
    pipe, kw = tiny("sd3")
    with rp.enabled(pipe, RASConfig(ratio=0.5, warmup=1, reset_steps=()), transform=StandInRAS):
        out = generate(pipe, kw, steps=5, skip_guidance_layers=[1], skip_layer_guidance_start=0.0,
                       skip_layer_guidance_stop=1.0)
        slots = [s for s, _ in _ras_of(pipe).calls]
    assert np.isfinite(out).all()
    assert "default" in slots and "default#1" in slots


def test_two_pipelines_do_not_share_state(transform):
    a, kwa = tiny("sd3", 0)
    b, kwb = tiny("sd3", 1)
    cfg_a, cfg_b = RASConfig(ratio=0.25, warmup=1, reset_steps=()), RASConfig(ratio=0.5, warmup=2, reset_steps=())
    rp.enable(a, cfg_a, transform=transform)
    solo_a = generate(a, kwa, steps=4)
    rp.enable(b, cfg_b, transform=transform)
    solo_b = generate(b, kwb, steps=4)
    # interleaved: a run of one pipeline is unaffected by the other's runs and caches
    assert np.array_equal(generate(a, kwa, steps=4), solo_a)
    assert rp.stats(a).config is cfg_a and rp.stats(b).config is cfg_b
    assert rp.stats(a).dense_steps == [0] and rp.stats(b).dense_steps == [0, 1]
    rp.disable(a)
    assert np.array_equal(generate(b, kwb, steps=4), solo_b)
    rp.disable(b)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 7, 10])
def test_few_steps_with_default_schedule_never_crash(steps):
    pipe, kw = tiny("sd3")
    with rp.enabled(pipe, RASConfig(ratio=0.25), transform=StandInRAS):
        out = generate(pipe, kw, steps=steps)
        s = rp.stats(pipe)
    assert np.isfinite(out).all()
    assert len(s.steps) == steps == s.num_steps
    assert s.steps[0].dense
    if steps >= 2:
        assert s.ras_steps, "default few-step schedules keep RAS steps"


def test_explicit_reset_steps_out_of_range_raise_a_clear_error():
    pipe, kw = tiny("sd3")
    plain = generate(pipe, kw, steps=4)
    rp.enable(pipe, RASConfig(ratio=0.5, reset_steps=(12, 20)), transform=StandInRAS)
    with pytest.raises(ConfigError, match=r"reset_steps.*4-step run"):
        generate(pipe, kw, steps=4)
    out = generate(pipe, kw, steps=22)  # the same config fits a longer run
    assert np.isfinite(out).all()
    assert rp.stats(pipe).dense_steps[-2:] == [12, 20]
    rp.disable(pipe)
    assert np.array_equal(generate(pipe, kw, steps=4), plain)


@pytest.mark.parametrize(
    "make",
    [
        lambda: build_pixart(scheduler=DPMSolverMultistepScheduler(solver_order=2)),
        lambda: build_pixart(scheduler=DDPMScheduler()),
        lambda: build_pixart(scheduler=EulerAncestralDiscreteScheduler()),
        lambda: build_pixart(scheduler=UniPCMultistepScheduler()),
        lambda: build_sd3(scheduler=FlowMatchHeunDiscreteScheduler()),
    ],
    ids=["dpm-multistep", "ddpm-stochastic", "euler-ancestral-stochastic", "unipc", "heun-2nd-order"],
)
def test_multistep_stochastic_and_second_order_schedulers(make):
    pipe, kw = make()
    plain = generate(pipe, kw, steps=5)
    with rp.enabled(pipe, RASConfig(ratio=0.25, warmup=1, reset_steps=()), transform=StandInRAS):
        first = generate(pipe, kw, steps=5)
        second = generate(pipe, kw, steps=5)  # the same generator seed: the same image
        s = rp.stats(pipe)
        evaluations = len(pipe.scheduler.timesteps)
    assert np.isfinite(first).all() and np.array_equal(first, second)
    assert not np.array_equal(first, plain)
    assert s.num_steps == evaluations and len(s.steps) == evaluations  # Heun: 2 per step but the last
    assert s.dense_steps == [0]


# ------------------------------------------------------------------------------ metric and stats


def test_flux_packed_scores_match_the_unpacked_latents():
    pipe, kw = tiny("flux")
    seen = {}
    with rp.enabled(pipe, RASConfig(ratio=0.5, warmup=1, reset_steps=()), transform=StandInRAS):
        state = rp._STATES[pipe]
        original = state.original_step

        def spy(*args, **kwargs):
            seen["noise"] = args[0].clone()
            return original(*args, **kwargs)

        state.original_step = spy
        generate(pipe, kw, steps=3)
        layout = state.run.sampler.layout
    noise = seen["noise"]  # [1, 64, 16]: 4 latent channels x 2 x 2 pixels per packed row
    assert noise.shape == (1, 64, 16) and layout.channels == 4 and layout.packed_perm is not None
    got = token_scores(noise, layout, "std")
    lat = FluxPipeline._unpack_latents(noise, 32, 32, pipe.vae_scale_factor)  # [1, 4, 16, 16]
    want = torch.nn.functional.avg_pool2d(lat.std(dim=1, keepdim=True), 2).flatten(1)
    torch.testing.assert_close(got, want)
    grid = rp.stats(pipe).token_grid
    assert grid.shape == (16, 16)  # latent pixels -> packed token, from the pipeline's unpacking
    assert torch.equal(grid, torch.arange(64).view(8, 8).repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_channels_first_layout_uses_the_token_map():
    pipe, kw = tiny("sd3")
    with rp.enabled(pipe, RASConfig(ratio=0.5, warmup=1, reset_steps=()), transform=StandInRAS):
        generate(pipe, kw, steps=3)
        layout = rp._STATES[pipe].run.sampler.layout
    assert isinstance(layout, PixelLayout) and layout.packed_perm is None
    assert layout.num_tokens == 64 and layout.channels == 4
    assert torch.equal(layout.grid_token[:2, :4], torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]]))


@pytest.mark.parametrize("name", ["sd3", "flux", "wan"])
def test_stats_and_heatmaps(name, tmp_path):
    pipe, kw = tiny(name)
    with rp.enabled(pipe, RASConfig(ratio=0.25, warmup=1, reset_steps=()), transform=StandInRAS):
        generate(pipe, kw, steps=5)
    s = rp.stats(pipe)
    assert [st.index for st in s.steps] == list(range(5))
    assert all(st.wall_time_s > 0 for st in s.steps)
    for st in s.steps:
        assert math.isclose(st.flops_fraction, st.active_tokens / st.num_tokens)
    assert s.noise_std is not None and torch.isfinite(s.noise_std).all()
    text = s.summary()
    assert "RAS" in text and "dense" in text
    for which in ("computed", "std"):
        path = save_heatmap(s, tmp_path / f"{name}-{which}.png", which, colorbar=False)
        from PIL import Image

        img = Image.open(path)
        assert img.format == "PNG"
        if name == "wan":  # 2 latent frames of 4 x 4 latent pixels in a 2 x 1 mosaic, x8 pixels
            assert img.size == (2 * 4 * 8, 4 * 8)
        else:  # 16 x 16 latent pixels, VAE factor 2 -> the 32 x 32 image
            assert img.size == (32, 32)
    if name == "wan":
        assert heatmap_image(s, frame=1).size == (32, 32)
    counts = s.grid_map("computed")
    assert counts.min() >= 1 and counts.max() <= 5


def test_enable_guards_and_context_manager():
    pipe, kw = build_sd3()  # a fresh pipeline: no stats recorded yet
    with pytest.raises(ValueError, match="no denoising step has run"):
        rp.stats(pipe)
    with rp.enabled(pipe, RASConfig(), transform=StandInRAS):
        assert rp.is_enabled(pipe)
        with pytest.raises(ValueError, match="already enabled"):
            rp.enable(pipe, RASConfig(), transform=StandInRAS)
        twin = StableDiffusion3Pipeline(**pipe.components)  # shares transformer and scheduler
        with pytest.raises(ValueError, match="already RAS-enabled"):
            rp.enable(twin, RASConfig(), transform=StandInRAS)
    assert not rp.is_enabled(pipe)
    with pytest.raises(ValueError, match="not enabled"):
        rp.disable(pipe)
    with pytest.raises(TypeError):
        rp.enable(pipe, {"ratio": 0.5})
    with pytest.raises(ValueError, match="transformer"):
        rp.enable(object(), RASConfig())


class _NoActiveSet(torch.nn.Module):
    """A transform result that forgets part of the contract: no set_active, no token_map, and a
    ``reset`` that is not callable."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.reset = None
        self.num_image_tokens = None
        self.last_forward_dense = True

    def cache_context(self, name):
        return contextlib.nullcontext()

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def test_custom_transform_is_checked_against_the_contract():
    pipe, kw = tiny("sd3")
    before = (dict(pipe.transformer.__dict__), dict(pipe.scheduler.__dict__))
    with pytest.raises(ArgumentTypeError) as info:
        rp.enable(pipe, RASConfig(), transform=_NoActiveSet)
    msg = str(info.value)
    assert isinstance(info.value, TypeError)
    assert "pipe.transformer" in msg and "_NoActiveSet" in msg and "rasfx.RASModuleProtocol" in msg
    assert "missing set_active, token_map" in msg and "not callable: reset" in msg
    assert "cache_context" not in msg and "num_image_tokens" not in msg  # present: not named
    assert not rp.is_enabled(pipe) and (dict(pipe.transformer.__dict__), dict(pipe.scheduler.__dict__)) == before
    # an object with none of it: every member of the protocol is named, in the protocol's order
    with pytest.raises(ArgumentTypeError, match=r"missing num_image_tokens, last_forward_dense, __call__, "
                                                      r"cache_context, set_active, token_map, reset\)"):
        rp.enable(pipe, RASConfig(), transform=lambda model: object())
    # the stand-in and rasfx.transform keep it (mypy checks rasfx.RASModule statically as well)
    for transform in TRANSFORMS.values():
        with rp.enabled(pipe, RASConfig(), transform=transform):
            assert rp.is_enabled(pipe)


def test_transformer_called_outside_a_run_is_untouched():
    pipe, kw = tiny("sd3")
    x = torch.randn(1, 4, 16, 16)
    args = dict(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 5, 16),
                pooled_projections=torch.randn(1, 8), return_dict=False)
    want = pipe.transformer(**args)[0]
    with rp.enabled(pipe, RASConfig(), transform=StandInRAS):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = pipe.transformer(**args)[0]
    assert torch.equal(got, want)


class _NoTokenMap(StandInRAS):
    def token_map(self):
        raise RuntimeError("no map for this model")


def test_module_without_token_map_falls_back_to_dense_with_a_warning():
    pipe, kw = tiny("pixart")
    plain = generate(pipe, kw, steps=4)
    with rp.enabled(pipe, RASConfig(ratio=0.25, warmup=1, reset_steps=()), transform=_NoTokenMap):
        with pytest.warns(rp.RASWarning, match="no token map"):
            out = generate(pipe, kw, steps=4)
        s = rp.stats(pipe)
    assert np.array_equal(out, plain)
    assert s.ras_steps == [] and any("no token map" in n for n in s.notes)


def test_packed_row_layout_is_read_from_the_pipelines_pack_function():
    """A packing that puts channels innermost (unlike Flux) is still decoded correctly."""

    class ChannelsLast:
        vae = type("V", (), {"config": type("C", (), {"latent_channels": 3})()})()

        @staticmethod
        def _pack_latents(latents, batch_size, num_channels_latents, height, width):
            x = latents.view(batch_size, num_channels_latents, height // 2, 2, width // 2, 2)
            x = x.permute(0, 2, 4, 3, 5, 1)  # (row, col, ph, pw, c): channels innermost
            return x.reshape(batch_size, (height // 2) * (width // 2), 4 * num_channels_latents)

    state = type("S", (), {})()
    state.latent_channels = latent_channels(ChannelsLast())
    state.original_pack = ChannelsLast._pack_latents
    perm, c, k = packed_structure(state, 12)
    assert (c, k) == (3, 4)
    assert torch.equal(perm, torch.arange(12))  # already (pixel, channel) ordered
    state.original_pack = None  # no pack function: diffusers' channel-major convention
    perm, c, k = packed_structure(state, 12)
    assert torch.equal(perm, torch.arange(12).view(3, 4).t().reshape(-1))


def test_wan22_two_transformers_share_one_sampler():
    """Wan 2.2: a high-noise and a low-noise transformer, switched at a boundary timestep."""
    pipe, kw = build_wan()
    torch.manual_seed(5)
    low = WanTransformer3DModel(**pipe.transformer.config)
    two = WanPipeline(transformer=pipe.transformer, transformer_2=low, scheduler=pipe.scheduler, vae=pipe.vae,
                      text_encoder=None, tokenizer=None, boundary_ratio=0.5)
    kw = {**kw, "guidance_scale_2": 2.0}
    plain = generate(two, kw, steps=6)
    with rp.enabled(two, RASConfig(ratio=0.5, warmup=1, reset_steps=()), transform=StandInRAS):
        out = generate(two, kw, steps=6)
        high_calls, low_calls = _ras_of(two).calls, _ras_of(two, "transformer_2").calls
        s = rp.stats(two)
    assert np.isfinite(out).all() and not np.array_equal(out, plain)
    assert high_calls and low_calls and len(high_calls) + len(low_calls) == 12  # cond + uncond per step
    switch = len(high_calls) // 2  # first step of the low-noise model
    assert 1 < switch < 6
    # that step runs dense (the low-noise model's caches are empty) and is reported as dense
    assert s.dense_steps == [0, switch]
    assert all(i is not None for _, i in low_calls)


def test_enabled_pipeline_can_be_garbage_collected():
    import gc

    pipe, kw = build_sd3()
    rp.enable(pipe, RASConfig(), transform=StandInRAS)
    ref = weakref.ref(pipe)
    del pipe
    gc.collect()
    assert ref() is None and len(rp._STATES) == 0
