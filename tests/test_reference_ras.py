"""Self-tests of the hand-written RAS reference (tests/reference_ras.py).

These check the reference against the unmodified diffusers models and against two oracles that
share no code with its attention processors: the SDPA-substitution oracle and a manual
softmax(QK^T)V computed from the reference's own cache contents.
"""

from __future__ import annotations

import math

import pytest
import torch

try:
    from reference_ras import (
        HandRAS,
        SDPASubstitutionOracle,
        flux_inputs,
        make_flux_tiny,
        make_sd3_tiny,
        num_image_tokens,
        sd3_inputs,
        sd3_patchify,
    )
except ImportError:  # tests/ imported as a package
    from tests.reference_ras import (
        HandRAS,
        SDPASubstitutionOracle,
        flux_inputs,
        make_flux_tiny,
        make_sd3_tiny,
        num_image_tokens,
        sd3_inputs,
        sd3_patchify,
    )


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# name -> (model factory, input factory(seed, B))
CASES = {
    "sd35_dual_rms": (lambda: make_sd3_tiny(0, dual=True, qk_norm="rms_norm"), lambda s, B=2: sd3_inputs(B, 8, 12, s)),
    "sd3_plain": (lambda: make_sd3_tiny(1, dual=False, qk_norm=None), lambda s, B=2: sd3_inputs(B, 12, 8, s)),
    "flux": (lambda: make_flux_tiny(2), lambda s, B=2: flux_inputs(B, 4, 6, s)),
    "flux_guidance": (
        lambda: make_flux_tiny(3, guidance_embeds=True),
        lambda s, B=2: flux_inputs(B, 5, 3, s, guidance=3.5 + s),
    ),
}


def _dense(model, kw):
    return model(**kw, return_dict=False)[0]


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _tokens(model, out):
    """Model output -> per-token [B, N, c] in the model's image-token order."""
    if out.dim() == 4:
        return sd3_patchify(out, model.config.patch_size)
    return out


def _rand_rows(B, N, n, gen):
    return torch.stack([torch.randperm(N, generator=gen)[:n] for _ in range(B)])


def _processors(model):
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_dense_matches_model_and_model_untouched(case):
    make, inputs = CASES[case]
    model = make()
    procs_before = _processors(model)
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = HandRAS(model)
    for s in range(3):
        kw = inputs(s)
        expect = _dense(model, kw)
        got = ref(None, **kw)
        assert got.shape == expect.shape
        assert _rel(got, expect) <= 1e-6
        # HandRAS restores the model's processors after each call (same objects)
        after = _processors(model)
        assert after.keys() == procs_before.keys()
        assert all(after[k] is procs_before[k] for k in after)
        assert torch.equal(_dense(model, kw), expect)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd_before[k]), k
    # the output cache holds the per-token output of the last dense call
    assert torch.equal(ref.out_cache, _tokens(model, expect))
    # return_dict is accepted and ignored
    assert _rel(ref(None, return_dict=True, **inputs(0)), _dense(model, inputs(0))) <= 1e-6


