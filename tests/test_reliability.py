"""Reliability of rasfx: no silent wrong result, isolated state, bad input rejected, fuzzed.

Every test here can fail: each one compares against the original model, a hand-written RAS
reference (``tests/reference_ras.py`` or a small oracle below) or a separate run, or checks a
typed error and its message. Known bugs are ``xfail(strict=True)`` tests whose reason says what
is wrong; they turn into failures (XPASS) once fixed, so the marker must then be removed.
See docs/reliability.md for what is guaranteed and the known limits.

Cost: a capture (torch.export at two resolutions) takes 1-3 s per new input signature, so the
transformed modules and pipelines are built once per module and reused; every test that
reuses one starts with ``reset()`` (or a fresh pipeline run) so that no state leaks between
tests.
"""

from __future__ import annotations

import copy
import gc
import os
import threading
import warnings
import weakref

import hypothesis  # the "test" extra
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_ras import HandRAS, make_sd3_tiny, sd3_inputs

import rasfx
import rasfx.pipeline as rp
from rasfx.capture import input_signature
from rasfx.sampler import step_kinds


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def same(a, b) -> bool:
    """Equal up to float32 rounding. Bit-equality is not asked for: on CPU the BLAS / oneDNN
    kernels may round differently for differently aligned buffers, so two identical runs in one
    process can differ in the last bit. Any state leak or lost update is orders of magnitude larger."""
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and float(np.abs(a.astype(np.float64) - b).max()) <= 1e-5
    return a.shape == b.shape and rel(a, b) <= 1e-6


# Tiny models: one intra-op thread is much faster than two on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd3():
    return make_sd3_tiny(0)


@pytest.fixture(scope="module")
def ras(sd3):
    """One transformed SD3 shared by the tests of this module (its captures are reused)."""
    return rasfx.transform(sd3, rasfx.TransformConfig(max_captures=32))


@pytest.fixture(scope="module")
def ras_other():
    """A transformed SD3 with other weights (for the isolation tests)."""
    return rasfx.transform(make_sd3_tiny(1))


def kw_sd3(B=2, H=8, W=8, seed=0, **extra):
    return dict(sd3_inputs(B, H, W, seed=seed), return_dict=False, **extra)


# ============================================================================== tiny DiT-like models


def rope_tables(n: int, d: int):
    pos = torch.arange(n, dtype=torch.float32)
    inv = 1.0 / (100.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    f = pos[:, None] * inv[None, :]
    return f.cos(), f.sin()


def rope_inplace(x: torch.Tensor) -> torch.Tensor:
    """RoPE written like diffusers' WanAttnProcessor: into an ``empty_like`` through strided slices."""
    cos, sin = rope_tables(x.shape[-2], x.shape[-1])
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


class TinyDiT(torch.nn.Module):
    """Packed tokens [B, N, C] -> linear embedding -> one multi-head attention block -> linear out.

    ``variant``: ``"rope"`` applies an in-place RoPE (runs on active tokens: must stay exact);
    ``"cumsum_"`` adds an in-place running sum over the token axis (a token-mixing op writing to an
    active tensor: must be rejected); ``"plain"``: neither.
    """

    def __init__(self, variant: str = "plain", c: int = 4, heads: int = 2, head_dim: int = 4):
        super().__init__()
        self.variant, self.heads, self.head_dim = variant, heads, head_dim
        d = heads * head_dim
        self.embed = torch.nn.Linear(c, d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, c)

    def _split(self, t):  # [B, N, H*D] -> [B, H, N, D] (a transposed view, like diffusers)
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def parts(self, hidden_states):
        """(h, q, k, v) at full length, as they enter attention (the oracle's building blocks)."""
        h = self.embed(hidden_states)
        if self.variant == "cumsum_":
            h.cumsum_(1)
        q, k, v = (self._split(t) for t in self.qkv(h).chunk(3, -1))
        if self.variant == "rope":
            q, k = rope_inplace(q), rope_inplace(k)
        return h, q, k, v

    def head(self, h, attn):
        b, _, n, _ = attn.shape
        return self.out(h + attn.transpose(1, 2).reshape(b, n, -1))

    def forward(self, hidden_states):
        h, q, k, v = self.parts(hidden_states)
        return self.head(h, F.scaled_dot_product_attention(q, k, v))


class TinyOracle:
    """Hand-written RAS for ``TinyDiT``: K/V caches at the attention, an output cache at the end.

    Everything before the attention is token-wise, so computing it at full length and taking the
    active rows is the same computation as running it on the active tokens only.
    """

    def __init__(self, model: TinyDiT):
        self.model = model
        self.k = self.v = self.out = None

    def __call__(self, hidden_states, active=None):
        h, q, k, v = self.model.parts(hidden_states)
        b, n = hidden_states.shape[:2]
        if active is None:
            self.k, self.v = k.clone(), v.clone()
            self.out = self.model.head(h, F.scaled_dot_product_attention(q, k, v))
            return self.out.clone()
        rows = active if active.dim() == 2 else active.expand(b, -1)
        mask = torch.zeros(b, n, dtype=torch.bool).scatter_(1, rows, True)
        m4 = mask[:, None, :, None]
        self.k = torch.where(m4, k, self.k)
        self.v = torch.where(m4, v, self.v)
        fresh = self.model.head(h, F.scaled_dot_product_attention(q, self.k, self.v))
        self.out = torch.where(mask[..., None], fresh, self.out)
        return self.out.clone()


def _index_schedule(n: int, batch: int, steps: int, seed: int):
    """Dense, then partial active sets of several sizes, shared and per row, with a dense reset."""
    g = torch.Generator().manual_seed(seed)
    out = [None]
    sizes = [1, max(1, n // 3), n, max(1, n // 2), None, max(1, n - 1)]
    for i in range(steps - 1):
        s = sizes[i % len(sizes)]
        if s is None:
            out.append(None)
        elif i % 2:
            out.append(torch.stack([torch.randperm(n, generator=g)[:s] for _ in range(batch)]))
        else:
            out.append(torch.randperm(n, generator=g)[:s])
    return out


# ============================================================================== unsupported models


def test_unet_is_rejected_by_name_with_what_to_do():
    from diffusers import UNet2DModel

    unet = UNet2DModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )
    with pytest.raises(rasfx.UnsupportedModelError) as e:
        rasfx.transform(unet)
    msg = str(e.value)
    assert "UNet2DModel" in msg and "U-Net" in msg
    assert "no single image-token sequence" in msg and "diffusion transformers" in msg


def test_model_without_image_token_sequence_is_rejected():
    class ConvNet(torch.nn.Module):  # a convolution: no dim of any tensor is a token count
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, hidden_states):
            return self.conv(hidden_states)

    conv = rasfx.transform(ConvNet())
    with pytest.raises(rasfx.UnsupportedModelError) as e:
        conv(hidden_states=torch.randn(1, 4, 8, 8))
    assert "no image-token sequence" in str(e.value) and "diffusion transformer" in str(e.value)
    assert conv.captures() == []  # nothing half-registered: the next call fails the same way
    with pytest.raises(rasfx.UnsupportedModelError, match="no image-token sequence"):
        conv(hidden_states=torch.randn(1, 4, 8, 8))

    class Mlp(torch.nn.Module):  # no input of rank >= 3 at all
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, features):
            return self.lin(features)

    with pytest.raises(rasfx.CaptureError) as e:
        rasfx.transform(Mlp())(features=torch.randn(2, 4))
    assert "found no image input" in str(e.value) and "TransformConfig(image_input=...)" in str(e.value)
    named = rasfx.transform(Mlp(), rasfx.TransformConfig(image_input="latents"))
    with pytest.raises(rasfx.CaptureError, match="image input 'latents' is not a tensor argument"):
        named(features=torch.randn(2, 4))
    with pytest.raises(rasfx.UnsupportedModelError, match="needs a torch.nn.Module"):
        rasfx.transform(lambda x: x)
    with pytest.raises(rasfx.UnsupportedModelError, match="already transformed"):
        rasfx.transform(conv)


