"""Unit tests of each compiler pass on a small hand-written DiT (text tokens first in a
joint sequence, SDPA, an MLP, unpatchify), with the pass counters."""

import pytest
import torch
import torch.nn.functional as F

import rasfx
from rasfx import passes
from rasfx.capture import export, input_signature
from rasfx.second_resolution import second_resolution_candidates
from rasfx.planned_capture import build_variant, plan_capture, copy_graph_module

T, C, P = 3, 16, 2  # text tokens, width, patch size


class JointDiT(torch.nn.Module):
    def __init__(self, mixer=None):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Conv2d(4, C, P, stride=P)
        self.txt = torch.nn.Linear(8, C)
        self.qkv = torch.nn.Linear(C, 3 * C)
        self.out = torch.nn.Linear(C, C)
        self.mlp = torch.nn.Linear(C, C)
        self.head = torch.nn.Linear(C, 4 * P * P)
        self.mixer = mixer

    def forward(self, hidden_states, text):
        b, _, h, w = hidden_states.shape
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)  # x: [B, N, C]
        seq = torch.cat([self.txt(text), x], dim=1).to(hidden_states.dtype)  # seq: [B, T + N, C], text first
        q, k, v = self.qkv(F.layer_norm(seq, (C,))).view(b, seq.shape[1], 3, 2, C // 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, seq.shape[1], C)
        seq = seq + self.out(a)
        x = seq[:, T:]  # image part
        if self.mixer is not None:
            x = x + self.mixer(x)
        x = x + self.mlp(F.gelu(x))
        x = self.head(x).view(b, h // P, w // P, P, P, 4)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 4, h, w)


def inputs(b=2, h=8, w=12):
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(b, 4, h, w, generator=g), "text": torch.randn(b, T, 8, generator=g)}


@pytest.fixture(scope="module")
def analysed():
    model, kw = JointDiT().eval(), inputs()
    gm = export(model, kw).graph_module
    n_asserts = sum(1 for n in gm.graph.nodes if "assert" in str(n.target))
    removed = passes.strip_asserts(gm)
    alt_kw, desc = second_resolution_candidates(kw, "hidden_states")[0]
    gm_alt = export(model, alt_kw).graph_module
    passes.strip_asserts(gm_alt)
    analysis = passes.analyze_tokens(gm, gm_alt, desc)
    return model, kw, gm, analysis, removed, n_asserts


def test_strip_asserts_counts_what_it_removes(analysed):
    _, _, gm, _, removed, n_asserts = analysed
    assert removed == n_asserts > 0
    assert not any("assert" in str(n.target) for n in gm.graph.nodes)


def test_token_analysis_finds_axes_and_segments(analysed):
    _, _, gm, analysis, *_ = analysed
    assert analysis.num_tokens == 24 and analysis.num_tokens_alt != 24 and not analysis.unmatched
    nodes = {n.name: n for n in gm.graph.nodes}
    embedded = nodes["transpose"]
    assert passes.token_axes(embedded) == (passes.Axis(1, 0, 0),)
    cat = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.cat.default)
    assert passes.token_axes(cat) == (passes.Axis(1, T, T),)  # text first: image segment at offset T
    sliced = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.slice.Tensor and passes.token_axes(n))
    assert passes.token_axes(sliced)[0].extra == 0 and passes.token_axes(sliced)[0].offset == 0
    conv = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default)
    assert passes.token_axes(conv) == ()  # the spatial grid is not a token axis


def test_plan_regions_modes_and_sites(analysed):
    _, _, gm, *_ = analysed
    plan = passes.plan_regions(gm)
    kinds = sorted(s.kind for s in plan.sites)
    assert kinds == ["attention", "attention", "output"]
    assert not plan.conservative
    linears = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert plan.mode[linears[0].name] == "-"  # the text projection has no token axis
    assert all(plan.mode[n.name] == "A" for n in linears[1:])
    assert plan.counters["sites_attention"] == 2 and plan.counters["sites_output"] == 1


