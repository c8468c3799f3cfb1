"""Helpers of the state tests (test_module, test_active_index, test_caches, test_pipeline_runs):
comparisons, the tiny SD3's inputs and active sets, tiny SD3 pipelines shared within a test
module, thread runs and memory probes.

Cost: a capture (torch.export at two resolutions) takes 1-3 s per new input signature, so the
transformed modules (conftest.py's ``sd3`` / ``ras`` / ``ras_other``) and pipelines are built once
per test module and reused; every test that reuses one starts with ``reset()`` (or a fresh
pipeline run) so that no state leaks between tests.
"""

from __future__ import annotations

import gc
import os
import threading
import warnings
import weakref

import numpy as np
import torch
from reference_ras import sd3_inputs

import rasfx
import rasfx.pipeline as rp



def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def same(a, b) -> bool:
    """Equal up to float32 rounding. Bit-equality is not asked for: on CPU the BLAS / oneDNN
    kernels may round differently for differently aligned buffers, so two identical runs in one
    process can differ in the last bit. Any state leak or lost update is orders of magnitude larger."""
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and float(np.abs(a.astype(np.float64) - b).max()) <= 1e-5
    return a.shape == b.shape and rel(a, b) <= 1e-6


def kw_sd3(B=2, H=8, W=8, seed=0, **extra):
    return dict(sd3_inputs(B, H, W, seed=seed), return_dict=False, **extra)


N_TOK = 16  # kw_sd3(2, 8, 8): a 4 x 4 token grid, batch 2


GOOD = torch.tensor([1, 6, 11, 12])


def warm(ras, kw):
    ras.reset()
    ras(**kw)
    ras.set_active(GOOD)
    ras(**kw)
    assert not ras.last_forward_dense


def cache_refs(ras):
    refs = [weakref.ref(c) for s in ras._slots.values() for b in s.buffers.values() for c in b.caches]
    assert refs, "expected live caches"
    return refs


def run_threads(jobs):
    """Run the callables in threads started together; returns their results, re-raises errors."""
    results, errors = [None] * len(jobs), []
    barrier = threading.Barrier(len(jobs))

    def work(i, job):
        try:
            barrier.wait(timeout=60)
            results[i] = job()
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    if errors:
        raise errors[0]
    return results


def build_sd3_pipe(seed=0):
    """The tiny SD3 pipeline of tests/test_pipeline.py (CFG batched: batch 2, 64 image tokens),
    with inputs drawn from their own generator."""
    from test_pipeline import build_sd3

    pipe, _ = build_sd3(seed)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(100 + seed)
    kw = dict(
        prompt_embeds=torch.randn(1, 5, 16, generator=g), negative_prompt_embeds=torch.randn(1, 5, 16, generator=g),
        pooled_prompt_embeds=torch.randn(1, 8, generator=g),
        negative_pooled_prompt_embeds=torch.randn(1, 8, generator=g), height=32, width=32, guidance_scale=3.0,
    )
    return pipe, kw


STEPS = 5


CFG = rasfx.RASConfig(ratio=0.25, warmup=1, reset_steps=())


_PIPES: dict = {}


_TRANSFORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached_transform(model):
    """rasfx.transform, one RASModule per model, so a pipeline is captured once per test module."""
    if model not in _TRANSFORMS:
        _TRANSFORMS[model] = rasfx.transform(model)
    return _TRANSFORMS[model]


def pipe_of(name):
    """Shared pipelines: "p0" and its twin "p0b" (same seed, separately built) and "p1" (other weights)."""
    if name not in _PIPES:
        _PIPES[name] = build_sd3_pipe({"p0": 0, "p0b": 0, "p1": 1}[name])
    return _PIPES[name]


def generate(pipe, kw, seed=0, steps=STEPS, **extra):
    out = pipe(**kw, **extra, num_inference_steps=steps, output_type="np",
               generator=torch.Generator().manual_seed(seed))
    return np.asarray(out.images)


def ras_of(pipe):
    return rp._STATES[pipe].hooks[0].ras


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on some torch objects warns about deprecations
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def real_tensor_level() -> tuple[int, int]:
    """(count, bytes of distinct storages) of the live CPU tensors, FakeTensors excluded (torch.export
    keeps the fake tensors of its last trace in a global; that is torch's, bounded, and not rasfx's)."""
    gc.collect()
    count, storages = 0, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for o in gc.get_objects():
            if isinstance(o, torch.Tensor) and type(o).__name__ != "FakeTensor" and o.device.type == "cpu":
                count += 1
                st_ = o.untyped_storage()
                storages[st_.data_ptr()] = st_.nbytes()
    return count, sum(storages.values())


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0
