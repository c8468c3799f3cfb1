"""Input builders shared by the preset families: seeded tensors, tokenizer masks, padded text
states, scheduler timesteps, and the latent layouts of the diffusers pipelines."""

from __future__ import annotations

import torch

_FRAMES = 2  # latent frames of the video presets
_VAE_SCALE = 8  # pixels per latent pixel of the diffusers VAEs


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


def _latent_ids(h: int, w: int) -> torch.Tensor:
    """``_prepare_latent_image_ids`` of the Flux-family pipelines: [h*w, 3] = (0, row, col)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def _pack_2x2(x: torch.Tensor) -> torch.Tensor:
    """``_pack_latents`` of the Flux-family pipelines: [B, C, 2h, 2w] -> [B, h*w, 4C]."""
    b, c, hh, ww = x.shape
    h, w = hh // 2, ww // 2
    return x.view(b, c, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * 4)


def _with_zero_condition(latents: torch.Tensor, dim: int) -> torch.Tensor:
    """Latents of a text-to-video call of an image-to-video model: ``cat(latents, zero
    condition latents, a zero mask channel)`` on the channel axis ``dim`` (Kandinsky 5/6,
    HunyuanVideo 1.5, Motif-Video)."""
    mask_shape = list(latents.shape)
    mask_shape[dim] = 1
    return torch.cat([latents, torch.zeros_like(latents), latents.new_zeros(mask_shape)], dim=dim)
