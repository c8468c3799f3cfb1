"""Tiny random-weight diffusion transformers, for the CLI, the examples and the tests.

Each :class:`Preset` builds one diffusers DiT class at toy size (widths 16-32, 1-4 layers,
2 heads) with every parameter re-randomised from a seed (diffusers zero-initialises the
AdaLN modulations and output projections, which would make equivalence tests pass
trivially), and builds the keyword arguments of one ``forward`` the way the model's
diffusers pipeline builds them: dtypes, masks, rotary tables, timestep scaling, packing,
``return_dict=False``. Nothing is downloaded.

``height, width`` of :meth:`Preset.inputs` are the size of the image input the model sees:
latent pixels for grid models (``[B, C, H, W]``), the latent ``H, W`` of each frame for
video models (with a small fixed number of frames), and the packed token grid ``h, w``
for packed models (Flux: ``hidden_states`` is ``[B, h*w, C]``).

Usage::

    from rasfx.presets import PRESETS, get_preset
    p = get_preset("sd3-tiny")
    model = p.build(0)
    out = model(**p.inputs(batch=2))[0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .errors import UsageError

__all__ = ["KnownFailure", "Preset", "PRESETS", "get_preset", "randomize_"]


@dataclass(frozen=True)
class KnownFailure:
    """Why rasfx cannot transform a preset yet (with the torch and diffusers versions it is
    tested with): ``reason`` is what ``rasfx presets`` prints, ``error`` a fragment of the error
    that ``rasfx inspect`` reports (tests/test_cli.py checks that the preset still fails with it)."""

    reason: str
    error: str


@dataclass(frozen=True)
class Preset:
    """One tiny model and its pipeline-faithful inputs.

    Attributes:
        name: registry key.
        description: one line: the diffusers class, what the preset exercises.
        build: ``build(seed=0) -> torch.nn.Module``: a new model, eval mode, float32, every
            parameter re-randomised from ``seed``.
        inputs: ``inputs(batch=1, height=None, width=None, seed=0) -> dict``: forward keyword
            arguments (``return_dict=False`` included); ``None`` sizes mean ``default_hw``.
            Raises ``ValueError`` for a size the model cannot take (see ``multiple``,
            ``square_only``, ``max_hw``).
        default_hw: ``(height, width)`` used when none is given.
        multiple: height and width must be multiples of this (the patch size).
        square_only: the model only supports ``height == width`` (DiT).
        max_hw: largest height/width the model's position tables allow (None: no limit).
        frames: number of latent frames of video presets (None for image models).
        model_class: name of the diffusers class.
        known_failure: why rasfx cannot transform this preset yet (None: it can).
    """

    name: str
    description: str
    build: Callable[..., torch.nn.Module]
    inputs: Callable[..., dict]
    default_hw: tuple[int, int]
    multiple: int = 2
    square_only: bool = False
    max_hw: Optional[int] = None
    frames: Optional[int] = None
    model_class: str = ""
    tags: tuple[str, ...] = field(default=())
    known_failure: Optional[KnownFailure] = None

    def valid_hw(self, height: int, width: int) -> bool:
        try:
            self._check_hw(height, width)
        except ValueError:
            return False
        return True

    def _check_hw(self, height: int, width: int) -> None:
        _check_hw(self, height, width)


# ------------------------------------------------------------------------------------ helpers


def randomize_(model: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    """Re-draw every parameter of ``model`` from a seeded generator so that every path
    contributes and activations stay O(1): matrices ``N(0, gain^2 / fan_in)``, 1-D weights
    (norm scales) ``1 + N(0, 0.1^2)``, biases and other vectors ``N(0, 0.1^2)``."""
    g = torch.Generator().manual_seed(10_007 * int(seed) + 1)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if prm.dim() >= 2:
                fan_in = math.prod(prm.shape[1:])
                std = gain / math.sqrt(max(1, fan_in))
                prm.copy_(std * torch.randn(prm.shape, generator=g, dtype=torch.float32))
            elif leaf == "weight":
                prm.copy_(1.0 + 0.1 * torch.randn(prm.shape, generator=g, dtype=torch.float32))
            else:
                prm.copy_(0.1 * torch.randn(prm.shape, generator=g, dtype=torch.float32))
    return model


def _finish(model: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.to(torch.float32)
    randomize_(model, seed, gain)
    model.eval()
    model.requires_grad_(False)
    return model


def _check_hw(p: Preset, height: int, width: int) -> None:
    for what, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise UsageError(f"{p.name}: {what} must be a positive int, got {v!r}")
        if v % p.multiple:
            raise UsageError(f"{p.name}: {what} must be a multiple of {p.multiple}, got {v}")
        if p.max_hw is not None and v > p.max_hw:
            raise UsageError(f"{p.name}: {what} must be at most {p.max_hw} (position tables), got {v}")
    if p.square_only and height != width:
        raise UsageError(f"{p.name}: {p.model_class} only supports square inputs, got {height}x{width}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _randn(g: torch.Generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def _token_mask(g: torch.Generator, batch: int, length: int, dtype=torch.int64, min_len: int = 2) -> torch.Tensor:
    """A tokenizer attention mask padded to ``length`` ("max_length" padding): ones for the
    prompt tokens, zeros after (at least ``min_len`` ones; rows of the batch differ)."""
    lens = torch.randint(min_len, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None, :] < lens[:, None]
    return mask.to(dtype)


def _padded_text(g: torch.Generator, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Text encoder states whose padding rows are zeros (as the T5 / UMT5 pipelines do)."""
    x = _randn(g, mask.shape[0], mask.shape[1], dim)
    return x * mask[..., None].to(x.dtype)


