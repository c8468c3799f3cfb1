"""Modules run as one token-wise op (``rasfx/tokenwise_modules.py``,
``TransformConfig(tokenwise_modules=...)``): a host-routed MoE feed-forward named in the config or
chosen after the failed export, checked on real inputs, refused when it mixes tokens; HiDream's MoE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rasfx

from test_constructs import C, P, TOL, _assert_per_row_sets_exact, _check_contract, _rel, _tiny_dit_layers


class HostRoutedMoE(torch.nn.Module):
    """An MoE feed-forward as research code writes it: top-1 routing, the tokens per expert
    counted on the host (``bincount().cpu().tolist()``), each expert run on its tokens."""

    def __init__(self, experts: int = 3):
        super().__init__()
        self.gate = torch.nn.Linear(C, experts)
        self.experts = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(C, 2 * C), torch.nn.GELU(), torch.nn.Linear(2 * C, C))
            for _ in range(experts))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weight, expert = self.gate(flat).softmax(-1).max(-1)
        order = expert.argsort()
        out = torch.zeros_like(flat)
        start = 0
        for e, count in enumerate(expert.bincount(minlength=len(self.experts)).cpu().tolist()):
            rows = order[start:start + count]
            start += count
            if count:
                out[rows] = self.experts[e](flat[rows]) * weight[rows, None]
        return out.view(x.shape)


class HostScaledNorm(torch.nn.Module):
    """Not token-wise: halves all tokens when their mean magnitude, read on the host, is large."""

    def forward(self, x):
        return x / 2 if x.abs().mean() > 0.5 else x


class MoEDiT(torch.nn.Module):
    """A DiT whose feed-forward is ``ff`` (``HostRoutedMoE``: captured as one token-wise op)."""

    def __init__(self, ff=HostRoutedMoE):
        super().__init__()
        _tiny_dit_layers(self)
        self.ffs = torch.nn.ModuleList(ff() for _ in self.blocks)

    def forward(self, hidden_states, timestep):
        b, _, h, w = hidden_states.shape
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        scale, shift = self.t_embed(timestep.view(b, 1, 1)).chunk(2, dim=-1)
        for blk, ff in zip(self.blocks, self.ffs):
            x = x + blk.attention(x * (1 + scale) + shift)
            x = x + ff(F.layer_norm(x, (C,)))
        x = self.head(x).view(b, h // P, w // P, P, P, 4)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 4, h, w)


def image_inputs(seed: int) -> dict:
    """An 8x12 latent (24 tokens of 2x2) and a timestep, batch 2."""
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, 4, 8, 12, generator=g), "timestep": torch.rand(2, generator=g)}


def test_a_host_routed_moe_named_in_the_config_runs_on_the_active_tokens():
    model = MoEDiT().eval()
    config = rasfx.TransformConfig(tokenwise_modules=(HostRoutedMoE,))
    ras = _check_contract(model, image_inputs, config)  # no warning: the choice is the user's
    _assert_per_row_sets_exact(ras, model, image_inputs(2))
    report = rasfx.explain(ras)
    assert not report.conservative()
    assert [m["module"] for m in report.tokenwise_modules()] == ["ffs.0", "ffs.1"]
    by_path = rasfx.TransformConfig(tokenwise_modules=("ffs.0", "HostRoutedMoE"))
    with torch.no_grad():
        assert _rel(rasfx.transform(model, by_path)(**image_inputs(3)), model(**image_inputs(3))) <= TOL


def test_a_host_routed_moe_is_chosen_after_the_failed_export(monkeypatch):
    model = MoEDiT().eval()
    ras = rasfx.transform(model)
    kw = image_inputs(0)
    with torch.no_grad():
        want = model(**kw)
        with pytest.warns(rasfx.RASWarning, match=r"2 x HostRoutedMoE \(torch.export failed in it: .*tolist"):
            assert _rel(ras(**kw), want) <= TOL
        rows = []  # the rows each call of the module gets (its eager forward, called by the op)
        forward = HostRoutedMoE.forward
        monkeypatch.setattr(HostRoutedMoE, "forward", lambda self, x: rows.append(tuple(x.shape)) or forward(self, x))
        ras.set_active(torch.arange(0, 24, 3))
        assert _rel(ras(**kw), want) <= TOL
        assert rows == [(2, 8, C), (2, 8, C)]  # the 8 active tokens of each row only
    _assert_per_row_sets_exact(ras, model, image_inputs(1))
    cc = ras.captures()[0]
    assert [c.path for c in cc.tokenwise] == ["ffs.0", "ffs.1"]
    assert cc.variant("shared").host_sync == ("ffs.0 (HostRoutedMoE)", "ffs.1 (HostRoutedMoE)")


def test_a_module_that_mixes_tokens_is_refused():
    kw = image_inputs(0)
    with pytest.raises(rasfx.CaptureError) as e:  # chosen automatically: checked, the export's error stands
        rasfx.transform(MoEDiT(HostScaledNorm).eval())(**kw)
    assert "mixes tokens" in "\n".join(getattr(e.value, "__notes__", []))
    named = rasfx.TransformConfig(tokenwise_modules=(HostScaledNorm,))
    with pytest.raises(rasfx.UnsupportedModelError, match="ffs.0 .HostScaledNorm. cannot run as one token-wise op"):
        rasfx.transform(MoEDiT(HostScaledNorm).eval(), named)(**kw)
    with pytest.raises(rasfx.UnsupportedModelError, match="match no submodule"):
        rasfx.transform(MoEDiT().eval(), rasfx.TransformConfig(tokenwise_modules=("ffs.7",)))(**kw)


class SpareMoEDiT(MoEDiT):
    """``MoEDiT`` with one more ``HostRoutedMoE`` that its forward never calls."""

    def __init__(self):
        super().__init__()
        self.spare = HostRoutedMoE()


def test_a_class_with_a_module_the_forward_never_calls_is_not_chosen():
    """The eager check cannot see the spare module, so its class is not chosen automatically
    (the export's error stands, with a note); the fake of a module that was never probed says so."""
    with pytest.raises(rasfx.CaptureError) as e:
        rasfx.transform(SpareMoEDiT().eval())(**image_inputs(0))
    assert "spare (HostRoutedMoE)" in "\n".join(getattr(e.value, "__notes__", []))
    assert "never calls it" in "\n".join(getattr(e.value, "__notes__", []))
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rasfx import tokenwise_modules as tm

    spare = HostRoutedMoE()
    key = tm._key_of(spare)
    with FakeTensorMode(), pytest.raises(rasfx.UnsupportedModelError, match="HostRoutedMoE .* never called it"):
        torch.ops.rasfx.tokenwise_module(torch.empty(2, 3, C), key)


def test_a_tokenwise_output_spec_goes_with_its_module():
    import gc

    from rasfx import tokenwise_modules as tm

    model = MoEDiT().eval()
    rasfx.transform(model, rasfx.TransformConfig(tokenwise_modules=(HostRoutedMoE,)))(**image_inputs(0))
    keys = [tm._key_of(ff) for ff in model.ffs]
    assert all(k in tm._OUT_SPECS for k in keys)
    del model
    gc.collect()
    assert not any(k in tm._OUT_SPECS for k in keys)


@pytest.mark.parametrize("value", ["HostRoutedMoE", (int,), ("",), HostRoutedMoE])
def test_tokenwise_modules_is_validated(value):
    with pytest.raises(rasfx.ConfigError, match="tokenwise_modules must be a tuple"):
        rasfx.TransformConfig(tokenwise_modules=value)


def test_cuda_graph_modes_do_not_capture_a_tokenwise_module():
    from rasfx.runtime import GraphRunner

    ras = rasfx.transform(MoEDiT().eval(), rasfx.TransformConfig(tokenwise_modules=(HostRoutedMoE,)))
    ras(**image_inputs(0))
    variant = ras.captures()[0].variant("shared")
    assert "may synchronise with the host" in GraphRunner("auto").host_sync_fallback(variant)
    for mode in ("cuda_graph", "compile+cuda_graph"):
        with pytest.raises(rasfx.UnsupportedModelError, match="use mode='auto'"):
            GraphRunner(mode).host_sync_fallback(variant)


def test_compile_mode_calls_the_tokenwise_module_without_a_graph_break(monkeypatch):
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="aot_eager", fullgraph=True, **kw))
    torch._dynamo.reset()
    model = MoEDiT().eval()
    ras = rasfx.transform(model, rasfx.TransformConfig(mode="compile", tokenwise_modules=(HostRoutedMoE,)))
    kw = image_inputs(0)
    with torch.no_grad():
        want = model(**kw)
        assert _rel(ras(**kw), want) <= TOL
        ras.set_active(torch.arange(0, 24, 2))
        assert _rel(ras(**kw), want) <= TOL
    assert ras.work_counts()["compiles"] >= 2


