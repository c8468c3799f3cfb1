"""DiT constructs found by running research code bases as their authors ship them (outside the
repository, see docs/models.md "Code bases tried"), each in a small self-written model checked
against the RAS contract of ``tests/test_constructs.py``."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

import rasfx

from test_constructs import C, P, TOL, _Block, _check_contract, _rel


class ExtraTokenDiT(torch.nn.Module):
    """U-ViT's sequence (``libs/uvit.py``): a class token and a time token made from the ``[B]``
    inputs in front of the image tokens, one learned position table of ``2 + N`` rows built for
    one input size, a long skip (``skip_linear(cat([x, skip]))``), the image rows ``x[:, 2:]``
    unpatchified from ``sqrt(N)``; optionally U-ViT's 3x3 conv over the unpatchified output
    (``conv_out``, its pixel-space configs), or another module there (``final_layer``)."""

    def __init__(self, input_size: int = 8, conv_out: bool = False, final_layer: torch.nn.Module | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Conv2d(4, C, P, stride=P)
        self.label = torch.nn.Embedding(10, C)
        self.pos_embed = torch.nn.Parameter(torch.randn(1, 2 + (input_size // P) ** 2, C) * 0.1)
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(3))
        self.skip_linear = torch.nn.Linear(2 * C, C)
        self.head = torch.nn.Linear(C, P * P * 4)
        self.final_layer = final_layer or (torch.nn.Conv2d(4, 4, 3, padding=1) if conv_out else torch.nn.Identity())

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


def _token_grid(size: int = 8) -> torch.Tensor:
    """The token of each pixel after ExtraTokenDiT's unpatchify: pixel ``(h * P + p, w * P + q)``
    comes from token ``h * (size // P) + w``."""
    cell = torch.arange(size) // P
    return cell[:, None] * (size // P) + cell[None]


def test_a_conv_after_unpatchify_maps_each_position_to_its_token():
    model = ExtraTokenDiT(conv_out=True).eval()
    ras = rasfx.transform(model)
    kw = _extra_token_inputs(0)
    with torch.no_grad():
        want = model(**kw)
        assert _rel(ras(**kw), want) <= TOL
        ras.set_active(torch.arange(0, 16, 3))
        assert _rel(ras(**kw), want) <= TOL  # the conv reads the cached outputs of the other tokens
    line = r"aten.conv2d.default at .*test_constructs_shipped.py:\d+ \(forward\): return self.final_layer\(x\)"
    with pytest.warns(rasfx.RASWarning, match=rf"token map: {line} mixes neighbouring tokens' outputs .*"
                      "each output position is taken as the token at that position") as caught:
        got = ras.token_map()
    assert len([w for w in caught if "token map" in str(w.message)]) == 1
    plain = rasfx.transform(ExtraTokenDiT().eval())
    with torch.no_grad():
        plain(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ras.token_map() is got  # once per capture
        without_conv = plain.token_map()
    assert got.shape == want.shape and torch.equal(got, without_conv)
    assert torch.equal(got, _token_grid().expand(2, 4, 8, 8))
    notes = rasfx.explain(ras).notes
    assert any(re.search(line, n) for n in notes)
    assert not [n for n in rasfx.explain(plain).notes if "token map" in n]


def test_a_pointwise_conv_after_unpatchify_maps_exactly():
    ras = rasfx.transform(ExtraTokenDiT(final_layer=torch.nn.Conv2d(4, 3, 1)).eval())
    with torch.no_grad():
        ras(**_extra_token_inputs(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 1x1 kernel reads one position: nothing approximated
        assert torch.equal(ras.token_map(), _token_grid().expand(2, 3, 8, 8))


class _MixColumns(torch.nn.Module):
    """A matmul over the image's columns (an average of each row): every output pixel reads a
    row of pixels."""

    def forward(self, x):
        return x @ torch.full((x.shape[-1], x.shape[-1]), 1.0 / x.shape[-1])


class _GlobalPool(torch.nn.Module):
    """The image minus its mean over all positions."""

    def forward(self, x):
        return x - x.mean(dim=(2, 3), keepdim=True)


@pytest.mark.parametrize("tail, match", [
    (lambda: torch.nn.Conv2d(4, 4, 3, stride=2, padding=1), r"after the output cache, aten.conv2d\S* at "),
    (_MixColumns, r"after the output cache, aten.(matmul|mm)\S* at "),
    (_GlobalPool, r"the output tail is not a pure data movement"),
])
def test_a_strided_conv_matmul_or_pooling_after_unpatchify_has_no_token_map(tail, match):
    model = ExtraTokenDiT(final_layer=tail()).eval()
    ras = rasfx.transform(model)
    kw = _extra_token_inputs(0)
    with torch.no_grad():
        assert _rel(ras(**kw), model(**kw)) <= TOL
    with pytest.raises(rasfx.UnsupportedModelError, match=rf"token map: {match}"):
        ras.token_map()


def test_the_sampling_loop_runs_ras_steps_through_a_conv_after_unpatchify():
    """The loop of docs/byo-dit.md ("Sample with RAS") on U-ViT's pixel-space ending: the
    sampler's layout comes from the token map, and its RAS steps compute a quarter of the tokens."""
    from rasfx.sampler import PixelLayout, RegionSampler, build_plan, index_for_batch

    model = ExtraTokenDiT(conv_out=True).eval()
    ras = rasfx.transform(model)
    kw = _extra_token_inputs(0)
    steps, x = 8, kw["x"].clone()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", rasfx.RASWarning)  # the token map's note (tested above)
        ras(**kw)
        config = rasfx.RASConfig(ratio=0.25)
        plan = build_plan(config, steps, ras.num_image_tokens)
        layout = PixelLayout.channels_first(ras.token_map()[0, 0], ras.num_image_tokens, channels=4)
        sampler = RegionSampler(config, plan, layout)
        ras.reset()
        sigmas = torch.linspace(1.0, 0.0, steps + 1)
        partial = []
        for i in range(steps):
            active = sampler.active_for(i)
            ras.set_active(None if active is None else index_for_batch(active, 2), check=False)
            v = ras(x, sigmas[i].expand(2) * 1000, kw["y"])
            if active is not None:
                partial.append(int(active.shape[-1]))
                assert not ras.last_forward_dense
            sampler.observe(i, v, ran_dense=active is None)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    assert partial and all(n == 4 for n in partial)  # a quarter of the 16 tokens
    assert int(sampler.computed[0].sum()) == sum(plan.active) < steps * 16
    assert torch.isfinite(x).all()