class _DataDependent(torch.nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, hidden_states):
        h = self.lin(hidden_states)
        if self.how == "item":
            return h * 2 if h.abs().max().item() > 1.0 else h
        if self.how == "tolist":
            return h if h.mean(dim=(0, 1)).tolist()[0] > 0 else -h
        if self.how == "branch":  # Python ``if`` on a tensor's value
            return h * 2 if h.sum() > 0 else h
        # "value": .item() used as a number, not for control flow (captured: it reads the value at run time)
        return h * h.abs().max().item()


@pytest.mark.parametrize("how", ["item", "tolist", "branch"])
def test_data_dependent_control_flow_is_a_capture_error(how):
    model = rasfx.transform(_DataDependent(how))
    x = torch.randn(1, 16, 4)
    with pytest.raises(rasfx.CaptureError) as e:
        model(hidden_states=x)
    msg = str(e.value)
    assert isinstance(e.value, rasfx.UnsupportedModelError)
    assert "could not capture _DataDependent.forward" in msg
    assert "data-dependent Python control flow" in msg and ".item()" in msg  # names the construct and the fix
    assert e.value.__cause__ is not None  # the export error is kept for debugging
    assert model.captures() == [] and model.cache_bytes() == 0


def test_item_used_as_a_value_is_captured_and_exact():
    """``.item()`` without control flow is not an error: the graph reads the value at run time
    (a reduction over all tokens, so it is computed from the full-length cache)."""
    torch.manual_seed(0)
    model = _DataDependent("value")
    ras = rasfx.transform(model)
    with torch.no_grad():
        for seed in range(3):
            x = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(seed))
            ras.set_active(None if seed == 0 else torch.arange(16))
            assert rel(ras(hidden_states=x), model(hidden_states=x)) <= 1e-6
            assert ras.last_forward_dense == (seed == 0)


def test_inplace_token_mixing_op_on_active_tokens_is_rejected():
    """``h.cumsum_(1)`` writes to an active-token tensor and mixes tokens: it cannot run on the
    active tokens and cannot be redirected to a copy (the write would be lost)."""
    torch.manual_seed(0)
    model = rasfx.transform(TinyDiT("cumsum_").eval())
    with pytest.raises(rasfx.UnsupportedModelError) as e:
        model(hidden_states=torch.randn(2, 12, 4))
    msg = str(e.value)
    assert "in-place op aten.cumsum_" in msg and "writes to an active-token tensor" in msg
    # the source line (torch.export records the frames of module forwards: the line of TinyDiT.forward)
    assert "at h, q, k, v = self.parts(hidden_states)" in msg
    assert "Rewrite it out of place" in msg


def test_inplace_rope_that_runs_on_active_tokens_stays_exact():
    """Wan-style RoPE (``out = empty_like(x); out[..., 0::2] = ...``) runs on the active tokens:
    over dense, partial shared and partial per-row steps the module equals the hand-written RAS."""
    torch.manual_seed(1)
    model = TinyDiT("rope").eval()
    ras, oracle = rasfx.transform(model), TinyOracle(model)
    n, b = 12, 2
    g = torch.Generator().manual_seed(0)
    deviation = 0.0  # from the dense model: shows that the comparison with the oracle can fail
    with torch.no_grad():
        for step, idx in enumerate(_index_schedule(n, b, steps=7, seed=3)):
            x = torch.randn(b, n, 4, generator=g)
            ras.set_active(idx)
            got, want = ras(hidden_states=x), oracle(x, idx)
            assert ras.last_forward_dense == (idx is None)
            assert torch.isfinite(got).all()
            assert rel(got, want) <= 1e-5, f"step {step} ({None if idx is None else tuple(idx.shape)})"
            deviation = max(deviation, rel(got, model(hidden_states=x)))
        assert deviation > 1e-2
        ras.set_active(torch.arange(n))
        x = torch.randn(b, n, 4, generator=g)
        assert rel(ras(hidden_states=x), model(hidden_states=x)) <= 1e-6  # all active == dense model
    cc = ras.captures()[0]
    assert cc.counters["sites_attention"] == 2 and not cc.plan.conservative


# ============================================================================== input signatures


def _first(out):
    return out[0]  # a tuple (return_dict=False) or a diffusers output object (indexable the same way)


