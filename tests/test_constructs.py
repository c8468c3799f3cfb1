"""DiT constructs that diffusers' classes do not all show, each in a small self-written model
that reproduces it the way a research code base writes it, checked against the RAS contract:

* dense forwards equal the model's; a partial forward on unchanged inputs equals it too
  (the caches hold the dense values);
* on new inputs with a new timestep, the outputs of inactive tokens (``token_map()``) are the
  cached ones, not recomputed;
* nothing is handled conservatively without a ``RASWarning`` naming the op.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import rasfx
from rasfx.passes import token_axes

C, P, HEADS = 16, 2, 2  # width, patch size, heads
TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) / max(float(b.double().abs().max()), 1e-30)


def _rel_all(a, b) -> float:
    """``_rel`` over a tensor or a list of per-sample tensors."""
    if isinstance(a, list):
        assert len(a) == len(b)
        return max(_rel(x, y) for x, y in zip(a, b))
    return _rel(a, b)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(C, 3 * C)
        self.proj = torch.nn.Linear(C, C)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(C, 2 * C), torch.nn.GELU(), torch.nn.Linear(2 * C, C))
        self.mod = torch.nn.Linear(C, 4 * C)

    def attention(self, x, mask=None):
        b, n, _ = x.shape
        q, k, v = self.qkv(F.layer_norm(x, (C,))).view(b, n, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(a.transpose(1, 2).reshape(b, n, C))


def _tiny_dit_layers(m: torch.nn.Module) -> None:
    """The layers most construct models share (seeded): a patch embedding, a text projection,
    a timestep modulation (scale, shift), two blocks and a head."""
    torch.manual_seed(0)
    m.embed = torch.nn.Conv2d(4, C, P, stride=P)
    m.txt = torch.nn.Linear(8, C)
    m.t_embed = torch.nn.Linear(1, 2 * C)
    m.blocks = torch.nn.ModuleList(_Block() for _ in range(2))
    m.head = torch.nn.Linear(C, 4 * P * P)


def _assert_per_row_sets_exact(ras: rasfx.RASModule, model: torch.nn.Module, kw: dict) -> None:
    """Per-row active sets (even tokens in row 0, odd ones in row 1) after a dense forward on the
    same inputs reproduce the model's output."""
    with torch.no_grad():
        want = model(**kw)
        ras.set_active(None)
        ras(**kw)
        ras.set_active(torch.stack([torch.arange(0, 24, 2), torch.arange(1, 24, 2)]))
        assert _rel_all(ras(**kw), want) <= TOL