def _flow_timestep(g: torch.Generator, batch: int) -> torch.Tensor:
    """A flow-matching scheduler timestep (float32 in [0, 1000]), expanded to the batch like
    ``t.expand(latent_model_input.shape[0])``."""
    t = torch.rand((), generator=g) * 1000.0
    return t.to(torch.float32).expand(batch)


def _int_timestep(g: torch.Generator, batch: int) -> torch.Tensor:
    """A discrete scheduler timestep (int64 in [0, 1000)), ``t[None].expand(B)``."""
    t = torch.randint(0, 1000, (), generator=g)
    return t[None].expand(batch)


_REGISTRY: dict[str, Preset] = {}


def _register(name, description, model_fn, inputs_fn, default_hw, *, multiple=2, square_only=False,
              max_hw=None, frames=None, model_class="", tags=(), known_failure=None):
    holder: dict[str, Preset] = {}

    def build(seed: int = 0) -> torch.nn.Module:
        torch_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(int(seed))
            model = model_fn()
        finally:
            torch.random.set_rng_state(torch_state)
        return _finish(model, seed)

    def inputs(batch: int = 1, height: Optional[int] = None, width: Optional[int] = None, seed: int = 0) -> dict:
        p = holder["p"]
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise UsageError(f"{name}: batch must be an int >= 1, got {batch!r}")
        h = p.default_hw[0] if height is None else height
        w = p.default_hw[1] if width is None else width
        _check_hw(p, h, w)
        kw = inputs_fn(batch, h, w, _gen(seed))
        kw["return_dict"] = False
        return kw

    build.__doc__ = f"Build {model_class} ({name}) with re-randomised weights."
    inputs.__doc__ = f"Forward kwargs of {name}, built as its diffusers pipeline builds them."
    preset = Preset(name, description, build, inputs, tuple(default_hw), multiple, square_only, max_hw, frames,
                    model_class, tuple(tags), known_failure)
    holder["p"] = preset
    _REGISTRY[name] = preset
    return preset


# ============================================================================ image models
# ---------------------------------------------------------------------------- SD3 / SD3.5


def _sd3(dual: bool):
    def make():
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
            pooled_projection_dim=8, out_channels=4, pos_embed_max_size=32,
            dual_attention_layers=(0,) if dual else (), qk_norm="rms_norm" if dual else None,
        )

    return make


def _sd3_inputs(batch, h, w, g):
    # StableDiffusion3Pipeline: latents [B, 16, H, W], prompt_embeds = cat(CLIP-L/G padded to
    # the T5 width, T5) -> [B, 77 + 256, 4096], pooled [B, 2048], timestep = t.expand(B) with
    # t in [0, 1000] (FlowMatchEuler). Toy sizes: 4 latent channels, 7 text tokens of width 16.
    return dict(
        hidden_states=_randn(g, batch, 4, h, w),
        encoder_hidden_states=_randn(g, batch, 7, 16),
        pooled_projections=_randn(g, batch, 8),
        timestep=_flow_timestep(g, batch),
        joint_attention_kwargs=None,
    )