def _switch_and_back(ras, model, kw_a, kw_b, idx_a, idx_b, kw_b2):
    """A (sparse, caches warm) -> B -> B sparse -> A. B and the return to A start dense and equal
    the model; B is captured unless its signature was seen before; A's capture is reused; the
    sparse step at B equals the hand-written RAS fed the same inputs (no state crosses over)."""
    ras.reset()
    sig_b = input_signature(model, kw_b)
    b_known = any(cc.capture.signature == sig_b for cc in ras.captures())
    with torch.no_grad():
        ras(**kw_a)
        ras.set_active(idx_a)
        ras(**kw_a)
        assert not ras.last_forward_dense
        before = {id(cc) for cc in ras.captures()}
        cc_a = ras._current_capture()
        with pytest.warns(UserWarning, match="signature changed"):
            out = ras(**kw_b)
        assert ras.last_forward_dense, "a new input signature must start dense"
        assert type(out) is type(model(**kw_b))
        assert rel(_first(out), _first(model(**kw_b))) <= 1e-6
        cc_b = ras._current_capture()
        assert cc_b is not cc_a and cc_b.capture.signature == sig_b
        assert (id(cc_b) in before) == b_known, "captured iff the signature is new"

        ras.set_active(idx_b)
        got = _first(ras(**kw_b2))
        assert not ras.last_forward_dense
        ref = HandRAS(model)
        ref(None, **kw_b)
        assert rel(got, ref(idx_b, **kw_b2)) <= 1e-5

        n_captures = len(ras.captures())
        ras.set_active(None)
        out = ras(**kw_a)  # index already dropped: no warning needed, still dense
        assert ras.last_forward_dense and rel(_first(out), _first(model(**kw_a))) <= 1e-6
        assert ras._current_capture() is cc_a and len(ras.captures()) == n_captures, "A's capture is reused"


SIGNATURE_CHANGES = {
    # name: (kw_a, kw_b, idx_a, idx_b)
    "resolution": (kw_sd3(2, 8, 8), kw_sd3(2, 8, 12), torch.arange(5), torch.tensor([0, 7, 23, 11])),
    # 24 tokens either way: the grid differs, the token count does not
    "aspect_ratio": (kw_sd3(2, 8, 12), kw_sd3(2, 12, 8), torch.arange(6), torch.tensor([3, 2, 20])),
    "batch_size": (kw_sd3(2, 8, 8), kw_sd3(1, 8, 8), torch.stack([torch.arange(4), torch.arange(4, 8)]),
                   torch.tensor([[1, 9, 15]])),
    "optional_list_input_given": (kw_sd3(2, 8, 8), kw_sd3(2, 8, 8, skip_layers=[1]), torch.arange(4),
                                  torch.tensor([2, 3, 12])),
    "optional_flag_omitted": (kw_sd3(2, 8, 8), {k: v for k, v in kw_sd3(2, 8, 8).items() if k != "return_dict"},
                              torch.arange(4), torch.tensor([5, 0])),
}


@pytest.mark.parametrize("change", list(SIGNATURE_CHANGES))
def test_signature_change_recaptures_starts_dense_and_is_exact(change, ras, sd3):
    kw_a, kw_b, idx_a, idx_b = SIGNATURE_CHANGES[change]
    kw_b2 = {k: (v + 0.5 if k == "hidden_states" else v) for k, v in kw_b.items()}
    _switch_and_back(ras, sd3, kw_a, kw_b, idx_a, idx_b, kw_b2)
    # coming back to B later reuses its capture
    n = len(ras.captures())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ras(**kw_b)
    assert len(ras.captures()) == n and ras.last_forward_dense


def test_dtype_change_recaptures_starts_dense_and_is_exact():
    """float32 -> float64 (the model converted with .double(): the module reads its parameters live)."""
    torch.manual_seed(5)
    model = TinyDiT("rope").eval()
    ras = rasfx.transform(model)
    x32 = torch.randn(2, 12, 4)
    with torch.no_grad():
        ras(hidden_states=x32)
        ras.set_active(torch.arange(5))
        ras(hidden_states=x32)
        assert not ras.last_forward_dense
        model.double()
        x64 = x32.double()
        with pytest.warns(UserWarning, match="signature changed"):
            out = ras(hidden_states=x64)
        assert out.dtype == torch.float64 and ras.last_forward_dense and len(ras.captures()) == 2
        assert rel(out, model(hidden_states=x64)) <= 1e-12
        assert all(c.dtype == torch.float64 for c in ras._slot.caches)
        oracle = TinyOracle(model)
        oracle(x64)
        for idx in (torch.tensor([0, 3, 9]), torch.stack([torch.arange(4), torch.arange(4, 8)])):
            x64 = x64 * 0.5 + 0.1
            ras.set_active(idx)
            got = ras(hidden_states=x64)
            assert not ras.last_forward_dense and got.dtype == torch.float64
            assert rel(got, oracle(x64, idx)) <= 1e-12


@pytest.mark.gpu
def test_device_change_recaptures_starts_dense_and_is_exact(sd3):
    model = copy.deepcopy(sd3)
    ras = rasfx.transform(model)
    kw = kw_sd3(2, 8, 8)
    with torch.no_grad():
        ras(**kw)
        ras.set_active(torch.arange(5))
        ras(**kw)
        model.cuda()
        kwc = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kw.items()}
        with pytest.warns(UserWarning, match="signature changed"):
            out = ras(**kwc)[0]
        assert out.is_cuda and ras.last_forward_dense and len(ras.captures()) == 2
        assert rel(out, model(**kwc)[0]) <= 1e-5
        assert all(c.is_cuda for c in ras._slot.caches)
        with pytest.raises(rasfx.InvalidIndexError, match="move it with .to()"):
            ras.set_active(torch.arange(3))  # a CPU index for a CUDA model
        idx = torch.tensor([0, 3, 9], device="cuda")
        ras.set_active(idx)
        got = ras(**kwc)[0]
        ref = HandRAS(model)
        ref(None, **kwc)
        assert not ras.last_forward_dense and rel(got, ref(idx, **kwc)) <= 1e-4


