"""Pipeline runs under RAS (rasfx/pipeline/): two pipelines interleaved or in threads keep their
own state; an exception mid-run or a config error at run start leaves the pipeline usable and the
next run fresh; caches survive runs, ``release`` and ``disable`` free them; saving while enabled
saves the plain model; copies and a single-token resolution.

Every test here can fail: each one compares against the original model, a hand-written RAS
reference (``tests/reference_ras.py``, ``tests/tiny_dit.py``) or a separate run, or checks a
typed error and its message (docs/reliability.md).
"""

from __future__ import annotations

import copy
import gc
import warnings
import weakref

import numpy as np
import pytest
import torch
from state_helpers import (
    CFG, build_sd3_pipe, cache_refs, cached_transform, generate, pipe_of,
    ras_of, real_tensor_level, run_threads, same,
)

import rasfx
import rasfx.pipeline as rp

# Tiny models: one intra-op thread is much faster than two on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference_images():
    """Plain and RAS images of p0's weights, from the twin pipeline p0b (never interrupted)."""
    pipe, kw = pipe_of("p0b")
    plain = generate(pipe, kw)
    with rasfx.enabled(pipe, CFG, transform=cached_transform):
        ras_img = generate(pipe, kw)
        assert rasfx.stats(pipe).ras_steps == [1, 2, 3, 4]
    assert np.isfinite(ras_img).all() and not same(ras_img, plain)
    return {"plain": plain, "ras": ras_img}


def test_two_pipelines_interleaved_mid_run_do_not_share_state(reference_images):
    a, kwa = pipe_of("p0")
    b, kwb = pipe_of("p1")
    rasfx.enable(a, CFG, transform=cached_transform)
    rasfx.enable(b, rasfx.RASConfig(ratio=0.5, warmup=2, reset_steps=()), transform=cached_transform)
    solo_b = generate(b, kwb)
    nested = {}

    def run_b_inside_a(pipe, i, t, kwargs):
        if i == 2:  # in the middle of a's run, with a's caches live: a whole run of b
            assert ras_of(a).cache_bytes() > 0
            nested["b"] = generate(b, kwb)
        return {}

    out_a = generate(a, kwa, callback_on_step_end=run_b_inside_a)
    assert same(out_a, reference_images["ras"]), "a's run was disturbed by b's"
    assert same(nested["b"], solo_b)
    assert rasfx.stats(a).ras_steps == [1, 2, 3, 4] and rasfx.stats(b).dense_steps == [0, 1]


def test_threads_with_their_own_pipelines_match_running_alone(reference_images):
    a, kwa = pipe_of("p0")
    b, kwb = pipe_of("p1")
    with rasfx.enabled(a, CFG, transform=cached_transform), rasfx.enabled(b, CFG, transform=cached_transform):
        for pipe, kw in ((a, kwa), (b, kwb)):
            generate(pipe, kw)  # captured before the threads start (see the cold-start xfail below)
        solo_b = [generate(b, kwb, seed=s) for s in range(2)]
        got_a, got_b = run_threads([lambda: [generate(a, kwa, seed=s) for s in range(2)],
                                     lambda: [generate(b, kwb, seed=s) for s in range(2)]])
    assert same(got_a[0], reference_images["ras"])
    assert all(same(x, y) for x, y in zip(got_b, solo_b))
    assert not same(got_a[1], got_a[0])


class _Boom(RuntimeError):
    pass


def _raise_at(step):
    def callback(pipe, i, t, kwargs):
        if i == step:
            raise _Boom(f"stop at step {i}")
        return {}

    return callback