_register("sd3-tiny", "SD3Transformer2DModel (MMDiT joint attention), 2 layers, width 16",
          _sd3(False), _sd3_inputs, (8, 12), max_hw=64, model_class="SD3Transformer2DModel")
_register("sd35-tiny", "SD3Transformer2DModel, SD3.5 style: dual attention in layer 0, RMS q/k-norm",
          _sd3(True), _sd3_inputs, (8, 12), max_hw=64, model_class="SD3Transformer2DModel")


# ---------------------------------------------------------------------------- Flux


def _flux_model():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )


def _flux_inputs(batch, h, w, g):
    # FluxPipeline: latents [B, 16, 2h, 2w] packed 2x2 -> [B, h*w, 64]; img_ids [h*w, 3] =
    # (0, row, col) from _prepare_latent_image_ids; txt_ids zeros [T, 3]; timestep = t / 1000;
    # guidance = full([1], scale).expand(B) (guidance-distilled dev model). Toy: 4 channels.
    c = 4
    latents = _randn(g, batch, c, 2 * h, 2 * w)
    packed = latents.view(batch, c, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(batch, h * w, c * 4)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = img_ids[..., 1] + torch.arange(h)[:, None]
    img_ids[..., 2] = img_ids[..., 2] + torch.arange(w)[None, :]
    text_len = 7
    t = _flow_timestep(g, batch)
    return dict(
        hidden_states=packed,
        timestep=t / 1000,
        guidance=torch.full([1], 3.5, dtype=torch.float32).expand(batch),
        pooled_projections=_randn(g, batch, 8),
        encoder_hidden_states=_randn(g, batch, text_len, 16),
        txt_ids=torch.zeros(text_len, 3),
        img_ids=img_ids.reshape(h * w, 3),
        joint_attention_kwargs=None,
    )


_register("flux-tiny", "FluxTransformer2DModel (double + single stream blocks, 3-axis RoPE, guidance), packed inputs",
          _flux_model, _flux_inputs, (4, 6), multiple=1, model_class="FluxTransformer2DModel")


# ---------------------------------------------------------------------------- PixArt-Sigma


def _pixart_model():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=16, interpolation_scale=2,
        use_additional_conditions=False, norm_type="ada_norm_single", norm_elementwise_affine=False,
        norm_eps=1e-6, attention_type="default", activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
    )


def _pixart_inputs(batch, h, w, g):
    # PixArtSigmaPipeline: T5 prompt_embeds [B, 300, 4096] with its tokenizer attention mask
    # (int64, max_length padding), timestep = t[None].expand(B) (int64, DPMSolver), added
    # micro-conditions {"resolution": None, "aspect_ratio": None} (Sigma has none).
    T = 7
    mask = _token_mask(g, batch, T)
    return dict(
        hidden_states=_randn(g, batch, 4, h, w),
        encoder_hidden_states=_padded_text(g, mask, 16),
        encoder_attention_mask=mask,
        timestep=_int_timestep(g, batch),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


_register("pixart-tiny", "PixArtTransformer2DModel, PixArt-Sigma style (AdaLN-single, cross-attention with text mask)",
          _pixart_model, _pixart_inputs, (8, 12), model_class="PixArtTransformer2DModel")


# ---------------------------------------------------------------------------- DiT


def _dit_model():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
    )


def _dit_inputs(batch, h, w, g):
    # DiTPipeline: latents [B, 4, S, S], class_labels int64 [B] (1000 = null class of CFG),
    # timesteps = t[None].expand(B) (int64).
    labels = torch.randint(0, 1001, (batch,), generator=g)
    return dict(
        hidden_states=_randn(g, batch, 4, h, w),
        timestep=_int_timestep(g, batch),
        class_labels=labels,
    )


_register("dit-tiny", "DiTTransformer2DModel (class-conditional, AdaLN-zero); square inputs only",
          _dit_model, _dit_inputs, (8, 8), square_only=True, model_class="DiTTransformer2DModel")


# ---------------------------------------------------------------------------- Lumina-Next


