"""A boolean mask over a joint text + image sequence whose image part must be resized with the
image, in a small self-written model checked against the RAS contract of ``tests/test_constructs.py``:
QwenImage 2.1 passes ``img_mask [B, T + N / 4]`` (``False`` at the text positions, ``True`` at its
image slots, each standing for 2x2 latent tokens), expands the slots with ``repeat_interleave``
and writes the image tokens into the joint sequence through the expanded mask
(``joint[:, image_pad_mask] = hidden_states``). The second-resolution capture needs the mask's
slots resized with the image (``rasfx.joint_masks``), and the write is replayed as a ``cat`` of
the sequence's pieces (``prompt_values._replay_run_write``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from test_constructs import C, _assert_per_row_sets_exact, _check_contract, _tiny_dit_layers

T = 5  # text length
H, W = 4, 6  # the latent grid: N = 24 packed tokens


class SlotMaskDiT(torch.nn.Module):
    """Packed latents ``[B, N, 8]`` written into a joint ``[text, image]`` sequence at the
    positions of ``img_mask`` expanded by ``slot`` tokens a position (4: QwenImage 2.1's 2x2
    slots; 1: a mask marking each image token); ``img_shapes`` carries the grid as Python ints."""

    def __init__(self, slot: int):
        super().__init__()
        _tiny_dit_layers(self)
        self.img_in = torch.nn.Linear(8, C)
        self.slot = slot

    def forward(self, hidden_states, encoder_hidden_states, timestep, img_shapes, img_mask):
        b = hidden_states.shape[0]
        x, e = self.img_in(hidden_states), self.txt(encoder_hidden_states)
        repeats = torch.where(img_mask, self.slot, 1)[0]
        image_pad_mask = torch.repeat_interleave(img_mask[0], repeats)
        n = math.prod(img_shapes[0][-1])
        joint = torch.cat([e, e.new_zeros(b, n // self.slot, C)], 1).repeat_interleave(repeats, dim=1)
        joint[:, image_pad_mask] = x
        scale, shift = self.t_embed(timestep.view(b, 1, 1)).chunk(2, dim=-1)
        for blk in self.blocks:
            joint = joint + blk.attention(F.layer_norm(joint, (C,)) * (1 + scale) + shift)
            joint = joint + blk.mlp(joint)
        return self.head(joint[:, -n:])


def _inputs(seed: int, slot: int, b: int = 2) -> dict:
    """The text and the mask stay the same between steps (one prompt)."""
    g = torch.Generator().manual_seed(seed)
    fixed = torch.Generator().manual_seed(100)
    mask = torch.cat([torch.zeros(b, T, dtype=torch.bool), torch.ones(b, H * W // slot, dtype=torch.bool)], 1)
    return {"hidden_states": torch.randn(b, H * W, 8, generator=g),
            "encoder_hidden_states": torch.randn(b, T, 8, generator=fixed),
            "timestep": torch.rand(b, generator=g) * 1000, "img_shapes": [[(1, H, W)]] * b, "img_mask": mask}


@pytest.mark.parametrize("slot", [4, 1])
def test_a_mask_over_a_joint_sequence_resized_with_the_image(slot):
    """Dense, partial and per-row active sets reproduce the model; the joint sequence is built
    by ops rasfx runs at full length (the ``repeat_interleave`` by the mask's slots), the rest of
    the blocks on the active tokens."""
    model = SlotMaskDiT(slot).eval()
    ras = _check_contract(model, lambda seed: _inputs(seed, slot), conservative="handled conservatively")
    assert ras.num_image_tokens == H * W
    _assert_per_row_sets_exact(ras, model, _inputs(3, slot))
