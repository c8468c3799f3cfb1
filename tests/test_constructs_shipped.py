"""DiT constructs found by running research code bases as their authors ship them (outside the
repository, see docs/models.md "Code bases tried"), each in a small self-written model checked
against the RAS contract of ``tests/test_constructs.py``."""

from __future__ import annotations

import math

import pytest
import torch

import rasfx

from test_constructs import C, P, TOL, _Block, _check_contract, _rel


class ExtraTokenDiT(torch.nn.Module):
    """U-ViT's sequence (``libs/uvit.py``): a class token and a time token made from the ``[B]``
    inputs in front of the image tokens, one learned position table of ``2 + N`` rows built for
    one input size, a long skip (``skip_linear(cat([x, skip]))``), the image rows ``x[:, 2:]``
    unpatchified from ``sqrt(N)``; optionally U-ViT's 3x3 conv over the unpatchified output."""

    def __init__(self, input_size: int = 8, conv_out: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Conv2d(4, C, P, stride=P)
        self.label = torch.nn.Embedding(10, C)
        self.pos_embed = torch.nn.Parameter(torch.randn(1, 2 + (input_size // P) ** 2, C) * 0.1)
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(3))
        self.skip_linear = torch.nn.Linear(2 * C, C)
        self.head = torch.nn.Linear(C, P * P * 4)
        self.final_layer = torch.nn.Conv2d(4, 4, 3, padding=1) if conv_out else torch.nn.Identity()

    def forward(self, x, timesteps, y):
        x = self.embed(x).flatten(2).transpose(1, 2)
        freqs = torch.exp(-math.log(10000.0) * torch.arange(C // 2, dtype=torch.float32) / (C // 2))
        args = timesteps[:, None].float() * freqs[None]
        time_token = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        x = torch.cat((self.label(y)[:, None], time_token[:, None], x), dim=1) + self.pos_embed
        x = x + self.blocks[0].attention(x)
        skip = x
        x = x + self.blocks[1].attention(x)
        x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.blocks[2].attention(x)
        x = x + self.blocks[2].mlp(x)
        x = self.head(x)[:, 2:]
        side = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], side, side, P, P, 4)
        x = torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], 4, side * P, side * P)
        return self.final_layer(x)


def _extra_token_inputs(seed: int, size: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(2, 4, size, size, generator=g), "timesteps": torch.rand(2, generator=g) * 1000,
            "y": torch.randint(0, 10, (2,), generator=g)}


def test_tokens_the_model_makes_in_front_of_a_table_built_for_one_size():
    model = ExtraTokenDiT().eval()
    with pytest.raises(RuntimeError):
        model(**_extra_token_inputs(0, 12))  # the table fits one size only
    ras = _check_contract(model, _extra_token_inputs)
    assert ras.num_image_tokens == 16
    assert ras.captures()[0].timings.get("analysis_model_resized")
    assert model.pos_embed.shape == (1, 18, C)  # restored


def test_a_conv_after_unpatchify_runs_but_has_no_token_map():
    model = ExtraTokenDiT(conv_out=True).eval()
    ras = rasfx.transform(model)
    kw = _extra_token_inputs(0)
    with torch.no_grad():
        want = model(**kw)
        assert _rel(ras(**kw), want) <= TOL
        ras.set_active(torch.arange(0, 16, 3))
        assert _rel(ras(**kw), want) <= TOL  # the conv reads the cached outputs of the other tokens
    with pytest.raises(rasfx.UnsupportedModelError,
                       match=r"conv2d.* at .*test_constructs_shipped.py:\d+ \(forward\): return self.final_layer"):
        ras.token_map()