def _lumina_next_model():
    from diffusers import LuminaNextDiT2DModel

    return LuminaNextDiT2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=1, num_attention_heads=2,
        num_kv_heads=2, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, learn_sigma=True, qk_norm=True,
        cross_attention_dim=16, scaling_factor=1.0,
    )


_LUMINA_NEXT_SAMPLE = 8  # transformer.config.sample_size of the tiny model
_VAE_SCALE = 8


def _lumina_next_inputs(batch, h, w, g):
    # LuminaPipeline (Lumina-Next): Gemma prompt_embeds [B, T, 2048] and attention mask
    # (int64), current_timestep = 1 - t / 1000 expanded to B, image_rotary_emb =
    # get_2d_rotary_pos_embed_lumina(head_dim, 384, 384, linear_factor, ntk_factor) with the
    # resolution-dependent scaling factor, cross_attention_kwargs = {"base_sequence_length":
    # (default_image_size // 16) ** 2} (proportional attention).
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    head_dim = 32 // 2
    default_image_size = _LUMINA_NEXT_SAMPLE * _VAE_SCALE
    height, width = h * _VAE_SCALE, w * _VAE_SCALE
    scaling_factor = math.sqrt(width * height / default_image_size**2)
    t = _flow_timestep(g, batch)
    current = 1 - t / 1000
    scaling_watershed = 1.0
    if current[0] < scaling_watershed:
        linear_factor, ntk_factor = scaling_factor, 1.0
    else:
        linear_factor, ntk_factor = 1.0, scaling_factor
    rope = get_2d_rotary_pos_embed_lumina(head_dim, 384, 384, linear_factor=linear_factor, ntk_factor=ntk_factor)
    T = 7
    mask = _token_mask(g, batch, T)
    return dict(
        hidden_states=_randn(g, batch, 4, h, w),
        timestep=current,
        encoder_hidden_states=_randn(g, batch, T, 16),
        encoder_mask=mask,
        image_rotary_emb=rope,
        cross_attention_kwargs={"base_sequence_length": (default_image_size // 16) ** 2},
    )


_register("lumina-next-tiny", "LuminaNextDiT2DModel (complex RoPE table, proportional attention, gated cross-attention)",
          _lumina_next_model, _lumina_next_inputs, (8, 12), max_hw=384 * 2, model_class="LuminaNextDiT2DModel")


# ---------------------------------------------------------------------------- Sana


def _sana_model():
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        mlp_ratio=2.5, sample_size=8, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6,
        interpolation_scale=None, qk_norm=None, timestep_scale=1.0,
    )


def _sana_inputs(batch, h, w, g):
    # SanaPipeline: Gemma-2 prompt_embeds [B, 300, 2304] + attention mask (int64),
    # timestep = t.expand(B) * transformer.config.timestep_scale (int64 DPMSolver timesteps
    # times a float -> float32).
    T = 7
    mask = _token_mask(g, batch, T)
    t = _int_timestep(g, batch) * 1.0
    return dict(
        hidden_states=_randn(g, batch, 4, h, w),
        encoder_hidden_states=_randn(g, batch, T, 16),
        encoder_attention_mask=mask,
        timestep=t,
        attention_kwargs=None,
    )


_register("sana-tiny", "SanaTransformer2DModel (ReLU linear attention, Mix-FFN with depthwise conv), patch 1",
          _sana_model, _sana_inputs, (8, 12), multiple=1, model_class="SanaTransformer2DModel")


# ---------------------------------------------------------------------------- HunyuanDiT


def _hunyuan_model():
    from diffusers import HunyuanDiT2DModel

    return HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8, hidden_size=16,
        num_layers=4, mlp_ratio=2.0, learn_sigma=True, cross_attention_dim=16, norm_type="layer_norm",
        cross_attention_dim_t5=16, pooled_projection_dim=8, text_len=7, text_len_t5=9,
        use_style_cond_and_image_meta_size=True,
    )