def test_lru_eviction_recaptures_and_stays_exact():
    """max_captures=1: a second signature evicts the first; coming back captures it again, starts
    dense and equals the model."""
    torch.manual_seed(2)
    model = TinyDiT("rope").eval()
    ras = rasfx.transform(model, rasfx.TransformConfig(max_captures=1))
    a, b = torch.randn(2, 12, 4), torch.randn(2, 16, 4)
    with torch.no_grad():
        ras(hidden_states=a)
        first = ras.captures()[0]
        ras(hidden_states=b)
        assert len(ras.captures()) == 1 and ras.captures()[0] is not first
        ras.set_active(torch.arange(3))
        with pytest.warns(UserWarning, match="signature changed"):
            out = ras(hidden_states=a)
        assert ras.last_forward_dense and len(ras.captures()) == 1 and ras.captures()[0] is not first
        assert rel(out, model(hidden_states=a)) <= 1e-6
        assert len(ras._resolvers) == 1
        ras.set_active(torch.tensor([4, 0, 7]))
        oracle = TinyOracle(model)
        oracle(a)
        assert rel(ras(hidden_states=a * 2), oracle(a * 2, torch.tensor([4, 0, 7]))) <= 1e-5


# ============================================================================== bad input: configs

NAN, INF = float("nan"), float("inf")
BAD_CONFIGS = [
    ("ratio", 0), ("ratio", 0.0), ("ratio", 1.5), ("ratio", -1), ("ratio", NAN), ("ratio", INF), ("ratio", "0.5"),
    ("ratio", True), ("ratio", None),
    ("metric", "unknown"), ("metric", "STD"), ("metric", None),
    ("starvation_scale", -0.1), ("starvation_scale", NAN), ("starvation_scale", INF),
    ("warmup", 0), ("warmup", -1), ("warmup", 1.5), ("warmup", True), ("warmup", "4"),
    ("reset_steps", (-1,)), ("reset_steps", (3, -2)), ("reset_steps", (1.5,)), ("reset_steps", (True,)),
    ("reset_steps", "12"), ("reset_steps", 12),
    ("schedule", "linear"),
    ("dynamic_range", 1.0), ("dynamic_range", -0.1), ("dynamic_range", NAN),
    ("high_ratio", 1.5), ("high_ratio", -0.1), ("high_ratio", NAN),
    ("round_to", 0), ("round_to", -4), ("round_to", 2.0),
    ("seed", 1.5), ("seed", None),
]


@pytest.mark.parametrize("field, value", BAD_CONFIGS, ids=[f"{f}={v!r}" for f, v in BAD_CONFIGS])
def test_invalid_config_values_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError) as e:
        rasfx.RASConfig(**{field: value})
    assert isinstance(e.value, rasfx.ConfigError)
    assert f"RASConfig.{field}" in str(e.value) and repr(value) in str(e.value)
    with pytest.raises(rasfx.ConfigError, match=f"RASConfig.{field}"):  # replace() validates again
        rasfx.RASConfig().replace(**{field: value})


def test_valid_config_edge_values_are_accepted_and_normalised():
    cfg = rasfx.RASConfig(ratio=1, warmup=np.int64(1), reset_steps=[5, 2, 5], round_to=1, high_ratio=0,
                          dynamic_range=0, starvation_scale=0, seed=np.int32(3))
    assert cfg.ratio == 1.0 and isinstance(cfg.ratio, float)
    assert cfg.warmup == 1 and type(cfg.warmup) is int and cfg.seed == 3 and type(cfg.seed) is int
    assert cfg.reset_steps == (2, 5)
    assert rasfx.RASConfig(ratio=1e-9).ratio == 1e-9 and rasfx.RASConfig(reset_steps=()).reset_steps == ()


def test_reset_steps_beyond_the_run_raise_at_run_time_naming_the_field():
    cfg = rasfx.RASConfig(reset_steps=(3, 8))
    assert len(step_kinds(cfg, 9)) == 9  # fits a 9-step run
    with pytest.raises(ValueError) as e:
        step_kinds(cfg, 8)
    assert isinstance(e.value, rasfx.ConfigError)
    assert "RASConfig.reset_steps" in str(e.value) and "8-step run" in str(e.value) and "[8]" in str(e.value)
    with pytest.raises(ValueError, match="number of denoising steps"):
        step_kinds(cfg, 0)


def test_warmup_longer_than_the_run_is_all_dense_not_an_error():
    """Documented behaviour (not an error): warm-up covers the whole run, every step is dense."""
    assert step_kinds(rasfx.RASConfig(warmup=50, reset_steps=()), 6) == (False,) * 6


BAD_TRANSFORM_CONFIGS = [
    ("max_captures", 0), ("max_captures", -1), ("max_captures", 1.5), ("mode", "fast"), ("mode", None),
    ("fuse", "yes"), ("fuse", None), ("image_input", ""), ("image_input", 3),
]


@pytest.mark.parametrize("field, value", BAD_TRANSFORM_CONFIGS, ids=[f"{f}={v!r}" for f, v in BAD_TRANSFORM_CONFIGS])
def test_invalid_transform_config_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError) as e:
        rasfx.TransformConfig(**{field: value})
    assert isinstance(e.value, rasfx.ConfigError) and field in str(e.value)


# ============================================================================== bad input: active indices

N_TOK = 16  # kw_sd3(2, 8, 8): a 4 x 4 token grid, batch 2
GOOD = torch.tensor([1, 6, 11, 12])
BAD_INDICES = {
    "out_of_range_high": (torch.tensor([0, N_TOK]), "out of range"),
    "out_of_range_negative": (torch.tensor([-1, 3]), "out of range"),
    "too_many_entries": (torch.arange(N_TOK + 1), "out of range"),
    "duplicated": (torch.tensor([2, 5, 2]), "duplicate"),
    "duplicated_in_one_row": (torch.tensor([[0, 1], [3, 3]]), "duplicate"),
    "float": (torch.arange(3).float(), "integer dtype"),
    "bool_mask": (torch.zeros(N_TOK, dtype=torch.bool), "integer dtype"),
    "scalar": (torch.tensor(3), r"\[n\] or \[B, n\]"),
    "rank_3": (torch.zeros(2, 2, 2, dtype=torch.long), r"\[n\] or \[B, n\]"),
    "empty": (torch.zeros(0, dtype=torch.long), "empty"),
    "meta_device": (torch.arange(3, device="meta"), "on meta, the model on cpu"),
    "python_list": ([0, 1], "torch.Tensor"),
}


