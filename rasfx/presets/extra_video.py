"""Tiny presets of the newer diffusers video DiT classes (see :mod:`rasfx.presets.extra`)."""

from __future__ import annotations

import torch

from .inputs import _FRAMES, _flow_timestep, _padded_text, _randn, _token_mask, _with_zero_condition
from .registry import _register

# ---------------------------------------------------------------------------- ChronoEdit


def _chronoedit_model():
    from diffusers import ChronoEditTransformer3DModel

    return ChronoEditTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, image_dim=16, added_kv_proj_dim=24, rope_max_seq_len=64,
    )


def _chronoedit_inputs(batch, h, w, g):
    # ChronoEditPipeline (Wan 2.1 I2V based image edit, 2 latent frames: input and edited
    # image): latent_model_input = cat(latents [B, 16, F, H, W], condition = cat(first-frame
    # mask [B, 4, F, H, W], VAE latents of the input image padded with zero frames)) on the
    # channels; CLIP image hidden states [B, 257, 1280]; UMT5 prompt_embeds zero padded;
    # timestep = t.expand(B) (float).
    T = 7
    mask = torch.zeros(batch, 4, _FRAMES, h, w)
    mask[:, :, 0] = 1
    condition = torch.cat([mask, _randn(g, batch, 4, _FRAMES, h, w)], dim=1)
    return dict(
        hidden_states=torch.cat([_randn(g, batch, 4, _FRAMES, h, w), condition], dim=1),
        timestep=_flow_timestep(g, batch),
        encoder_hidden_states=_padded_text(g, _token_mask(g, batch, T), 16),
        encoder_hidden_states_image=_randn(g, batch, 5, 16),
        attention_kwargs=None,
    )


_register("chronoedit-tiny", "ChronoEditTransformer3DModel (Wan I2V based image edit: condition channels, image "
          "K/V, 2-frame RoPE)", _chronoedit_model, _chronoedit_inputs, (8, 12), max_hw=128, frames=_FRAMES,
          model_class="ChronoEditTransformer3DModel")


# ---------------------------------------------------------------------------- Wan VACE


def _wan_vace_model():
    from diffusers import WanVACETransformer3DModel

    return WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=64, vace_layers=[0, 1],
        vace_in_channels=8 + 16,
    )


def _wan_vace_inputs(batch, h, w, g):
    # WanVACEPipeline: control_hidden_states = cat(VAE latents of the inactive and reactive
    # video (2 x 16 channels), the pixel mask folded to latent resolution (8 x 8 = 64 channels,
    # here 4 x 4)) [B, 96, F, H, W]; control_hidden_states_scale = tensor of conditioning_scale
    # per VACE layer; otherwise as Wan.
    T = 7
    mask = (torch.rand(batch, 16, _FRAMES, h, w, generator=g) > 0.5).float()
    return dict(
        hidden_states=_randn(g, batch, 4, _FRAMES, h, w),
        timestep=_flow_timestep(g, batch),
        encoder_hidden_states=_padded_text(g, _token_mask(g, batch, T), 16),
        control_hidden_states=torch.cat([_randn(g, batch, 8, _FRAMES, h, w), mask], dim=1),
        control_hidden_states_scale=torch.tensor([1.0, 1.0]),
        attention_kwargs=None,
    )


_register("wan-vace-tiny", "WanVACETransformer3DModel (Wan + VACE control blocks on control latents), 2 frames",
          _wan_vace_model, _wan_vace_inputs, (8, 12), max_hw=128, frames=_FRAMES,
          model_class="WanVACETransformer3DModel")


# ---------------------------------------------------------------------------- HunyuanVideo 1.5


def _hunyuan_video15_model():
    from diffusers import HunyuanVideo15Transformer3DModel

    return HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=8, rope_axes_dim=(2, 2, 4), task_type="t2v",
    )