def test_rewrite_pass_counters_and_result():
    model, kw = JointDiT().eval(), inputs()
    cc = plan_capture(model, kw, None, input_signature(model, kw))
    shared = cc.variant("shared")
    assert shared.counters["gathers"] == 1  # the embedded image tokens, before the concat
    assert shared.counters["resized_args"] >= 2  # reshape of the joint sequence, view of qkv
    assert shared.counters["attention_sites"] == 1 and shared.counters["cache_sites"] == 1
    ras = rasfx.transform(model)
    _dense_and_all_active_match(ras, model, kw)


def _dense_and_all_active_match(ras, model, kw):
    """A dense forward and one with every token active both equal the model; returns its output."""
    with torch.no_grad():
        want = model(**kw)
        assert torch.allclose(ras(**kw), want, atol=1e-6)
        ras.set_active(torch.arange(24))
        assert torch.allclose(ras(**kw), want, atol=1e-5)
    return want


class GridRampHead(torch.nn.Module):
    """A head on the token grid [B, H / P, W / P, C]: a LayerNorm and a scaling treat every grid
    position alike; a ramp over the grid's columns does not."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Conv2d(4, C, P, stride=P)
        self.mlp = torch.nn.Linear(C, C)
        self.head = torch.nn.Linear(C, 4 * P * P)

    def forward(self, hidden_states):
        b, _, h, w = hidden_states.shape
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        x = x + self.mlp(x)
        x = F.layer_norm(x.view(b, h // P, w // P, C), (C,)) * 2.0
        x = self.head(x + torch.linspace(0, 1, w // P)[:, None])
        return x.view(b, h // P, w // P, P, P, 4).permute(0, 5, 1, 3, 2, 4).reshape(b, 4, h, w)


def test_flatten_token_grids_stops_at_an_op_over_the_grid():
    assert plan_capture(JointDiT().eval(), inputs(), None, input_signature(JointDiT(), inputs())).counters[
        "grid_ops_flattened"] == 0  # the unpatchify view splits the features too: not a token grid
    model, kw = GridRampHead().eval(), {"hidden_states": inputs()["hidden_states"]}
    ras = rasfx.transform(model)
    _dense_and_all_active_match(ras, model, kw)
    cc = ras.captures()[0]
    assert cc.counters["grid_ops_flattened"] == 2  # the LayerNorm and the scaling; the ramp stays on the grid
    (out,) = [s for s in cc.plan.sites if s.kind == "output"]
    assert out.shape == (2, 24, C) and out.consumer.endswith("_grid")
    with torch.no_grad():
        ras.set_active(torch.tensor([0, 5, 23]))
        assert torch.allclose(ras(**kw), model(**kw), atol=1e-5)  # the same inputs: the caches hold the dense values


def test_unknown_token_mixer_is_conservative_and_reported():
    class CumsumMixer(torch.nn.Module):  # mixes tokens through an op rasfx has no rule for
        def forward(self, x):
            return torch.cumsum(x, dim=1) * 0.1

    model, kw = JointDiT(CumsumMixer()).eval(), inputs()
    ras = rasfx.transform(model)
    _dense_and_all_active_match(ras, model, kw)
    with torch.no_grad():
        ras.set_active(torch.tensor([2, 3, 11]))
        out = ras(**kw)
    assert torch.isfinite(out).all()
    cc = ras.captures()[0]
    mixing = [s for s in cc.plan.sites if s.kind == "mixing"]
    assert mixing and "reduction over the token axis" in mixing[0].reason


def test_copy_graph_module_is_independent(analysed):
    _, _, gm, *_ = analysed
    copy = copy_graph_module(gm)
    assert len(copy.graph.nodes) == len(gm.graph.nodes)
    next(iter(copy.graph.nodes)).meta["x"] = 1
    assert "x" not in next(iter(gm.graph.nodes)).meta


def test_build_variant_rejects_unknown_names():
    model, kw = JointDiT().eval(), inputs()
    cc = plan_capture(model, kw, None, input_signature(model, kw))
    with pytest.raises(ValueError, match="unknown graph variant"):
        build_variant(cc, "sparse")


class MaskedDiT(torch.nn.Module):
    """Lumina-Next-like attention: a padding mask over the image tokens expanded to
    [B, H, N, N] (a query and a key token axis), GQA keys repeated over heads with
    ``repeat``, and a cross-attention to text whose mask is [B, H, N, T]."""

    def __init__(self, mask_kind="query_key"):
        super().__init__()
        torch.manual_seed(0)
        self.mask_kind = mask_kind
        self.embed = torch.nn.Linear(4, C)
        self.q, self.kv = torch.nn.Linear(C, C), torch.nn.Linear(C, C // 2)
        self.txt = torch.nn.Linear(8, C)
        self.out = torch.nn.Linear(C, 4)

    def forward(self, hidden_states, text):
        b, n, _ = hidden_states.shape
        image_mask = hidden_states.new_ones(b, n)  # [B, N] padding mask (Lumina builds it in the forward)
        x = self.embed(hidden_states)  # x: [B, N, C]
        q = self.q(x).view(b, n, 2, C // 2).transpose(1, 2)  # q: [B, 2, N, C/2]
        k, v = self.kv(x).view(b, n, 1, 2, C // 4).unbind(3)  # one kv head: [B, N, 1, C/4] each
        k = k.unsqueeze(3).repeat(1, 1, 1, 2, 1).flatten(2, 3).transpose(1, 2)  # [B, 2, N, C/4]
        v = v.unsqueeze(3).repeat(1, 1, 1, 2, 1).flatten(2, 3).transpose(1, 2)
        q = q[..., : C // 4]
        if self.mask_kind == "query_key":
            mask = image_mask.bool().view(b, 1, 1, n).expand(-1, 2, n, -1)  # [B, 2, N(queries), N(keys)]
        else:  # "key": broadcast over the queries
            mask = image_mask.bool().view(b, 1, 1, n)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, C // 2)
        t = self.txt(text).view(b, T, 2, C // 2).transpose(1, 2)  # [B, 2, T, C/2]
        cross_mask = torch.ones(b, 2, n, T, dtype=torch.bool, device=x.device)  # [B, 2, N, T]: query rows
        c = F.scaled_dot_product_attention(self.q(x).view(b, n, 2, C // 2).transpose(1, 2), t, t, attn_mask=cross_mask)
        x = x + torch.cat([a, c.transpose(1, 2).reshape(b, n, C)[..., : C // 2]], dim=-1)
        return self.out(x)


def masked_inputs(b=2, n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(b, n, 4, generator=g), "text": torch.randn(b, T, 8, generator=g)}


@pytest.mark.parametrize("kind", ["query_key", "key"])
def test_attention_masks_over_image_tokens_follow_the_queries(kind):
    """A [.., N, N] mask is gathered along its query rows (keys come from the caches); a
    [.., 1, N] mask is read at full length; a [.., N, T] cross-attention mask along its rows;
    ``repeat`` over the heads is token-wise. Nothing runs conservatively, and partial steps on
    unchanged inputs reproduce the dense output."""
    model = MaskedDiT(kind).eval()
    ras = rasfx.transform(model)
    kw = masked_inputs()
    with torch.no_grad():
        want = model(**kw)
        assert torch.allclose(ras(**kw), want, atol=1e-6)
        cc = ras.captures()[0]
        assert cc.plan.conservative == []
        assert cc.plan.counters["sites_attention"] == 2  # K and V of the self-attention
        gathered = {p for p, _ in cc.plan.gathers}
        assert any(name.startswith("expand") for name in gathered) == (kind == "query_key")
        for idx in (torch.tensor([0, 5, 6, 17, 23]), torch.tensor([[1, 2, 3], [20, 4, 9]])):
            ras.set_active(idx)
            assert torch.allclose(ras(**kw), want, atol=1e-5)
            assert not ras.last_forward_dense
        # a partial step on new inputs reads the cached keys of the inactive tokens
        ras.set_active(None)
        ras(**kw)
        new = masked_inputs(seed=2)
        ras.set_active(torch.arange(24))
        assert torch.allclose(ras(**new), model(**new), atol=1e-5)


def test_attention_mask_over_keys_without_kv_cache_is_conservative():
    model = MaskedDiT("query_key").eval()
    ras = rasfx.transform(model, rasfx.TransformConfig(kv_cache=False))
    with torch.no_grad():
        ras(**masked_inputs())
    reasons = {r for _, _, r in ras.captures()[0].plan.conservative}
    assert "attention mask over image-token keys" in reasons


def test_repeat_along_the_token_axis_is_conservative():
    class Repeats(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, hidden_states):
            h = self.lin(hidden_states)  # [B, N, 4]
            return h.repeat(1, 2, 1)[:, : h.shape[1]] + h

    ras = rasfx.transform(Repeats().eval())
    with torch.no_grad():
        ras(hidden_states=torch.randn(1, 16, 4))
    assert ("repeat along the token axis" in {r for _, _, r in ras.captures()[0].plan.conservative})


def test_pad_sequence_of_different_lengths_is_conservative():
    """Rows of sequences of one length are stacked (token-wise); of different lengths, the
    shorter ones are padded at their end, which rasfx does not follow: full length."""
    from torch.nn.utils.rnn import pad_sequence

    class Ragged(torch.nn.Linear):
        def forward(self, hidden_states):
            h = super().forward(hidden_states)  # [B, N, 4]
            rows = pad_sequence([h[0], h[1, :-2]], batch_first=True)  # N and N - 2 tokens
            same = pad_sequence([h[0], h[1]], batch_first=True)
            return super().forward(rows) + super().forward(same)

    ras = rasfx.transform(Ragged(4, 4).eval())
    with pytest.warns(rasfx.RASWarning, match="pad_sequence of sequences of different lengths"):
        with torch.no_grad():
            ras(hidden_states=torch.randn(2, 16, 4))
    cc = ras.captures()[0]
    assert [name for name, _, _ in cc.plan.conservative] == ["pad_sequence"]
    same = next(n for n in cc.capture.graph_module.graph.nodes if n.name == "pad_sequence_1")
    assert cc.plan.mode[same.name] == "A"


def test_padding_neutral_sizes_keep_the_padding():
    """A model that pads its N tokens to a multiple of M is analysed at a size whose token
    count differs by a multiple of M, both sides changed (one side alone scales with the area
    like the tokens), the nearest first."""
    from rasfx.second_resolution import padding_neutral_candidates

    kw = inputs(h=8, w=12)  # N = 24 tokens of 2 x 2
    found = [desc["hw2"] for _, desc in padding_neutral_candidates(kw, "hidden_states", 24, 32)]
    assert found and found[0] == (20, 24)
    for h2, w2 in found:
        assert h2 != 8 and w2 != 12 and (h2 * w2 // 4 - 24) % 32 == 0
    assert padding_neutral_candidates({"hidden_states": torch.randn(2, 24, 4)}, "hidden_states", 24, 32) == []


def test_gather_of_a_broadcast_axis_stays_a_broadcast():
    """Gathering query rows of an expanded mask must not materialise n full rows."""
    from rasfx.ops import gather_tokens

    src = torch.rand(2, 1, 1, 7) > 0.3
    mask = src.expand(2, 3, 7, 7)  # [B, H, N(queries), N(keys)], stride 0 along the queries
    shared, rows = torch.tensor([6, 0, 3]), torch.tensor([[1, 2], [5, 4]])
    got = gather_tokens(mask, shared, 2, 4)
    assert got.stride(2) == 0 and torch.equal(got, mask.index_select(2, shared))
    got = gather_tokens(mask, rows, 2, 4)
    want = torch.stack([mask[b].index_select(1, rows[b]) for b in range(2)])
    assert got.stride(2) == 0 and torch.equal(got, want)
    dense = torch.rand(2, 3, 7, 7)  # an ordinary tensor is still gathered row by row
    assert torch.equal(gather_tokens(dense, shared, 2, 4), dense.index_select(2, shared))


def test_dense_variant_writes_concatenated_kv_into_the_caches():
    """SD3's joint attention concatenates image and text K/V: the dense variant lets the cat
    write into the cache (no copy), the partial variants keep the cache-aware op; outputs equal
    the model's and the caches hold exactly the concatenated K/V."""
    from rasfx.presets import get_preset

    p = get_preset("sd3-tiny")
    model, kw = p.build(0), p.inputs(1)
    ras = rasfx.transform(model)
    with torch.no_grad():
        want = model(**kw)[0]
        assert torch.allclose(ras(**kw)[0], want, atol=1e-6)
        cc = ras.captures()[0]
        dense, shared = cc.variant("dense"), cc.variant("shared")
        assert dense.counters["cat_into_cache"] == 2 * dense.counters["attention_sites"] > 0
        targets = [n.target for n in dense.gm.graph.nodes]
        assert torch.ops.aten.cat.out in targets and torch.ops.rasfx.ras_attention.default not in targets
        assert "cat_into_cache" not in shared.counters
        # the caches filled by the dense step serve a partial step on the same inputs exactly
        ras.set_active(torch.tensor([0, 3, 7, 12]))
        assert torch.allclose(ras(**kw)[0], want, atol=1e-5)
    other = get_preset("pixart-tiny")  # K/V are projections, not concatenations
    ras2 = rasfx.transform(other.build(0))
    with torch.no_grad():
        ras2(**other.inputs(1))
    assert "cat_into_cache" not in ras2.captures()[0].variant("dense").counters


