"""Constructs of sequences built row by row, checked against the RAS contract of
``tests/test_constructs.py``."""

from __future__ import annotations

import pytest
import torch

from test_constructs import C, P, TOL, _Block, _check_contract, _prompt_inputs, _rel


class RowJoinDiT(torch.nn.Module):
    """Lumina 2's joint sequence: the text lengths read from the prompt mask
    (``mask.sum(1).tolist()``), a zero tensor written per sample (``joint[i, :L_i] = text[i, :L_i]``,
    ``joint[i, L_i:L_i + N] = x[i]``), so the image starts at another offset in each row; a text
    refiner that reads a table written in place the same way; the output is each row's image
    slice, stacked."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Conv2d(4, C, P, stride=P)
        self.txt = torch.nn.Linear(8, C)
        self.txt_pos = torch.nn.Parameter(torch.randn(16, C))
        self.refiner = _Block()
        self.t_embed = torch.nn.Linear(1, 2 * C)
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(2))
        self.head = torch.nn.Linear(C, 4 * P * P)

    def forward(self, hidden_states, encoder_hidden_states, timestep, attention_mask):
        b, _, h, w = hidden_states.shape
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        n, t = x.shape[1], attention_mask.shape[1]
        lengths = attention_mask.sum(1).tolist()
        # text positions written in place per sample (the refiner reads them: hoisted only after the writes)
        pos = encoder_hidden_states.new_zeros(b, t, C)
        for i, length in enumerate(lengths):
            pos[i, :length] = self.txt_pos[:length]
        txt = self.txt(encoder_hidden_states) + pos
        txt = txt + self.refiner.attention(txt, attention_mask.bool()[:, None, None, :])
        joint = x.new_zeros(b, t + n, C)
        keys = torch.zeros(b, t + n, dtype=torch.bool)
        for i, length in enumerate(lengths):
            joint[i, :length] = txt[i, :length]
            joint[i, length:length + n] = x[i]
            keys[i, : length + n] = True
        scale, shift = self.t_embed(timestep.view(b, 1, 1)).chunk(2, dim=-1)
        mask = keys[:, None, None, :]
        for blk in self.blocks:
            joint = joint + blk.attention(joint * (1 + scale) + shift, mask)
            joint = joint + blk.mlp(joint)
        x = torch.stack([joint[i, length:length + n] for i, length in enumerate(lengths)])
        x = self.head(x).view(b, h // P, w // P, P, P, 4)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 4, h, w)


@pytest.mark.filterwarnings("ignore:.*changed on 3 consecutive forwards")  # new prompt tensors in every call
def test_a_joint_sequence_built_row_by_row():
    model = RowJoinDiT().eval()
    ras = _check_contract(model, _prompt_inputs)  # text lengths 3 and 5: the image starts at 3 and 5
    cc = ras.captures()[0]
    assert cc.analysis.stats["row_writes_located"] >= 1
    assert cc.plan.counters["gathers"] >= 1  # the blocks over the joint sequence run on the active tokens
    kw = _prompt_inputs(3)
    with torch.no_grad():
        want = model(**kw)
        ras.set_active(None)
        ras(**kw)
        ras.set_active(torch.stack([torch.arange(0, 24, 2), torch.arange(1, 24, 2)]))  # per-row sets
        assert _rel(ras(**kw), want) <= TOL