def _slot_snapshot(ras):
    slot = ras._slot
    return dict(
        index=None if slot.index is None else slot.index.clone(),
        caches=[c.clone() for c in slot.caches],
        cache_ids=[id(c) for c in slot.caches],
        cache_bytes=ras.cache_bytes(),
        signature=slot.signature,
        forwards=slot.forwards,
        captures=len(ras.captures()),
    )


def _assert_same_state(a, b):
    assert (a["index"] is None) == (b["index"] is None)
    if a["index"] is not None:
        assert torch.equal(a["index"], b["index"]), "the active set changed"
    assert a["cache_ids"] == b["cache_ids"] and all(torch.equal(x, y) for x, y in zip(a["caches"], b["caches"]))
    for key in ("cache_bytes", "signature", "forwards", "captures"):
        assert a[key] == b[key], key


def _warm(ras, kw):
    ras.reset()
    ras(**kw)
    ras.set_active(GOOD)
    ras(**kw)
    assert not ras.last_forward_dense


@pytest.fixture(scope="module")
def control(ras):
    """Output of the step after ``_warm`` with GOOD, without any bad call in between."""
    with torch.no_grad():
        _warm(ras, kw_sd3(2, 8, 8, seed=0))
        return ras(**kw_sd3(2, 8, 8, seed=1))[0]


@pytest.mark.parametrize("case", list(BAD_INDICES))
def test_invalid_index_rejected_before_any_state_changes(case, ras, control):
    bad, match = BAD_INDICES[case]
    with torch.no_grad():
        _warm(ras, kw_sd3(2, 8, 8, seed=0))
        before = _slot_snapshot(ras)
        with pytest.raises(rasfx.InvalidIndexError, match=match) as e:
            ras.set_active(bad)
        assert isinstance(e.value, ValueError)
        _assert_same_state(before, _slot_snapshot(ras))
        out = ras(**kw_sd3(2, 8, 8, seed=1))[0]  # the module goes on as if nothing happened
    assert not ras.last_forward_dense and same(out, control)


def test_per_row_index_with_wrong_batch_rejected_by_set_active(ras):
    with torch.no_grad():
        _warm(ras, kw_sd3(2, 8, 8, seed=0))
        before = _slot_snapshot(ras)
        with pytest.raises(rasfx.InvalidIndexError, match="rows"):
            ras.set_active(torch.stack([GOOD] * 3))
        _assert_same_state(before, _slot_snapshot(ras))


def test_accepted_index_forms_are_equivalent(ras, control):
    """int32 / uint8 / unsorted indices mean the same shared set; a per-row index with equal rows
    (contiguous or not) runs the rowwise graph and gives the same result up to rounding."""
    with torch.no_grad():
        for form in (GOOD.to(torch.int32), GOOD.to(torch.uint8), GOOD.flip(0)):
            _warm(ras, kw_sd3(2, 8, 8, seed=0))
            ras.set_active(form)
            assert same(ras(**kw_sd3(2, 8, 8, seed=1))[0], control)
        for form in (torch.stack([GOOD] * 2), torch.stack([GOOD, GOOD], 1).t()):
            _warm(ras, kw_sd3(2, 8, 8, seed=0))
            ras.set_active(form)
            assert rel(ras(**kw_sd3(2, 8, 8, seed=1))[0], control) <= 1e-6


# ============================================================================== state: isolation


def test_transformed_models_never_share_caches(ras, ras_other, sd3):
    """Two models, and two transforms of one model, interleaved step by step: each equals its own
    run alone."""
    mods = {"a": ras, "b": ras_other, "a2": rasfx.transform(sd3)}
    schedules = {name: _index_schedule(N_TOK, 2, steps=6, seed=s) for s, name in enumerate(mods)}
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


# ------------------------------------------------------------------------------ tiny pipelines


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


def _run_threads(jobs):
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


def test_threads_with_their_own_pipelines_match_running_alone(reference_images):
    a, kwa = pipe_of("p0")
    b, kwb = pipe_of("p1")
    with rasfx.enabled(a, CFG, transform=cached_transform), rasfx.enabled(b, CFG, transform=cached_transform):
        for pipe, kw in ((a, kwa), (b, kwb)):
            generate(pipe, kw)  # captured before the threads start (see the cold-start xfail below)
        solo_b = [generate(b, kwb, seed=s) for s in range(2)]
        got_a, got_b = _run_threads([lambda: [generate(a, kwa, seed=s) for s in range(2)],
                                     lambda: [generate(b, kwb, seed=s) for s in range(2)]])
    assert same(got_a[0], reference_images["ras"])
    assert all(same(x, y) for x, y in zip(got_b, solo_b))
    assert not same(got_a[1], got_a[0])


def test_threads_with_their_own_transformed_models_match_running_alone(ras, ras_other):
    mods = [ras, ras_other]
    schedule = _index_schedule(N_TOK, 2, steps=8, seed=5)
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
        got = _run_threads([lambda: run(mods[0]), lambda: run(mods[1])])
        for g, w in zip(got, alone):
            assert all(same(x, y) for x, y in zip(g, w))


