"""The caches of a ``RASModule`` (rasfx/slot_state.py): never shared between transformed models
or threads; ``reset()`` keeps their memory, ``release()`` frees it; a thousand steps do not
grow it.

Every test here can fail: each one compares against the original model, a hand-written RAS
reference (``tests/reference_ras.py``, ``tests/tiny_dit.py``) or a separate run, or checks a
typed error and its message (docs/reliability.md).
"""

from __future__ import annotations

import gc

import pytest
import torch
from reference_ras import make_sd3_tiny
from state_helpers import GOOD, N_TOK, cache_refs, kw_sd3, live_tensors, rel, rss_bytes, run_threads, same
from tiny_dit import TinyDiT, index_schedule

import rasfx

# Tiny models: one intra-op thread is much faster than two on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_transformed_models_never_share_caches(ras, ras_other, sd3):
    """Two models, and two transforms of one model, interleaved step by step: each equals its own
    run alone."""
    mods = {"a": ras, "b": ras_other, "a2": rasfx.transform(sd3)}
    schedules = {name: index_schedule(N_TOK, 2, steps=6, seed=s) for s, name in enumerate(mods)}
    inputs = [kw_sd3(2, 8, 8, seed=10 + i) for i in range(6)]

    def step(name, i):
        mod = mods[name]
        mod.set_active(schedules[name][i])
        out = mod(**inputs[i])[0]
        assert mod.last_forward_dense == (schedules[name][i] is None)
        return out

    with torch.no_grad():
        alone = {}
        for name, mod in mods.items():
            mod.reset()
            alone[name] = [step(name, i) for i in range(6)]
        for mod in mods.values():
            mod.reset()
        for i in range(6):
            for name in mods:
                assert same(step(name, i), alone[name][i]), f"{name} step {i}"
    assert not same(alone["a"][2], alone["a2"][2])  # different active sets: the check can fail


def test_threads_with_their_own_transformed_models_match_running_alone(ras, ras_other):
    mods = [ras, ras_other]
    schedule = index_schedule(N_TOK, 2, steps=8, seed=5)
    inputs = [kw_sd3(2, 8, 8, seed=20 + i) for i in range(8)]

    def run(mod):
        with torch.no_grad():
            mod.reset()
            outs = []
            for idx, kw in zip(schedule, inputs):
                mod.set_active(idx)
                outs.append(mod(**kw)[0])
            return outs

    alone = [run(m) for m in mods]  # also captures both before the threads start
    for _ in range(2):
        got = run_threads([lambda: run(mods[0]), lambda: run(mods[1])])
        for g, w in zip(got, alone):
            assert all(same(x, y) for x, y in zip(g, w))


def test_reset_keeps_memory_and_the_next_forward_is_dense(ras, sd3):
    """reset() starts a new image: nothing is freed or re-allocated (a captured CUDA graph reads
    the caches in place), the next forward is dense and exact, RAS steps after it are exact."""
    kw = kw_sd3(2, 8, 8)
    with torch.no_grad():
        for slot in ("cond", "uncond"):
            with ras.cache_context(slot):
                ras(**kw)
                ras.set_active(GOOD)
                ras(**kw_sd3(2, 8, 8, seed=1))
        refs, ptrs, nbytes = cache_refs(ras), [r().data_ptr() for r in cache_refs(ras)], ras.cache_bytes()
        ras.reset()
        assert [r().data_ptr() for r in refs] == ptrs and ras.cache_bytes() == nbytes > 0
        for slot in ("cond", "uncond"):
            with ras.cache_context(slot):
                ras.set_active(GOOD)  # an active set before the first forward of an image: it runs dense
                assert same(ras(**kw_sd3(2, 8, 8, seed=2))[0], sd3(**kw_sd3(2, 8, 8, seed=2))[0])
                assert ras.last_forward_dense
                out = ras(**kw_sd3(2, 8, 8, seed=3))[0]
                assert not ras.last_forward_dense
        assert [r().data_ptr() for r in cache_refs(ras)] == ptrs
        fresh = rasfx.transform(sd3)
        fresh(**kw_sd3(2, 8, 8, seed=2))
        fresh.set_active(GOOD)
        assert same(out, fresh(**kw_sd3(2, 8, 8, seed=3))[0])