@pytest.mark.parametrize("name, written", [("pixart-tiny", {"linear_into_cache": 2}),
                                           ("wan-tiny", {"linear_into_cache": 1}),
                                           ("flux-tiny", {"cat_into_cache": 1, "linear_into_cache": 1})])
def test_dense_variant_projects_kv_into_the_caches(name, written):
    """A K/V operand that is views of a projection (PixArt's K and V, Wan's and Flux's V; their
    keys pass q/k-norm and RoPE first) is computed by addmm straight into its cache in the dense
    variant: no ras_attention, no full copy. The output is bit-identical to the model's (the same
    GEMM linear runs), each cache equals the K/V the model attends to, and a partial step on the
    same inputs reproduces the dense output from those caches."""
    from rasfx.presets import get_preset

    p = get_preset(name)
    model, kw = p.build(0), p.inputs(1)
    ras = rasfx.transform(model)
    seen = []  # K/V as the model's own SDPA sees them

    def spy(*args, **kwargs):  # q, k, v positional or by name
        names = ("query", "key", "value")
        q, k, v = (args[i] if i < len(args) else kwargs.pop(names[i]) for i in range(3))
        seen.append((k.clone(), v.clone()))
        return real(q, k, v, *args[3:], **kwargs)

    real = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention = spy
        try:
            want = model(**kw)[0]
        finally:
            torch.nn.functional.scaled_dot_product_attention = real
        assert torch.equal(ras(**kw)[0], want)
        cc = ras.captures()[0]
        dense = cc.variant("dense")
        assert {k: dense.counters[k] for k in written} == written
        targets = [n.target for n in dense.gm.graph.nodes]
        assert torch.ops.aten.addmm.out in targets and torch.ops.rasfx.ras_attention.default not in targets
        assert "linear_into_cache" not in cc.variant("shared").counters
        caches = [c for c, spec in zip(ras._slot.caches, dense.caches) if spec.kind == "attention"]
        assert len(caches) == 2 * dense.counters["attention_sites"] > 0
        for kc, vc in zip(caches[0::2], caches[1::2]):  # each pair is some attention's K/V (PixArt's
            assert any(kc.shape == k.shape and torch.equal(kc, k) and torch.equal(vc, v)  # cross-attention
                       for k, v in seen), "a cache differs from the K/V the model attends to"  # has none)
        n = cc.num_tokens
        ras.set_active(torch.arange(0, n, 3))
        assert torch.allclose(ras(**kw)[0], want, atol=1e-5)