_CONCURRENT_CAPTURE_SCRIPT = r"""
import sys, threading
import torch
import torch.nn.functional as F
import rasfx

torch.set_num_threads(1)


class Dit(torch.nn.Module):  # packed tokens -> embedding -> attention -> output
    def __init__(self):
        super().__init__()
        self.embed, self.qkv, self.out = torch.nn.Linear(4, 8), torch.nn.Linear(8, 24), torch.nn.Linear(8, 4)

    def forward(self, hidden_states):
        h = self.embed(hidden_states)
        q, k, v = (t.view(*t.shape[:2], 2, 4).transpose(1, 2) for t in self.qkv(h).chunk(3, -1))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.out(h + a)


events = [threading.Event(), threading.Event()]


def meet(who):  # both threads wait for each other inside their first capture (or go on after 3 s)
    def pre_hook(module, args):
        if torch.compiler.is_exporting() and not events[who].is_set():
            events[who].set()
            events[1 - who].wait(timeout=3.0)
    return pre_hook


torch.manual_seed(0)
models = [Dit().eval(), Dit().eval()]
x = torch.randn(2, 12, 4)
alone = [m(hidden_states=x) for m in models]
for who, m in enumerate(models):
    m.embed.register_forward_pre_hook(meet(who))
mods = [rasfx.transform(m) for m in models]
results, errors = [None, None], []
barrier = threading.Barrier(2)


def work(i):
    try:
        barrier.wait(timeout=60)
        with torch.no_grad():
            results[i] = mods[i](hidden_states=x)
    except BaseException as e:
        errors.append(f"{type(e).__name__}: {e}")


threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join(timeout=120)
if errors:
    print("ERROR", errors[0][:400])
    sys.exit(1)
bad = [i for i in range(2) if not torch.allclose(results[i], alone[i], rtol=1e-5, atol=1e-6)]
print("MISMATCH" if bad else "OK", bad)
sys.exit(1 if bad else 0)
"""


def test_threads_capturing_at_the_same_time_match_running_alone():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _CONCURRENT_CAPTURE_SCRIPT], capture_output=True, text=True,
                          check=False, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, (proc.stdout + proc.stderr)[-2000:]


# ============================================================================== state: exceptions


class _Boom(RuntimeError):
    pass


def _raise_at(step):
    def callback(pipe, i, t, kwargs):
        if i == step:
            raise _Boom(f"stop at step {i}")
        return {}

    return callback


def _cache_refs(ras):
    refs = [weakref.ref(c) for s in ras._slots.values() for b in s.buffers.values() for c in b.caches]
    assert refs, "expected live caches"
    return refs


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
        refs = _cache_refs(ras)
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


# ============================================================================== state: memory


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
        refs, ptrs, nbytes = _cache_refs(ras), [r().data_ptr() for r in _cache_refs(ras)], ras.cache_bytes()
        ras.reset()
        assert [r().data_ptr() for r in refs] == ptrs and ras.cache_bytes() == nbytes > 0
        for slot in ("cond", "uncond"):
            with ras.cache_context(slot):
                ras.set_active(GOOD)  # an active set before the first forward of an image: it runs dense
                assert same(ras(**kw_sd3(2, 8, 8, seed=2))[0], sd3(**kw_sd3(2, 8, 8, seed=2))[0])
                assert ras.last_forward_dense
                out = ras(**kw_sd3(2, 8, 8, seed=3))[0]
                assert not ras.last_forward_dense
        assert [r().data_ptr() for r in _cache_refs(ras)] == ptrs
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
        refs = _cache_refs(ras)
        expected = sum(r().numel() * r().element_size() for r in refs)
        assert ras.cache_bytes() == expected > 0
        captures = ras.captures()
        ras.release()
    assert ras.cache_bytes() == 0 and ras._slots == {} and ras.captures() == captures
    assert all(r() is None for r in refs), "a cache tensor outlived release() (freed at once, no gc needed)"
    with torch.no_grad():
        ras(**kw_sd3(2, 8, 8))
    assert ras.last_forward_dense and ras.captures() == captures  # nothing captured again


def test_caches_survive_runs_and_release_frees_them_while_enabled():
    """A finished run keeps its caches for the next image (same storage, nothing allocated or
    captured again); rasfx.release(pipe) frees them and keeps the pipeline enabled."""
    pipe, kw = pipe_of("p0")
    ptrs, refs = [], []

    def grab(p, i, t, kwargs):
        if i == 2:
            refs.extend(_cache_refs(ras_of(p)))
            ptrs.append(sorted(r().data_ptr() for r in _cache_refs(ras_of(p))))
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


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on some torch objects warns about deprecations
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _real_tensor_level() -> tuple[int, int]:
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


def test_disable_returns_memory_to_the_level_before_enable():
    """rasfx.disable drops the RASModule with its captures, graph variants and caches: no tensor
    that rasfx created stays alive."""
    pipe, kw = pipe_of("p1")
    generate(pipe, kw)  # the plain pipeline's own lazily created state exists before the baseline
    level = _real_tensor_level()
    caches, graphs = [], []

    def grab(p, i, t, kwargs):
        if i == 2:
            ras = ras_of(p)
            caches.extend(_cache_refs(ras))
            graphs.append(weakref.ref(ras))
            graphs.extend(weakref.ref(v.gm) for cc in ras.captures() for v in cc.variants.values())
        return {}

    rasfx.enable(pipe, CFG)  # the default transform: a RASModule only this pipeline holds
    generate(pipe, kw, callback_on_step_end=grab)
    assert _real_tensor_level()[1] > level[1]
    rasfx.disable(pipe)
    rp._LAST_STATS.pop(pipe, None)  # the last run's stats are kept on purpose (a few small tensors)
    assert caches and all(r() is None for r in caches), "caches must be freed at once (no cycle holds them)"
    gc.collect()  # the module and its graphs form reference cycles: freed by the cycle collector
    assert len(graphs) > 2 and all(r() is None for r in graphs), "a RASModule or graph outlived disable()"
    after = _real_tensor_level()
    # "<=": garbage of earlier tests may be collected meanwhile; nothing rasfx made may remain
    assert after[0] <= level[0] and after[1] <= level[1], f"live CPU tensors (count, bytes): {level} -> {after}"


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


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
        before, tensors, rss = state(), _live_tensors(), _rss_bytes()
        for _ in range(100):  # 100 cycles x 2 slots x 5 sets = 1,000 steps
            out = cycle()
        assert torch.isfinite(out).all()
        assert rel(out, model(hidden_states=x)) <= 1e-6  # the last step is all-active: still the model's
        assert state() == before
        assert _live_tensors() <= tensors + 2  # no per-step tensor is kept alive
        if rss:
            assert _rss_bytes() - rss < 64 * 2**20
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


# ============================================================================== torch.compile


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