def _hunyuan_inputs(batch, h, w, g):
    # HunyuanDiTPipeline: CLIP states [B, 77, 1024] + mask, T5 states [B, 256, 2048] + mask
    # (int64 tokenizer masks), t_expand = tensor([t] * B).to(latent dtype), image_meta_size =
    # [orig h, orig w, target h, target w, crop top, crop left] (float) repeated, style = 0
    # (int64), image_rotary_emb = get_2d_rotary_pos_embed(head_dim, crops, (gh, gw)) (cos, sin).
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    patch = 2
    height, width = h * _VAE_SCALE, w * _VAE_SCALE
    grid_height = height // 8 // patch
    grid_width = width // 8 // patch
    base_size = 512 // 8 // patch
    grid_crops_coords = get_resize_crop_region_for_grid((grid_height, grid_width), base_size)
    rope = get_2d_rotary_pos_embed(16 // 2, grid_crops_coords, (grid_height, grid_width), output_type="pt")
    mask = _token_mask(g, batch, 7)
    mask_t5 = _token_mask(g, batch, 9)
    add_time_ids = torch.tensor([[height, width, height, width, 0, 0]], dtype=torch.float32).repeat(batch, 1)
    t = int(torch.randint(0, 1000, (), generator=g))
    return dict(
        hidden_states=_randn(g, batch, 4, h, w),
        timestep=torch.tensor([t] * batch).to(dtype=torch.float32),
        encoder_hidden_states=_randn(g, batch, 7, 16),
        text_embedding_mask=mask,
        encoder_hidden_states_t5=_padded_text(g, mask_t5, 16),
        text_embedding_mask_t5=mask_t5,
        image_meta_size=add_time_ids,
        style=torch.tensor([0]).repeat(batch),
        image_rotary_emb=rope,
    )


_register("hunyuan-dit-tiny", "HunyuanDiT2DModel (2D RoPE (cos, sin) input, long skips, CLIP+T5 text with masks)",
          _hunyuan_model, _hunyuan_inputs, (8, 12), model_class="HunyuanDiT2DModel")


# ---------------------------------------------------------------------------- AuraFlow


def _auraflow_model():
    from diffusers import AuraFlowTransformer2DModel

    return AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        out_channels=4, pos_embed_max_size=256,
    )


def _auraflow_inputs(batch, h, w, g):
    # AuraFlowPipeline: Pile-T5 prompt_embeds [B, 256, 2048] (padding rows zeroed by the
    # pipeline's attention-mask multiplication), timestep = tensor([t / 1000]).expand(B).
    T = 7
    mask = _token_mask(g, batch, T)
    t = _flow_timestep(g, batch)
    return dict(
        hidden_states=_randn(g, batch, 4, h, w),
        encoder_hidden_states=_padded_text(g, mask, 16),
        timestep=(t / 1000).to(torch.float32),
        attention_kwargs=None,
    )


_register("auraflow-tiny", "AuraFlowTransformer2DModel (MMDiT + single DiT blocks, register tokens, learned pos table)",
          _auraflow_model, _auraflow_inputs, (8, 12), max_hw=32, model_class="AuraFlowTransformer2DModel")


# ---------------------------------------------------------------------------- CogView4


def _cogview4_model():
    from diffusers import CogView4Transformer2DModel

    return CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=16, time_embed_dim=16, condition_dim=4, pos_embed_max_size=32, sample_size=8,
        rope_axes_dim=(32, 32),
    )


def _cogview4_inputs(batch, h, w, g):
    # CogView4Pipeline: GLM prompt_embeds [B, T, 4096] (T a multiple of 16, left padded),
    # timestep = t.expand(B) (float), original_size / target_size / crop_coords = tensor of the
    # pixel sizes (prompt dtype) repeated over the batch. The uncond branch is a second call.
    height, width = h * _VAE_SCALE, w * _VAE_SCALE
    size = torch.tensor([[height, width]], dtype=torch.float32).repeat(batch, 1)
    return dict(
        hidden_states=_randn(g, batch, 4, h, w),
        encoder_hidden_states=_randn(g, batch, 16, 16),
        timestep=_flow_timestep(g, batch),
        original_size=size.clone(),
        target_size=size.clone(),
        crop_coords=torch.zeros(batch, 2, dtype=torch.float32),
        attention_kwargs=None,
    )


_register("cogview4-tiny", "CogView4Transformer2DModel (text+image joint attention, 2D RoPE, size conditioning)",
          _cogview4_model, _cogview4_inputs, (8, 12), max_hw=64, model_class="CogView4Transformer2DModel")


# ---------------------------------------------------------------------------- Lumina 2


