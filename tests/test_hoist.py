"""hoist_invariants: what a graph computes from the weights and the prompt tensors alone runs
once per prompt, not once per step; the results never differ from computing it every step."""

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

import rasfx
from rasfx import passes
from rasfx.capture import bind_inputs
from rasfx.planned_capture import copy_graph_module
from rasfx.presets import get_preset

aten = torch.ops.aten


def _pair(name, **config):
    p = get_preset(name)
    model = p.build(seed=0)
    on = rasfx.transform(model, rasfx.TransformConfig(**config))
    off = rasfx.transform(model, rasfx.TransformConfig(hoist_invariants=False, **config))
    return p, model, on, off


def _steps(ras, kws, index):
    """A dense step, then RAS steps on later inputs: the outputs."""
    outs = []
    with torch.no_grad():
        for i, kw in enumerate(kws):
            ras.set_active(None if i == 0 else index)
            outs.append(ras(**kw)[0])
    return outs


def _step_kws(p, n=3, batch=2):
    base = p.inputs(batch, seed=0)
    kws = []
    for s in range(n):
        fresh = p.inputs(batch, seed=s + 1)
        kws.append(dict(base, hidden_states=fresh["hidden_states"], timestep=fresh["timestep"]))
    return kws


@pytest.mark.parametrize("name", ["pixart-tiny", "flux-tiny", "sd3-tiny", "wan-tiny"])
def test_hoisted_graphs_compute_exactly_what_the_plain_ones_do(name):
    p, model, on, off = _pair(name)
    kws = _step_kws(p)
    with torch.no_grad():
        on(**kws[0])
    index = torch.arange(0, on.num_image_tokens, 3)
    got, want = _steps(on, kws, index), _steps(off, kws, index)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    variant = on.captures()[0].variant("shared")
    assert variant.counters["hoisted_values"] > 0 and variant.counters["hoisted_nodes"] > 0
    assert off.captures()[0].variant("shared").hoisted is None


def test_cross_attention_text_projections_leave_the_step_graph():
    """PixArt: every block's cross-attention K/V projection of the text runs in the prologue."""
    p, model, on, _ = _pair("pixart-tiny")
    with torch.no_grad():
        on(**p.inputs(2, seed=0))
    cc = on.captures()[0]
    blocks = len(model.transformer_blocks)
    for name in ("dense", "shared"):
        variant = cc.variant(name)
        # export names parameters p_model_transformer_blocks_<i>_attn2_to_k_weight, ...
        def reads(gm, what):
            return {n.args[1].name for n in gm.graph.nodes if n.target is aten.linear.default and what in n.args[1].name}

        assert len(reads(variant.hoisted.prologue, "attn2_to_k")) == blocks
        assert len(reads(variant.hoisted.prologue, "attn2_to_v")) == blocks
        assert not reads(variant.gm, "attn2_to_k") and not reads(variant.gm, "attn2_to_v")
        assert reads(variant.gm, "attn2_to_q")  # the queries come from the image tokens: per step
    # the dense and RAS variants hoist the same computation: one prologue run serves both
    assert cc.variant("dense").hoisted.prologue.code == cc.variant("shared").hoisted.prologue.code


def test_prologue_runs_once_per_prompt_and_again_when_the_prompt_changes(monkeypatch):
    p, model, on, _ = _pair("pixart-tiny")
    kws = _step_kws(p, n=4)
    with torch.no_grad():
        on(**kws[0])
    prologue = on.captures()[0].variant("dense").hoisted.prologue
    runs = []
    original = type(prologue).__call__

    def counted(self, *args, **kwargs):
        runs.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(prologue), "__call__", counted)
    index = torch.arange(0, on.num_image_tokens, 2)
    _steps(on, kws, index)
    assert len(runs) == 0  # the first forward computed them; steps with the same prompt reuse them

    # a new prompt (another tensor): recomputed once, then reused; results as without hoisting
    new_prompt = p.inputs(2, seed=7)["encoder_hidden_states"]
    kws2 = [dict(kw, encoder_hidden_states=new_prompt) for kw in kws]
    got = _steps(on, kws2, index)
    assert len(runs) == 1
    ref = rasfx.transform(model, rasfx.TransformConfig(hoist_invariants=False))
    for g, w in zip(got, _steps(ref, kws2, index)):
        assert torch.equal(g, w)

    # the same tensor changed in place: its version moves, the values are recomputed
    with torch.no_grad():
        new_prompt.mul_(-0.5)
        on.set_active(None)
        out = on(**kws2[0])[0]
        want = model(**kws2[0])[0]
    assert len(runs) == 2
    assert torch.allclose(out, want, rtol=1e-5, atol=1e-6)


