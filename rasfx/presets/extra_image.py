"""Tiny presets of the newer diffusers image DiT classes (see :mod:`rasfx.presets.extra`)."""

from __future__ import annotations

import torch

from .inputs import _flow_timestep, _latent_ids, _pack_2x2, _padded_text, _randn, _token_mask
from .registry import _register

# ---------------------------------------------------------------------------- LongCat-Image


def _diagonal_text_ids(length: int) -> torch.Tensor:
    """Text position ids [T, 3] = (0, i, i) (LongCat-Image, Ovis-Image pipelines)."""
    ids = torch.zeros(length, 3)
    ids[:, 1] = torch.arange(length)
    ids[:, 2] = torch.arange(length)
    return ids


def _longcat_image_model():
    from diffusers import LongCatImageTransformer2DModel

    return LongCatImageTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    )


def _longcat_image_inputs(batch, h, w, g):
    # LongCatImagePipeline: Flux-style packed latents; prepare_pos_ids: text ids (0, i, i) for
    # i < T, image ids (1, 512 + row, 512 + col) (offset tokenizer_max_length); timestep =
    # t.expand(B) / 1000; guidance None; Qwen2.5-VL prompt_embeds [B, 512, 3584].
    T = 7
    txt_ids = _diagonal_text_ids(T)
    img_ids = _latent_ids(h, w)
    img_ids[:, 0] = 1
    img_ids[:, 1:] += 512
    return dict(
        hidden_states=_pack_2x2(_randn(g, batch, 4, 2 * h, 2 * w)),
        timestep=_flow_timestep(g, batch) / 1000,
        guidance=None,
        encoder_hidden_states=_randn(g, batch, T, 16),
        txt_ids=txt_ids,
        img_ids=img_ids,
    )


_register("longcat-image-tiny", "LongCatImageTransformer2DModel (Flux-like, modality-offset position ids), packed",
          _longcat_image_model, _longcat_image_inputs, (4, 6), multiple=1,
          model_class="LongCatImageTransformer2DModel")


# ---------------------------------------------------------------------------- Ovis-Image


def _ovis_image_model():
    from diffusers import OvisImageTransformer2DModel

    return OvisImageTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4),
    )


def _ovis_image_inputs(batch, h, w, g):
    # OvisImagePipeline: Flux-style packed latents and latent ids; Ovis prompt_embeds multiplied
    # by the tokenizer mask; text_ids [T, 3] = (0, i, i); timestep = t.expand(B) / 1000.
    T = 7
    txt_ids = _diagonal_text_ids(T)
    return dict(
        hidden_states=_pack_2x2(_randn(g, batch, 4, 2 * h, 2 * w)),
        timestep=_flow_timestep(g, batch) / 1000,
        encoder_hidden_states=_padded_text(g, _token_mask(g, batch, T), 16),
        txt_ids=txt_ids,
        img_ids=_latent_ids(h, w),
        joint_attention_kwargs=None,
    )


_register("ovis-image-tiny", "OvisImageTransformer2DModel (Flux-like double + single stream), packed inputs",
          _ovis_image_model, _ovis_image_inputs, (4, 6), multiple=1, model_class="OvisImageTransformer2DModel")


# ---------------------------------------------------------------------------- Bria FIBO


def _bria_fibo_model():
    from diffusers import BriaFiboTransformer2DModel

    return BriaFiboTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4), text_encoder_dim=8,
    )


def _bria_fibo_inputs(batch, h, w, g):
    # BriaFiboPipeline (do_patching=False): latents [B, 48, H, W] flattened to [B, H*W, 48];
    # prompt_embeds = cat(last two SmolLM3 hidden states) and prompt_layers = the last
    # (num_layers + num_single_layers) hidden states, zero padded to the longest prompt;
    # joint_attention_kwargs["attention_mask"] = cat(text mask, ones)[:, None, None, :] (bool)
    # when a prompt is padded; text_ids zeros [T, 3]; timestep = t.expand(B) (float, 0..1000).
    T = 7
    mask = _token_mask(g, batch, T)
    layers = [_padded_text(g, mask, 8) for _ in range(2)]
    latents = _randn(g, batch, 8, h, w)
    joint = torch.cat([mask, torch.ones(batch, h * w, dtype=mask.dtype)], dim=1).bool()
    return dict(
        hidden_states=latents.reshape(batch, 8, h * w).permute(0, 2, 1),
        timestep=_flow_timestep(g, batch),
        encoder_hidden_states=torch.cat(layers[::-1], dim=-1),
        text_encoder_layers=layers,
        joint_attention_kwargs={"attention_mask": joint[:, None, None, :]},
        txt_ids=torch.zeros(T, 3),
        img_ids=_latent_ids(h, w),
    )


