"""One joint sequence ``[text, time, image]`` with its position ids ``[B, S]`` and a square mask
``[B, S, S]`` passed in, as OmniGen's pipeline builds them (``OmniGenCollator``: left-padded text,
positions counting on after the padding, a mask causal over text and time, the image tokens seeing
everything but the padding), in a small self-written model checked against the RAS contract of
``tests/test_constructs.py``. The second-resolution capture must resize both with the image
(``joint_sequence.joint_sequence_candidates``); the RoPE-like table is built from row 0's positions
for every row (OmniGen's ``cat((freqs, freqs), -1)[0]``: ``batch_rows.SHARED_TABLE``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rasfx
from rasfx.joint_sequence import joint_sequence_candidates

from test_constructs import C, HEADS, P, TOL, _assert_per_row_sets_exact, _check_contract, _rel, _tiny_dit_layers

TEXT = 4  # padded text length


class JointSequenceDiT(torch.nn.Module):
    """Text tokens, a time token and the patch tokens in one sequence; the positions of the
    sequence, row 0's taken for all rows, as sin / cos frequencies that scale the queries and keys
    (in the blocks, after the projection: the product runs on the active tokens); the attention
    mask over it turned additive."""

    def __init__(self):
        super().__init__()
        _tiny_dit_layers(self)
        self.time_token = torch.nn.Linear(1, C)
        d = C // HEADS // 2
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(0, d) / d), persistent=False)

    def forward(self, hidden_states, timestep, text, attention_mask, position_ids):
        b, _, h, w = hidden_states.shape
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        n = x.shape[1]
        t = self.time_token(timestep.view(b, 1, 1))
        seq = torch.cat([self.txt(text), t, x], dim=1)
        s = seq.shape[1]
        pos = position_ids.view(-1, s)
        freqs = (self.inv_freq[None, :, None].expand(b, -1, 1) @ pos[:, None, :].float()).transpose(1, 2)
        table = freqs[0]
        rope = torch.cat([table.cos(), table.sin()], dim=-1)  # [S, C / HEADS]
        mask = ((1 - attention_mask) * -1e9).unsqueeze(1)
        scale, shift = self.t_embed(timestep.view(b, 1, 1)).chunk(2, dim=-1)
        for blk in self.blocks:
            y = F.layer_norm(seq, (C,)) * (1 + scale) + shift
            q, k, v = blk.qkv(y).view(b, s, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q * rope, k * rope, v, attn_mask=mask)
            seq = seq + blk.proj(a.transpose(1, 2).reshape(b, s, C))
            seq = seq + blk.mlp(seq)
        x = self.head(seq[:, s - n:]).view(b, h // P, w // P, P, P, 4)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 4, h, w)


def _joint_inputs(lengths: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids and mask of OmniGen's processor for left-padded texts of ``lengths`` tokens
    (``TEXT`` with the padding) and ``n`` image tokens."""
    s = TEXT + 1 + n
    positions, masks = [], []
    for length in lengths:
        pad = TEXT - length
        positions.append(torch.cat([torch.zeros(pad, dtype=torch.long), torch.arange(length + 1 + n)]))
        m = torch.zeros(s, s)
        m[:pad] = 1.0  # padding rows see everything (their outputs are not read)
        m[pad:TEXT + 1, pad:TEXT + 1] = torch.tril(torch.ones(length + 1, length + 1))  # causal text and time
        m[TEXT + 1:, pad:] = 1.0  # image tokens: everything but the padding
        masks.append(m)
    return torch.stack(positions), torch.stack(masks)


def _inputs(seed: int, b: int = 2, h: int = 8, w: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    fixed = torch.Generator().manual_seed(100)
    position_ids, mask = _joint_inputs([TEXT, 2][:b] + [3] * max(0, b - 2), (h // P) * (w // P))
    return {"hidden_states": torch.randn(b, 4, h, w, generator=g), "timestep": torch.rand(b, generator=g),
            "text": torch.randn(b, TEXT, 8, generator=fixed), "attention_mask": mask, "position_ids": position_ids}


def test_the_inputs_follow_the_image_as_the_processor_builds_them():
    """The candidates resize the position ids and the mask as the processor builds them at the other size."""
    kw = _inputs(0)
    candidates = joint_sequence_candidates(kw, "hidden_states")
    assert candidates
    for new, desc in candidates:
        h2, w2 = desc["hw2"]
        n2 = (h2 // P) * (w2 // P)
        if new["position_ids"].shape[1] != TEXT + 1 + n2:
            continue  # a guess at another patch size
        want_pos, want_mask = _joint_inputs([TEXT, 2], n2)
        assert torch.equal(new["position_ids"], want_pos) and torch.equal(new["attention_mask"], want_mask)
        assert new["text"] is kw["text"]
        return
    pytest.fail("no candidate at the model's patch size")


def test_the_joint_inputs_matter():
    """The mask and the positions change the output (a test of them that cannot fail is none)."""
    model = JointSequenceDiT().eval()
    kw = _inputs(0)
    with torch.no_grad():
        want = model(**kw)
        assert _rel(model(**dict(kw, attention_mask=torch.ones_like(kw["attention_mask"]))), want) > 1e-3
        assert _rel(model(**dict(kw, position_ids=kw["position_ids"] + 1)), want) > 1e-3


def test_a_joint_sequence_with_position_ids_and_a_square_mask():
    model = JointSequenceDiT().eval()
    ras = _check_contract(model, _inputs)
    _assert_per_row_sets_exact(ras, model, _inputs(3))
    assert ras.num_image_tokens == 24


def test_other_sizes_and_batch_one():
    model = JointSequenceDiT().eval()
    ras = rasfx.transform(model)
    for b, h, w in ((2, 12, 8), (1, 8, 8)):
        kw = _inputs(5, b, h, w)
        with torch.no_grad():
            want = model(**kw)
            ras.set_active(None)
            assert _rel(ras(**kw), want) <= TOL
            n = ras.num_image_tokens
            ras.set_active(torch.arange(0, n, 3))
            assert _rel(ras(**kw), want) <= TOL