class AutocastDiT(torch.nn.Module):
    """The original Wan 2.1 code's habit: residual adds, the modulation and the output head in
    ``autocast(float32)`` regions (CUDA autocast around CPU tensors: a disabled region, as on a
    bf16 model) and one region that is really on (bfloat16 on the CPU) around the MLP input."""

    def __init__(self, bf16_region: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Conv2d(4, C, P, stride=P)
        self.t_embed = torch.nn.Sequential(torch.nn.Linear(1, C), torch.nn.SiLU(), torch.nn.Linear(C, C))
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(2))
        self.head_mod = torch.nn.Linear(C, 2 * C)
        self.head = torch.nn.Linear(C, 4 * P * P)
        self.bf16_region = bf16_region

    def forward(self, hidden_states, timestep):
        b, _, h, w = hidden_states.shape
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        with torch.autocast("cuda", dtype=torch.float32):
            e = self.t_embed(timestep.view(b, 1, 1).float())
        for blk in self.blocks:
            shift, scale, gate, gate2 = blk.mod(e).chunk(4, dim=-1)
            y = blk.attention(F.layer_norm(x, (C,)) * (1 + scale) + shift)
            with torch.autocast("cuda", dtype=torch.float32):
                x = x + y * gate
            if self.bf16_region:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = blk.mlp[0](x).float()
                y = blk.mlp[2](blk.mlp[1](y))
            else:
                y = blk.mlp(x)
            with torch.autocast("cuda", dtype=torch.float32):
                x = x + y * gate2
        with torch.autocast("cuda", dtype=torch.float32):
            shift, scale = self.head_mod(e).chunk(2, dim=-1)
            x = self.head(F.layer_norm(x, (C,)) * (1 + scale) + shift)
        x = x.view(b, h // P, w // P, P, P, 4)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 4, h, w)


def _inputs(seed: int, b: int = 2, h: int = 8, w: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(b, 4, h, w, generator=g), "timestep": torch.rand(b, generator=g) * 1000}


def _check_contract(model: torch.nn.Module, make_inputs, config: rasfx.TransformConfig | None = None,
                    conservative: str | None = None) -> rasfx.RASModule:
    """``conservative``: a pattern the one expected RASWarning matches (None: no warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", rasfx.RASWarning)  # nothing conservative, nothing dense
        if conservative is not None:
            warnings.filterwarnings("ignore", f".*{conservative}", rasfx.RASWarning)
        ras = rasfx.transform(model, config)
        kw, nxt = make_inputs(0), make_inputs(1)
        with torch.no_grad():
            want, want_nxt = model(**kw), model(**nxt)
            ras.set_active(None)
            assert _rel_all(ras(**kw), want) <= TOL
            n = ras.num_image_tokens
            active = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: n // 4]
            ras.set_active(active)
            assert _rel_all(ras(**kw), want) <= TOL  # caches hold the dense values
            got = ras(**nxt)
    if isinstance(got, list):  # per-sample outputs: the token map is that of the first sample
        got, want, want_nxt = got[0], want[0], want_nxt[0]
    tokens = ras.token_map()
    kept = (tokens >= 0) & ~torch.isin(tokens, active)
    changed = (tokens >= 0) & torch.isin(tokens, active)
    assert bool(kept.any()) and bool(changed.any())
    assert _rel(got[kept], want[kept]) <= TOL, "outputs of inactive tokens must be the cached ones"
    assert _rel(got[changed], want_nxt[changed]) > 1e-3  # the active ones were computed anew
    return ras


def test_autocast_regions_are_inlined():
    ras = _check_contract(AutocastDiT().eval(), _inputs)
    gm = ras.captures()[0].capture.graph_module
    assert not any("wrap_with" in str(n.target) for n in gm.graph.nodes)


def test_an_enabled_autocast_region_keeps_its_casts():
    model = AutocastDiT(bf16_region=True).eval()
    ras = rasfx.transform(model)
    kw = _inputs(0)
    with torch.no_grad():
        want, got = model(**kw), ras(**kw)
    assert torch.equal(got, want)  # the same bf16 casts, in the same places
    with torch.no_grad():
        plain = AutocastDiT(bf16_region=False).eval()(**kw)
    assert _rel(want, plain) > 1e-4  # the region really ran in bfloat16
    casts = [n for n in ras.captures()[0].capture.graph_module.graph.nodes
             if n.target is torch.ops.aten._to_copy.default and n.kwargs.get("dtype") is torch.bfloat16]
    assert casts


class JointMaskDiT(torch.nn.Module):
    """Text and image tokens in one sequence with a padding mask over the joint sequence,
    passed in as ``[B, T + N]`` (Chroma) or built inside from ``ones`` and the text lengths
    (HunyuanVideo); text first or image first."""

    def __init__(self, image_first: bool, built_inside: bool):
        super().__init__()
        _tiny_dit_layers(self)
        self.image_first, self.built_inside = image_first, built_inside

    def forward(self, hidden_states, encoder_hidden_states, timestep, attention_mask):
        b, _, h, w = hidden_states.shape
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        t, n = encoder_hidden_states.shape[1], x.shape[1]
        parts = [x, self.txt(encoder_hidden_states)]
        seq = torch.cat(parts if self.image_first else parts[::-1], dim=1)
        if self.built_inside:  # attention_mask: [B, T] text mask (valid first); the joint one is built here
            joint = torch.ones(b, n + t, dtype=torch.bool)
            pos = torch.arange(n + t).unsqueeze(0)
            valid = attention_mask.sum(1, dtype=torch.int).unsqueeze(1)
            if self.image_first:  # HunyuanVideo: [image, text], the text's padding at the end
                joint = joint.masked_fill(pos >= n + valid, False)
            else:
                joint = joint.masked_fill((pos < t) & (pos >= valid), False)
            mask = joint[:, None, None, :]  # keys only
        else:  # attention_mask: [B, T + N] over the joint sequence; queries x keys
            m = attention_mask.bool()
            mask = (m[:, None, :, None] & m[:, None, None, :]) | torch.eye(n + t, dtype=torch.bool)
        scale, shift = self.t_embed(timestep.view(b, 1, 1)).chunk(2, dim=-1)
        for blk in self.blocks:
            seq = seq + blk.attention(seq * (1 + scale) + shift, mask)
            seq = seq + blk.mlp(seq)
        x = seq[:, :n] if self.image_first else seq[:, t:]
        x = self.head(x).view(b, h // P, w // P, P, P, 4)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 4, h, w)


@pytest.mark.parametrize("image_first", [False, True], ids=["text-first", "image-first"])
@pytest.mark.parametrize("built_inside", [False, True], ids=["mask-passed", "mask-built"])
def test_joint_attention_masks_keep_the_token_region(image_first, built_inside):
    model = JointMaskDiT(image_first, built_inside).eval()
    t, n = 5, 24

    def make(seed):
        g = torch.Generator().manual_seed(seed)
        kw = {"hidden_states": torch.randn(2, 4, 8, 12, generator=g),
              "encoder_hidden_states": torch.randn(2, t, 8, generator=g),
              "timestep": torch.rand(2, generator=g)}
        text = torch.tensor([[1] * 3 + [0] * 2, [1] * 5])
        if built_inside:
            kw["attention_mask"] = text
        else:
            img = torch.ones(2, n, dtype=torch.long)
            kw["attention_mask"] = torch.cat([img, text] if image_first else [text, img], dim=1)
        return kw

    ras = _check_contract(model, make)
    sdpa = [n for n in ras.captures()[0].capture.graph_module.graph.nodes
            if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert all(ras.captures()[0].plan.mode[n.name] == "A" for n in sdpa)  # every attention on active queries


def test_a_tail_that_reads_the_timestep_warns():
    """A model whose last token-mixing op comes after the timestep modulation of the head:
    the output cache cannot sit at the output; the warning says so and names the op."""

    class LateMix(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Conv2d(4, C, P, stride=P)
            self.block = _Block()
            self.t = torch.nn.Linear(1, C)

        def forward(self, hidden_states, timestep):
            b, _, h, w = hidden_states.shape
            x = self.embed(hidden_states).flatten(2).transpose(1, 2)
            x = x + self.block.mlp(x)
            x = torch.cumsum(x, dim=1) * self.t(timestep.view(b, 1, 1))  # mixes tokens, then modulates
            return x.transpose(1, 2).reshape(b, C, h // P, w // P)

    ras = rasfx.transform(LateMix().eval())
    with pytest.warns(rasfx.RASWarning, match=r"(?s)conservatively.*recomputed with this step's values"):
        with torch.no_grad():
            ras(**_inputs(0))


class FixedSizeDiT(torch.nn.Module):
    """The reference DiT's habits (facebookresearch/DiT ``models.py`` with timm's
    ``PatchEmbed``): a patch embedding that asserts the input size it was built for, a fixed
    sin-cos position table built once in ``__init__`` (a frozen parameter), adaLN-Zero
    modulation and an unpatchify that takes the grid side from ``sqrt(N)``."""

    def __init__(self, input_size: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.img_size = (input_size, input_size)
        self.grid_size = (input_size // P, input_size // P)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = torch.nn.Conv2d(4, C, P, stride=P)
        g = torch.arange(self.grid_size[0], dtype=torch.float32)
        freqs = torch.exp(-torch.arange(C // 4) / (C // 4) * 4.0)
        yy, xx = torch.meshgrid(g, g, indexing="ij")
        table = torch.cat([torch.sin(yy.reshape(-1, 1) * freqs), torch.cos(yy.reshape(-1, 1) * freqs),
                           torch.sin(xx.reshape(-1, 1) * freqs), torch.cos(xx.reshape(-1, 1) * freqs)], dim=1)
        self.pos_embed = torch.nn.Parameter(table[None], requires_grad=False)
        self.t_embed = torch.nn.Linear(1, C)
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(2))
        self.final = torch.nn.Linear(C, P * P * 4)

    def forward(self, x, t):
        _, _, h, w = x.shape
        assert h == self.img_size[0] and w == self.img_size[1], f"Input size ({h}*{w}) doesn't match model"
        x = self.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = torch.nn.functional.silu(self.t_embed(t.view(-1, 1, 1)))
        for blk in self.blocks:
            shift, scale, gate, gate2 = blk.mod(c).chunk(4, dim=-1)
            x = x + gate * blk.attention(F.layer_norm(x, (C,)) * (1 + scale) + shift)
            x = x + gate2 * blk.mlp(F.layer_norm(x, (C,)))
        x = self.final(x)
        side = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], side, side, P, P, 4)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], 4, side * P, side * P)


def test_a_model_built_for_one_size_works_as_shipped():
    model = FixedSizeDiT(8).eval()
    with pytest.raises(AssertionError):
        model(**_fixed_inputs(0, 12))  # it really accepts one size only

    ras = _check_contract(model, _fixed_inputs)
    assert ras.captures()[0].timings.get("analysis_model_resized")
    assert dict(model.named_parameters())["pos_embed"].shape == (1, 16, C)  # restored
    assert model.img_size == (8, 8) and model.num_patches == 16


def _fixed_inputs(seed: int, size: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(2, 4, size, size, generator=g), "t": torch.rand(2, generator=g) * 1000}


class FoldedBatchDiT(torch.nn.Module):
    """Original PixArt cross-attention: ``q_linear(x).view(1, -1, heads, dim)`` over a batch (the
    queries of every sample in one sequence of B*N tokens; here over all prompts' text)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Conv2d(4, C, P, stride=P)
        self.q = torch.nn.Linear(C, C)
        self.kv = torch.nn.Linear(8, 2 * C)
        self.t_embed = torch.nn.Linear(1, C)
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(2))
        self.head = torch.nn.Linear(C, 4 * P * P)

    def forward(self, hidden_states, text, timestep):
        b, _, h, w = hidden_states.shape
        x = self.embed(hidden_states).flatten(2).transpose(1, 2) + self.t_embed(timestep.view(b, 1, 1) / 1000)
        for blk in self.blocks:
            x = x + blk.attention(x)
            q = self.q(x).view(1, -1, HEADS, C // HEADS).transpose(1, 2)
            k, v = self.kv(text).view(1, -1, 2, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
            x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, C)
        x = self.head(x).view(b, h // P, w // P, P, P, 4)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 4, h, w)


def _folded_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, 4, 8, 12, generator=g), "text": torch.randn(2, 5, 8, generator=g),
            "timestep": torch.rand(2, generator=g) * 1000}


