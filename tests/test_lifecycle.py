"""The lifetime of what rasfx builds, across pipeline calls (docs/speed.md, "From the second image on").

A user's unit of work is the pipeline call. Exports, graph variants, caches, CUDA graphs and
compiled functions are built on the first image of an input signature and reused by every
later one; reusing them changes no result; ``rasfx.release`` and ``rasfx.disable`` free them.
The CUDA-graph counts themselves are checked on a GPU (tests/test_gpu.py).
"""

from __future__ import annotations

import gc
import logging
import weakref

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import rasfx  # noqa: E402
import rasfx.pipeline as rp  # noqa: E402
from rasfx.runtime import GraphRunner  # noqa: E402
from test_pipeline import build_flux, build_sd3  # noqa: E402

CFG = rasfx.RASConfig(ratio=0.25, warmup=1, reset_steps=())


def generate(pipe, kw, seed=0, steps=5, **extra):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**kw, **extra, num_inference_steps=steps, output_type="np",
               generator=torch.Generator().manual_seed(seed))
    return np.asarray(out.images)


@pytest.mark.parametrize("build", [build_sd3, build_flux], ids=["sd3", "flux"])
def test_three_calls_build_once_and_reuse_changes_no_result(build, caplog):
    pipe, kw = build(0)
    rasfx.enable(pipe, CFG)
    exports, images = [], []
    with caplog.at_level(logging.INFO, logger="rasfx"):
        for seed in (0, 1, 2):
            images.append(generate(pipe, kw, seed=seed))
            s = rasfx.stats(pipe)
            exports.append(s.exports)
            assert s.ras_steps == [1, 2, 3, 4] and s.mode == "eager"  # the default mode, on CPU tensors
            assert s.graph_captures == 0 and s.compiles == 0
            assert 0 < s.transformer_time_s < s.run_time_s
    assert exports == [1, 0, 0]
    assert sum("this image built 1 exports" in r.getMessage() for r in caplog.records) == 1
    fresh, _ = build(0)
    with rasfx.enabled(fresh, CFG):
        assert np.array_equal(generate(fresh, kw, seed=2), images[2])
    with rasfx.enabled(fresh, CFG.replace(ratio=1.0)):
        plain_like = generate(fresh, kw, seed=2)
    rasfx.disable(pipe)
    with rasfx.enabled(pipe, CFG.replace(ratio=1.0)):
        for _ in range(2):
            assert np.array_equal(generate(pipe, kw, seed=2), plain_like)
    assert np.array_equal(generate(pipe, kw, seed=2), plain_like)  # ratio 1.0 is the plain pipeline


def test_resolution_a_b_a_captures_the_second_a_nothing():
    pipe, kw = build_sd3(0)
    rasfx.enable(pipe, CFG)
    exports = []
    for h in (32, 48, 32, 48):
        generate(pipe, {**kw, "height": h, "width": h})
        exports.append(rasfx.stats(pipe).exports)
    assert exports == [1, 1, 0, 0]


def test_release_and_disable_free_what_rasfx_built():
    pipe, kw = build_sd3(0)
    rasfx.enable(pipe, CFG)
    generate(pipe, kw)
    ras = rp._STATES[pipe].hooks[0].ras
    caches = [weakref.ref(c) for s in ras._slots.values() for b in s.buffers.values() for c in b.caches]
    assert caches and ras.cache_bytes() > 0
    rasfx.release(pipe)
    assert all(r() is None for r in caches) and ras.cache_bytes() == 0
    assert rasfx.is_enabled(pipe) and len(ras.captures()) == 1  # the exports stay
    generate(pipe, kw)
    assert rasfx.stats(pipe).exports == 0  # nothing exported again; caches allocated again
    graphs = [weakref.ref(ras)] + [weakref.ref(v.gm) for cc in ras.captures() for v in cc.variants.values()]
    del ras
    rasfx.disable(pipe)
    gc.collect()
    assert len(graphs) > 2 and all(r() is None for r in graphs)