_register("bria-fibo-tiny", "BriaFiboTransformer2DModel (Flux-like, a text-encoder layer per block, joint key mask)",
          _bria_fibo_model, _bria_fibo_inputs, (4, 6), multiple=1, model_class="BriaFiboTransformer2DModel")


# ---------------------------------------------------------------------------- Krea 2


def _krea2_model():
    from diffusers import Krea2Transformer2DModel

    return Krea2Transformer2DModel(
        in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, timestep_embed_dim=16, text_hidden_dim=16, num_text_layers=2,
        text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=32, num_layerwise_text_blocks=1,
        num_refiner_text_blocks=1, axes_dims_rope=(2, 2, 4),
    )


def _krea2_inputs(batch, h, w, g):
    # Krea2Pipeline: latents packed 2x2 [B, h*w, 64]; prompt_embeds = selected text-encoder
    # hidden states stacked [B, T, L, D] + bool mask with the padding inside the template
    # ([prompt | PAD | suffix]); position_ids [T + h*w, 3] (text at the origin, image (0, row,
    # col)); timestep = (t / 1000).expand(B).
    T = 7
    mask = torch.cat([_token_mask(g, batch, T - 2, dtype=torch.bool), torch.ones(batch, 2, dtype=torch.bool)], dim=1)
    text = torch.zeros(T, 3)
    return dict(
        hidden_states=_pack_2x2(_randn(g, batch, 4, 2 * h, 2 * w)),
        encoder_hidden_states=_randn(g, batch, T, 2, 16),
        timestep=_flow_timestep(g, batch) / 1000,
        position_ids=torch.cat([text, _latent_ids(h, w)], dim=0),
        encoder_attention_mask=mask,
        attention_kwargs=None,
    )


_register("krea2-tiny", "Krea2Transformer2DModel (text-encoder refiner blocks over stacked layers, joint position ids)",
          _krea2_model, _krea2_inputs, (4, 6), multiple=1, model_class="Krea2Transformer2DModel")


# ---------------------------------------------------------------------------- PRX


def _prx_model():
    from diffusers import PRXTransformer2DModel

    return PRXTransformer2DModel(
        in_channels=4, patch_size=2, context_in_dim=16, hidden_size=24, mlp_ratio=2.0, num_heads=2, depth=2,
        axes_dim=[4, 8],
    )


def _prx_inputs(batch, h, w, g):
    # PRXPipeline: latents [B, 16, H, W], T5-Gemma text embeddings [B, T, 2304] + bool mask,
    # timestep = (t / 1000).view(1) (one value for the batch).
    T = 7
    mask = _token_mask(g, batch, T, dtype=torch.bool)
    return dict(
        hidden_states=_randn(g, batch, 4, h, w),
        timestep=(_flow_timestep(g, 1) / 1000).view(1),
        encoder_hidden_states=_randn(g, batch, T, 16),
        attention_mask=mask,
    )


_register("prx-tiny", "PRXTransformer2DModel (single-stream blocks, text K/V, 2D RoPE), one timestep for the batch",
          _prx_model, _prx_inputs, (8, 12), model_class="PRXTransformer2DModel")


# ---------------------------------------------------------------------------- ERNIE-Image


def _ernie_image_model():
    from diffusers import ErnieImageTransformer2DModel

    return ErnieImageTransformer2DModel(
        hidden_size=24, num_attention_heads=2, num_layers=2, ffn_hidden_size=48, in_channels=16, out_channels=16,
        patch_size=1, text_in_dim=16, rope_axes_dim=(4, 4, 4),
    )


def _ernie_image_inputs(batch, h, w, g):
    # ErnieImagePipeline: latents [B, 32, 2h, 2w] patchified 2x2 to [B, 128, h, w]; text
    # hidden states padded into text_bth [B, Tmax, D] with text_lens [B] (int64); t_batch =
    # full((B,), t) in the latents' dtype.
    T = 7
    lens = torch.randint(2, T + 1, (batch,), generator=g)
    text = _randn(g, batch, T, 16) * (torch.arange(T)[None, :] < lens[:, None])[..., None]
    latents = _randn(g, batch, 4, 2 * h, 2 * w)
    patched = latents.view(batch, 4, h, 2, w, 2).permute(0, 1, 3, 5, 2, 4).reshape(batch, 16, h, w)
    return dict(
        hidden_states=patched,
        timestep=torch.full((batch,), float(torch.rand((), generator=g) * 1000.0)),
        text_bth=text,
        text_lens=lens,
    )