def test_a_batch_folded_into_the_token_axis():
    model = FoldedBatchDiT().eval()
    ras = _check_contract(model, _folded_inputs)
    kw = _folded_inputs(0)
    kw["text"] = _folded_inputs(5)["text"]
    _assert_per_row_sets_exact(ras, model, kw)
    folded = [ax for n in ras.captures()[0].capture.graph_module.graph.nodes for ax in token_axes(n) if ax.outer > 1]
    assert folded and all(ax.outer == 2 and ax.offset == 0 for ax in folded)


class SpatioTemporalDiT(torch.nn.Module):
    """Latte's original code (einops written out): spatial blocks on ``(b f) (h w) c``, temporal
    blocks on ``(b h w) f c``, the timestep modulation repeated per frame and per position with
    ``einops.repeat`` (``t[:, None].expand(...).reshape(...)``), a temporal position table."""

    def __init__(self, frames: int = 3):
        super().__init__()
        _tiny_dit_layers(self)
        self.temporal = torch.nn.ModuleList(_Block() for _ in range(2))
        self.temp_pos = torch.nn.Parameter(torch.randn(1, frames, C) * 0.1)

    def forward(self, hidden_states, timestep):
        b, c, f, h, w = hidden_states.shape
        x = hidden_states.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # b c f h w -> (b f) c h w
        x = self.embed(x).flatten(2).transpose(1, 2)
        n = x.shape[1]
        t = self.t_embed(timestep.view(b, 1) / 1000)
        t_spatial = t[:, None].expand(b, f, 2 * C).reshape(b * f, 1, 2 * C)  # repeat(t, 'b d -> (b f) 1 d')
        t_temporal = t[:, None].expand(b, n, 2 * C).reshape(b * n, 1, 2 * C)  # repeat(t, 'b d -> (b n) 1 d')
        for i, (spatial, temporal) in enumerate(zip(self.blocks, self.temporal)):
            scale, shift = t_spatial.chunk(2, dim=-1)
            x = x + spatial.attention(x * (1 + scale) + shift)
            x = x + spatial.mlp(x)
            x = x.view(b, f, n, C).permute(0, 2, 1, 3).reshape(b * n, f, C)  # (b f) n c -> (b n) f c
            if i == 0:
                x = x + self.temp_pos
            scale, shift = t_temporal.chunk(2, dim=-1)
            x = x + temporal.attention(x * (1 + scale) + shift)
            x = x + temporal.mlp(x)
            x = x.view(b, n, f, C).permute(0, 2, 1, 3).reshape(b * f, n, C)  # (b n) f c -> (b f) n c
        x = self.head(x).view(b, f, h // P, w // P, P, P, 4)
        return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, 4, f, h, w)


