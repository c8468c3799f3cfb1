"""Fuzzing: random tiny SD3 / SD3.5 configs and active sets against the hand-written RAS
(``RASFX_FUZZ_EXAMPLES=N`` explores N random examples instead of the 4 fixed ones).

Every test here can fail: each one compares against the original model, a hand-written RAS
reference (``tests/reference_ras.py``, ``tests/tiny_dit.py``) or a separate run, or checks a
typed error and its message (docs/reliability.md).
"""

from __future__ import annotations

import os

import hypothesis  # the "test" extra
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_ras import HandRAS, sd3_inputs
from state_helpers import rel

import rasfx

# Tiny models: one intra-op thread is much faster than two on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


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