@pytest.mark.parametrize("case", list(CASES))
def test_all_active_equals_dense(case):
    make, inputs = CASES[case]
    model = make()
    ref = HandRAS(model)
    ref(None, **inputs(0))
    N = num_image_tokens(model, inputs(0))
    gen = torch.Generator().manual_seed(0)
    for s, active in enumerate(
        [torch.arange(N), _rand_rows(2, N, N, gen), torch.randperm(N, generator=gen), torch.arange(N).expand(2, N)],
        start=1,
    ):
        kw = inputs(s)  # new inputs: every cache row is overwritten, so this must be exactly dense
        got = ref(active, **kw)
        assert _rel(got, _dense(model, kw)) <= 1e-5


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("per_row", [False, True])
def test_partial_steps_output_cache(case, per_row):
    make, inputs = CASES[case]
    model = make()
    ref = HandRAS(model)
    B = 2
    kw = inputs(0, B)
    N = num_image_tokens(model, kw)
    out = ref(None, **kw)
    tok = _tokens(model, out).clone()
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 5):
        kw = inputs(step, B)
        n = [N // 2, N // 3, 1, N - 1][step - 1]
        active = _rand_rows(B, N, n, gen) if per_row else torch.randperm(N, generator=gen)[:n]
        rows = active if per_row else active.expand(B, -1)
        mask = torch.zeros(B, N, dtype=torch.bool)
        mask.scatter_(1, rows, True)

        out = ref(active, **kw)
        assert torch.isfinite(out).all()
        new_tok = _tokens(model, out)
        assert torch.equal(new_tok, ref.out_cache)
        # inactive tokens keep the value of the most recent forward that computed them
        assert torch.equal(new_tok[~mask], tok[~mask])
        # active tokens were recomputed: they differ from their old value and, because the other
        # tokens' K/V are stale, (sanity) also from a dense forward on the new inputs
        dense_tok = _tokens(model, _dense(model, kw))
        assert not torch.allclose(new_tok[mask], tok[mask], atol=1e-4)
        assert not torch.allclose(new_tok[mask], dense_tok[mask], atol=1e-4)
        tok = new_tok.clone()


@pytest.mark.parametrize("case", list(CASES))
def test_matches_sdpa_substitution_oracle(case):
    """Brute-force cross-check: dense model run with inactive image K/V replaced at the SDPA inputs."""
    make, inputs = CASES[case]
    model = make()
    ref = HandRAS(model)
    oracle = SDPASubstitutionOracle(model)
    B = 2
    kw = inputs(0, B)
    N = num_image_tokens(model, kw)
    a, b = ref(None, **kw), oracle(None, **kw)
    assert torch.equal(a, b)
    gen = torch.Generator().manual_seed(2)
    schedule = [
        torch.randperm(N, generator=gen)[: N // 2],
        _rand_rows(B, N, N // 3, gen),
        None,  # a dense refresh in the middle
        _rand_rows(B, N, N // 4, gen),
        torch.randperm(N, generator=gen)[: N - 2],
        _rand_rows(B, N, 2, gen),
    ]
    for step, active in enumerate(schedule, start=1):
        kw = inputs(step, B)
        a, b = ref(active, **kw), oracle(active, **kw)
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # caches: same K/V as the oracle used at every attention site (oracle stores [B, H, N, D])
        order = ref.site_call_order
        assert len(order) == len(oracle.kv) == len(ref.sites)
        assert sorted(order) == sorted(ref.sites)
        for i, site in enumerate(order):
            k, v = ref.kv_cache(site)
            ok, ov = oracle.kv[i]
            torch.testing.assert_close(k, ok.transpose(1, 2), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, ov.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_cache_rows_fresh_and_stale(case):
    """After a partial step: every site's cache has the old K/V at inactive rows and changed K/V at active
    rows; the first site (which only sees per-token computations of the new input) has exactly the
    dense K/V of the new inputs at active rows (recorded independently by the SDPA oracle)."""
    make, inputs = CASES[case]
    model = make()
    ref = HandRAS(model)
    B = 2
    kw0, kw1 = inputs(0, B), inputs(1, B)
    N = num_image_tokens(model, kw0)
    ref(None, **kw0)
    before = {s: ref.kv_cache(s) for s in ref.sites}
    order = ref.site_call_order
    dense1 = SDPASubstitutionOracle(model)
    dense1(None, **kw1)  # dense K/V of the new inputs, [B, H, N, D] in call order
    active = _rand_rows(B, N, N // 3, torch.Generator().manual_seed(3))
    mask = torch.zeros(B, N, dtype=torch.bool).scatter_(1, active, True)
    ref(active, **kw1)
    for i, site in enumerate(order):
        k, v = ref.kv_cache(site)
        k0, v0 = before[site]
        assert k.shape == k0.shape and k.shape[:2] == (B, N)
        assert torch.equal(k[~mask], k0[~mask]) and torch.equal(v[~mask], v0[~mask])
        assert not torch.allclose(k[mask], k0[mask], atol=1e-4)
        assert not torch.allclose(v[mask], v0[mask], atol=1e-4)
        if i == 0:
            dk, dv = (t.transpose(1, 2) for t in dense1.kv[0])
            torch.testing.assert_close(k[mask], dk[mask], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(v[mask], dv[mask], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# manual attention from the cache contents (independent of the processors' code)
# ----------------------------------------------------------------------------------------------
def _manual_attn(q, k, v):
    """q [B, Sq, H, D], k/v [B, Sk, H, D] -> [B, Sq, H*D], plain softmax(QK^T/sqrt(D))V."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    o = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double())
    return o.reshape(o.shape[0], o.shape[1], -1).float()


def _heads(x, D):
    return x.reshape(x.shape[0], x.shape[1], -1, D)


def _capture(module):
    rec = {}

    def hook(mod, args, kwargs, output):
        rec["kwargs"] = kwargs
        rec["out"] = output

    return rec, module.register_forward_hook(hook, with_kwargs=True)


def test_manual_attention_sd3_joint_and_attn2():
    model = make_sd3_tiny(5, dual=True, qk_norm="rms_norm", num_layers=1)
    ref = HandRAS(model)
    B = 2
    kw0, kw1 = sd3_inputs(B, 8, 6, 0), sd3_inputs(B, 8, 6, 1)
    N = num_image_tokens(model, kw0)
    ref(None, **kw0)
    blk = model.transformer_blocks[0]
    rec1, h1 = _capture(blk.attn)
    rec2, h2 = _capture(blk.attn2)
    active = _rand_rows(B, N, 7, torch.Generator().manual_seed(4))
    try:
        ref(active, **kw1)
    finally:
        h1.remove()
        h2.remove()
    D = model.config.attention_head_dim

    # joint attention: queries = [active image, text]; keys = [image cache (N rows), fresh text]
    attn = blk.attn
    x, c = rec1["kwargs"]["hidden_states"], rec1["kwargs"]["encoder_hidden_states"]
    assert x.shape[1] == 7
    q = attn.norm_q(_heads(attn.to_q(x), D))
    qc = attn.norm_added_q(_heads(attn.add_q_proj(c), D))
    kc = attn.norm_added_k(_heads(attn.add_k_proj(c), D))
    vc = _heads(attn.add_v_proj(c), D)
    K, V = ref.kv_cache("transformer_blocks.0.attn")  # [B, N, H, D]
    # the cache rows of active tokens are the fresh K/V of the active tokens
    torch.testing.assert_close(
        K.gather(1, active[:, :, None, None].expand(-1, -1, *K.shape[2:])), attn.norm_k(_heads(attn.to_k(x), D))
    )
    torch.testing.assert_close(V.gather(1, active[:, :, None, None].expand(-1, -1, *V.shape[2:])), _heads(attn.to_v(x), D))
    o = _manual_attn(torch.cat([q, qc], 1), torch.cat([K, kc], 1), torch.cat([V, vc], 1))
    img_out = attn.to_out[0](o[:, :7])
    img_got, ctx_got = rec1["out"]
    torch.testing.assert_close(img_got, img_out, rtol=1e-5, atol=1e-5)
    assert attn.context_pre_only  # last (only) block: text output is not projected
    torch.testing.assert_close(ctx_got, o[:, 7:], rtol=1e-5, atol=1e-5)

    # SD3.5 attn2: image-only self-attention over its own cache
    attn = blk.attn2
    x2 = rec2["kwargs"]["hidden_states"]
    assert rec2["kwargs"].get("encoder_hidden_states") is None and x2.shape[1] == 7
    q = attn.norm_q(_heads(attn.to_q(x2), D))
    K, V = ref.kv_cache("transformer_blocks.0.attn2")
    o = _manual_attn(q, K, V)
    torch.testing.assert_close(rec2["out"], attn.to_out[0](o), rtol=1e-5, atol=1e-5)


def _rope_complex(x, cos, sin):
    """RoPE via complex multiplication, x [B, S, H, D], cos/sin [B or 1, S, D] (pair-repeated)."""
    ang = torch.atan2(sin[..., 0::2], cos[..., 0::2]).double()  # [., S, D/2]
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    rot = torch.polar(torch.ones_like(ang), ang)[:, :, None, :]
    return torch.view_as_real(xc * rot).flatten(3).float()


@pytest.mark.parametrize("per_row", [False, True])
def test_manual_attention_flux(per_row):
    model = make_flux_tiny(6, num_layers=1, num_single_layers=1)
    ref = HandRAS(model)
    B, h, w, T = 2, 4, 5, 6
    kw0, kw1 = flux_inputs(B, h, w, 0, text_len=T), flux_inputs(B, h, w, 1, text_len=T)
    N = h * w
    ref(None, **kw0)
    gen = torch.Generator().manual_seed(7)
    active = _rand_rows(B, N, 6, gen) if per_row else torch.randperm(N, generator=gen)[:6]
    rows = active if per_row else active.expand(B, -1)
    recd, hd = _capture(model.transformer_blocks[0].attn)
    recs, hs = _capture(model.single_transformer_blocks[0].attn)
    try:
        ref(active, **kw1)
    finally:
        hd.remove()
        hs.remove()
    D = model.config.attention_head_dim
    # RoPE table of the full sequence from the model's own positional embedder, gathered here
    cos, sin = model.pos_embed(torch.cat([kw1["txt_ids"], kw1["img_ids"]], 0))
    sel = torch.cat([torch.arange(T).expand(B, -1), T + rows], 1)  # [B, T+n]
    cos_q, sin_q = cos[sel], sin[sel]

    # double-stream block: queries [text, active image], keys [fresh text, image cache]
    attn = model.transformer_blocks[0].attn
    x, c = recd["kwargs"]["hidden_states"], recd["kwargs"]["encoder_hidden_states"]
    q = torch.cat([attn.norm_added_q(_heads(attn.add_q_proj(c), D)), attn.norm_q(_heads(attn.to_q(x), D))], 1)
    k_fresh = torch.cat([attn.norm_added_k(_heads(attn.add_k_proj(c), D)), attn.norm_k(_heads(attn.to_k(x), D))], 1)
    q, k_fresh = _rope_complex(q, cos_q, sin_q), _rope_complex(k_fresh, cos_q, sin_q)
    K, V = ref.kv_cache("transformer_blocks.0.attn")
    idx4 = rows[:, :, None, None].expand(-1, -1, *K.shape[2:])
    torch.testing.assert_close(K.gather(1, idx4), k_fresh[:, T:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(V.gather(1, idx4), _heads(attn.to_v(x), D))
    o = _manual_attn(q, torch.cat([k_fresh[:, :T], K], 1), torch.cat([_heads(attn.add_v_proj(c), D), V], 1))
    img_got, ctx_got = recd["out"]
    torch.testing.assert_close(img_got, attn.to_out[0](o[:, T:]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ctx_got, attn.to_add_out(o[:, :T]), rtol=1e-5, atol=1e-5)

    # single-stream block: one tensor [text, active image]
    attn = model.single_transformer_blocks[0].attn
    xs = recs["kwargs"]["hidden_states"]
    assert xs.shape[1] == T + 6
    q = _rope_complex(attn.norm_q(_heads(attn.to_q(xs), D)), cos_q, sin_q)
    k_fresh = _rope_complex(attn.norm_k(_heads(attn.to_k(xs), D)), cos_q, sin_q)
    K, V = ref.kv_cache("single_transformer_blocks.0.attn")
    torch.testing.assert_close(K.gather(1, idx4), k_fresh[:, T:], rtol=1e-5, atol=1e-5)
    o = _manual_attn(q, torch.cat([k_fresh[:, :T], K], 1), torch.cat([_heads(attn.to_v(xs)[:, :T], D), V], 1))
    torch.testing.assert_close(recs["out"], o, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
def test_same_inputs_partial_equals_dense():
    """Consistency: if nothing changed since the dense step, any partial step reproduces dense output."""
    for case in CASES:
        make, inputs = CASES[case]
        model = make()
        ref = HandRAS(model)
        kw = inputs(0)
        dense = ref(None, **kw)
        N = num_image_tokens(model, kw)
        got = ref(_rand_rows(2, N, N // 3, torch.Generator().manual_seed(8)), **kw)
        torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-6)


def test_instances_independent_reset_and_errors():
    make, inputs = CASES["sd35_dual_rms"]
    model = make()
    r1, r2 = HandRAS(model), HandRAS(model)
    kw0, kw1 = inputs(0), inputs(1)
    N = num_image_tokens(model, kw0)
    with pytest.raises(RuntimeError):
        r1(torch.arange(3), **kw0)  # partial before dense
    r1(None, **kw0)
    r2(None, **kw1)
    act = torch.arange(0, N, 3)
    a = r1(act, **kw1)
    b = r2(act, **kw1)
    # r2's caches came from kw1 itself -> dense kw1 output; r1's from kw0 -> different
    torch.testing.assert_close(b, _dense(model, kw1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a, b, atol=1e-4)
    # procs restored even when a call fails
    procs = _processors(model)
    with pytest.raises(ValueError):
        r1(torch.tensor([1, 1, 2]), **kw1)  # duplicate indices
    with pytest.raises(IndexError):
        r1(torch.tensor([N]), **kw1)
    with pytest.raises(RuntimeError):
        r1(torch.arange(3), **inputs(2, B=3))  # batch differs from the cached one
    assert all(_processors(model)[k] is procs[k] for k in procs)
    r1.reset()
    assert r1.out_cache is None and all(r1.kv_cache(s) == (None, None) for s in r1.sites)
    with pytest.raises(RuntimeError):
        r1(act, **kw1)
    assert r2.out_cache is not None


def test_degenerate_shapes_batch1_single_row():
    """B=1, a one-patch-high SD3 grid (2 x W latents) and a 1 x w Flux grid."""
    sd3 = make_sd3_tiny(9)
    flux = make_flux_tiny(9)
    for model, kw0, kw1 in [
        (sd3, sd3_inputs(1, 2, 10, 0), sd3_inputs(1, 2, 10, 1)),
        (flux, flux_inputs(1, 1, 7, 0), flux_inputs(1, 1, 7, 1)),
    ]:
        ref, oracle = HandRAS(model), SDPASubstitutionOracle(model)
        assert _rel(ref(None, **kw0), _dense(model, kw0)) <= 1e-6
        oracle(None, **kw0)
        out = ref(torch.tensor([3, 0]), **kw1)
        torch.testing.assert_close(out, oracle(torch.tensor([3, 0]), **kw1), rtol=1e-5, atol=1e-5)
        out.add_(1.0)  # mutating a returned tensor must not corrupt the output cache
        torch.testing.assert_close(ref.out_cache, _tokens(model, oracle.out), rtol=1e-5, atol=1e-5)
