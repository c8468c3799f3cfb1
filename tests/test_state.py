"""State that outlives a call never gives a silent wrong result (docs/reliability.md, "State").

Each test names the behaviour it pins down: values computed once per prompt follow weight
edits and diffusers' LoRA API; hooks added after capture are followed, diffusers' hook-based
features are refused with a clear error; a replaced scheduler is followed; inference mode,
index snapshots, unknown arguments, copies and pickles behave as the plain model does.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import rasfx  # noqa: E402
from rasfx.pipeline.patching import is_ours  # noqa: E402
from reference_ras import make_sd3_tiny, sd3_inputs  # noqa: E402
from test_pipeline import build_flux, build_pixart, build_sd3  # noqa: E402

CFG = rasfx.RASConfig(ratio=0.25, warmup=1, reset_steps=())


def rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def generate(pipe, kw, steps=5, seed=0):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**kw, num_inference_steps=steps, output_type="np", generator=torch.Generator().manual_seed(seed))
    return np.asarray(out.images)


def sequence(ras, kw_list, index):
    """A dense forward, then RAS forwards on the next inputs with ``index``: the last output."""
    with torch.no_grad():
        ras.reset()
        out = ras(**kw_list[0])[0]
        ras.set_active(index)
        for kw in kw_list[1:]:
            out = ras(**kw)[0]
    return out


# ============================================================================== weights


def _pixart_model():
    from rasfx.presets import get_preset

    p = get_preset("pixart-tiny")
    return p.build(0), (lambda seed: p.inputs(2, *p.default_hw, seed=seed)), "caption_projection.linear_1.weight"


def _sd3_model():
    return make_sd3_tiny(0), (lambda seed: {**sd3_inputs(2, 8, 8, seed=0), "hidden_states":
                                           sd3_inputs(2, 8, 8, seed=seed)["hidden_states"]}), "context_embedder.weight"


def _edit_in_place(model, name):
    with torch.no_grad():
        model.get_parameter(name).add_(0.5)


def _edit_load_state_dict(model, name):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.1)
    model.load_state_dict(other.state_dict())


def _edit_new_storage(model, name):
    p = model.get_parameter(name)
    p.data = p.data + 0.5  # the same Parameter object, other storage, version unchanged


@pytest.mark.parametrize("edit", [_edit_in_place, _edit_load_state_dict, _edit_new_storage],
                         ids=["in-place", "load_state_dict", "param.data="])
@pytest.mark.parametrize("build", [_sd3_model, _pixart_model], ids=["sd3", "pixart"])
def test_weight_edits_reach_the_values_computed_once_per_prompt(build, edit):
    """The prompt path (SD3's context embedder, PixArt's caption projection and cross-attention
    keys/values) is computed once per prompt; after a weight edit, a dense forward equals the
    edited model and a RAS sequence equals a freshly transformed model's."""
    model, inputs, name = build()
    ras = rasfx.transform(model)
    kws = [inputs(s) for s in (1, 2, 3)]
    with torch.no_grad():
        ras(**kws[0])
        n = ras.num_image_tokens
        index = torch.arange(0, n, 3)
        sequence(ras, kws, index)  # the per-prompt values exist and are reused
        edit(model, name)
        ras.set_active(None)
        assert rel(ras(**kws[0])[0], model(**kws[0])[0]) == 0.0
        got = sequence(ras, kws, index)
    want = sequence(rasfx.transform(model), kws, index)
    assert rel(got, want) == 0.0


def _random_lora(model):
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "add_k_proj"]),
                      adapter_name="a")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _lora_states(target):
    """diffusers' LoRA API calls, in order, on a pipeline or a model: (name, call)."""
    return [
        ("adapter", lambda: None),
        ("fused", lambda: target.fuse_lora()),
        ("unfused", lambda: target.unfuse_lora()),
        ("scaled", lambda: target.set_adapters(["a"], [0.5]) if hasattr(target, "transformer")
         else target.set_adapters(["a"], weights=[0.5])),
        ("disabled", lambda: target.disable_lora()),
    ]