def test_a_prompt_that_changes_at_every_step_is_named_in_a_warning():
    """A per-step input missing from varying_inputs costs a recompute per forward: after a few
    consecutive ones the runtime says which input and what to do, once; results stay exact."""
    import warnings

    p, model, on, _ = _pair("pixart-tiny")
    kws = [p.inputs(2, seed=s) for s in range(6)]  # a new prompt tensor on every forward
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            outs = [on(**kw)[0] for kw in kws]
            want = [model(**kw)[0] for kw in kws]
    said = [w for w in caught if issubclass(w.category, rasfx.RASWarning) and "varying_inputs" in str(w.message)]
    assert len(said) == 1 and "encoder_hidden_states" in str(said[0].message)
    assert "encoder_attention_mask" in str(said[0].message)
    for o, w in zip(outs, want):
        assert torch.allclose(o, w, rtol=1e-5, atol=1e-6)


def test_inference_tensors_are_recomputed_every_call():
    """Inference-mode tensors have no version counter: an in-place change could not be seen,
    so their prologue runs on every forward (never stale)."""
    p, model, on, _ = _pair("pixart-tiny")
    with torch.inference_mode():
        kw = p.inputs(2, seed=0)
        on(**kw)
        kw["encoder_hidden_states"].mul_(3.0)
        out = on(**kw)[0]
        want = model(**kw)[0]
    assert torch.allclose(out, want, rtol=1e-5, atol=1e-6)


def test_hoisted_values_are_fresh_tensors_and_their_memory_is_reported():
    """The runtime refreshes hoisted values in place: none may share memory with an input
    (a write would reach the user's prompt tensor or a weight)."""
    for name in ("pixart-tiny", "flux-tiny", "lumina-next-tiny"):
        p, model, on, off = _pair(name)
        kw = p.inputs(2, seed=0)
        with torch.no_grad():
            on(**kw)
            off(**kw)
        cc = on.captures()[0]
        hoisted = cc.variant("dense").hoisted
        flat = on._resolver(cc)(pytree.tree_leaves(bind_inputs(model, (), kw)))
        inputs = [flat[i] for i in hoisted.inputs if isinstance(flat[i], torch.Tensor)]
        ptrs = {t.untyped_storage().data_ptr() for t in inputs}
        values = hoisted.prologue(*[flat[i] for i in hoisted.inputs])
        assert values and all(v.untyped_storage().data_ptr() not in ptrs for v in values)
        held = sum(v.numel() * v.element_size() for v in values)
        assert on.hoisted_bytes() == held > 0 and off.hoisted_bytes() == 0
        assert on.cache_bytes() == off.cache_bytes()


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.txt = torch.nn.Linear(8, 8)
        self.w = torch.nn.Parameter(torch.randn(8, 8))

    def forward(self, x, text, timestep):
        t = self.txt(text)  # prompt only: hoisted
        tv = text.transpose(1, 2)  # a view of the user's tensor: stays in the step graph
        wt = self.w.t()  # weights only: stays (free, or constant-folded by Inductor)
        noise = torch.rand_like(t)  # random: never hoisted
        step = timestep[:, None, None] * t  # varies each step
        return x @ wt + step + noise.sum() * 0 + (x @ tv).sum()