def test_packed_tokens_with_grid_ints_change_the_ints_with_the_sequence():
    """LTX passes packed tokens [B, F*H*W, C] and the grid as ints: the second resolution of the
    token analysis changes the last grid int with N, and a joint-sequence mask [B, T + N]
    (Chroma) follows N too."""
    kw = {"hidden_states": torch.randn(1, 2 * 8 * 12, 8), "encoder_hidden_states": torch.randn(1, 7, 16),
          "num_frames": 2, "height": 8, "width": 12, "attention_mask": torch.ones(1, 7 + 192)}
    alt, desc = second_resolution_candidates(kw, "hidden_states")[0]
    assert desc["grid_ints"] == ["num_frames", "height", "width"]
    assert alt["num_frames"] * alt["height"] * alt["width"] == alt["hidden_states"].shape[1] == desc["n2"] != 192
    assert alt["attention_mask"].shape == (1, 7 + desc["n2"])
    assert alt["encoder_hidden_states"].shape == (1, 7, 16)


class _FlipMixer(torch.nn.Module):
    """Mixes tokens through torch.flip over the token axis, which rasfx has no rule for."""

    def forward(self, x):
        return torch.flip(x, dims=[1]) * 0.1


def test_user_op_rules_are_consulted_first():
    """TransformConfig(op_rules=...): a user rule replaces the conservative default (here: flip
    over the tokens is 'mixing' with its input at full length), and the result stays exact."""
    model, kw = JointDiT(_FlipMixer()).eval(), inputs()
    default = rasfx.transform(model)
    seen = []

    def flip_rule(node):
        seen.append(node.name)
        return rasfx.OpRule("mixing", {node.args[0]}, reason="flip over the tokens (user rule)")

    ruled = rasfx.transform(model, rasfx.TransformConfig(op_rules={torch.ops.aten.flip: flip_rule}))  # a packet
    with torch.no_grad():
        want = model(**kw)
        for ras in (default, ruled):
            assert torch.allclose(ras(**kw), want, atol=1e-6)
            ras.set_active(torch.tensor([0, 5, 9, 17]))
            assert torch.allclose(ras(**kw), want, atol=1e-5)
    assert seen == ["flip"]
    reasons = {s.reason for s in ruled.captures()[0].plan.sites}
    assert "flip over the tokens (user rule)" in reasons
    assert any("unknown op aten.flip" in r for _, _, r in default.captures()[0].plan.conservative)
    assert ruled.captures()[0].plan.conservative == []