def _opcheck_cases():
    b, h, n, d = 2, 2, 6, 4

    def heads_view(length):  # [B, H, L, D] as a transposed view of [B, L, H, D], like diffusers
        return torch.randn(b, length, h, d).transpose(1, 2)

    kc, vc = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    idx = torch.tensor([4, 1])
    return {
        "ras_attention_dense": (torch.ops.rasfx.ras_attention.default,
                                (heads_view(n), heads_view(n), heads_view(n), kc, vc, None)),
        "ras_attention_shared": (torch.ops.rasfx.ras_attention.default,
                                 (heads_view(2), heads_view(2), heads_view(2), kc, vc, idx)),
        "ras_attention_rowwise": (torch.ops.rasfx.ras_attention.default,
                                  (heads_view(2), heads_view(2), heads_view(2), kc, vc, torch.stack([idx, idx + 1]))),
        "cache_write_shared": (torch.ops.rasfx.cache_write_.default,
                               (torch.randn(b, n, 3), torch.randn(b, 2, 3), idx, 1)),
        "cache_write_rowwise": (torch.ops.rasfx.cache_write_.default,
                                (torch.randn(b, n, 3), torch.randn(b, 2, 3), torch.stack([idx, idx + 1]), 1)),
    }


@pytest.mark.parametrize("case", [
    "ras_attention_dense", "ras_attention_shared", "ras_attention_rowwise",
    "cache_write_shared", "cache_write_rowwise",
])
def test_custom_ops_fake_kernels_match_real_ones(case):
    """torch.library.opcheck: schema, fake kernel (shapes, dtypes, strides), mutations declared."""
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


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


# ============================================================================== saving and loading


def test_state_dict_is_the_models_without_caches(ras, sd3, tmp_path):
    with torch.no_grad():
        _warm(ras, kw_sd3(2, 8, 8))
        with ras.cache_context("uncond"):
            ras(**kw_sd3(2, 8, 8))
    assert ras.cache_bytes() > 0  # caches are live while the state dict is taken
    sd, ref = ras.state_dict(), sd3.state_dict()
    assert list(sd) == list(ref)
    assert all(sd[k] is ref[k] or (torch.equal(sd[k], ref[k]) and sd[k].data_ptr() == ref[k].data_ptr()) for k in ref)
    assert not any("ras" in k or "cache" in k for k in sd)
    assert {k.removeprefix("model.") for k, _ in ras.named_buffers()} == {k for k, _ in sd3.named_buffers()}
    assert sum(p.numel() for p in ras.parameters()) == sum(p.numel() for p in sd3.parameters())
    # round trip through a file into a fresh model with other weights
    torch.save(sd, tmp_path / "sd.pt")
    fresh = make_sd3_tiny(7)
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt"))
    kw = kw_sd3(1, 8, 8, seed=3)
    with torch.no_grad():
        assert same(fresh(**kw)[0], sd3(**kw)[0])
        # load_state_dict of the transformed module loads into the model; the next forward uses it
        other = make_sd3_tiny(8)
        ras_other = rasfx.transform(other)
        ras_other.load_state_dict(sd)
        assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), ref.values()))


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


# ============================================================================== silent staleness (known bugs)


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


@pytest.mark.parametrize("change", ["replace_submodule", "swap_attention_processor"])
def test_model_changed_after_capture_is_followed(change):
    """A replaced submodule (what a LoRA/peft layer does) or a swapped attention processor is
    seen at the next forward: RASWarning, the captures are dropped, that forward is dense and
    equals the changed model; the following partial steps equal a fresh transform of it."""
    model = make_sd3_tiny(0, num_layers=1)
    ras = rasfx.transform(model)
    kw, kw2 = kw_sd3(1, 8, 8), kw_sd3(1, 8, 8, seed=1)
    idx = torch.tensor([0, 3, 5, 9, 14])
    with torch.no_grad():
        ras(**kw)
        ras.set_active(idx)
        ras(**kw2)  # live caches of the old model
        if change == "replace_submodule":
            torch.manual_seed(1)
            model.proj_out = torch.nn.Linear(model.proj_out.in_features, model.proj_out.out_features)
        else:
            attn = model.transformer_blocks[0].attn
            inner = attn.processor

            class Halved:
                def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
                    out = inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)
                    return tuple(o * 0.5 for o in out) if isinstance(out, tuple) else out * 0.5

            attn.set_processor(Halved())
        want = model(**kw)[0]
        with pytest.warns(rasfx.RASWarning, match="changed since it was captured"):
            got = ras(**kw)[0]
        assert ras.last_forward_dense and rel(got, want) <= 1e-6
        fresh = rasfx.transform(model)
        fresh(**kw)
        for m in (ras, fresh):
            m.set_active(idx)
        assert rel(ras(**kw2)[0], fresh(**kw2)[0]) <= 1e-6 and not ras.last_forward_dense
        assert rel(ras(**kw2)[0], model(**kw2)[0]) > 1e-3  # a real partial step, not the dense output


def test_unchanged_model_is_not_recaptured_when_other_modules_are_built():
    """Building modules elsewhere in the process (which bumps rasfx's registration counter) does
    not look like a change: no warning, the capture and the caches are kept."""
    model = make_sd3_tiny(0, num_layers=1)
    ras = rasfx.transform(model)
    with torch.no_grad():
        ras(**kw_sd3(1, 8, 8))
        captured = ras.captures()
        make_sd3_tiny(1, num_layers=1)  # registers many submodules, none in `model`
        ras.set_active(torch.tensor([1, 2, 3]))
        with warnings.catch_warnings():
            warnings.simplefilter("error", rasfx.RASWarning)
            ras(**kw_sd3(1, 8, 8, seed=1))
    assert not ras.last_forward_dense and ras.captures() == captured


def test_reset_with_captures_drops_the_graphs():
    model = make_sd3_tiny(0, num_layers=1)
    ras = rasfx.transform(model)
    with torch.no_grad():
        ras(**kw_sd3(1, 8, 8))
        assert len(ras.captures()) == 1 and ras.cache_bytes() > 0
        ras.reset()
        assert len(ras.captures()) == 1 and ras.cache_bytes() > 0
        ras.reset(captures=True)
        assert ras.captures() == [] and ras.cache_bytes() == 0
        assert same(ras(**kw_sd3(1, 8, 8))[0], model(**kw_sd3(1, 8, 8))[0])