def test_diffusers_lora_api_on_a_transformed_model():
    """After each LoRA call on the model: a dense forward equals the model's, a RAS sequence
    equals a freshly transformed model's."""
    pytest.importorskip("peft")
    model = make_sd3_tiny(0)
    _random_lora(model)
    ras = rasfx.transform(model)
    kws = [sd3_inputs(2, 8, 8, seed=s) for s in (1, 2, 3)]
    index = torch.arange(0, 16, 3)
    outputs = {}
    for what, change in _lora_states(model):
        change()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", rasfx.RASWarning)  # "changed since it was captured"
            ras.reset()
            ras.set_active(None)
            assert rel(ras(**kws[0])[0], model(**kws[0])[0]) <= 1e-6, what
            outputs[what] = sequence(ras, kws, index)
        assert rel(outputs[what], sequence(rasfx.transform(model), kws, index)) == 0.0, what
    assert rel(outputs["unfused"], outputs["adapter"]) <= 1e-5
    assert rel(outputs["scaled"], outputs["adapter"]) > 1e-3 and rel(outputs["disabled"], outputs["adapter"]) > 1e-3


def test_diffusers_lora_api_on_an_enabled_pipeline():
    """LoRA through the pipeline's API while RAS is enabled (fuse, unfuse, scale, disable): every
    image equals the one a freshly enabled pipeline makes in the same state."""
    pytest.importorskip("peft")
    pipe, kw = build_sd3(0)
    _random_lora(pipe.transformer)
    rasfx.enable(pipe, CFG)
    images = {}
    for what, change in _lora_states(pipe):
        change()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasfx.RASWarning)
            images[what] = generate(pipe, kw)
        rasfx.disable(pipe)
        with rasfx.enabled(pipe, CFG):
            assert np.array_equal(images[what], generate(pipe, kw)), f"{what}: differs from a fresh pipeline"
        rasfx.enable(pipe, CFG)
    assert np.abs(images["unfused"] - images["adapter"]).max() <= 1e-5
    assert not np.array_equal(images["scaled"], images["adapter"])


# ============================================================================== hooks


def test_forward_hook_added_after_capture_is_followed():
    model = make_sd3_tiny(0)
    ras = rasfx.transform(model)
    kw = sd3_inputs(2, 8, 8, seed=1)
    with torch.no_grad():
        ras(**kw)
        handle = model.transformer_blocks[0].ff.register_forward_hook(lambda m, i, o: o * 2.0)
        with pytest.warns(rasfx.RASWarning, match="forward hook or pre-hook of transformer_blocks.0.ff"):
            out = ras(**kw)[0]
        assert rel(out, model(**kw)[0]) <= 1e-6
        ras.set_active(torch.arange(0, 16, 2))
        ras(**sd3_inputs(2, 8, 8, seed=2))
        assert not ras.last_forward_dense
        handle.remove()
        with pytest.warns(rasfx.RASWarning, match="was added or removed"):
            out = ras(**kw)[0]
        assert rel(out, model(**kw)[0]) <= 1e-6


def test_global_module_hooks_are_followed():
    model = make_sd3_tiny(0)
    ras = rasfx.transform(model)
    kw = sd3_inputs(1, 8, 8, seed=1)
    with torch.no_grad():
        ras(**kw)
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o: o * 0.5 if isinstance(m, torch.nn.Linear) else None)
        try:
            with pytest.warns(rasfx.RASWarning, match="changed since it was captured"):
                out = ras(**kw)[0]
            assert rel(out, model(**kw)[0]) <= 1e-6
        finally:
            handle.remove()


def test_diffusers_cache_hooks_are_refused_with_a_clear_error():
    from diffusers import FirstBlockCacheConfig

    pipe, kw = build_flux(0)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(rasfx.UnsupportedModelError, match=r"diffusers hook .*disable_cache\(\)"):
        rasfx.enable(pipe, CFG)
    assert not rasfx.is_enabled(pipe)
    pipe.transformer.disable_cache()
    rasfx.enable(pipe, CFG)
    generate(pipe, kw)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))  # added while enabled
    with pytest.raises(rasfx.UnsupportedModelError, match="diffusers hook"):
        generate(pipe, kw)


