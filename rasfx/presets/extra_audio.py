"""Tiny presets of the diffusers audio DiT classes (see :mod:`rasfx.presets.extra`).

The audio latents are one sequence of frames; ``height * width`` of :meth:`Preset.inputs` is
its length (as for ``stable-audio-tiny``).
"""

from __future__ import annotations

import torch

from .inputs import _flow_timestep, _padded_text, _randn, _token_mask
from .registry import _register

# ---------------------------------------------------------------------------- ACE-Step


def _ace_step_model():
    from diffusers import AceStepTransformer1DModel

    return AceStepTransformer1DModel(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, in_channels=12, audio_acoustic_hidden_dim=4, patch_size=2, sliding_window=8,
    )


def _ace_step_inputs(batch, h, w, g):
    # AceStepPipeline (text to music): latents [B, L, 64]; context_latents = cat(silence source
    # latents, chunk mask) [B, L, 128] on the features; condition-encoder states [B, T, hidden];
    # timestep = timestep_r = t * ones(B) (float in [0, 1]).
    length = h * w
    t = float(torch.rand((), generator=g))
    return dict(
        hidden_states=_randn(g, batch, length, 4),
        timestep=torch.full((batch,), t),
        timestep_r=torch.full((batch,), t),
        encoder_hidden_states=_randn(g, batch, 7, 32),
        context_latents=torch.cat([_randn(g, 1, length, 4).expand(batch, -1, -1), torch.ones(batch, length, 4)], -1),
        attention_kwargs=None,
    )


_register("ace-step-tiny", "AceStepTransformer1DModel (music latents [B, L, C], L = height * width, sliding + full "
          "attention, patch 2)", _ace_step_model, _ace_step_inputs, (4, 6), model_class="AceStepTransformer1DModel")


# ---------------------------------------------------------------------------- LongCat-Audio-DiT


def _longcat_audio_model():
    from diffusers import LongCatAudioDiTTransformer

    return LongCatAudioDiTTransformer(
        dit_dim=24, dit_depth=2, dit_heads=2, dit_text_dim=16, latent_dim=4, ff_mult=2.0,
    )


def _longcat_audio_inputs(batch, h, w, g):
    # LongCatAudioDiTPipeline: latents [B, L, 64]; text states + bool mask from the lengths;
    # attention_mask = _lens_to_mask(duration) (all ones [B, L], bool); latent_cond zeros;
    # timestep = (t / 1000).expand(B). return_dict stays True in the pipeline (.sample).
    length, T = h * w, 7
    mask = _token_mask(g, batch, T, dtype=torch.bool)
    return dict(
        hidden_states=_randn(g, batch, length, 4),
        encoder_hidden_states=_padded_text(g, mask, 16),
        encoder_attention_mask=mask,
        timestep=_flow_timestep(g, batch) / 1000,
        attention_mask=torch.ones(batch, length, dtype=torch.bool),
        latent_cond=torch.zeros(batch, length, 4),
    )


_register("longcat-audio-tiny", "LongCatAudioDiTTransformer (audio latents [B, L, C], L = height * width, long skips, "
          "per-frame mask)", _longcat_audio_model, _longcat_audio_inputs, (4, 6), multiple=1,
          model_class="LongCatAudioDiTTransformer")


# ---------------------------------------------------------------------------- Stable Audio 3


def _stable_audio3_model():
    from diffusers import StableAudio3DiTModel

    return StableAudio3DiTModel(
        io_channels=4, patch_size=1, embed_dim=24, depth=2, num_heads=2, cond_token_dim=16, global_cond_dim=16,
        local_add_cond_dim=5, timestep_features_dim=16, ff_mult=2.0, num_memory_tokens=2,
    )


def _stable_audio3_inputs(batch, h, w, g):
    # StableAudio3Pipeline: latents [B, 256, L] (channels first); encoder_hidden_states =
    # cat(T5 prompt_embeds, the duration embedding as a token) with the mask extended by one;
    # global_hidden_states = the duration embedding [B, D]; timestep = t.expand(B) (float).
    length, T = h * w, 7
    mask = _token_mask(g, batch, T)
    duration = _randn(g, 1, 16).expand(batch, -1)
    return dict(
        hidden_states=_randn(g, batch, 4, length),
        timestep=torch.rand((), generator=g).expand(batch),
        encoder_hidden_states=torch.cat([_padded_text(g, mask, 16), duration[:, None]], dim=1),
        global_hidden_states=duration,
        encoder_attention_mask=torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1),
    )


_register("stable-audio3-tiny", "StableAudio3DiTModel (audio latents [B, C, L], L = height * width, memory tokens, "
          "differential attention)", _stable_audio3_model, _stable_audio3_inputs, (4, 6), multiple=1,
          model_class="StableAudio3DiTModel")