def _video_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, 4, 3, 8, 12, generator=g), "timestep": torch.rand(2, generator=g) * 1000}


def test_spatial_and_temporal_layouts_of_one_token_set():
    model = SpatioTemporalDiT().eval()
    with pytest.warns(rasfx.RASWarning, match=r"dim 0 holds 3 rows per sample .*share one active set"):
        ras = rasfx.transform(model)
        with torch.no_grad():
            ras(**_video_inputs(0))
    ras = _check_contract(model, _video_inputs, conservative=r"dim 0 holds 3 rows per sample")
    assert ras.num_image_tokens == 24  # the positions of one frame: the frames share the active set
    _assert_per_row_sets_exact(ras, model, _video_inputs(3))
    report = rasfx.explain(ras)
    assert [c["reason"] for c in report.conservative()] == [report.conservative()[0]["reason"]]
    assert {s["kind"] for s in report.sites()} == {"attention", "output"}
    assert len(report.sites()) == 5  # spatial K/V x 2 blocks + output: temporal attention runs on active positions
    flops = report.flops()  # ratio 0.25: both layouts run on a quarter of the positions
    assert flops["at_ratio"] < 0.5 * flops["dense"]


class FoldedVideoDiT(SpatioTemporalDiT):
    """Frames folded into the batch (``[B*F, N, C]``, Latte) and, in every block, PixArt's
    cross-attention with all of them folded into one query sequence (``view(1, -1, H, D)``:
    a token axis of B*F blocks) over every prompt's text."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(C, C)
        self.kv = torch.nn.Linear(8, 2 * C)

    def forward(self, hidden_states, timestep, text):
        b, c, f, h, w = hidden_states.shape
        x = self.embed(hidden_states.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)).flatten(2).transpose(1, 2)
        n = x.shape[1]
        x = x + self.t_embed(timestep.view(b, 1, 1) / 1000).chunk(2, dim=-1)[0].repeat_interleave(f, dim=0)
        for blk in self.blocks:
            x = x + blk.attention(x)
            q = self.q(x).view(1, -1, HEADS, C // HEADS).transpose(1, 2)
            k, v = self.kv(text).view(1, -1, 2, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
            x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * f, n, C)
        x = self.head(x).view(b, f, h // P, w // P, P, P, 4)
        return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, 4, f, h, w)


def test_frames_folded_twice_into_the_batch_and_into_the_queries():
    model = FoldedVideoDiT().eval()

    def inputs(seed: int) -> dict:
        return dict(_video_inputs(seed), text=torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(seed)))

    ras = _check_contract(model, inputs, conservative=r"dim 0 holds 3 rows per sample")
    _assert_per_row_sets_exact(ras, model, inputs(3))
    graph = ras.captures()[0].capture.graph_module.graph
    assert {ax.outer for node in graph.nodes for ax in token_axes(node) if ax.outer > 1} == {6}  # B * F blocks


class ListDiT(torch.nn.Module):
    """The original Wan 2.1 code's interface: ``x`` is a list of per-sample [C, F, H, W]
    latents, embedded one by one, padded to ``seq_len`` (an int) and concatenated into a
    batch; the output is a list of per-sample tensors again."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.patch = torch.nn.Conv3d(4, C, (1, P, P), stride=(1, P, P))
        self.t = torch.nn.Linear(1, 4 * C)
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(2))
        self.head = torch.nn.Linear(C, 4 * P * P)

    def forward(self, x, t, seq_len):
        x = [self.patch(u.unsqueeze(0)) for u in x]
        grids = [u.shape[2:] for u in x]
        x = [u.flatten(2).transpose(1, 2) for u in x]
        x = torch.cat([torch.cat([u, u.new_zeros(1, seq_len - u.size(1), u.size(2))], dim=1) for u in x])
        shift, scale, gate, gate2 = self.t(t.view(-1, 1, 1)).chunk(4, dim=-1)
        for blk in self.blocks:
            x = x + gate * blk.attention(F.layer_norm(x, (C,)) * (1 + scale) + shift)
            x = x + gate2 * blk.mlp(x)
        x = self.head(x)
        out = []
        for u, (f, h, w) in zip(x, grids):
            u = u[: f * h * w].view(f, h, w, P, P, 4)
            out.append(torch.einsum("fhwpqc->cfhpwq", u).reshape(4, f, h * P, w * P))
        return out