@pytest.mark.parametrize("bad, match", [
    ([1, 2], "op_rules must be a dict"),
    ({"aten::flip": lambda n: None}, "keys must be ops"),
    ({torch.ops.aten.flip.default: "mixing"}, "must be callable"),
])
def test_invalid_op_rules_config(bad, match):
    with pytest.raises(rasfx.ConfigError, match=match):
        rasfx.TransformConfig(op_rules=bad)


def test_op_rule_returning_garbage_is_a_type_error():
    model, kw = JointDiT(_FlipMixer()).eval(), inputs()
    ras = rasfx.transform(model, rasfx.TransformConfig(op_rules={torch.ops.aten.flip.default: lambda node: "mixing"}))
    with torch.no_grad(), pytest.raises(TypeError, match="aten.flip.default returned 'mixing'"):
        ras(**kw)


@pytest.mark.parametrize("preset", ["sd3-tiny", "pixart-tiny"])
def test_lower_cache_ops_gives_plain_aten_writes_with_the_same_results(preset):
    """The compile modes lower rasfx::ras_attention / cache_write_ to in-place ATen writes
    (so that inductor fuses them into the producers): every cache op is rewritten, none is
    left, and the lowered graphs give the same outputs and leave the same caches as the
    custom ops, for dense, shared and per-row steps in sequence."""
    from rasfx.presets import get_preset

    p = get_preset(preset)
    model, kw = p.build(0), p.inputs(2)
    ras = rasfx.transform(model)
    with torch.no_grad():
        ras(**kw)
    cc = ras.captures()[0]
    n_img = ras.num_image_tokens
    flat = ras._resolver(cc)(torch.utils._pytree.tree_leaves(rasfx.capture.bind_inputs(model, (), kw)))
    caches = {"custom": None, "lowered": None}
    g = torch.Generator().manual_seed(3)
    shared = torch.randperm(n_img, generator=g)[:5].sort().values
    rowwise = torch.stack([torch.randperm(n_img, generator=g)[:4] for _ in range(kw_batch(kw))])
    for name, index in (("dense", None), ("shared", shared), ("rowwise", rowwise), ("shared", shared.flip(0))):
        variant = cc.variant(name)
        lowered = copy_graph_module(variant.gm)
        n_ops = sum(n.target in (torch.ops.rasfx.ras_attention.default, torch.ops.rasfx.cache_write_.default)
                    for n in variant.gm.graph.nodes)
        assert passes.lower_cache_ops(lowered)["lowered"] == n_ops > 0
        assert not any(str(n.target).startswith("rasfx.") for n in lowered.graph.nodes)
        outs = {}
        for kind, gm in (("custom", variant.gm), ("lowered", lowered)):
            if caches[kind] is None:
                caches[kind] = [c.allocate() for c in variant.caches]
            with torch.no_grad():
                outs[kind] = gm(*variant.call_args(flat, index, caches[kind]))
        for a, b in zip(outs["custom"], outs["lowered"]):
            assert torch.equal(a, b), name
        for a, b in zip(caches["custom"], caches["lowered"]):
            assert torch.equal(a, b), name


