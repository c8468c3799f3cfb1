"""Per-token tensors written through a boolean per-token mask (``x[mask] = 0``, ``x[mask] *= 0``),
each in a small self-written model checked against the RAS contract of ``tests/test_constructs.py``:
GLM-Image drops the prior tokens of the unconditional pass with
``prior_embedding[prior_token_drop] *= 0.0``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rasfx

from test_constructs import C, P, TOL, _assert_per_row_sets_exact, _check_contract, _rel, _tiny_dit_layers

VOCAB = 32
THRESHOLD = 5.0


class PriorDropDiT(torch.nn.Module):
    """GLM-Image's prior tokens: one id per image token (an autoregressive model's image tokens),
    embedded and added to the patch embedding, with the rows of the tokens in ``drop`` zeroed in
    place, as ``x[mask] = 0.0`` (``write="assign"``) or ``x[mask] *= 0.0`` (``write="scale"``, a
    write of values listed per masked element). ``write="image"``: the mask is computed from the
    residual stream itself (the tokens whose features have a large norm are zeroed after each block's
attention)."""

    def __init__(self, write: str):
        super().__init__()
        _tiny_dit_layers(self)
        self.prior = torch.nn.Embedding(VOCAB, C)
        self.write = write

    def forward(self, hidden_states, timestep, prior_ids, drop):
        b, _, h, w = hidden_states.shape
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        prior = self.prior(prior_ids)
        if self.write == "assign":
            prior[drop] = 0.0
        elif self.write == "scale":
            prior[drop] *= 0.0
        x = x + prior
        scale, shift = self.t_embed(timestep.view(b, 1, 1)).chunk(2, dim=-1)
        for blk in self.blocks:
            x = x + blk.attention(F.layer_norm(x, (C,)) * (1 + scale) + shift)
            if self.write == "image":  # after the first block: the tokens' own values decide
                x[x.norm(dim=-1) > THRESHOLD] = 0.0
            x = x + blk.mlp(x)
        x = self.head(x).view(b, h // P, w // P, P, P, 4)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 4, h, w)


def _inputs(seed: int, b: int = 2, h: int = 8, w: int = 12, drop: str = "random") -> dict:
    """The prior ids and the drop mask stay the same between steps (one prompt); ``drop``:
    ``random`` (some tokens of each row), ``cfg`` (the unconditional row all dropped, GLM-Image's
    classifier-free guidance batch) or ``none``."""
    g = torch.Generator().manual_seed(seed)
    fixed = torch.Generator().manual_seed(100)
    n = (h // P) * (w // P)
    mask = {"random": torch.rand(b, n, generator=fixed) < 0.3, "none": torch.zeros(b, n, dtype=torch.bool),
            "cfg": (torch.arange(b) % 2 == 1)[:, None].expand(b, n)}[drop]
    return {"hidden_states": torch.randn(b, 4, h, w, generator=g), "timestep": torch.rand(b, generator=g) * 1000,
            "prior_ids": torch.randint(0, VOCAB, (b, n), generator=fixed), "drop": mask.clone()}


def _drop_matters(model: torch.nn.Module) -> None:
    """The construct changes the output (a test of it that cannot fail is none)."""
    kw = _inputs(0)
    with torch.no_grad():
        assert _rel(model(**kw), model(**dict(kw, drop=torch.zeros_like(kw["drop"])))) > 1e-3


def _assert_writes_active(ras: rasfx.RASModule, op) -> None:
    """The in-place writes ``op`` into the prior embedding run on the active tokens."""
    cc = ras.captures()[0]
    nodes = cc.capture.graph_module.graph.nodes
    embedding = next(n for n in nodes if n.target is torch.ops.aten.embedding.default)
    writes = [n for n in nodes if n.target is op and n.args[0] is embedding]
    assert writes and all(cc.plan.mode[n.name] == "A" for n in [embedding, *writes])


def test_a_per_token_tensor_zeroed_in_place_by_a_per_token_mask():
    model = PriorDropDiT("assign").eval()
    _drop_matters(model)
    ras = _check_contract(model, _inputs)
    _assert_per_row_sets_exact(ras, model, _inputs(3))
    _assert_writes_active(ras, torch.ops.aten.index_put_.default)


@pytest.mark.parametrize("drop", ["random", "cfg", "none"])
def test_a_per_token_tensor_scaled_in_place_through_a_mask(drop):
    """``x[mask] *= 0.0``: the masked rows are read (``x[mask]``, a read of values of the prompt's mask,
    specialised per prompt) and written back; the write runs on the active tokens, the read at full length."""
    model = PriorDropDiT("scale").eval()
    if drop == "random":
        _drop_matters(model)
    ras = _check_contract(model, lambda seed: _inputs(seed, drop=drop), conservative="indexing of the token axis")
    _assert_per_row_sets_exact(ras, model, _inputs(3, drop=drop))
    _assert_writes_active(ras, torch.ops.aten.copy_.default)  # x.copy_(where(mask, rows[slot], x))
    assert not any(n.target is torch.ops.aten.index_put_.default for n in ras.captures()[0].capture.graph_module.graph.nodes)


def test_a_mask_computed_from_the_image_tokens():
    model = PriorDropDiT("image").eval()
    norms = []
    hook = model.blocks[0].mlp.register_forward_pre_hook(lambda m, args: norms.append(args[0].norm(dim=-1)))
    with torch.no_grad():
        model(**_inputs(0))
    hook.remove()
    masked = norms[0] == 0  # the zeroed tokens, as the first block's MLP reads them
    assert bool(masked.any()) and not bool(masked.all())
    ras = _check_contract(model, _inputs)
    _assert_per_row_sets_exact(ras, model, _inputs(3))


class _IndexWrites(torch.nn.Linear):
    """Writes that move values between token positions: ``index_put`` by integer indices (a
    permutation of the tokens), and by a mask with values listed one row per masked token."""

    def forward(self, hidden_states, mask, rows):
        h = super().forward(hidden_states)  # [B, N, 4]
        n = h.shape[1]
        perm = torch.arange(n - 1, -1, -1)
        moved = h.index_put((torch.arange(h.shape[0])[:, None], perm[None]), h * 2)
        listed = h.index_put((mask,), rows)
        return super().forward(moved + listed)


def test_index_writes_that_move_values_between_tokens_are_conservative():
    b, n = 2, 16
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[0, 3] = mask[1, 5] = True
    kw = {"hidden_states": torch.randn(b, n, 4), "mask": mask, "rows": torch.randn(2, 4)}
    model = _IndexWrites(4, 4).eval()
    ras = rasfx.transform(model)
    with pytest.warns(rasfx.RASWarning, match="handled conservatively"), torch.no_grad():
        got = ras(**kw)
    with torch.no_grad():
        assert _rel(got, model(**kw)) <= TOL
        ras.set_active(torch.arange(0, n, 3))
        assert _rel(ras(**kw), model(**kw)) <= TOL
    reasons = {name: r for name, _, r in ras.captures()[0].plan.conservative}
    assert set(reasons) == {"index_put", "index_put_1"}, reasons
    assert "integer indices name positions" in reasons["index_put"]
    assert "values listed per masked element" in reasons["index_put_1"]


class FeatureIndexDiT(torch.nn.Module):
    """Ideogram's interleaved RoPE sections, on the tokens: features picked and written by an
    integer index into the dims after the token axis (``y[..., idx] = x[..., idx] * 2``)."""

    def __init__(self):
        super().__init__()
        _tiny_dit_layers(self)

    def forward(self, hidden_states, timestep):
        b, _, h, w = hidden_states.shape
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        scale, shift = self.t_embed(timestep.view(b, 1, 1)).chunk(2, dim=-1)
        for blk in self.blocks:
            x = x + blk.attention(F.layer_norm(x, (C,)) * (1 + scale) + shift)
            y = blk.mlp(x)
            idx = torch.arange(1, C, 3, device=x.device)
            y[..., idx] = x[..., idx] * 2
            x = x + y
        x = self.head(x).view(b, h // P, w // P, P, P, 4)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 4, h, w)


def test_features_indexed_after_the_token_axis():
    model = FeatureIndexDiT().eval()
    ras = _check_contract(model, _inputs_plain)
    _assert_per_row_sets_exact(ras, model, _inputs_plain(3))
    cc = ras.captures()[0]
    nodes = [n for n in cc.capture.graph_module.graph.nodes
             if n.target in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default)]
    assert len(nodes) == 4 and all(cc.plan.mode[n.name] == "A" for n in nodes)


def _inputs_plain(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, 4, 8, 12, generator=g), "timestep": torch.rand(2, generator=g) * 1000}


@pytest.mark.parametrize("write", ["assign", "scale"])
def test_a_new_prompt_mask_is_not_served_the_last_prompts_write(write):
    """State across calls: the slots ``x[mask] *= 0.0`` records are per prompt (specialised on the
    mask's values); one module called with a mask, then another one, then the first again, gives
    each prompt's own output, dense and on a partial step after that prompt's dense step."""
    model = PriorDropDiT(write).eval()
    ras = rasfx.transform(model)
    prompts = [_inputs(0, drop="random"), _inputs(1, drop="cfg"), _inputs(2, drop="random")]
    prompts[1]["prior_ids"] = prompts[0]["prior_ids"]  # only the mask differs from the first prompt
    n = prompts[0]["drop"].shape[1]
    with torch.no_grad():
        for kw in prompts:
            want = model(**kw)
            ras.set_active(None)
            assert _rel(ras(**kw), want) <= TOL
            ras.set_active(torch.arange(0, n, 3))
            assert _rel(ras(**kw), want) <= TOL
        assert _rel(model(**prompts[0]), model(**prompts[1])) > 1e-3  # the masks do matter