def test_list_inputs_of_per_sample_tensors():
    def make(seed):
        g = torch.Generator().manual_seed(seed)
        return {"x": [torch.randn(4, 2, 8, 12, generator=g) for _ in range(2)], "t": torch.rand(2, generator=g),
                "seq_len": 48}

    ras = _check_contract(ListDiT().eval(), make)
    assert ras.num_image_tokens == 48 and ras.captures()[0].batch == 2


def test_attention_over_a_compressed_grid_is_named():
    """PixArt-Sigma's original K/V compression: keys / values downsampled by a strided conv
    over the token grid. The error names the reduced grid and the op that makes it."""

    class KVCompressed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Conv2d(4, C, P, stride=P)
            self.qkv = torch.nn.Linear(C, 3 * C)
            self.sr = torch.nn.Conv2d(C, C, 2, stride=2)
            self.head = torch.nn.Linear(C, 4 * P * P)

        def forward(self, hidden_states):
            b, _, h, w = hidden_states.shape
            x = self.embed(hidden_states).flatten(2).transpose(1, 2)
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            k = self.sr(k.transpose(1, 2).reshape(b, C, h // P, w // P)).flatten(2).transpose(1, 2)
            v = self.sr(v.transpose(1, 2).reshape(b, C, h // P, w // P)).flatten(2).transpose(1, 2)
            x = x + F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
            x = self.head(x).view(b, h // P, w // P, P, P, 4)
            return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 4, h, w)

    ras = rasfx.transform(KVCompressed().eval())
    with pytest.raises(rasfx.UnsupportedModelError, match=r"(?s)24, 6 tokens; the first tensor with 6 comes from .aten[.a-z_]+ at [^ ]*test_constructs.py:[0-9]+ [(]forward[)]: k = self.sr.*reduced grid"):
        with torch.no_grad():
            ras(hidden_states=torch.randn(2, 4, 8, 12))


def test_a_table_cached_on_the_first_call_survives_the_capture():
    """Bria FIBO 2 / Z-Image keep ``freqs_cis`` on a plain helper object, computed on the first
    call: a capture must not leave its fake tensors there (the model would fail eagerly)."""

    class Rope:
        def __init__(self):
            self.freqs = None

        def __call__(self, n: int) -> torch.Tensor:
            if self.freqs is None or self.freqs.shape[0] != n:
                self.freqs = torch.arange(n, dtype=torch.float32)[:, None] / n
            return self.freqs

    class LazyDiT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Conv2d(4, C, P, stride=P)
            self.rope = Rope()
            self.block = _Block()
            self.head = torch.nn.Linear(C, 4 * P * P)

        def forward(self, hidden_states):
            b, _, h, w = hidden_states.shape
            x = self.embed(hidden_states).flatten(2).transpose(1, 2)
            if not hasattr(self, "scale"):
                self.scale = torch.ones(C)  # a lazily set attribute, too
            x = x + self.rope(x.shape[1]) * self.scale
            x = x + self.block.attention(x)
            x = self.head(x).view(b, h // P, w // P, P, P, 4)
            return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 4, h, w)

    model = LazyDiT().eval()
    x = torch.randn(2, 4, 8, 12)
    ras = rasfx.transform(model)
    with torch.no_grad():
        got = ras(hidden_states=x)
        assert model.rope.freqs is None and not hasattr(model, "scale")  # as before the capture
        want = model(hidden_states=x)  # the plain model still runs
    assert _rel(got, want) <= TOL


class PromptReadDiT(torch.nn.Module):
    """Python that reads the prompt's values, as Lumina 2, Mochi and HunyuanImage do: the text
    lengths read from the mask with ``.tolist()``, the valid text tokens moved first with a
    boolean index (``text[mask]``, HunyuanImage), kept with ``torch.nonzero`` (Mochi), and a
    key mask over [image, text] written with the Python lengths."""

    def __init__(self, step_read: bool = False):
        super().__init__()
        _tiny_dit_layers(self)
        self.step_read = step_read

    def forward(self, hidden_states, encoder_hidden_states, timestep, attention_mask):
        b, _, h, w = hidden_states.shape
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        n, t = x.shape[1], attention_mask.shape[1]
        if self.step_read and bool(timestep.max() > 0.5):  # a read of a per-step input: not specialisable
            x = x * 2
        lengths = attention_mask.sum(1).tolist()
        m = attention_mask.bool()
        txt = self.txt(encoder_hidden_states)
        txt = torch.stack([torch.cat([u[k], u[~k]]) for u, k in zip(txt, m)])  # valid tokens first
        first = torch.nonzero(m[0]).flatten()  # the first prompt's valid tokens, as Mochi keeps them
        txt = txt + self.txt(encoder_hidden_states[:1, first]).mean(1, keepdim=True)
        keys = torch.zeros(b, n + t, dtype=torch.bool)
        for i, length in enumerate(lengths):
            keys[i, : n + length] = True
        mask = keys[:, None, None, :]
        seq = torch.cat([x, txt], dim=1)
        scale, shift = self.t_embed(timestep.view(b, 1, 1)).chunk(2, dim=-1)
        for blk in self.blocks:
            seq = seq + blk.attention(seq * (1 + scale) + shift, mask)
            seq = seq + blk.mlp(seq)
        x = self.head(seq[:, :n]).view(b, h // P, w // P, P, P, 4)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 4, h, w)


def _prompt_inputs(seed: int, lengths=(3, 5), t: int = 6) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, 4, 8, 12, generator=g),
            "encoder_hidden_states": torch.randn(2, t, 8, generator=g),
            "timestep": torch.rand(2, generator=g),
            "attention_mask": (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).long()}


@pytest.mark.filterwarnings("ignore:.*changed on 3 consecutive forwards")  # new prompt tensors in every call
def test_reads_of_prompt_values_are_specialised_per_prompt():
    model = PromptReadDiT().eval()
    ras = _check_contract(model, _prompt_inputs)
    cc = ras.captures()[0]
    assert cc.capture.value_leaves == (3,)  # the mask's values key the capture
    assert ras.work_counts()["exports"] == 1

    def run(kw):
        with torch.no_grad():
            got, want = ras(**kw), model(**kw)
        assert _rel(got, want) <= TOL
        return ras.work_counts()["exports"]

    # the same prompt (new tensors, equal values) in a new image: the capture is reused
    ras.reset()
    assert run(_prompt_inputs(5)) == 1
    # another prompt of the same shapes: a capture of its own, never the old one
    ras.reset()
    other = _prompt_inputs(6, lengths=(6, 2))
    assert run(other) == 2
    ras.set_active(torch.arange(0, 24, 3))
    assert run(other) == 2  # a RAS step on the new capture: exact on unchanged inputs
    # back to the first prompt: its capture is still there
    ras.reset()
    assert run(_prompt_inputs(7)) == 2
    # a mask changed in place (same tensor object) is read again
    ras.reset()
    kw = _prompt_inputs(8)
    assert run(kw) == 2
    kw["attention_mask"][0, 4] = 1
    assert run(kw) == 3


def test_a_read_of_a_per_step_input_is_named():
    ras = rasfx.transform(PromptReadDiT(step_read=True).eval())
    with pytest.raises(rasfx.CaptureError, match=r"(?s)bool\(tensor\) at .*test_constructs.py:\d+ \(forward\) reads "
                                                 r"values computed from the input 'timestep', which changes at every step"):
        with torch.no_grad():
            ras(**_prompt_inputs(0))


class PerSampleAttentionDiT(torch.nn.Module):
    """Mochi's attention: a loop over the batch, each sample's image tokens attending with its
    own valid text tokens (``torch.nonzero`` of its mask), padded back to one length
    (``F.pad``) and concatenated into a batch again."""

    def __init__(self):
        super().__init__()
        _tiny_dit_layers(self)

    def forward(self, hidden_states, encoder_hidden_states, timestep, attention_mask):
        b, _, h, w = hidden_states.shape
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        n, t = x.shape[1], attention_mask.shape[1]
        txt = self.txt(encoder_hidden_states)
        scale, shift = self.t_embed(timestep.view(b, 1, 1)).chunk(2, dim=-1)
        for blk in self.blocks:
            seq = torch.cat([x, txt], dim=1) * (1 + scale) + shift
            q, k, v = blk.qkv(F.layer_norm(seq, (C,))).view(b, n + t, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
            outs = []
            for i in range(b):
                valid = torch.nonzero(attention_mask[i]).flatten()
                qi, ki, vi = (torch.cat([u[i:i + 1, :, :n], u[i:i + 1, :, n:][:, :, valid]], dim=2) for u in (q, k, v))
                a = F.scaled_dot_product_attention(qi, ki, vi)
                outs.append(F.pad(a, (0, 0, 0, n + t - a.shape[2])))
            a = torch.cat(outs).transpose(1, 2).reshape(b, n + t, C)
            x, txt = (seq + blk.proj(a)).split([n, t], dim=1)
            x = x + blk.mlp(x)
        x = self.head(x).view(b, h // P, w // P, P, P, 4)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 4, h, w)


@pytest.mark.filterwarnings("ignore:.*changed on 3 consecutive forwards")
def test_per_sample_attention_over_each_prompts_valid_tokens():
    model = PerSampleAttentionDiT().eval()
    ras = _check_contract(model, _prompt_inputs)
    _assert_per_row_sets_exact(ras, model, _prompt_inputs(3))
    assert ras.work_counts()["exports"] == 1