def kw_batch(kw):
    return next(v.shape[0] for v in kw.values() if isinstance(v, torch.Tensor) and v.dim() == 4)


def test_compiled_modes_get_contiguous_attention_caches():
    """Eager runners keep the producer's layout for every cache; compiled runners get contiguous
    attention caches and keep the layout of other caches (their readers may view them)."""
    from rasfx.passes.context import CacheSpec

    perm = (2 * 5 * 3 * 4, 4, 3 * 4, 1)  # [B, H, L, D] seen through a transpose of [B, L, H, D]
    for kind in ("attention", "output"):
        spec = CacheSpec("c", (2, 3, 5, 4), torch.float32, torch.device("cpu"), kind, "p", "c", 2, perm)
        assert spec.allocate().stride() == perm
        assert spec.allocate(contiguous_attention=True).is_contiguous() == (kind == "attention")
    from rasfx.target import contiguous_attention_caches

    assert contiguous_attention_caches("compile+cuda_graph") and contiguous_attention_caches("compile")
    assert not contiguous_attention_caches("cuda_graph") and not contiguous_attention_caches("eager")


def test_projection_written_into_the_cache_only_in_the_caches_layout():
    """PixArt's K/V caches in the producer's layout are filled by addmm straight into them; with
    contiguous attention caches (compiled runners) the projection's layout is not the cache's,
    so the dense variant copies instead. The capture fixes the layout its variants assume, and
    the module allocates the caches by the capture, not by the runner's current setting."""
    from rasfx.planned_capture import plan_capture
    from rasfx.module import input_signature
    from rasfx.presets import get_preset

    p = get_preset("pixart-tiny")
    model, kw = p.build(0), p.inputs(1)
    for contiguous, written in ((False, 2), (True, 0)):
        cc = plan_capture(model, kw, None, input_signature(model, kw), contiguous_attention=contiguous)
        assert cc.variant("dense").counters["linear_into_cache"] == written
    ras = rasfx.transform(model)
    with torch.no_grad():
        ras(**kw)
        assert not all(c.is_contiguous() for c in ras._slot.caches)