@pytest.mark.parametrize("where", ["callback_on_step_end", "scheduler_step"])
def test_exception_mid_run_leaves_pipeline_usable_and_next_run_fresh(where, reference_images):
    """An exception at RAS step 2 (after caches were written) propagates; the pipeline stays
    enabled; the next run starts dense and equals an uninterrupted run of the twin pipeline."""
    pipe, kw = pipe_of("p0")
    extra = {}
    if where == "scheduler_step":  # a hook on the scheduler that rasfx wraps (it is installed first)
        original = pipe.scheduler.step
        calls = []

        def step(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise _Boom("scheduler failed at step 2")
            return original(*args, **kwargs)

        pipe.scheduler.step = step
    else:
        extra["callback_on_step_end"] = _raise_at(2)
    try:
        rasfx.enable(pipe, CFG, transform=cached_transform)
        with pytest.raises(_Boom):
            generate(pipe, kw, **extra)
        ras = ras_of(pipe)
        assert rasfx.is_enabled(pipe) and ras.cache_bytes() > 0  # interrupted with live caches
        first_forward = {}

        def spy(p, i, t, kwargs):
            if i in (0, 1):  # step 0 ran dense in every slot; step 1 (a RAS step) did not
                first_forward[i] = bool(ras._slots) and all(s.last_dense for s in ras._slots.values())
            return {}

        if where == "scheduler_step":
            calls.append(100)  # the hook raises only once
        again = generate(pipe, kw, callback_on_step_end=spy)
        assert first_forward == {0: True, 1: False}
        assert same(again, reference_images["ras"]), "the interrupted run leaked into the next one"
        assert rasfx.stats(pipe).ras_steps == [1, 2, 3, 4]
        with pytest.raises(_Boom):  # interrupted again, then disabled: caches freed, plain pipeline back
            generate(pipe, kw, callback_on_step_end=_raise_at(3))
        refs = cache_refs(ras)
        rasfx.disable(pipe)
        assert ras.cache_bytes() == 0 and all(r() is None for r in refs), "disable must free the caches"
        assert same(generate(pipe, kw), reference_images["plain"])
    finally:
        if rasfx.is_enabled(pipe):
            rasfx.disable(pipe)
        pipe.scheduler.__dict__.pop("step", None)


def test_config_error_at_run_start_leaves_pipeline_usable(reference_images):
    pipe, kw = pipe_of("p0")
    with rasfx.enabled(pipe, rasfx.RASConfig(ratio=0.25, warmup=1, reset_steps=(3, 9)), transform=cached_transform):
        with pytest.raises(rasfx.ConfigError, match=r"RASConfig.reset_steps .*5-step run"):
            generate(pipe, kw)
        assert np.isfinite(generate(pipe, kw, steps=10)).all()
        assert rasfx.stats(pipe).dense_steps == [0, 3, 9]
    with rasfx.enabled(pipe, rasfx.RASConfig(ratio=0.25, warmup=50), transform=cached_transform):
        assert same(generate(pipe, kw), reference_images["plain"])  # warm-up covers the run: plain
        assert rasfx.stats(pipe).ras_steps == [] and any("every step dense" in n for n in rasfx.stats(pipe).notes)
    with rasfx.enabled(pipe, CFG, transform=cached_transform):
        assert same(generate(pipe, kw), reference_images["ras"])


def test_caches_survive_runs_and_release_frees_them_while_enabled():
    """A finished run keeps its caches for the next image (same storage, nothing allocated or
    captured again); rasfx.release(pipe) frees them and keeps the pipeline enabled."""
    pipe, kw = pipe_of("p0")
    ptrs, refs = [], []

    def grab(p, i, t, kwargs):
        if i == 2:
            refs.extend(cache_refs(ras_of(p)))
            ptrs.append(sorted(r().data_ptr() for r in cache_refs(ras_of(p))))
        return {}

    with rasfx.enabled(pipe, CFG):  # a RASModule of its own: the first image captures
        generate(pipe, kw, callback_on_step_end=grab)
        first = rasfx.stats(pipe)
        assert first.exports == 1
        second_image = generate(pipe, kw, callback_on_step_end=grab)
        assert ptrs[0] == ptrs[1] and rasfx.stats(pipe).exports == 0
        assert all(r() is not None for r in refs)
        rasfx.release(pipe)
        assert all(r() is None for r in refs) and ras_of(pipe).cache_bytes() == 0
        assert rasfx.is_enabled(pipe)
        assert same(generate(pipe, kw), second_image)


def test_disable_returns_memory_to_the_level_before_enable():
    """rasfx.disable drops the RASModule with its captures, graph variants and caches: no tensor
    that rasfx created stays alive."""
    pipe, kw = pipe_of("p1")
    generate(pipe, kw)  # the plain pipeline's own lazily created state exists before the baseline
    level = real_tensor_level()
    caches, graphs = [], []

    def grab(p, i, t, kwargs):
        if i == 2:
            ras = ras_of(p)
            caches.extend(cache_refs(ras))
            graphs.append(weakref.ref(ras))
            graphs.extend(weakref.ref(v.gm) for cc in ras.captures() for v in cc.variants.values())
        return {}

    rasfx.enable(pipe, CFG)  # the default transform: a RASModule only this pipeline holds
    generate(pipe, kw, callback_on_step_end=grab)
    assert real_tensor_level()[1] > level[1]
    rasfx.disable(pipe)
    rp._LAST_STATS.pop(pipe, None)  # the last run's stats are kept on purpose (a few small tensors)
    assert caches and all(r() is None for r in caches), "caches must be freed at once (no cycle holds them)"
    gc.collect()  # the module and its graphs form reference cycles: freed by the cycle collector
    assert len(graphs) > 2 and all(r() is None for r in graphs), "a RASModule or graph outlived disable()"
    after = real_tensor_level()
    # "<=": garbage of earlier tests may be collected meanwhile; nothing rasfx made may remain
    assert after[0] <= level[0] and after[1] <= level[1], f"live CPU tensors (count, bytes): {level} -> {after}"


def test_save_pretrained_while_enabled_saves_the_plain_model(tmp_path, reference_images):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe, kw = pipe_of("p0")
    with rasfx.enabled(pipe, CFG, transform=cached_transform):
        assert same(generate(pipe, kw), reference_images["ras"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.save_pretrained(tmp_path / "pipe")
        assert same(generate(pipe, kw), reference_images["ras"])  # saving did not disturb RAS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = StableDiffusion3Pipeline.from_pretrained(
            tmp_path / "pipe", text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
            text_encoder_3=None, tokenizer_3=None,
        )
        tr = SD3Transformer2DModel.from_pretrained(tmp_path / "pipe" / "transformer")
    loaded.set_progress_bar_config(disable=True)
    assert not rasfx.is_enabled(loaded)
    assert "forward" not in vars(loaded.transformer) and "step" not in vars(loaded.scheduler)
    ref = pipe.transformer.state_dict()
    assert list(tr.state_dict()) == list(ref) and all(torch.equal(v, ref[k]) for k, v in tr.state_dict().items())
    assert same(generate(loaded, kw), reference_images["plain"])
    with rasfx.enabled(loaded, CFG):  # and RAS works on the reloaded pipeline
        assert same(generate(loaded, kw), reference_images["ras"])


def test_deepcopy_of_an_enabled_transformer_computes_with_its_own_weights():
    pipe, _ = build_sd3_pipe(0)  # fresh: no run, so nothing is captured
    rasfx.enable(pipe, CFG, transform=cached_transform)
    twin = copy.deepcopy(pipe.transformer)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    x = dict(hidden_states=torch.randn(1, 4, 16, 16), timestep=torch.tensor([500.0]),
             encoder_hidden_states=torch.randn(1, 5, 16), pooled_projections=torch.randn(1, 8), return_dict=False)
    with torch.no_grad():
        want = type(twin).forward(twin, **x)[0]  # the class's forward on the copy's own weights
        assert not same(want, pipe.transformer(**x)[0])
        assert same(twin(**x)[0], want)


def test_single_image_token_runs_dense_instead_of_crashing():
    pipe, kw = build_sd3_pipe(0)
    kw = dict(kw, height=4, width=4)
    plain = generate(pipe, kw)
    with rasfx.enabled(pipe, CFG, transform=cached_transform), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", rasfx.RASWarning)
        assert same(generate(pipe, kw), plain)
    assert any("single token" in str(w.message) for w in seen)
