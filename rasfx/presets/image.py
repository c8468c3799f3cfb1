"""Presets of the image DiT classes that rasfx was first checked on (SD3 to Chroma)."""

from __future__ import annotations

import math

import torch

from .inputs import _flow_timestep, _int_timestep, _padded_text, _randn, _token_mask, _VAE_SCALE
from .registry import _register


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
