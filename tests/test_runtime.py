"""The runtime's compiled path (rasfx/runtime.py, ``TransformConfig(mode="compile")``): the
compiled and eager graphs agree step after step, each shape is compiled and announced once.

Every test here can fail: each one compares against the original model, a hand-written RAS
reference (``tests/reference_ras.py``, ``tests/tiny_dit.py``) or a separate run, or checks a
typed error and its message (docs/reliability.md).
"""

from __future__ import annotations

import os

import pytest
import torch
from state_helpers import kw_sd3, rel
from tiny_dit import TinyDiT, TinyOracle

import rasfx

# Tiny models: one intra-op thread is much faster than two on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def aot_eager_compile(monkeypatch):
    """The runtime's compile path (TransformConfig(mode="compile")) with dynamo's ``aot_eager``
    backend instead of inductor: the same tracing and functionalisation of the cache writes, without
    C++ code generation (inductor takes > 60 s per shape on this CPU)."""
    real = torch.compile
    graphs = []  # one entry per graph dynamo hands to the backend: proves that compilation happened

    def backend(gm, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    def compile_(fn, **kwargs):
        assert "backend" not in kwargs
        return real(fn, backend=backend, **kwargs)

    assert not torch.compiler.is_exporting(), "torch.compile would be a no-op (leaked export state)"
    monkeypatch.setattr(torch, "compile", compile_)
    torch._dynamo.reset()
    yield graphs
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", ["rope", "plain"])
def test_compiled_and_eager_paths_agree_over_steps(variant, aot_eager_compile, caplog):
    torch.manual_seed(6)
    model = TinyDiT(variant).eval()
    compiled = rasfx.transform(model, rasfx.TransformConfig(mode="compile"))
    eager = rasfx.transform(model)
    oracle = TinyOracle(model)
    n, b = 12, 2
    g = torch.Generator().manual_seed(1)
    # sizes repeat, so compiled functions are reused as well as built
    schedule = [None, torch.arange(3), torch.randperm(n, generator=g)[:3],
                torch.stack([torch.randperm(n, generator=g)[:5] for _ in range(b)]), None,
                torch.randperm(n, generator=g)[:3], torch.arange(n)]
    with torch.no_grad(), caplog.at_level("INFO", logger="rasfx"):
        for step, idx in enumerate(schedule):
            x = torch.randn(b, n, 4, generator=g)
            compiled.set_active(idx)
            eager.set_active(idx)
            got, want = compiled(hidden_states=x), eager(hidden_states=x)
            assert compiled.last_forward_dense == eager.last_forward_dense == (idx is None)
            assert torch.isfinite(got).all()
            assert rel(got, want) <= 1e-5, f"step {step}"
            assert rel(got, oracle(x, idx)) <= 1e-5, f"step {step}"
    assert compiled.runner.stats["compiles"] == 3  # dense, shared, rowwise: one compiled function each
    # each new shape is announced once (compilation takes long on real models), repeats are not
    assert compiled.runner.stats["compiled_shapes"] == 4  # dense, shared [3], rowwise [2, 5], shared [12]
    announced = [r.getMessage() for r in caplog.records if "compiling the" in r.getMessage()]
    assert len(announced) == 4 and "shared graph for active index [3]" in announced[1]
    assert sum("compiled in" in r.getMessage() for r in caplog.records) == 4
    assert len(aot_eager_compile) >= 4  # and dynamo traced them (3 variants, one more shape of "shared")
    assert eager.runner.stats["compiles"] == 0


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RASFX_SLOW_TESTS"), reason="inductor on CPU: minutes; set RASFX_SLOW_TESTS=1")
def test_inductor_compile_mode_matches_eager(sd3):
    ras = rasfx.transform(sd3, rasfx.TransformConfig(mode="compile"))
    eager = rasfx.transform(sd3)
    with torch.no_grad():
        for idx in (None, torch.arange(4)):
            kw = kw_sd3(2, 8, 8)
            ras.set_active(idx)
            eager.set_active(idx)
            assert rel(ras(**kw)[0], eager(**kw)[0]) <= 1e-5