def test_release_needs_an_enabled_pipeline():
    pipe, _ = build_sd3(0)
    with pytest.raises(rasfx.UsageError, match="rasfx.enable"):
        rasfx.release(pipe)


def test_default_mode_is_cuda_graphs_for_cuda_tensors_only(monkeypatch):
    assert rasfx.TransformConfig().mode == "auto"
    runner = GraphRunner("auto")
    assert runner.resolved_mode(torch.device("cuda")) == "cuda_graph"
    assert runner.resolved_mode(torch.device("cpu")) == "eager"
    assert GraphRunner("compile+cuda_graph").resolved_mode(torch.device("cpu")) == "compile"
    assert GraphRunner("cuda_graph").resolved_mode(torch.device("cpu")) == "eager"

    def no_capture(*a, **k):
        raise AssertionError("a CUDA graph was captured for CPU tensors")

    monkeypatch.setattr(GraphRunner, "_capture", no_capture)
    pipe, kw = build_sd3(0)
    with rasfx.enabled(pipe, CFG):
        generate(pipe, kw)
        assert rasfx.stats(pipe).mode == "eager"


def test_failed_graph_capture_in_auto_mode_runs_eagerly(monkeypatch):
    """The default mode must never make a model fail that runs eagerly: a CUDA-graph capture that
    raises is reported once and the key runs eagerly (a fake CUDA path on CPU tensors)."""
    runner = GraphRunner("auto")
    calls = []

    def fn(*args):
        calls.append(args)
        return [args[0] + 1]

    class Variant:
        name, gm = "dense", staticmethod(fn)

    class FakeCuda(torch.Tensor):
        is_cuda = True

    def broken_capture(self, fn, args, dynamic):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(GraphRunner, "_capture", broken_capture)
    x = torch.zeros(2).as_subclass(FakeCuda)
    with pytest.warns(rasfx.RASWarning, match="capture of the dense graph failed"):
        out = runner.run(Variant, [x], [0], ("default", "dense", "sig", None))
    assert float(out[0].sum()) == 2.0
    runner.run(Variant, [x], [0], ("default", "dense", "sig", None))  # no second warning, no capture
    assert len(calls) == 2
    # what ran is recorded (rasfx.stats reported cuda_graph here): eager, and why
    assert runner.ran == {("dense", "eager"): 2} and "not permitted" in runner.fallbacks["dense"]
    with pytest.raises(RuntimeError, match="not permitted"):  # an explicit mode raises
        GraphRunner("cuda_graph").run(Variant, [x], [0], ("default", "dense", "sig", None))


@pytest.fixture
def aot_eager_compile(monkeypatch):
    """TransformConfig(mode="compile") through dynamo with the ``aot_eager`` backend (inductor's
    C++ code generation takes over a minute per shape on this CPU)."""
    real = torch.compile

    def compile_(fn, **kwargs):
        return real(fn, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_functions_survive_pipeline_calls(aot_eager_compile):
    """The compiled mode compiles on the first image only (it compiled on every image before:
    0.10x of the dense pipeline on an H100), and its images equal the eager mode's."""
    pipe, kw = build_sd3(0)
    compiles, images = [], []
    with rasfx.enabled(pipe, CFG, transform_config=rasfx.TransformConfig(mode="compile")):
        for seed in (0, 1, 2):
            images.append(generate(pipe, kw, seed=seed))
            compiles.append(rasfx.stats(pipe).compiles)
            assert rasfx.stats(pipe).mode == "compile"
    assert compiles[0] >= 2 and compiles[1:] == [0, 0]
    with rasfx.enabled(pipe, CFG, transform_config=rasfx.TransformConfig(mode="eager")):
        assert np.abs(generate(pipe, kw, seed=2) - images[2]).max() <= 1e-5