def test_group_offloading_is_refused_with_a_clear_error():
    pipe, kw = build_sd3(0)
    pipe.transformer.enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    with pytest.raises(rasfx.UnsupportedModelError, match="diffusers hook"):
        rasfx.enable(pipe, CFG)


# ============================================================================== scheduler


def test_scheduler_replaced_after_enable_is_followed():
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe, kw = build_sd3(0)
    rasfx.enable(pipe, CFG)
    old = pipe.scheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(old.config, shift=2.0)
    got = generate(pipe, kw)
    stats = rasfx.stats(pipe)
    assert stats.ras_steps == [1, 2, 3, 4] and len(stats.steps) == 5
    assert "step" not in old.__dict__ and "set_timesteps" not in old.__dict__  # the old one is restored
    rasfx.disable(pipe)
    assert "step" not in pipe.scheduler.__dict__
    plain = generate(pipe, kw)
    with rasfx.enabled(pipe, CFG):  # enabled with the new scheduler from the start
        want = generate(pipe, kw)
    assert np.array_equal(got, want) and not np.array_equal(got, plain)


def test_stats_never_report_a_run_without_steps():
    pipe, kw = build_sd3(0)
    rasfx.enable(pipe, CFG)
    with pytest.raises(rasfx.UsageError, match="call pipe"):
        rasfx.stats(pipe)
    generate(pipe, kw)
    pipe.scheduler.set_timesteps(5)  # a run begins (as a pipeline call does) but no step ran yet
    assert len(rasfx.stats(pipe).steps) == 5  # the last finished run


# ============================================================================== calls


def test_inference_mode_then_no_grad():
    model = make_sd3_tiny(0)
    ras = rasfx.transform(model)
    kw = sd3_inputs(2, 8, 8, seed=1)
    with torch.inference_mode():
        ras(**{k: v.clone() if torch.is_tensor(v) else v for k, v in kw.items()})
    with torch.no_grad():
        ras.set_active(torch.arange(5))
        got = ras(**kw)[0]
        assert not ras.last_forward_dense
        ras.reset()
        assert rel(ras(**kw)[0], model(**kw)[0]) == 0.0
    fresh = rasfx.transform(model)
    assert rel(got, sequence(fresh, [kw, kw], torch.arange(5))) == 0.0


def test_set_active_snapshots_its_index():
    model = make_sd3_tiny(0)
    ras, ref = rasfx.transform(model), rasfx.transform(model)
    kws = [sd3_inputs(2, 8, 8, seed=s) for s in (1, 2)]
    want = sequence(ref, kws, torch.arange(0, 16, 2))
    with torch.no_grad():
        ras(**kws[0])
        index = torch.arange(0, 16, 2)
        ras.set_active(index)
        index.fill_(10**6)  # the caller reuses its tensor
        assert rel(ras(**kws[1])[0], want) == 0.0


def test_index_is_checked_against_the_call_that_uses_it():
    model = make_sd3_tiny(0)
    ras = rasfx.transform(model)
    with torch.no_grad():
        ras(**sd3_inputs(1, 16, 16))  # 64 image tokens
        ras.reset()
        ras.set_active(torch.arange(50, 60))  # valid for 64 tokens, 10 entries
        ras(**sd3_inputs(1, 8, 8))  # 16 tokens: the first forward of an image is dense
        with pytest.raises(rasfx.InvalidIndexError, match="out of range"):
            ras(**sd3_inputs(1, 8, 8, seed=1))
        ras.set_active(torch.arange(4))
        ras(**sd3_inputs(1, 8, 8, seed=1))
        assert not ras.last_forward_dense


def test_unknown_keyword_raises_the_models_type_error():
    model = make_sd3_tiny(0)
    ras = rasfx.transform(model)
    kw = sd3_inputs(1, 8, 8)
    with pytest.raises(TypeError) as plain:
        model(**kw, hiden_states=None)
    with pytest.raises(TypeError, match="unexpected keyword argument 'hiden_states'") as ours:
        ras(**kw, hiden_states=None)
    assert "hiden_states" in str(plain.value) and not isinstance(ours.value, rasfx.RasfxError)
    assert ras.captures() == []


