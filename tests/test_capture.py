"""Which models rasfx captures and which it refuses (rasfx/capture.py, the token analysis and
the planner): U-Nets and models without an image-token sequence, data-dependent control flow,
in-place ops on active tokens, export failures; each refusal names the cause and the fix.

Every test here can fail: each one compares against the original model, a hand-written RAS
reference (``tests/reference_ras.py``, ``tests/tiny_dit.py``) or a separate run, or checks a
typed error and its message (docs/reliability.md).
"""

from __future__ import annotations

import re

import pytest
import torch
from state_helpers import rel
from tiny_dit import TinyDiT, TinyOracle, index_schedule

import rasfx

# Tiny models: one intra-op thread is much faster than two on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


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
    assert re.search(r"at \S+tiny_dit\.py:\d+ \(forward\): h, q, k, v = self\.parts\(hidden_states\)", msg), msg
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
        for step, idx in enumerate(index_schedule(n, b, steps=7, seed=3)):
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