def _hunyuan_video15_inputs(batch, h, w, g):
    # HunyuanVideo15Pipeline (t2v): latent_model_input = cat(latents [B, 32, F, H, W], zero
    # condition latents, zero mask) [B, 65, F, H, W]; image_embeds zeros [B, 729, 1152]; Qwen2.5-VL
    # prompt_embeds + mask and byT5 glyph embeds + mask; timestep = t.expand(B) (float).
    T, T2 = 7, 5
    return dict(
        hidden_states=_with_zero_condition(_randn(g, batch, 4, _FRAMES, h, w), dim=1),
        image_embeds=torch.zeros(batch, 9, 8),
        timestep=_flow_timestep(g, batch),
        encoder_hidden_states=_randn(g, batch, T, 16),
        encoder_attention_mask=_token_mask(g, batch, T),
        encoder_hidden_states_2=_randn(g, batch, T2, 8),
        encoder_attention_mask_2=_token_mask(g, batch, T2),
        attention_kwargs=None,
    )


_register("hunyuan-video15-tiny", "HunyuanVideo15Transformer3DModel (token refiner, image + two text encoders with "
          "masks), 2 frames", _hunyuan_video15_model, _hunyuan_video15_inputs, (8, 12), multiple=1,
          frames=_FRAMES, model_class="HunyuanVideo15Transformer3DModel")


# ---------------------------------------------------------------------------- Motif-Video


def _motif_video_model():
    from diffusers import MotifVideoTransformer3DModel

    return MotifVideoTransformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=16, rope_axes_dim=(2, 2, 4),
    )


def _motif_video_inputs(batch, h, w, g):
    # MotifVideoPipeline (t2v): hidden_states = cat(latents [B, 16, F, H, W], zero condition
    # latents, zero mask) [B, 33, F, H, W]; prompt_embeds + tokenizer mask; timestep =
    # t.expand(B) (float).
    T = 7
    latents = _randn(g, batch, 4, _FRAMES, h, w)
    mask = _token_mask(g, batch, T)
    return dict(
        hidden_states=_with_zero_condition(latents, dim=1),
        timestep=_flow_timestep(g, batch),
        encoder_hidden_states=_padded_text(g, mask, 16),
        encoder_attention_mask=mask,
        attention_kwargs=None,
    )


_register("motif-video-tiny", "MotifVideoTransformer3DModel (HunyuanVideo-like double + single stream, text mask), "
          "2 frames", _motif_video_model, _motif_video_inputs, (8, 12), frames=_FRAMES,
          model_class="MotifVideoTransformer3DModel")


# ---------------------------------------------------------------------------- AnyFlow


def _anyflow_model():
    from diffusers import AnyFlowTransformer3DModel

    return AnyFlowTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=64,
    )


def _anyflow_inputs(batch, h, w, g):
    # AnyFlowPipeline: latents laid out [B, F, C, H, W]; flow-map timesteps t (source) and r
    # (target, the next sigma * 1000) expanded per frame: t.expand(B).unsqueeze(-1).repeat(1, F)
    # (float); UMT5 prompt_embeds zero padded.
    T = 7
    t = _flow_timestep(g, 1)[0]
    r = t * torch.rand((), generator=g)
    return dict(
        hidden_states=_randn(g, batch, _FRAMES, 4, h, w),
        timestep=t.expand(batch).unsqueeze(-1).repeat(1, _FRAMES),
        r_timestep=r.expand(batch).unsqueeze(-1).repeat(1, _FRAMES),
        encoder_hidden_states=_padded_text(g, _token_mask(g, batch, T), 16),
        attention_kwargs=None,
    )


_register("anyflow-tiny", "AnyFlowTransformer3DModel (Wan-based flow map: source and target timesteps per frame, "
          "[B, F, C, H, W])", _anyflow_model, _anyflow_inputs, (8, 12), max_hw=128, frames=_FRAMES,
          model_class="AnyFlowTransformer3DModel")


# ---------------------------------------------------------------------------- Helios


def _helios_model():
    from diffusers import HeliosTransformer3DModel

    return HeliosTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_dim=(4, 4, 4),
    )


_HELIOS_HISTORY = [4, 2, 1]  # pipeline default [16, 2, 1] (long, mid, 1x), shortened