def test_pass_keeps_views_weights_random_and_varying_inputs_in_the_step_graph():
    ep = torch.export.export(_Toy(), (torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2)))
    gm = ep.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = [n.name for n in placeholders]
    user = {names.index(n) for n in ("x", "text", "timestep")}
    invariant = {i for i in range(len(names)) if names[i] not in ("x", "timestep")}
    before = copy_graph_module(gm)
    hoisted = passes.hoist_invariants(gm, invariant, user)
    assert hoisted is not None and hoisted.counters == {"hoisted_nodes": 1, "hoisted_values": 1}
    [linear] = [n for n in hoisted.prologue.graph.nodes if n.op == "call_function"]
    assert linear.target is aten.linear.default
    step_targets = {n.target for n in gm.graph.nodes}
    assert aten.transpose.int in step_targets and aten.t.default in step_targets
    assert aten.rand_like.default in step_targets and aten.linear.default not in step_targets
    assert [names[i] for i in hoisted.user_inputs] == ["text"]
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == names + ["ras_hoisted_0"]

    # nothing to hoist when the prompt counts as varying
    assert passes.hoist_invariants(before, invariant - {names.index("text")}, user) is None


def test_config_validates_hoisting_options():
    with pytest.raises(rasfx.ConfigError, match="hoist_invariants"):
        rasfx.TransformConfig(hoist_invariants="yes")
    with pytest.raises(rasfx.ConfigError, match="varying_inputs"):
        rasfx.TransformConfig(varying_inputs="timestep")
    with pytest.raises(rasfx.ConfigError, match="varying_inputs"):
        rasfx.TransformConfig(varying_inputs=("timestep", ""))
    assert rasfx.TransformConfig(varying_inputs=["timestep", "guidance"]).varying_inputs == ("timestep", "guidance")


def test_a_prompt_input_named_varying_is_not_hoisted():
    p = get_preset("pixart-tiny")
    model = p.build(seed=0)
    ras = rasfx.transform(model, rasfx.TransformConfig(
        varying_inputs=("timestep", "encoder_hidden_states", "encoder_attention_mask")))
    with torch.no_grad():
        ras(**p.inputs(2, seed=0))
    assert ras.captures()[0].variant("dense").hoisted is None


def test_mask_conversion_alone_is_hoisted_with_text_projection():
    """A model whose prompt path is a linear plus a mask conversion hoists both (F.linear on
    a user input; the comparison and arithmetic of the mask)."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.txt = torch.nn.Linear(4, 4)

        def forward(self, hidden_states, text, mask):
            b, c, h, w = hidden_states.shape
            x = self.proj(hidden_states.flatten(2).transpose(1, 2))  # x: [B, N, 4]
            k = self.txt(text)  # k: [B, T, 4]
            bias = (1 - mask.float())[:, None, :] * -1e4  # bias: [B, 1, T]
            a = F.scaled_dot_product_attention(x[:, None], k[:, None], k[:, None], attn_mask=bias[:, None])[:, 0]
            return (x + a).transpose(1, 2).reshape(b, c, h, w)

    model = M().eval()
    kw = dict(hidden_states=torch.randn(2, 4, 4, 4), text=torch.randn(2, 3, 4), mask=torch.ones(2, 3))
    ras = rasfx.transform(model)
    with torch.no_grad():
        ras(**kw)
        ras.set_active(torch.tensor([0, 5, 9]))
        ras(**kw)
        ras.set_active(torch.arange(16))
        out = ras(**kw)
    assert torch.allclose(out, model(**kw), rtol=1e-5, atol=1e-6)
    variant = ras.captures()[0].variant("shared")
    prologue_ops = {n.target for n in variant.hoisted.prologue.graph.nodes}
    assert aten.linear.default in prologue_ops and aten.mul.Tensor in prologue_ops


def test_explain_counts_hoisted_work_once_per_prompt():
    """rasfx.explain / inspect show the graphs as the runtime builds them: the prologue's
    matrix products leave the per-step estimate and are reported once per prompt."""
    from rasfx.explain import explain, node_flops

    report = explain("pixart-tiny")
    prologue = report.variant.hoisted.prologue
    fl = report.flops()
    assert fl["once_per_prompt"] == sum(node_flops(n) or 0 for n in prologue.graph.nodes if n.op == "call_function") > 0
    assert "once per prompt" in report.summary(timings=False)
    assert any(v.op == "hoisted input" for v in report.nodes())