def _lumina2_model():
    from diffusers import Lumina2Transformer2DModel

    return Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=None, hidden_size=32, num_layers=1,
        num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None,
        norm_eps=1e-5, scaling_factor=1.0, axes_dim_rope=(4, 4, 8), axes_lens=(64, 64, 64), cap_feat_dim=16,
    )


def _lumina2_inputs(batch, h, w, g):
    # Lumina2Pipeline: Gemma-2 prompt_embeds [B, T, 2304] + attention mask (int64),
    # current_timestep = (1 - t / 1000).expand(B).
    T = 7
    mask = _token_mask(g, batch, T)
    t = _flow_timestep(g, batch)
    return dict(
        hidden_states=_randn(g, batch, 4, h, w),
        timestep=1 - t / 1000,
        encoder_hidden_states=_randn(g, batch, T, 16),
        encoder_attention_mask=mask,
        attention_kwargs=None,
    )


_register("lumina2-tiny", "Lumina2Transformer2DModel (unified text+image sequence, refiners, 3-axis RoPE, GQA)",
          _lumina2_model, _lumina2_inputs, (8, 12), max_hw=128, model_class="Lumina2Transformer2DModel")


# ---------------------------------------------------------------------------- PixArt-Alpha


def _pixart_alpha_model():
    from diffusers import PixArtTransformer2DModel

    # sample_size 128 as the 1024px PixArt-Alpha checkpoints: use_additional_conditions
    # (resolution / aspect-ratio embeddings) is on, and the pipeline passes them.
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=24, sample_size=128, patch_size=2, caption_channels=16, interpolation_scale=None,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, num_embeds_ada_norm=1000,
    )


def _pixart_alpha_inputs(batch, h, w, g):
    # PixArtAlphaPipeline (sample_size 128): added_cond_kwargs = {"resolution": [B, 2] pixel
    # (height, width), "aspect_ratio": [B, 1] height / width} in the prompt dtype.
    kw = _pixart_inputs(batch, h, w, g)
    height, width = h * _VAE_SCALE, w * _VAE_SCALE
    kw["added_cond_kwargs"] = {
        "resolution": torch.tensor([height, width]).repeat(batch, 1).to(torch.float32),
        "aspect_ratio": torch.tensor([float(height / width)]).repeat(batch, 1).to(torch.float32),
    }
    return kw


_register("pixart-alpha-tiny", "PixArtTransformer2DModel, PixArt-Alpha 1024 style (resolution + aspect-ratio conditions)",
          _pixart_alpha_model, _pixart_alpha_inputs, (8, 12), model_class="PixArtTransformer2DModel")


# ---------------------------------------------------------------------------- CogView3-Plus


def _cogview3plus_model():
    from diffusers import CogView3PlusTransformer2DModel

    return CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2, out_channels=4,
        text_embed_dim=16, time_embed_dim=16, condition_dim=4, pos_embed_max_size=32, sample_size=8,
    )


def _cogview3plus_inputs(batch, h, w, g):
    # CogView3PlusPipeline: T5 prompt_embeds [B, 224, 4096], timestep = t.expand(B) (int64,
    # CogVideoXDDIM), original_size / target_size / crop coords as prompt-dtype tensors.
    height, width = h * _VAE_SCALE, w * _VAE_SCALE
    size = torch.tensor([[height, width]], dtype=torch.float32).repeat(batch, 1)
    T = 7
    mask = _token_mask(g, batch, T)
    return dict(
        hidden_states=_randn(g, batch, 4, h, w),
        encoder_hidden_states=_padded_text(g, mask, 16),
        timestep=_int_timestep(g, batch),
        original_size=size.clone(),
        target_size=size.clone(),
        crop_coords=torch.zeros(batch, 2, dtype=torch.float32),
    )


_register("cogview3plus-tiny", "CogView3PlusTransformer2DModel (text+image joint attention, learned/sincos positions)",
          _cogview3plus_model, _cogview3plus_inputs, (8, 12), max_hw=64, model_class="CogView3PlusTransformer2DModel")


# ---------------------------------------------------------------------------- Chroma


def _chroma_model():
    from diffusers import ChromaTransformer2DModel

    return ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4), approximator_num_channels=16, approximator_hidden_dim=32,
        approximator_layers=1,
    )