def _helios_inputs(batch, h, w, g):
    # HeliosPipeline, first chunk with keep_first_frame: history latents (zeros before anything
    # is generated) split into long / mid / 1x; latents_history_short = cat(zero prefix frame,
    # 1x); frame indices arange(1 + sum(history) + F) split into prefix / long / mid / 1x /
    # hidden_states, each unsqueezed to [1, f]; timestep = t.expand(B) (float).
    T = 7
    long_f, mid_f, one_f = _HELIOS_HISTORY
    idx = torch.arange(0, 1 + long_f + mid_f + one_f + _FRAMES)
    prefix, i_long, i_mid, i_1x, i_hidden = idx.split([1, long_f, mid_f, one_f, _FRAMES])
    return dict(
        hidden_states=_randn(g, batch, 4, _FRAMES, h, w),
        timestep=_flow_timestep(g, batch),
        encoder_hidden_states=_padded_text(g, _token_mask(g, batch, T), 16),
        indices_hidden_states=i_hidden.unsqueeze(0),
        indices_latents_history_short=torch.cat([prefix, i_1x]).unsqueeze(0),
        indices_latents_history_mid=i_mid.unsqueeze(0),
        indices_latents_history_long=i_long.unsqueeze(0),
        latents_history_short=torch.zeros(batch, 4, 1 + one_f, h, w),
        latents_history_mid=torch.zeros(batch, 4, mid_f, h, w),
        latents_history_long=torch.zeros(batch, 4, long_f, h, w),
        attention_kwargs=None,
    )


_register("helios-tiny", "HeliosTransformer3DModel (Wan-like, multi-term history memory patches with frame indices), "
          "2 frames", _helios_model, _helios_inputs, (8, 16), multiple=8, max_hw=128, frames=_FRAMES,
          model_class="HeliosTransformer3DModel")


# ---------------------------------------------------------------------------- JoyImage-Edit


def _joyimage_edit_model():
    from diffusers import JoyImageEditTransformer3DModel

    return JoyImageEditTransformer3DModel(
        patch_size=[1, 2, 2], in_channels=4, out_channels=4, hidden_size=24, num_attention_heads=2, text_dim=16,
        mlp_width_ratio=2.0, num_layers=2, rope_dim_list=[4, 4, 4],
    )


def _joyimage_edit_inputs(batch, h, w, g):
    # JoyImageEditPipeline: latents [B, items, C, F, H, W] = cat(the input image's latents,
    # noise) on the items axis (F = 1 for images), the image items overwritten with the image
    # latents at every step; Qwen-VL prompt_embeds of the valid tokens stacked and zero padded;
    # t_expand = t.repeat(B) (float).
    T = 7
    return dict(
        hidden_states=_randn(g, batch, 2, 4, 1, h, w),
        timestep=_flow_timestep(g, batch),
        encoder_hidden_states=_padded_text(g, _token_mask(g, batch, T), 16),
    )


_register("joyimage-edit-tiny", "JoyImageEditTransformer3DModel (multi-item input [B, items, C, F, H, W]: image to "
          "edit + noise)", _joyimage_edit_model, _joyimage_edit_inputs, (8, 12),
          model_class="JoyImageEditTransformer3DModel")


# ---------------------------------------------------------------------------- Kandinsky 6


def _kandinsky6_model():
    from diffusers import Kandinsky6Transformer3DModel

    return Kandinsky6Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, patch_size=(1, 2, 2),
        model_dim=24, ff_dim=48, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 4, 4), visual_cond=True,
    )


def _kandinsky6_inputs(batch, h, w, g):
    # Kandinsky6TI2VAPipeline, text to video without audio: channels-last latents [B, F, H, W, C]
    # concatenated with zero condition latents and a zero mask channel; Qwen prompt_embeds + bool
    # mask (None when nothing is padded), pooled CLIP embeds; timestep = t.expand(B) (float);
    # visual_rope_pos / visual_token_type_ids None (no first-frame condition), audio None.
    T = 7
    return dict(
        hidden_states=_with_zero_condition(_randn(g, batch, _FRAMES, h, w, 4), dim=-1),
        audio_hidden_states=None,
        encoder_hidden_states=_randn(g, batch, T, 16),
        pooled_projections=_randn(g, batch, 8),
        timestep=_flow_timestep(g, batch),
        visual_rope_pos=None,
        encoder_attention_mask=_token_mask(g, batch, T, dtype=torch.bool),
        visual_token_type_ids=None,
    )


