"""More tiny presets: diffusers DiT classes beyond :mod:`rasfx.presets.image` and
:mod:`rasfx.presets.video` (the newer ones are in ``extra_image``, ``extra_video``, ``extra_audio``);
the classes without a preset (``NOT_COVERED``) and the presets rasfx cannot transform yet.

Same conventions as :mod:`rasfx.presets` (toy sizes, every parameter re-randomised, forward
keyword arguments built the way the class's diffusers pipeline builds them); the presets
register themselves in :data:`rasfx.presets.PRESETS` when :mod:`rasfx.presets` is imported.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from .inputs import (
    _FRAMES, _VAE_SCALE, _flow_timestep, _int_timestep, _latent_ids, _pack_2x2, _padded_text, _randn, _token_mask,
    _with_zero_condition,
)
from .registry import _REGISTRY, KnownFailure, _register

__all__ = ["NOT_COVERED"]

#: diffusers 0.42.1 transformer classes without a preset, and why (docs/models.md lists them).
NOT_COVERED: dict[str, str] = {
    "Flux3Transformer2DModel": "no diffusers pipeline builds its inputs",
    "MiniMaxH3Transformer3DModel": "no diffusers pipeline builds its inputs",
    "MiniMaxMusic3Transformer1DModel": "no diffusers pipeline builds its inputs",
    "WanAnimate2Transformer3DModel": "no diffusers pipeline builds its inputs",
    "AnyFlowFARTransformer3DModel": "not attempted: frame-autoregressive chunks with a KV cache that forward fills",
    "SanaWMTransformer3DModel": "not attempted: chunked camera-conditioned world model (data_info, Plücker inputs)",
    "SanaWMLTX2RefinerTransformer3DModel": "not attempted: refiner driven by a KV cache and cache modes",
    "Cosmos3OmniTransformer": "not attempted: omni model over token index tensors (text, vision, sound, action)",
    "Kandinsky6SRTransformer3DModel": "not attempted: super-resolution on fixed tiles with NABLA flex-attention masks",
    "RFD4ProteinaTransformer": "not an image model: protein structure diffusion over residues",
    "PriorTransformer": "not a DiT over latents: CLIP image-embedding prior",
    "T5FilmDecoder": "not attempted: spectrogram decoder over note-encoder outputs (encodings_and_masks lists)",
    "MiniMaxMusic3RVQDepthDecoder": "not a diffusion model: RVQ depth decoder",
    "DreamLiteTransformer2DModel": "a block of DreamLiteUNetModel (a U-Net)",
    "DualTransformer2DModel": "a U-Net component (Versatile Diffusion)",
    "TransformerTemporalModel": "a U-Net component (AnimateDiff / video U-Nets)",
    "Transformer2DModel": "the legacy U-Net/DiT block; DiT and PixArt have their own classes and presets",
}

# ---------------------------------------------------------------------------- Allegro


def _allegro_model():
    from diffusers import AllegroTransformer3DModel

    return AllegroTransformer3DModel(
        patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        num_layers=2, cross_attention_dim=24, sample_height=8, sample_width=12, sample_frames=_FRAMES,
        caption_channels=16,
    )


def _allegro_inputs(batch, h, w, g):
    # AllegroPipeline: latents [B, 4, F, H, W], T5 prompt_embeds [B, 512, 4096] + tokenizer mask
    # (int64), timestep = t.expand(B) (float, EulerAncestral), image_rotary_emb from
    # _prepare_rotary_positional_embeddings: (freqs_t, freqs_h, freqs_w), (grid_t, grid_h, grid_w).
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    T = 7
    mask = _token_mask(g, batch, T)
    p, head_dim = 2, 12
    grid_height, grid_width = h // p, w // p
    freqs_t, freqs_h, freqs_w, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(  # type: ignore[misc]  # diffusers annotates 2 of its 6 results
        embed_dim=head_dim, crops_coords=((0, 0), (grid_height, grid_width)), grid_size=(grid_height, grid_width),
        temporal_size=_FRAMES, interpolation_scale=(2.2, 2.0, 2.0),
    )
    pos = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long())
    pos = pos.reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1).contiguous()
    return dict(
        hidden_states=_randn(g, batch, 4, _FRAMES, h, w),
        encoder_hidden_states=_randn(g, batch, T, 16),
        encoder_attention_mask=mask,
        timestep=_flow_timestep(g, batch),
        image_rotary_emb=((freqs_t, freqs_h, freqs_w), tuple(pos)),
    )


_register("allegro-tiny", "AllegroTransformer3DModel (PixArt-style video DiT, 3D RoPE tables + grid ids), 2 frames",
          _allegro_model, _allegro_inputs, (8, 12), frames=_FRAMES, model_class="AllegroTransformer3DModel")


# ---------------------------------------------------------------------------- Cosmos


def _edm_timestep(g: torch.Generator, batch: int) -> torch.Tensor:
    """An EDM scheduler timestep: ``precondition_noise(sigma) = 0.25 * log(sigma)`` for a sigma
    in [0.002, 80], expanded to the batch."""
    sigma = 0.002 * (80 / 0.002) ** torch.rand((), generator=g)
    return (0.25 * torch.log(sigma)).to(torch.float32).expand(batch)


def _cosmos_model():
    from diffusers import CosmosTransformer3DModel

    # concat_padding_mask=False: the checkpoints concatenate the pipeline's all-zero padding
    # mask as an extra channel, resized with torchvision, which rasfx does not depend on.
    return CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2.0,
        text_embed_dim=16, adaln_lora_dim=8, max_size=(8, 64, 64), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=False, extra_pos_embed_type="learnable",
    )


def _cosmos_inputs(batch, h, w, g):
    # CosmosTextToWorldPipeline (Cosmos 1.0): latents [B, 16, F, H, W], T5 prompt_embeds
    # [B, 512, 1024] zeroed after each prompt's length, timestep = t.expand(B) (EDM
    # preconditioned noise level), fps (int), padding_mask = zeros [1, 1, height, width] (pixels).
    T = 7
    mask = _token_mask(g, batch, T)
    return dict(
        hidden_states=_randn(g, batch, 4, _FRAMES, h, w),
        timestep=_edm_timestep(g, batch),
        encoder_hidden_states=_padded_text(g, mask, 16),
        fps=30,
        padding_mask=torch.zeros(1, 1, h * _VAE_SCALE, w * _VAE_SCALE),
    )


_register("cosmos-tiny", "CosmosTransformer3DModel, Cosmos 1.0 text2world style (AdaLN-LoRA, learnable + RoPE positions, "
          "fps), 2 frames", _cosmos_model, _cosmos_inputs, (8, 12), max_hw=64, frames=_FRAMES,
          model_class="CosmosTransformer3DModel")


# ---------------------------------------------------------------------------- SkyReels-V2


def _skyreels(diffusion_forcing: bool):
    def make():
        from diffusers import SkyReelsV2Transformer3DModel

        return SkyReelsV2Transformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
        )

    return make


def _skyreels_inputs(diffusion_forcing: bool):
    def inputs(batch, h, w, g):
        # SkyReelsV2Pipeline: as Wan (timestep = t.expand(B), UMT5 prompt_embeds zero padded).
        # SkyReelsV2DiffusionForcingPipeline: one timestep per latent frame ([B, F] rows of the
        # step matrix, float), enable_diffusion_forcing=True. No fps embedding (inject_sample_info):
        # with a [B, F] timestep it broadcasts only for batch 1 (transformer_skyreels_v2.py:715).
        T = 7
        mask = _token_mask(g, batch, T)
        kw: dict[str, Any] = dict(
            hidden_states=_randn(g, batch, 4, _FRAMES, h, w),
            timestep=_flow_timestep(g, batch),
            encoder_hidden_states=_padded_text(g, mask, 16),
            attention_kwargs=None,
        )
        if diffusion_forcing:
            kw["timestep"] = (torch.rand(_FRAMES, generator=g) * 1000.0).expand(batch, -1)
            kw["enable_diffusion_forcing"] = True
        return kw

    return inputs


_register("skyreels-v2-tiny", "SkyReelsV2Transformer3DModel, T2V style (Wan-like video DiT), 2 frames",
          _skyreels(False), _skyreels_inputs(False), (8, 12), max_hw=128, frames=_FRAMES,
          model_class="SkyReelsV2Transformer3DModel")
_register("skyreels-v2-df-tiny", "SkyReelsV2Transformer3DModel, diffusion forcing: a timestep per latent frame, 2 frames",
          _skyreels(True), _skyreels_inputs(True), (8, 12), max_hw=128, frames=_FRAMES,
          model_class="SkyReelsV2Transformer3DModel")


# ---------------------------------------------------------------------------- Latte


def _latte_model():
    from diffusers import LatteTransformer3DModel

    return LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, attention_bias=True, sample_size=8, patch_size=2, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        caption_channels=16, video_length=_FRAMES,
    )


def _latte_inputs(batch, h, w, g):
    # LattePipeline: latents [B, 4, F, H, W] (F = video_length), T5 prompt_embeds [B, 120, 4096]
    # (no mask passed to the transformer), timestep = t[None].expand(B) (int64, DDIM),
    # enable_temporal_attentions=True.
    return dict(
        hidden_states=_randn(g, batch, 4, _FRAMES, h, w),
        encoder_hidden_states=_randn(g, batch, 7, 16),
        timestep=_int_timestep(g, batch),
        enable_temporal_attentions=True,
    )


_register("latte-tiny", "LatteTransformer3DModel (alternating spatial [B*F, HW] and temporal [B*HW, F] blocks: one "
          "token set, the HW positions, whose active set the frames share), 2 frames",
          _latte_model, _latte_inputs, (8, 12), frames=_FRAMES, model_class="LatteTransformer3DModel")


# ---------------------------------------------------------------------------- Bria


def _bria_model():
    from diffusers import BriaTransformer2DModel

    return BriaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=None, guidance_embeds=False, axes_dims_rope=(2, 2, 4),
    )


def _bria_inputs(batch, h, w, g):
    # BriaPipeline: Flux-style packed latents [B, h*w, 64], T5 prompt_embeds [B, 128, 4096]
    # zero padded, text_ids zeros [T, 3] and latent_image_ids [h*w, 3] (the pipeline drops the
    # batch dim), timestep = t.expand(B) (float in [0, 1000], not divided), no pooled / guidance.
    T = 7
    mask = _token_mask(g, batch, T)
    return dict(
        hidden_states=_pack_2x2(_randn(g, batch, 4, 2 * h, 2 * w)),
        timestep=_flow_timestep(g, batch),
        encoder_hidden_states=_padded_text(g, mask, 16),
        attention_kwargs=None,
        txt_ids=torch.zeros(T, 3),
        img_ids=_latent_ids(h, w),
    )


_register("bria-tiny", "BriaTransformer2DModel (Flux-like double + single stream, no pooled text), packed inputs",
          _bria_model, _bria_inputs, (4, 6), multiple=1, model_class="BriaTransformer2DModel")


# ---------------------------------------------------------------------------- Stable Audio


def _stable_audio_model():
    from diffusers import StableAudioDiTModel

    return StableAudioDiTModel(
        sample_size=32, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=16, time_proj_dim=16,
        global_states_input_dim=32, cross_attention_input_dim=16,
    )


def _stable_audio_inputs(batch, h, w, g):
    # StableAudioPipeline: latents [B, 64, L] (1-D audio latents; here L = height * width),
    # timestep t.unsqueeze(0) ([1], EDM preconditioned noise), encoder_hidden_states =
    # cat(T5 prompt_embeds masked by the tokenizer mask, seconds_start, seconds_end) on the
    # token axis, global_hidden_states = cat(seconds_start, seconds_end) on the feature axis
    # [B, 1, 1536], rotary_embedding = get_1d_rotary_pos_embed(head_dim // 2, L + 1, use_real=True,
    # repeat_interleave_real=False).
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    length = h * w
    T = 7
    mask = _token_mask(g, batch, T)
    start, end = _randn(g, batch, 1, 16), _randn(g, batch, 1, 16)
    return dict(
        hidden_states=_randn(g, batch, 4, length),
        timestep=_edm_timestep(g, 1),
        encoder_hidden_states=torch.cat([_padded_text(g, mask, 16), start, end], dim=1),
        global_hidden_states=torch.cat([start, end], dim=2),
        rotary_embedding=get_1d_rotary_pos_embed(8 // 2, length + 1, use_real=True, repeat_interleave_real=False),
    )


_register("stable-audio-tiny", "StableAudioDiTModel (1-D audio latents [B, C, L], L = height * width, global token, "
          "GQA, 1-D RoPE)", _stable_audio_model, _stable_audio_inputs, (4, 6), multiple=1,
          model_class="StableAudioDiTModel")


# ---------------------------------------------------------------------------- Flux 2


def _flux2_model():
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=16, mlp_ratio=2.0, axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=True,
    )


def _flux2_inputs(batch, h, w, g):
    # Flux2Pipeline: latents drawn as [B, 4C, h, w] and packed to [B, h*w, 4C] (a reshape);
    # latent_ids = cartesian_prod(t=[0], h, w, l=[0]) [B, h*w, 4] and text_ids =
    # cartesian_prod([0], [0], [0], arange(T)) [B, T, 4] (int64); timestep = t.expand(B) / 1000;
    # guidance = full([1], scale).expand(B) (float32).
    T = 7
    latents = _randn(g, batch, 16, h, w)
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(T))
    return dict(
        hidden_states=latents.reshape(batch, 16, h * w).permute(0, 2, 1),
        timestep=_flow_timestep(g, batch) / 1000,
        guidance=torch.full([1], 4.0, dtype=torch.float32).expand(batch),
        encoder_hidden_states=_randn(g, batch, T, 16),
        txt_ids=txt_ids.unsqueeze(0).expand(batch, -1, -1),
        img_ids=img_ids.unsqueeze(0).expand(batch, -1, -1),
        joint_attention_kwargs=None,
    )


_register("flux2-tiny", "Flux2Transformer2DModel (shared modulations, double + single stream, 4-axis RoPE, guidance)",
          _flux2_model, _flux2_inputs, (4, 6), multiple=1, model_class="Flux2Transformer2DModel")


# ---------------------------------------------------------------------------- Z-Image


def _zimage_model():
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=24, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0, axes_dims=[4, 4, 4], axes_lens=[64, 32, 32],
    )


def _zimage_inputs(batch, h, w, g):
    # ZImagePipeline: x = list(latents.unsqueeze(2).unbind(0)) (B tensors [C, 1, H, W]),
    # t = (1000 - t.expand(B)) / 1000, cap_feats = [prompt_embeds[i][mask[i]]] (one [L_i, D]
    # tensor per prompt, its own length). Positional: the pipeline passes x, t, cap_feats.
    T = 7
    mask = _token_mask(g, batch, T, dtype=torch.bool)
    embeds = _randn(g, batch, T, 16)
    latents = _randn(g, batch, 4, h, w)
    return dict(
        x=list(latents.unsqueeze(2).unbind(dim=0)),
        t=(1000 - _flow_timestep(g, batch)) / 1000,
        cap_feats=[embeds[i][mask[i]] for i in range(batch)],
        joint_attention_kwargs=None,
    )


_register("zimage-tiny", "ZImageTransformer2DModel (per-sample lists x / cap_feats, unified sequence, refiners)",
          _zimage_model, _zimage_inputs, (8, 12), max_hw=64, model_class="ZImageTransformer2DModel",
          tags=("image_input=x", "timestep_input=t"))


# ---------------------------------------------------------------------------- Sana-Video


def _sana_video_model():
    from diffusers import SanaVideoTransformer3DModel

    return SanaVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=16,
        mlp_ratio=2.5, sample_size=8, patch_size=(1, 2, 2), qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    )


def _sana_video_inputs(batch, h, w, g):
    # SanaVideoPipeline: latents [B, 16, F, H, W], Gemma-2 prompt_embeds [B, 300, 2304] +
    # tokenizer mask (int64), timestep = t.expand(B) (float, flow matching).
    T = 7
    mask = _token_mask(g, batch, T)
    return dict(
        hidden_states=_randn(g, batch, 4, _FRAMES, h, w),
        encoder_hidden_states=_randn(g, batch, T, 16),
        encoder_attention_mask=mask,
        timestep=_flow_timestep(g, batch),
        attention_kwargs=None,
    )


_register("sana-video-tiny", "SanaVideoTransformer3DModel (linear attention, 3D RoPE, temporal Mix-FFN), 2 frames",
          _sana_video_model, _sana_video_inputs, (8, 12), max_hw=128, frames=_FRAMES,
          model_class="SanaVideoTransformer3DModel")


# ---------------------------------------------------------------------------- EasyAnimate


def _easyanimate_model():
    from diffusers import EasyAnimateTransformer3DModel

    return EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2, sample_width=12,
        sample_height=8, num_layers=2, mmdit_layers=2, time_embed_dim=16, text_embed_dim=16, text_embed_dim_t5=None,
        time_position_encoding_type="3d_rope", enable_text_attention_mask=True,
    )


def _easyanimate_inputs(batch, h, w, g):
    # EasyAnimatePipeline (V5.1): latents [B, 16, F, H, W], Qwen2-VL hidden states [B, T, 3584]
    # (the tokenizer mask goes to the text encoder only), t_expand = tensor([t] * B) in the
    # latents' dtype (flow matching, float), positional (latents, t_expand).
    t = float(torch.rand((), generator=g) * 1000.0)
    return dict(
        hidden_states=_randn(g, batch, 4, _FRAMES, h, w),
        timestep=torch.tensor([t] * batch).to(torch.float32),
        encoder_hidden_states=_randn(g, batch, 7, 16),
    )


_register("easyanimate-tiny", "EasyAnimateTransformer3DModel (MMDiT joint text+video attention, 3D RoPE), 2 frames",
          _easyanimate_model, _easyanimate_inputs, (8, 12), frames=_FRAMES,
          model_class="EasyAnimateTransformer3DModel")


# ---------------------------------------------------------------------------- Kandinsky 5


def _kandinsky5_model():
    from diffusers import Kandinsky5Transformer3DModel

    return Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=24, ff_dim=48, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 4, 4), visual_cond=True,
    )


def _kandinsky5_inputs(batch, h, w, g):
    # Kandinsky5T2VPipeline: channels-last latents [B, F, H, W, C] concatenated with zero
    # visual-conditioning latents and a zero mask channel ([B, F, H, W, 2C + 1]); Qwen2.5-VL
    # hidden states [B, T, 3584] (no mask: padding="longest"), CLIP pooled [B, 768],
    # timestep = t.unsqueeze(0).repeat(B) (float), visual_rope_pos = [arange(F), arange(H // 2),
    # arange(W // 2)], text_rope_pos = arange(longest prompt), scale_factor from
    # _get_scale_factor (outside 480p: (1, 3.16, 3.16)), sparse_params None (regular attention).
    T = 7
    t = torch.rand((), generator=g) * 1000.0
    return dict(
        hidden_states=_with_zero_condition(_randn(g, batch, _FRAMES, h, w, 4), dim=-1),
        encoder_hidden_states=_randn(g, batch, T, 16),
        pooled_projections=_randn(g, batch, 8),
        timestep=t.unsqueeze(0).repeat(batch).to(torch.float32),
        visual_rope_pos=[torch.arange(_FRAMES), torch.arange(h // 2), torch.arange(w // 2)],
        text_rope_pos=torch.arange(T),
        scale_factor=(1, 3.16, 3.16),
        sparse_params=None,
    )


_register("kandinsky5-tiny", "Kandinsky5Transformer3DModel (channels-last video [B, F, H, W, C], text encoder blocks, "
          "RoPE from position lists), 2 frames", _kandinsky5_model, _kandinsky5_inputs, (8, 12), max_hw=64,
          frames=_FRAMES, model_class="Kandinsky5Transformer3DModel")


# ---------------------------------------------------------------------------- Qwen-Image


def _qwenimage_model():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(2, 2, 4),
    )


def _qwenimage_inputs(batch, h, w, g):
    # QwenImagePipeline: latents [B, 16, 2h, 2w] packed 2x2 -> [B, h*w, 64]; Qwen2.5-VL hidden
    # states of the valid tokens stacked and zero padded to the longest prompt, its mask (int64;
    # None when every prompt has the longest length); timestep = t.expand(B) / 1000; img_shapes
    # = [[(1, h, w)]] * B (python ints); guidance None (not guidance-distilled).
    T = 7
    mask = _token_mask(g, batch, T)
    mask[0] = 1  # padding to the longest prompt: one row is all ones
    return dict(
        hidden_states=_pack_2x2(_randn(g, batch, 4, 2 * h, 2 * w)),
        timestep=_flow_timestep(g, batch) / 1000,
        guidance=None,
        encoder_hidden_states_mask=mask,
        encoder_hidden_states=_padded_text(g, mask, 16),
        img_shapes=[[(1, h, w)]] * batch,
        attention_kwargs={},
    )


_register("qwenimage-tiny", "QwenImageTransformer2DModel (MMDiT, text mask, RoPE built from img_shapes python ints)",
          _qwenimage_model, _qwenimage_inputs, (4, 6), multiple=1, model_class="QwenImageTransformer2DModel")


# ---------------------------------------------------------------------------- HiDream-I1


def _hidream_model():
    from diffusers import HiDreamImageTransformer2DModel

    return HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[16, 16], text_emb_dim=8, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(16, 16), llama_layers=[0, 1],
    )


def _hidream_inputs(batch, h, w, g):
    # HiDreamImagePipeline: latents [B, 16, H, W] (the model patchifies; non-square latents are
    # padded to max_seq tokens with a mask), T5 prompt_embeds [B, 128, 4096], Llama-3.1 hidden
    # states of every layer stacked [L, B, 128, 4096], CLIP-L + CLIP-G pooled [B, 2048],
    # timesteps = t.expand(B) (float in [0, 1000], flow matching).
    T = 7
    return dict(
        hidden_states=_randn(g, batch, 4, h, w),
        timesteps=_flow_timestep(g, batch),
        encoder_hidden_states_t5=_randn(g, batch, T, 16),
        encoder_hidden_states_llama3=_randn(g, 2, batch, T, 16),
        pooled_embeds=_randn(g, batch, 8),
        attention_kwargs=None,
    )


_register("hidream-tiny", "HiDreamImageTransformer2DModel (MoE feed-forward, Llama layer states per block, padded "
          "non-square tokens)", _hidream_model, _hidream_inputs, (8, 12), max_hw=16,
          model_class="HiDreamImageTransformer2DModel", tags=("timestep_input=timesteps",))


# ---------------------------------------------------------------------------- CogVideoX 1.5

_COGVIDEOX15_FRAMES = 4  # latent frames: 2 after the temporal patch of 2


def _cogvideox15_model():
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=16, num_layers=2, sample_width=32, sample_height=32, sample_frames=9, patch_size=2,
        patch_size_t=2, temporal_compression_ratio=4, max_text_seq_length=7, use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=False, patch_bias=False,
    )


def _cogvideox15_inputs(batch, h, w, g):
    # CogVideoXPipeline with a CogVideoX 1.5 transformer: latents [B, F, C, H, W] with F padded
    # to a multiple of patch_size_t, T5 prompt_embeds [B, 224, 4096] (zero padded), timestep =
    # t.expand(B) (int64), image_rotary_emb = get_3d_rotary_pos_embed(head_dim, None, (gh, gw),
    # F // p_t, grid_type="slice", max_size=(sample_height // p, sample_width // p)).
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    T = 7
    mask = _token_mask(g, batch, T)
    p, p_t = 2, 2
    return dict(
        hidden_states=_randn(g, batch, _COGVIDEOX15_FRAMES, 4, h, w),
        encoder_hidden_states=_padded_text(g, mask, 16),
        timestep=_int_timestep(g, batch),
        image_rotary_emb=get_3d_rotary_pos_embed(
            embed_dim=16, crops_coords=None, grid_size=(h // p, w // p), temporal_size=_COGVIDEOX15_FRAMES // p_t,
            grid_type="slice", max_size=(32 // p, 32 // p),
        ),
        attention_kwargs=None,
    )


_register("cogvideox15-tiny", "CogVideoXTransformer3DModel, 1.5 style (temporal patch 2, sliced 3D RoPE), 4 latent "
          "frames", _cogvideox15_model, _cogvideox15_inputs, (8, 12), max_hw=32, frames=_COGVIDEOX15_FRAMES,
          model_class="CogVideoXTransformer3DModel")




# Why rasfx cannot transform these presets yet (``rasfx presets`` prints the reason; tests/test_cli.py
# checks that ``rasfx inspect`` still fails with the fragment). Rasfx bugs among them are listed with
# their diagnosis in tests/test_equivalence.py (KNOWN_BUGS); the rest are limits of torch.export.
_SECOND_SIZE = "could not capture the model at a second resolution"
_KNOWN_FAILURES = {
    "framepack-tiny": ("mask-sum lengths slice the sequence per sample (data-dependent on the prompt mask)",
                       "data-dependent"),
}


def mark_known_failures() -> None:
    """Set ``known_failure`` on the presets of ``_KNOWN_FAILURES`` (called once every family
    module has registered its presets)."""
    for name, (reason, error) in _KNOWN_FAILURES.items():
        _REGISTRY[name] = replace(_REGISTRY[name], known_failure=KnownFailure(reason, error))