_register("ernie-image-tiny", "ErnieImageTransformer2DModel (unified text+image sequence, text lengths as a tensor)",
          _ernie_image_model, _ernie_image_inputs, (4, 6), multiple=1, model_class="ErnieImageTransformer2DModel")


# ---------------------------------------------------------------------------- HunyuanImage 2.1


def _hunyuan_image_model():
    from diffusers import HunyuanImageTransformer2DModel

    return HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=(1, 1), guidance_embeds=False, text_embed_dim=16,
        text_embed_2_dim=8, rope_axes_dim=(4, 4),
    )


def _hunyuan_image_inputs(batch, h, w, g):
    # HunyuanImagePipeline: latents [B, 64, H, W] (32x VAE, patch 1); Qwen2.5-VL prompt_embeds +
    # mask and byT5 glyph embeds + mask (int64 tokenizer masks); timestep = t.expand(B)
    # (float, 0..1000); timestep_r / guidance None (not the distilled model).
    T, T2 = 7, 5
    mask, mask2 = _token_mask(g, batch, T), _token_mask(g, batch, T2)
    return dict(
        hidden_states=_randn(g, batch, 4, h, w),
        timestep=_flow_timestep(g, batch),
        timestep_r=None,
        guidance=None,
        encoder_hidden_states=_randn(g, batch, T, 16),
        encoder_attention_mask=mask,
        encoder_hidden_states_2=_randn(g, batch, T2, 8),
        encoder_attention_mask_2=mask2,
        attention_kwargs=None,
    )


_register("hunyuan-image-tiny", "HunyuanImageTransformer2DModel, 2.1 style (token refiner, double + single stream, "
          "two text encoders with masks)", _hunyuan_image_model, _hunyuan_image_inputs, (8, 12), multiple=1,
          model_class="HunyuanImageTransformer2DModel")


# ---------------------------------------------------------------------------- Nucleus-MoE-Image


def _nucleusmoe_image_model():
    from diffusers import NucleusMoEImageTransformer2DModel

    return NucleusMoEImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        num_key_value_heads=1, joint_attention_dim=16, axes_dims_rope=(2, 2, 4), mlp_ratio=2.0, moe_enabled=True,
        dense_moe_strategy="leave_first_three_and_last_block_dense", num_experts=4, moe_intermediate_dim=16,
        capacity_factors=8.0,
    )


def _nucleusmoe_image_inputs(batch, h, w, g):
    # NucleusMoEImagePipeline: latents packed 2x2 [B, h*w, 64]; text-encoder hidden states +
    # tokenizer mask (None if nothing is padded); img_shapes = [(1, h, w)] * B (python ints);
    # timestep = t.expand(B) / 1000.
    T = 7
    mask = _token_mask(g, batch, T)
    return dict(
        hidden_states=_pack_2x2(_randn(g, batch, 4, 2 * h, 2 * w)),
        img_shapes=[(1, h, w)] * batch,
        encoder_hidden_states=_randn(g, batch, T, 16),
        encoder_hidden_states_mask=mask,
        timestep=_flow_timestep(g, batch) / 1000,
        attention_kwargs={},
    )


_register("nucleusmoe-image-tiny", "NucleusMoEImageTransformer2DModel (MoE feed-forward, img_shapes python ints)",
          _nucleusmoe_image_model, _nucleusmoe_image_inputs, (4, 6), multiple=1,
          model_class="NucleusMoEImageTransformer2DModel")


# ---------------------------------------------------------------------------- Qwen-Image 2.1


def _qwenimage21_model():
    from diffusers import QwenImage21Transformer2DModel

    return QwenImage21Transformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        context_in_dim=16, mlp_ratio=2, axes_dims_rope=(2, 2, 4),
    )