_register("kandinsky6-tiny", "Kandinsky6Transformer3DModel (channels-last video [B, F, H, W, C], text blocks, "
          "optional audio stream off), 2 frames", _kandinsky6_model, _kandinsky6_inputs, (8, 12), max_hw=64,
          frames=_FRAMES, model_class="Kandinsky6Transformer3DModel")


# ---------------------------------------------------------------------------- HunyuanVideo FramePack


def _framepack_model():
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    return HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
        image_condition_type=None, has_image_proj=True, image_proj_dim=8, has_clean_x_embedder=True,
    )


_FRAMEPACK_HISTORY = [16, 2, 1]  # 4x, 2x, 1x history frames (vanilla sampling)


def _framepack_inputs(batch, h, w, g):
    # HunyuanVideoFramepackPipeline, vanilla sampling, first section: history latents zeros,
    # split into 4x / 2x / 1x; latents_clean = cat(image latents, 1x history); frame indices
    # arange(1 + sum(history) + window) split into prefix / 4x / 2x / 1x / latents;
    # image_embeds = SigLIP states of the input image; guidance = [scale] * B * 1000;
    # timestep = t.expand(B) (float).
    T = 7
    h4, h2, h1 = _FRAMEPACK_HISTORY
    idx = torch.arange(0, 1 + h4 + h2 + h1 + _FRAMES)
    prefix, i4, i2, i1, ilat = idx.split([1, h4, h2, h1, _FRAMES])
    return dict(
        hidden_states=_randn(g, batch, 4, _FRAMES, h, w),
        timestep=_flow_timestep(g, batch),
        encoder_hidden_states=_randn(g, batch, T, 16),
        encoder_attention_mask=_token_mask(g, batch, T),
        pooled_projections=_randn(g, batch, 8),
        image_embeds=_randn(g, batch, 5, 8),
        indices_latents=ilat,
        guidance=torch.tensor([9.0] * batch) * 1000.0,
        latents_clean=torch.cat([_randn(g, batch, 4, 1, h, w), torch.zeros(batch, 4, h1, h, w)], dim=2),
        indices_latents_clean=torch.cat([prefix, i1]),
        latents_history_2x=torch.zeros(batch, 4, h2, h, w),
        indices_latents_history_2x=i2,
        latents_history_4x=torch.zeros(batch, 4, h4, h, w),
        indices_latents_history_4x=i4,
        attention_kwargs=None,
    )


_register("framepack-tiny", "HunyuanVideoFramepackTransformer3DModel (clean + 2x / 4x compressed history latents with "
          "frame indices), 2 frames", _framepack_model, _framepack_inputs, (8, 16), multiple=8, frames=_FRAMES,
          model_class="HunyuanVideoFramepackTransformer3DModel")


# ---------------------------------------------------------------------------- LTX-2


def _ltx2_model():
    from diffusers import LTX2VideoTransformer3DModel

    return LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2,
        audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2, caption_channels=16,
    )


_LTX2_AUDIO_FRAMES = 5