@pytest.mark.parametrize("preset", ["sd3-tiny", "pixart-tiny"])
def test_fused_qkv_projections_are_captured(preset):
    """diffusers' ``fuse_qkv_projections()`` (one Q/K/V GEMM, the fused attention processors):
    the fused projection's output is split along features, not tokens, so the capture needs
    nothing special; dense and all-active steps equal the model, and a partial step equals the
    unfused model's partial step (same weights)."""
    from rasfx.presets import get_preset

    p = get_preset(preset)
    plain, fused = p.build(0).eval(), p.build(0).eval()
    fused.fuse_qkv_projections()
    assert any("Fused" in type(pr).__name__ for pr in fused.attn_processors.values())
    kw = p.inputs(2)
    ras_plain, ras_fused = rasfx.transform(plain), rasfx.transform(fused)
    with torch.no_grad():
        want = plain(**kw)[0]
        assert torch.allclose(ras_fused(**kw)[0], want, atol=1e-5)
        ras_plain(**kw)
        n = ras_fused.num_image_tokens
        for idx in (torch.arange(1, n, 3), torch.arange(n)):
            ras_plain.set_active(idx)
            ras_fused.set_active(idx)
            got = ras_fused(**kw)[0]
            assert torch.allclose(got, ras_plain(**kw)[0], atol=1e-5)
        assert torch.allclose(got, want, atol=1e-5)  # the last step: every token active