def _qwenimage21_inputs(batch, h, w, g):
    # QwenImage21Pipeline (text to image): latents [B, C, h, w] flattened to [B, h*w, C] (no
    # patching); text hidden states zero padded + mask (None when nothing is padded);
    # img_shapes = [[(1, h, w)]] * B; img_mask over the joint sequence = cat(zeros [B, T] (no
    # condition-image positions), ones [B, h*w / 4] (a slot per 2x2 target latents), bool)
    # (append_target_slots); timestep = t.expand(B) / 1000; no KV cache.
    T = 7
    mask = _token_mask(g, batch, T)
    mask[0] = 1
    latents = _randn(g, batch, 16, h, w)
    return dict(
        hidden_states=latents.view(batch, 16, h * w).transpose(1, 2),
        encoder_hidden_states=_padded_text(g, mask, 16),
        timestep=_flow_timestep(g, batch) / 1000,
        img_shapes=[[(1, h, w)]] * batch,
        img_mask=torch.cat([torch.zeros(batch, T, dtype=torch.bool), torch.ones(batch, h * w // 4, dtype=torch.bool)], 1),
        encoder_hidden_states_mask=mask,
        attention_kwargs=None,
        kv_cache=None,
        kv_cache_mode=None,
    )


_register("qwenimage21-tiny", "QwenImage21Transformer2DModel (unpatched tokens, text mask, img_shapes python ints)",
          _qwenimage21_model, _qwenimage21_inputs, (4, 6), model_class="QwenImage21Transformer2DModel")


# ---------------------------------------------------------------------------- GLM-Image


def _glm_image_model():
    from diffusers import GlmImageTransformer2DModel

    return GlmImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=16, time_embed_dim=16, condition_dim=4, prior_vq_quantizer_codebook_size=64,
    )


def _glm_image_inputs(batch, h, w, g):
    # GlmImagePipeline: latents [B, 16, H, W]; byT5 glyph embeddings [B, T, 1472]; prior_token_id
    # = the autoregressive model's image tokens upsampled to the latent token grid [B, h*w / 4]
    # (int64) with prior_token_drop (bool, same shape) all False for the conditional call and all
    # True for the unconditional one (here batched: the odd rows dropped); timestep = t.expand(B) - 1
    # (float); target_size [B, 2] = pixel (height, width), crop_coords zeros [B, 2] (prompt dtype).
    n = (h // 2) * (w // 2)
    size = torch.tensor([[h * 8, w * 8]], dtype=torch.float32).repeat(batch, 1)
    return dict(
        hidden_states=_randn(g, batch, 4, h, w),
        encoder_hidden_states=_randn(g, batch, 7, 16),
        prior_token_id=torch.randint(0, 64, (batch, n), generator=g),
        prior_token_drop=(torch.arange(batch) % 2 == 1)[:, None].repeat(1, n),
        timestep=_flow_timestep(g, batch) - 1,
        target_size=size,
        crop_coords=torch.zeros(batch, 2),
        attention_kwargs=None,
        kv_caches=None,
    )


_register("glm-image-tiny", "GlmImageTransformer2DModel (text+image joint attention, per-token prior ids from an AR "
          "model)", _glm_image_model, _glm_image_inputs, (8, 12), model_class="GlmImageTransformer2DModel")


# ---------------------------------------------------------------------------- Ideogram 4


def _ideogram4_model():
    from diffusers import Ideogram4Transformer2DModel

    return Ideogram4Transformer2DModel(
        in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2, intermediate_size=48,
        adaln_dim=16, llm_features_dim=16, mrope_section=(4, 2, 2),
    )


def _ideogram4_inputs(batch, h, w, g):
    # Ideogram4Pipeline: one packed [left-pad | text | image] sequence: hidden_states =
    # cat(zeros [B, T, C], latents [B, h*w, C]); encoder_hidden_states = cat(tapped LLM features
    # (zero on padding), zeros over the image) ; position_ids (3-axis MRoPE, int64), segment_ids
    # and indicator from _prepare_ids; timestep = 1 - t / 1000 expanded to B.
    from diffusers.pipelines.ideogram4.pipeline_ideogram4 import Ideogram4Pipeline

    T, n = 7, h * w
    lengths = [int(v) for v in torch.randint(2, T + 1, (batch,), generator=g)]
    position_ids, segment_ids, indicator = Ideogram4Pipeline._prepare_ids(lengths, h, w, T, torch.device("cpu"))
    text = _randn(g, batch, T, 16) * (torch.arange(T)[None, :] >= T - torch.tensor(lengths)[:, None])[..., None]
    latents = _randn(g, batch, n, 16)
    return dict(
        hidden_states=torch.cat([torch.zeros(batch, T, 16), latents], dim=1),
        timestep=(1.0 - _flow_timestep(g, batch) / 1000),
        encoder_hidden_states=torch.cat([text, torch.zeros(batch, n, 16)], dim=1),
        position_ids=position_ids,
        segment_ids=segment_ids,
        indicator=indicator,
        attention_kwargs=None,
    )


_register("ideogram4-tiny", "Ideogram4Transformer2DModel (one packed text+image sequence, MRoPE ids, segment ids)",
          _ideogram4_model, _ideogram4_inputs, (4, 6), multiple=1, model_class="Ideogram4Transformer2DModel")


# ---------------------------------------------------------------------------- OmniGen


def _omnigen_model():
    from diffusers import OmniGenTransformer2DModel

    return OmniGenTransformer2DModel(
        in_channels=4, patch_size=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, num_layers=2, pad_token_id=0, vocab_size=64, max_position_embeddings=1024,
        original_max_position_embeddings=256, pos_embed_max_size=32, time_step_dim=16,
        rope_scaling={"short_factor": [1.0 + 0.1 * k for k in range(8)], "long_factor": [2.0 + k for k in range(8)],
                      "type": "su"},
    )


def _omnigen_inputs(batch, h, w, g):
    # OmniGenPipeline (text to image): latents [B, 4, H, W]; OmniGenCollator turns the prompt
    # token ids into left-padded input_ids, position_ids (after the padding: text, a time token,
    # then the image tokens) and the [B, S, S] mask (causal over text, bidirectional within the
    # image), S = T + 1 + h*w / 4; no input images (input_img_latents [], input_image_sizes {}).
    from diffusers.pipelines.omnigen.processor_omnigen import OmniGenCollator

    collator = OmniGenCollator(pad_token_id=0, hidden_size=32)
    lengths = [int(v) for v in torch.randint(2, 8, (batch,), generator=g)]
    ids = [torch.randint(1, 64, (n,), generator=g).tolist() for n in lengths]
    input_ids, attention_mask, _ = collator.pad_input_ids(ids, {})
    num_image_tokens = [h * w // 4] * batch
    position_ids = collator.create_position(attention_mask, num_image_tokens)
    mask, _ = collator.create_mask(attention_mask, num_image_tokens)
    return dict(
        hidden_states=_randn(g, batch, 4, h, w),
        timestep=_flow_timestep(g, batch) / 1000,
        input_ids=input_ids,
        input_img_latents=[],
        input_image_sizes={},
        attention_mask=mask,
        position_ids=position_ids,
    )


_register("omnigen-tiny", "OmniGenTransformer2DModel (Phi-3 LLM over text + time + image tokens, [B, S, S] mask)",
          _omnigen_model, _omnigen_inputs, (8, 12), max_hw=64, model_class="OmniGenTransformer2DModel")


# ---------------------------------------------------------------------------- Bria FIBO 2


def _bria_fibo2_model():
    from diffusers import BriaFibo2Transformer2DModel

    return BriaFibo2Transformer2DModel(
        in_channels=4, patch_size=2, dim=24, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=16,
        injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8, gist_step=4,
        gist_min_text_len=4, gist_max_text_len=16, axes_dims=(4, 4, 4), axes_lens=(64, 32, 32),
    )


def _bria_fibo2_inputs(batch, h, w, g):
    # BriaFibo2Pipeline: latents [B, C, H, W]; text features [B, 1 + len(injection_layer_ids),
    # T, D] (the Perceiver's bundle, then one per injection block) with a bool mask of the real
    # tokens (None when nothing is padded); timestep = t.expand(B) / 1000; no context latents.
    T = 7
    mask = _token_mask(g, batch, T, dtype=torch.bool)
    feats = _randn(g, batch, 2, T, 16) * mask[:, None, :, None]
    return dict(
        hidden_states=_randn(g, batch, 4, h, w),
        timestep=_flow_timestep(g, batch) / 1000,
        encoder_hidden_states=feats,
        encoder_attention_mask=mask,
        context_latents=None,
    )


_register("bria-fibo2-tiny", "BriaFibo2Transformer2DModel (Z-Image-like, Perceiver gist tokens, injected text layers)",
          _bria_fibo2_model, _bria_fibo2_inputs, (8, 12), max_hw=64, model_class="BriaFibo2Transformer2DModel")