def _ltx2_inputs(batch, h, w, g):
    # LTX2Pipeline (video + audio): packed video latents [B, F*H*W, 128] and audio latents
    # [B, L, C*M]; connector outputs: video / audio prompt embeds with a binary mask (all ones:
    # the connector's registers replace the padding); timestep = sigma = t.expand(B) (float);
    # num_frames / height / width / audio_num_frames ints, fps = conditioning frame rate (float);
    # video_coords / audio_coords from the transformer's rope.prepare_*_coords.
    from diffusers.models.transformers.transformer_ltx2 import LTX2AudioVideoRotaryPosEmbed

    T, f = 7, _FRAMES
    video_rope = LTX2AudioVideoRotaryPosEmbed(dim=16, patch_size=1, patch_size_t=1, base_num_frames=20,
                                              base_height=2048, base_width=2048, scale_factors=(8, 32, 32),
                                              modality="video", num_attention_heads=2)
    audio_rope = LTX2AudioVideoRotaryPosEmbed(dim=16, patch_size=1, patch_size_t=1, base_num_frames=20,
                                              sampling_rate=16000, hop_length=160, scale_factors=(4,),
                                              modality="audio", num_attention_heads=2)
    latents = _randn(g, batch, 8, f, h, w)
    packed = latents.permute(0, 2, 3, 4, 1).reshape(batch, f * h * w, 8)
    t = _flow_timestep(g, batch)
    return dict(
        hidden_states=packed,
        audio_hidden_states=_randn(g, batch, _LTX2_AUDIO_FRAMES, 8),
        encoder_hidden_states=_randn(g, batch, T, 16),
        audio_encoder_hidden_states=_randn(g, batch, T, 16),
        timestep=t,
        sigma=t,
        encoder_attention_mask=torch.ones(batch, T, dtype=torch.int64),
        audio_encoder_attention_mask=torch.ones(batch, T, dtype=torch.int64),
        num_frames=f,
        height=h,
        width=w,
        fps=24.0,
        audio_num_frames=_LTX2_AUDIO_FRAMES,
        video_coords=video_rope.prepare_video_coords(batch, f, h, w, torch.device("cpu"), fps=24.0),
        audio_coords=audio_rope.prepare_audio_coords(batch, _LTX2_AUDIO_FRAMES, torch.device("cpu")),
        isolate_modalities=False,
        spatio_temporal_guidance_blocks=None,
        perturbation_mask=None,
        use_cross_timestep=True,
        attention_kwargs=None,
    )


_register("ltx2-tiny", "LTX2VideoTransformer3DModel (joint video + audio streams with cross-modal attention, packed "
          "tokens, coordinate RoPE), 2 frames", _ltx2_model, _ltx2_inputs, (8, 12), multiple=1, frames=_FRAMES,
          model_class="LTX2VideoTransformer3DModel")


# ---------------------------------------------------------------------------- ConsisID


def _consisid_model():
    from diffusers import ConsisIDTransformer3DModel

    # 3 heads of 16: the face cross-attention's K/V width is inner_dim * 2 / 3 and must equal
    # LFE_output_dim (3072 -> 2048 in the checkpoint); 16 keeps the 3D RoPE split even.
    return ConsisIDTransformer3DModel(
        num_attention_heads=3, attention_head_dim=16, in_channels=8, out_channels=4, time_embed_dim=16,
        text_embed_dim=16, num_layers=2, sample_width=12, sample_height=8, sample_frames=5, patch_size=2,
        max_text_seq_length=7, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False,
        is_train_face=True, cross_attn_interval=1, cross_attn_dim_head=8, cross_attn_num_heads=2, LFE_id_dim=8,
        LFE_vit_dim=8, LFE_depth=2, LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=2, LFE_num_querie=4,
        LFE_output_dim=32, LFE_ff_mult=2, LFE_num_scale=2,
    )