def test_deepcopy_and_pickle_of_a_transformed_module():
    """A copy has its own weights (copied) and its own caches; captures are made again."""
    model = make_sd3_tiny(0)
    ras = rasfx.transform(model)
    kws = [sd3_inputs(2, 8, 8, seed=s) for s in (1, 2)]
    want = sequence(ras, kws, torch.arange(6))
    for twin in (copy.deepcopy(ras), pickle.loads(pickle.dumps(ras))):
        assert twin.captures() == [] and twin.cache_bytes() == 0
        assert all(a is not b for a, b in zip(twin.parameters(), model.parameters()))
        assert rel(sequence(twin, kws, torch.arange(6)), want) == 0.0
        with torch.no_grad():
            twin.model.context_embedder.weight.add_(1.0)  # the copy's weights are its own
    assert rel(sequence(ras, kws, torch.arange(6)), want) == 0.0


def test_pickle_of_an_enabled_pipeline_is_the_plain_pipeline():
    pipe, kw = build_pixart(0)
    plain = generate(pipe, kw)
    rasfx.enable(pipe, CFG)
    twin = pickle.loads(pickle.dumps(pipe))
    assert not rasfx.is_enabled(twin)
    assert "forward" not in twin.transformer.__dict__ or not is_ours(twin.transformer.__dict__["forward"])
    assert np.array_equal(generate(twin, kw), plain)
    with rasfx.enabled(twin, CFG):
        generate(twin, kw)
        assert rasfx.stats(twin).ras_steps


# ============================================================================== lifetimes (review findings)


def test_lru_eviction_of_another_slots_signature_runs_that_slot_dense():
    """max_captures=1 and two slots at two batch sizes: evicting slot a's signature frees its
    caches, so a's next forward is dense (it returned NaN from uninitialised caches before)."""
    model = make_sd3_tiny(0)
    ras = rasfx.transform(model, rasfx.TransformConfig(max_captures=1))
    a, b = sd3_inputs(1, 8, 8, seed=1), sd3_inputs(2, 8, 8, seed=2)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ras.cache_context("a"):
            ras(**a)
            ras.set_active(torch.arange(4))
        with ras.cache_context("b"):
            ras(**b)  # evicts a's signature
        with ras.cache_context("a"):
            out = ras(**a)[0]
            assert ras.last_forward_dense and rel(out, model(**a)[0]) == 0.0


def test_index_set_after_reset_is_checked_against_the_forward_that_uses_it():
    model = make_sd3_tiny(0)
    ras = rasfx.transform(model)
    big, small = sd3_inputs(1, 16, 16), sd3_inputs(1, 8, 12)  # 64 and 24 image tokens
    with torch.no_grad():
        ras(**big)
        ras(**small)
        ras.reset()
        ras.set_active(torch.arange(0, 64, 2))  # valid for the next image, at 64 tokens
        ras(**big)
        ras(**big)
        assert not ras.last_forward_dense


def test_an_exception_inside_a_step_makes_the_next_forward_dense(monkeypatch):
    model = make_sd3_tiny(0)
    ras = rasfx.transform(model)
    kw = sd3_inputs(2, 8, 8, seed=1)
    with torch.no_grad():
        ras(**kw)
        ras.set_active(torch.arange(4))
        real_run = ras.runner.run

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(ras.runner, "run", interrupted)
        with pytest.raises(KeyboardInterrupt):
            ras(**kw)
        monkeypatch.setattr(ras.runner, "run", real_run)
        assert rel(ras(**kw)[0], model(**kw)[0]) == 0.0 and ras.last_forward_dense


def test_a_replaced_weight_is_not_kept_alive():
    import gc
    import weakref

    model = make_sd3_tiny(0)
    ras = rasfx.transform(model)
    kw = sd3_inputs(2, 8, 8, seed=1)
    with torch.no_grad():
        ras(**kw)
        old = weakref.ref(model.context_embedder.weight)
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
        ras(**kw)
    gc.collect()
    assert old() is None, "the capture or the per-prompt values keep a replaced weight alive"