def _chroma_inputs(batch, h, w, g):
    # ChromaPipeline: Flux-style packed latents and ids, timestep / 1000, and an attention mask
    # [B, T + N]: text tokens up to and including the first padding token, then ones over
    # the image tokens (_prepare_attention_mask; float, the latents' dtype).
    kw = _flux_inputs(batch, h, w, g)
    del kw["guidance"], kw["pooled_projections"]
    T = kw["encoder_hidden_states"].shape[1]
    tok = _token_mask(g, batch, T, min_len=1)
    seq_lengths = tok.sum(dim=1)
    mask_indices = torch.arange(T).unsqueeze(0).expand(batch, -1)
    text_mask = (mask_indices <= seq_lengths.unsqueeze(1)).to(torch.float32)
    kw["attention_mask"] = torch.cat([text_mask, torch.ones(batch, h * w, dtype=torch.bool)], dim=1)
    return kw


_register("chroma-tiny", "ChromaTransformer2DModel (Flux-like, distilled modulation, text+image attention mask)",
          _chroma_model, _chroma_inputs, (4, 6), multiple=1, model_class="ChromaTransformer2DModel")


# ============================================================================ video models
_FRAMES = 2

# ---------------------------------------------------------------------------- Wan


def _wan_model():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=64,
    )


def _wan_inputs(batch, h, w, g):
    # WanPipeline: latents [B, 16, F, H, W], timestep = t.expand(B) (float, FlowMatch/UniPC),
    # UMT5 prompt_embeds [B, 512, 4096] zero-padded after each prompt's length.
    T = 7
    mask = _token_mask(g, batch, T)
    return dict(
        hidden_states=_randn(g, batch, 4, _FRAMES, h, w),
        timestep=_flow_timestep(g, batch),
        encoder_hidden_states=_padded_text(g, mask, 16),
        attention_kwargs=None,
    )


_register("wan-tiny", "WanTransformer3DModel (video [B, C, F, H, W], 3D RoPE, cross-attention), 2 latent frames",
          _wan_model, _wan_inputs, (8, 12), max_hw=128, frames=_FRAMES, model_class="WanTransformer3DModel")


# ---------------------------------------------------------------------------- CogVideoX


def _cogvideox(rope: bool):
    def make():
        from diffusers import CogVideoXTransformer3DModel

        return CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
            text_embed_dim=16, num_layers=1, sample_width=12, sample_height=8, sample_frames=5, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=7,
            use_rotary_positional_embeddings=rope, use_learned_positional_embeddings=False,
        )

    return make


def _cogvideox_inputs(rope: bool):
    def inputs(batch, h, w, g):
        # CogVideoXPipeline: latents [B, F, C, H, W], T5 prompt_embeds [B, 226, 4096] (zero
        # padded), timestep = t.expand(B) (int64, CogVideoXDDIM), image_rotary_emb from
        # _prepare_rotary_positional_embeddings (5B models) or None (2B: sincos positions).
        T = 7
        mask = _token_mask(g, batch, T)
        kw: dict[str, Any] = dict(
            hidden_states=_randn(g, batch, _FRAMES, 4, h, w),
            encoder_hidden_states=_padded_text(g, mask, 16),
            timestep=_int_timestep(g, batch),
            image_rotary_emb=None,
            attention_kwargs=None,
        )
        if rope:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed
            from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

            p = 2
            height, width = h * _VAE_SCALE, w * _VAE_SCALE
            grid_height = height // (_VAE_SCALE * p)
            grid_width = width // (_VAE_SCALE * p)
            base_w, base_h = 12 // p, 8 // p
            crops = get_resize_crop_region_for_grid((grid_height, grid_width), base_w, base_h)
            kw["image_rotary_emb"] = get_3d_rotary_pos_embed(
                embed_dim=16, crops_coords=crops, grid_size=(grid_height, grid_width), temporal_size=_FRAMES,
            )
        return kw

    return inputs


_register("cogvideox-tiny", "CogVideoXTransformer3DModel, 2B style (3D sincos positions), [B, F, C, H, W], 2 frames",
          _cogvideox(False), _cogvideox_inputs(False), (8, 12), frames=_FRAMES,
          model_class="CogVideoXTransformer3DModel")
_register("cogvideox-rope-tiny", "CogVideoXTransformer3DModel, 5B style (3D RoPE (cos, sin) passed in), 2 frames",
          _cogvideox(True), _cogvideox_inputs(True), (8, 12), frames=_FRAMES,
          model_class="CogVideoXTransformer3DModel")