def _consisid_inputs(batch, h, w, g):
    # ConsisIDPipeline (CogVideoX I2V based): latent_model_input = cat(latents, image latents of
    # the face image followed by zero frames) on the channels of [B, F, C, H, W]; T5 prompt_embeds;
    # timestep = t.expand(B) (int64); 3D RoPE (cos, sin) as CogVideoX 1.0; id_cond [B, 1280] and
    # id_vit_hidden (a list of ViT hidden states [B, 577, 1024]) from the face models.
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    T = 7
    image = torch.cat([_randn(g, batch, 1, 4, h, w), torch.zeros(batch, _FRAMES - 1, 4, h, w)], dim=1)
    crops = get_resize_crop_region_for_grid((h // 2, w // 2), 12 // 2, 8 // 2)
    return dict(
        hidden_states=torch.cat([_randn(g, batch, _FRAMES, 4, h, w), image], dim=2),
        encoder_hidden_states=_padded_text(g, _token_mask(g, batch, T), 16),
        timestep=torch.randint(0, 1000, (), generator=g)[None].expand(batch),
        image_rotary_emb=get_3d_rotary_pos_embed(embed_dim=16, crops_coords=crops, grid_size=(h // 2, w // 2),
                                                 temporal_size=_FRAMES),
        attention_kwargs=None,
        id_vit_hidden=[_randn(g, batch, 5, 8) for _ in range(2)],
        id_cond=_randn(g, batch, 8),
    )


_register("consisid-tiny", "ConsisIDTransformer3DModel (CogVideoX I2V + face identity Perceiver cross-attention), "
          "2 frames", _consisid_model, _consisid_inputs, (8, 12), frames=_FRAMES,
          model_class="ConsisIDTransformer3DModel")


# ---------------------------------------------------------------------------- Wan-Animate


def _wan_animate_model():
    from diffusers import WanAnimateTransformer3DModel

    return WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12, latent_channels=4,
        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, image_dim=16, added_kv_proj_dim=24,
        rope_max_seq_len=64, motion_encoder_channel_sizes={"4": 8, "8": 8}, motion_encoder_size=8,
        motion_style_dim=8, motion_dim=4, motion_encoder_dim=8, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
        inject_face_latents_blocks=1, motion_encoder_batch_size=8,
    )


def _wan_animate_inputs(batch, h, w, g):
    # WanAnimatePipeline: latent_model_input = cat(latents, reference latents (mask + VAE latents
    # of the character image and the previous segment)) [B, 2C + 4, T + 1, H, W] (the reference
    # image is frame 0); pose latents [B, C, T, H, W]; the face video in pixels [B, 3, S, 512,
    # 512] (here 8 x 8); CLIP image states; timestep = t.expand(B) (float).
    T, frames = 7, _FRAMES
    reference = torch.cat([torch.ones(batch, 4, frames + 1, h, w), _randn(g, batch, 4, frames + 1, h, w)], dim=1)
    return dict(
        hidden_states=torch.cat([_randn(g, batch, 4, frames + 1, h, w), reference], dim=1),
        timestep=_flow_timestep(g, batch),
        encoder_hidden_states=_padded_text(g, _token_mask(g, batch, T), 16),
        encoder_hidden_states_image=_randn(g, batch, 5, 16),
        pose_hidden_states=_randn(g, batch, 4, frames, h, w),
        face_pixel_values=torch.rand(batch, 3, 4 * frames - 3, 8, 8, generator=g) * 2 - 1,
        motion_encode_batch_size=None,
        attention_kwargs=None,
    )


_register("wan-animate-tiny", "WanAnimateTransformer3DModel (Wan I2V + pose latents + face-motion encoder and "
          "adapters), 2 + 1 frames", _wan_animate_model, _wan_animate_inputs, (8, 12), max_hw=128,
          frames=_FRAMES + 1, model_class="WanAnimateTransformer3DModel")


# ---------------------------------------------------------------------------- JoyImage-Edit-Plus


def _joyimage_edit_plus_model():
    from diffusers import JoyImageEditPlusTransformer3DModel

    return JoyImageEditPlusTransformer3DModel(
        patch_size=[1, 2, 2], in_channels=4, out_channels=4, hidden_size=24, num_attention_heads=2, text_dim=16,
        mlp_width_ratio=2.0, num_layers=2, rope_dim_list=[4, 4, 4],
    )


def _joyimage_edit_plus_inputs(batch, h, w, g):
    # JoyImageEditPlusPipeline (no reference image): latents pre-patchified per item and padded
    # to the longest sample [B, max_patches, C, pt, ph, pw]; shape_list = [[(t, h/2, w/2)]] per
    # sample (python ints); prompt_embeds + mask (int64); t_expand = t.repeat(B) (float).
    T = 7
    latents = _randn(g, batch, 4, 1, h, w)
    patches = latents.reshape(batch, 4, 1, 1, h // 2, 2, w // 2, 2).permute(0, 2, 4, 6, 1, 3, 5, 7)
    mask = _token_mask(g, batch, T)
    return dict(
        hidden_states=patches.reshape(batch, (h // 2) * (w // 2), 4, 1, 2, 2),
        timestep=_flow_timestep(g, batch),
        encoder_hidden_states=_padded_text(g, mask, 16),
        encoder_hidden_states_mask=mask,
        shape_list=[[(1, h // 2, w // 2)] for _ in range(batch)],
    )


_register("joyimage-edit-plus-tiny", "JoyImageEditPlusTransformer3DModel (pre-patchified items [B, P, C, pt, ph, pw] "
          "with a python shape_list)", _joyimage_edit_plus_model, _joyimage_edit_plus_inputs, (8, 12),
          model_class="JoyImageEditPlusTransformer3DModel")