@pytest.mark.filterwarnings("ignore:.*MOEFeedForwardSwiGLU")
def test_hidream_moe_runs_on_the_active_tokens():
    """diffusers' HiDream (its MoE routes with ``bincount().cpu().numpy()``) at a square size."""
    from rasfx.presets import get_preset

    p = get_preset("hidream-tiny")
    model = p.build(0)
    ras = rasfx.transform(model)
    kw, nxt = p.inputs(2, 8, 8, seed=0), p.inputs(2, 8, 8, seed=1)
    nxt = dict(kw, hidden_states=nxt["hidden_states"], timesteps=nxt["timesteps"])
    with torch.no_grad():
        want, want_nxt = model(**kw)[0], model(**nxt)[0]
        assert _rel(ras(**kw)[0], want) <= TOL
        n = ras.num_image_tokens
        ras.set_active(torch.stack([torch.randperm(n)[: n // 3], torch.randperm(n)[: n // 3]]))
        assert _rel(ras(**kw)[0], want) <= TOL
        active = torch.arange(0, n, 4)
        ras.set_active(active)
        got = ras(**nxt)[0]
    assert {c.cls for c in ras.captures()[0].tokenwise} == {"MOEFeedForwardSwiGLU"}
    tokens = ras.token_map()
    kept = (tokens >= 0) & ~torch.isin(tokens, active)
    assert _rel(got[kept], want[kept]) <= TOL  # inactive tokens: the cached outputs
    assert _rel(got[~kept], want_nxt[~kept]) > 1e-3
