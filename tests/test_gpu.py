"""GPU checks of the runtime modes (skipped without CUDA): CUDA-graph replay and
torch.compile give the eager results, step after step, at several active counts."""

import pytest
import torch

import rasfx
from rasfx.runtime import GraphRunner
from reference_ras import make_sd3_tiny, sd3_inputs

pytestmark = pytest.mark.gpu


def _steps(ras, kws, idxs):
    outs = []
    for kw, idx in zip(kws, idxs):
        ras.set_active(idx)
        outs.append(ras(**kw)[0].float())
    return outs


@pytest.mark.parametrize("mode", ["cuda_graph", "compile", "compile+cuda_graph"])
def test_modes_match_eager_on_gpu(mode):
    dev = torch.device("cuda")
    model = make_sd3_tiny(0).to(dev)
    kws = [{k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in dict(sd3_inputs(2, 16, 24, seed=s), return_dict=False).items()}
           for s in range(6)]
    g = torch.Generator().manual_seed(0)
    idxs = [None, torch.randperm(96, generator=g)[:32].to(dev), torch.randperm(96, generator=g)[:32].to(dev), None,
            torch.randperm(96, generator=g)[:64].to(dev), torch.randperm(96, generator=g)[:32].to(dev)]
    with torch.no_grad():
        want = _steps(rasfx.transform(model), kws, idxs)
        ras = rasfx.transform(model, rasfx.TransformConfig(mode=mode))
        got = _steps(ras, kws, idxs)
    for w, o in zip(want, got):
        assert ((w - o).norm() / w.norm()).item() < 1e-4
    if "cuda_graph" in mode:
        assert ras.runner.stats["captures"] == 3  # dense, n=32, n=64: replayed afterwards
        assert ras.runner.stats["replays"] == 6


def test_no_host_sync_in_ras_step():
    dev = torch.device("cuda")
    model = make_sd3_tiny(0).to(dev)
    kw = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in dict(sd3_inputs(2, 16, 24, seed=0), return_dict=False).items()}
    ras = rasfx.transform(model)
    with torch.no_grad():
        ras(**kw)
        ras.set_active(torch.arange(32, device=dev), check=False)
        ras(**kw)  # builds the variant
        torch.cuda.set_sync_debug_mode("error")
        try:
            ras(**kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