def test_single_image_token_runs_dense_instead_of_crashing():
    pipe, kw = build_sd3_pipe(0)
    kw = dict(kw, height=4, width=4)
    plain = generate(pipe, kw)
    with rasfx.enabled(pipe, CFG, transform=cached_transform), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", rasfx.RASWarning)
        assert same(generate(pipe, kw), plain)
    assert any("single token" in str(w.message) for w in seen)


def test_single_image_token_module_runs_the_plain_model():
    model = make_sd3_tiny(0, num_layers=1)
    ras = rasfx.transform(model)
    kw = kw_sd3(1, 2, 2)  # a 2 x 2 latent, patch 2: one token
    with torch.no_grad(), pytest.warns(rasfx.RASWarning, match="single token"):
        out = ras(**kw)[0]
    assert same(out, model(**kw)[0]) and ras.last_forward_dense
    assert ras.num_image_tokens == 1 and ras.captures() == []
    with pytest.raises(rasfx.UnsupportedModelError, match="single token"):
        ras.token_map()
    with torch.no_grad():
        ras.set_active(torch.tensor([0]))
        assert same(ras(**kw)[0], model(**kw)[0])  # still dense, no second warning needed
        ras(**kw_sd3(1, 8, 8))  # another resolution is captured as usual
    assert len(ras.captures()) == 1


def test_export_failure_message_names_the_cause():
    """A capture failure that is not data-dependent control flow does not claim it is."""

    class Holder:
        pass

    class ReturnsObject(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, hidden_states):
            out = Holder()
            out.x = self.lin(hidden_states)
            return out

    with pytest.raises(rasfx.CaptureError) as e:
        rasfx.transform(ReturnsObject())(hidden_states=torch.randn(1, 16, 4))
    msg = str(e.value)
    assert "Holder" in msg and "torch.export.export" in msg and "data-dependent" not in msg
    assert not torch.compiler.is_exporting()


# ============================================================================== fuzzing

FUZZ_EXAMPLES = int(os.environ.get("RASFX_FUZZ_EXAMPLES", "0"))


@st.composite
def dit_cases(draw):
    heads = draw(st.integers(1, 2))
    head_dim = draw(st.sampled_from([4, 8] if heads == 1 else [4, 6, 8]))  # sincos pos-embed: inner dim % 4 == 0
    patch = draw(st.sampled_from([1, 2]))
    sizes = [2, 4, 6, 8] if patch == 2 else [2, 3, 4, 6]
    cfg = dict(
        num_layers=draw(st.integers(1, 2)), num_attention_heads=heads, attention_head_dim=head_dim, patch_size=patch,
        qk_norm=draw(st.sampled_from([None, "rms_norm"])), dual=draw(st.booleans()),
    )
    batch = draw(st.integers(1, 2))
    h, w = draw(st.sampled_from(sizes)), draw(st.sampled_from(sizes))
    n = (h // patch) * (w // patch)
    hypothesis.assume(n >= 2)  # one image token runs the plain model (test_single_image_token_...)
    steps = []
    for _ in range(draw(st.integers(2, 3))):
        kind = draw(st.sampled_from(["dense", "shared", "rowwise"]))
        size = draw(st.integers(1, n))
        steps.append((kind, size))
    return dict(cfg=cfg, batch=batch, h=h, w=w, n=n, text_len=draw(st.integers(1, 6)), steps=steps,
                seed=draw(st.integers(0, 2**16)))


def _fuzz_model(cfg, seed):
    from diffusers import SD3Transformer2DModel
    from reference_ras import _randomize_

    torch.manual_seed(seed)
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    model = SD3Transformer2DModel(
        sample_size=16, in_channels=4, out_channels=4, joint_attention_dim=16, caption_projection_dim=inner,
        pooled_projection_dim=8, pos_embed_max_size=16, dual_attention_layers=(0,) if cfg["dual"] else (),
        **{k: v for k, v in cfg.items() if k != "dual"},
    )
    return _randomize_(model, seed).eval()


@settings(max_examples=FUZZ_EXAMPLES or 4, deadline=None, derandomize=not FUZZ_EXAMPLES, database=None,
          suppress_health_check=list(HealthCheck))
@given(case=dit_cases())
def test_fuzz_random_dits_and_active_sets(case):
    """Random tiny SD3 / SD3.5 configs and active sets: finite, equal to the hand-written RAS on every
    partial step, equal to the model with every token active. ``RASFX_FUZZ_EXAMPLES=N`` explores N
    random examples instead of the fixed ones."""
    model = _fuzz_model(case["cfg"], case["seed"])
    ras, ref = rasfx.transform(model), HandRAS(model)
    b, n = case["batch"], case["n"]
    g = torch.Generator().manual_seed(case["seed"])

    def inputs(step):
        return dict(sd3_inputs(b, case["h"], case["w"], seed=case["seed"] + step, text_len=case["text_len"]),
                    return_dict=False)

    with torch.no_grad():
        kw = inputs(0)
        out = ras(**kw)[0]  # dense: captures
        assert ras.num_image_tokens == n
        assert torch.isfinite(out).all() and rel(out, model(**kw)[0]) <= 1e-5
        ref(None, **kw)
        for step, (kind, size) in enumerate(case["steps"], start=1):
            if kind == "dense":
                idx = None
            elif kind == "shared":
                idx = torch.randperm(n, generator=g)[:size]
            else:
                idx = torch.stack([torch.randperm(n, generator=g)[:size] for _ in range(b)])
            kw = inputs(step)
            ras.set_active(idx)
            out = ras(**kw)[0]
            assert ras.last_forward_dense == (idx is None)
            assert torch.isfinite(out).all(), f"step {step}: non-finite output"
            assert rel(out, ref(idx, **kw)) <= 1e-5, f"step {step} ({kind}, {size} of {n})"
        # 100% ratio: every token active (shared, then per row in a random order) == the model
        for full in (torch.arange(n), torch.stack([torch.randperm(n, generator=g) for _ in range(b)])):
            kw = inputs(99)
            ras.set_active(full)
            out = ras(**kw)[0]
            assert not ras.last_forward_dense
            assert rel(out, model(**kw)[0]) <= 1e-5, "all tokens active must equal the dense model"
