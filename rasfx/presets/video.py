"""Presets of the video DiT classes that rasfx was first checked on (Wan to Mochi)."""

from __future__ import annotations

from typing import Any

import torch

from .inputs import _FRAMES, _VAE_SCALE, _flow_timestep, _int_timestep, _padded_text, _randn, _token_mask
from .registry import _register


# ============================================================================ video models

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
          model_class="CogVideoXTransformer3DModel",
          fixed_size="built for 8 x 12 (sample_height, sample_width): at any other size CogVideoXPatchEmbed rebuilds its "
                     "sin-cos table through .data (embeddings.py), which torch.export cannot capture")
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
