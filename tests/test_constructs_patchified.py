"""An image input the pipeline patchified already (JoyImage Edit Plus: ``[B, P, C, pt, ph, pw]``
with ``P = t * h * w`` tokens and a python ``shape_list`` of ``(t, h, w)`` per sample), in a small
self-written model checked against the RAS contract of ``tests/test_constructs.py``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import rasfx
from rasfx.second_resolution import patchified_candidates, second_resolution_candidates

from test_constructs import C, P, _assert_per_row_sets_exact, _Block, _check_contract

CH = 4  # latent channels


class PatchifiedDiT(torch.nn.Module):
    """Tokens ``[B, N, CH, P, P]`` embedded by a LayerNorm and a Linear over each token's patch
    pixels; sin-cos positions built from the python grid ``shape_list[i] = [(t, h, w)]`` (``t * h * w
    == N``), one table a sample; the output in the input's layout."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(CH * P * P, C)
        self.t_embed = torch.nn.Linear(1, 2 * C)
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(2))
        self.head = torch.nn.Linear(C, CH * P * P)

    @staticmethod
    def _positions(t: int, h: int, w: int) -> torch.Tensor:
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
        freqs = torch.exp(-math.log(100.0) * torch.arange(C // 6 + 1) / (C // 6 + 1))
        angles = grid.reshape(3, -1, 1).float() * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=-1).permute(1, 0, 2).reshape(t * h * w, -1)[:, :C]

    def forward(self, hidden_states, timestep, shape_list):
        b, n = hidden_states.shape[:2]
        x = F.layer_norm(hidden_states.reshape(b, n, -1), (CH * P * P,))
        pos = torch.stack([torch.cat([self._positions(*thw) for thw in shape_list[i]]) for i in range(b)])
        x = self.embed(x) + pos
        scale, shift = self.t_embed(timestep.view(b, 1, 1) / 1000).chunk(2, dim=-1)
        for blk in self.blocks:
            x = x + blk.attention(F.layer_norm(x, (C,)) * (1 + scale) + shift)
            x = x + blk.mlp(x)
        return self.head(x).reshape(b, n, CH, P, P)


def _patchified_inputs(seed: int, b: int = 2, h: int = 4, w: int = 6) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(b, h * w, CH, P, P, generator=g),
            "timestep": torch.rand(b, generator=g) * 1000, "shape_list": [[(1, h, w)] for _ in range(b)]}


def test_a_pre_patchified_input_with_a_python_grid():
    model = PatchifiedDiT().eval()
    kw = _patchified_inputs(0)
    with pytest.raises(RuntimeError):  # the grid must match the tokens
        model(**dict(kw, shape_list=[[(1, 4, 8)]] * 2))
    ras = _check_contract(model, _patchified_inputs)
    assert ras.num_image_tokens == 24
    _assert_per_row_sets_exact(ras, model, kw)


def test_pre_patchified_candidates_come_after_the_others_and_resize_the_grid():
    kw = _patchified_inputs(0)
    patchified = patchified_candidates(kw, "hidden_states")
    # the usual candidates take the trailing (P, P) for the grid; these resize the tokens only
    assert all(new["hidden_states"].shape[1] == 24 for new, _ in second_resolution_candidates(kw, "hidden_states"))
    first, desc = patchified[0]
    n2 = first["hidden_states"].shape[1]
    assert first["hidden_states"].shape[2:] == (CH, P, P) and n2 != 24 and desc == dict(desc, mode="packed", n2=n2)
    assert [math.prod(thw) for sample in first["shape_list"] for thw in sample] == [n2, n2]
    assert desc["resized"].startswith("a pre-patchified sequence (tokens in dim 1) and the grid tuples")
    assert patchified_candidates(_patchified_inputs(0, h=1, w=1), "hidden_states") == []
    assert patchified_candidates({"x": torch.randn(2, 24, C)}, "x") == []  # a packed [B, N, C]: not these


def test_a_pre_patchified_capture_is_named_in_the_second_resolution_errors():
    class Fixed(PatchifiedDiT):
        def forward(self, hidden_states, timestep, shape_list):
            torch._check(hidden_states.shape[1] == 24)  # built for one grid: no second resolution captures
            return super().forward(hidden_states, timestep, shape_list)

    with pytest.raises(rasfx.CaptureError, match=r"N=\d+ with a pre-patchified sequence \(tokens in dim 1\)"):
        rasfx.transform(Fixed().eval())(**_patchified_inputs(0))