# ---------------------------------------------------------------------------- LTX-Video


def _ltx_model():
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=1, caption_channels=16, qk_norm="rms_norm_across_heads",
        norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True, attention_out_bias=True,
    )


def _ltx_inputs(batch, h, w, g):
    # LTXPipeline: latents [B, 128, F, H, W] packed to [B, F*H*W, 128] (_pack_latents, patch
    # 1), T5 prompt_embeds [B, 128, 4096] + bool mask, timestep = t.expand(B) (float),
    # num_frames/height/width = latent sizes, rope_interpolation_scale = (8 / frame_rate, 32, 32).
    c, f = 8, _FRAMES
    latents = _randn(g, batch, c, f, h, w)
    packed = latents.reshape(batch, c, f, 1, h, 1, w, 1).permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)
    T = 7
    mask = _token_mask(g, batch, T, dtype=torch.bool)
    frame_rate = 25
    return dict(
        hidden_states=packed,
        encoder_hidden_states=_padded_text(g, mask, 16),
        timestep=_flow_timestep(g, batch),
        encoder_attention_mask=mask,
        num_frames=f,
        height=h,
        width=w,
        rope_interpolation_scale=(8 / frame_rate, 32, 32),
        attention_kwargs=None,
    )


_register("ltx-tiny", "LTXVideoTransformer3DModel (packed video tokens, 3D RoPE from num_frames/height/width ints)",
          _ltx_model, _ltx_inputs, (8, 12), multiple=1, frames=_FRAMES, model_class="LTXVideoTransformer3DModel")


# ---------------------------------------------------------------------------- HunyuanVideo


def _hunyuan_video_model():
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8, rope_theta=256.0, rope_axes_dim=(2, 2, 4),
    )


def _hunyuan_video_inputs(batch, h, w, g):
    # HunyuanVideoPipeline: latents [B, 16, F, H, W], timestep = t.expand(B) (float), Llama
    # prompt_embeds + attention mask cast to the transformer dtype, CLIP pooled [B, 768],
    # guidance = tensor([scale] * B) * 1000.
    T = 7
    mask = _token_mask(g, batch, T)
    return dict(
        hidden_states=_randn(g, batch, 4, _FRAMES, h, w),
        timestep=_flow_timestep(g, batch),
        encoder_hidden_states=_randn(g, batch, T, 16),
        encoder_attention_mask=mask.to(torch.float32),
        pooled_projections=_randn(g, batch, 8),
        guidance=torch.tensor([6.0] * batch, dtype=torch.float32) * 1000.0,
        attention_kwargs=None,
    )


_register("hunyuan-video-tiny", "HunyuanVideoTransformer3DModel (token refiner, double + single stream, 3D RoPE), 2 frames",
          _hunyuan_video_model, _hunyuan_video_inputs, (8, 12), frames=_FRAMES,
          model_class="HunyuanVideoTransformer3DModel")


# ---------------------------------------------------------------------------- Mochi


def _mochi_model():
    from diffusers import MochiTransformer3DModel

    return MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=1, pooled_projection_dim=16,
        in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
        activation_fn="swiglu", max_sequence_length=7,
    )


def _mochi_inputs(batch, h, w, g):
    # MochiPipeline: latents [B, 12, F, H, W], T5 prompt_embeds [B, 256, 4096] + bool mask,
    # timestep = t.expand(B) (float, 1000 - sigma scale).
    T = 7
    mask = _token_mask(g, batch, T, dtype=torch.bool)
    return dict(
        hidden_states=_randn(g, batch, 4, _FRAMES, h, w),
        encoder_hidden_states=_padded_text(g, mask, 16),
        timestep=_flow_timestep(g, batch),
        encoder_attention_mask=mask,
        attention_kwargs=None,
    )


_register("mochi-tiny", "MochiTransformer3DModel (asymmetric joint attention, text mask, 3D RoPE), 2 frames",
          _mochi_model, _mochi_inputs, (8, 12), frames=_FRAMES, model_class="MochiTransformer3DModel")


# ------------------------------------------------------------------------------------ lookup

PRESETS: dict[str, Preset] = _REGISTRY


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise UsageError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}") from None
from . import presets_extra  # noqa: E402,F401  (registers the presets of presets_extra)