def test_release_frees_every_cache(ras):
    with torch.no_grad():
        for slot in ("cond", "uncond"):
            with ras.cache_context(slot):
                ras(**kw_sd3(2, 8, 8))
                ras.set_active(GOOD)
                ras(**kw_sd3(2, 8, 8, seed=1))
        refs = cache_refs(ras)
        expected = sum(r().numel() * r().element_size() for r in refs)
        assert ras.cache_bytes() == expected > 0
        captures = ras.captures()
        ras.release()
    assert ras.cache_bytes() == 0 and ras._slots == {} and ras.captures() == captures
    assert all(r() is None for r in refs), "a cache tensor outlived release() (freed at once, no gc needed)"
    with torch.no_grad():
        ras(**kw_sd3(2, 8, 8))
    assert ras.last_forward_dense and ras.captures() == captures  # nothing captured again


def test_thousand_ras_steps_do_not_grow_memory():
    """1,000 eager steps alternating dense and sparse sets of a few sizes (shared and per row, two
    slots): caches, captures, graph variants, compiled/recorded graphs and live tensors stay bounded."""
    torch.manual_seed(4)
    model = TinyDiT("rope").eval()
    ras = rasfx.transform(model)
    n, b = 16, 2
    x = torch.randn(b, n, 4)
    g = torch.Generator().manual_seed(0)
    sets = [None, torch.randperm(n, generator=g)[:2], torch.randperm(n, generator=g)[:8],
            torch.stack([torch.randperm(n, generator=g)[:5] for _ in range(b)]), torch.arange(n)]

    def cycle():
        for slot in ("cond", "uncond"):
            with ras.cache_context(slot):
                for idx in sets:
                    ras.set_active(idx)
                    out = ras(hidden_states=x)
                    assert ras.last_forward_dense == (idx is None)
        return out

    with torch.no_grad():
        cycle()  # warm: every variant built, every slot allocated
        state = lambda: (len(ras.captures()), ras.cache_bytes(), len(ras._slots), len(ras.runner._graphs),
                         len(ras.runner._compiled), len(ras.captures()[0].variants), len(ras._resolvers))
        before, tensors, rss = state(), live_tensors(), rss_bytes()
        for _ in range(100):  # 100 cycles x 2 slots x 5 sets = 1,000 steps
            out = cycle()
        assert torch.isfinite(out).all()
        assert rel(out, model(hidden_states=x)) <= 1e-6  # the last step is all-active: still the model's
        assert state() == before
        assert live_tensors() <= tensors + 2  # no per-step tensor is kept alive
        if rss:
            assert rss_bytes() - rss < 64 * 2**20
    assert ras._slots["cond"].forwards == 505


@pytest.mark.gpu
def test_release_returns_gpu_memory():
    """torch.cuda.memory_allocated after release() is back at its level before the caches existed.
    One warm round first: the capture, every graph variant and cuBLAS workspaces stay allocated."""
    model = make_sd3_tiny(0).cuda()
    ras = rasfx.transform(model, rasfx.TransformConfig(mode="eager"))
    kw = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kw_sd3(2, 16, 16).items()}

    def sparse_round():
        ras(**kw)
        for idx in (torch.arange(10, device="cuda"), torch.stack([torch.arange(6, device="cuda")] * 2)):
            ras.set_active(idx)
            ras(**kw)

    with torch.no_grad():
        model(**kw)
        sparse_round()
        ras.release()
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        sparse_round()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() - base >= ras.cache_bytes() > 0
        ras.reset()  # a new image keeps the memory
        assert torch.cuda.memory_allocated() - base >= ras.cache_bytes() > 0
        ras.release()
        torch.cuda.synchronize()
    assert ras.cache_bytes() == 0 and torch.cuda.memory_allocated() == base
