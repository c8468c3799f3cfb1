"""Latent layouts: which image token each value of the scheduler's latents belongs to.

The sampler scores tokens on the noise prediction the scheduler integrates, so it needs to map
those latents to the transformer's image tokens. The map is read from the ``RASModule``'s token
map (model output element -> image token) and from the pipeline itself:

* latents ``[B, C, *grid]`` (SD3, PixArt, Wan): the token map has the same grid, every channel
  of a latent pixel belongs to one token (:meth:`PixelLayout.channels_first`);
* Flux-style packed latents ``[B, M, C * k]``: the layout of a packed row is read from the
  pipeline's own ``_pack_latents`` (run on a tensor of channel and pixel ids); the std is taken
  over the ``C`` latent channels of each of the ``k`` latent pixels of a row, exactly as on the
  unpacked latents (:meth:`PixelLayout.packed`).

Anything else raises :class:`LayoutError`; the pipeline then runs that run dense with a warning.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Protocol

import torch

from ..sampler import PixelLayout


class LayoutError(RuntimeError):
    """The scheduler's latents cannot be mapped to the model's image tokens. Never reaches the
    user: the controller catches it and runs that run dense with a ``RASWarning``."""


class PackingSource(Protocol):
    """Where the packed-row layout is read from (the pipeline controller, or a stand-in)."""

    latent_channels: Optional[int]  # the VAE's latent channels, if the pipeline says
    original_pack: Optional[Callable[..., Any]]  # the pipeline class's own ``_pack_latents``


def pixel_scale(pipe: Any) -> int:
    """Image pixels per latent pixel (the VAE's spatial factor), 1 if the pipeline does not say."""
    for name in ("vae_scale_factor", "vae_scale_factor_spatial"):
        v = getattr(pipe, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return 1


def latent_channels(pipe: Any) -> Optional[int]:
    """The VAE's latent channels (``latent_channels`` or Wan's ``z_dim``), or None."""
    cfg = getattr(getattr(pipe, "vae", None), "config", None)
    for name in ("latent_channels", "z_dim"):
        v = getattr(cfg, name, None) if cfg is not None else None
        if isinstance(v, int) and v > 0:
            return v
    return None


def packed_structure(source: PackingSource, d: int) -> tuple[torch.Tensor, int, int]:
    """``(perm, C, k)`` of a packed latent row of ``d`` values: ``k`` pixels of ``C`` channels.

    ``perm`` reorders the row into ``(k, C)`` order. Read from the pipeline's ``_pack_latents``
    run on a tensor of (pixel, channel) ids; without one, diffusers' convention (channel-major,
    ``d = c * k + j``) with ``C`` = the VAE's latent channels.
    """
    c = source.latent_channels
    if c is None or d % c:
        c = d
    k = d // c
    pack = source.original_pack
    q = math.isqrt(k)
    if pack is not None and k > 1 and q * q == k:
        try:
            h = w = 2 * q
            pix = torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w).expand(1, c, h, w)
            ch = torch.arange(c, dtype=torch.float64).view(1, c, 1, 1).expand(1, c, h, w)
            packed = pack((pix * c + ch).contiguous(), 1, c, h, w)
            if packed.dim() == 3 and packed.shape[-1] == d:
                v = packed[0].round().to(torch.long)
                chan, pixel = v % c, v // c
                ref = None
                for m in range(v.shape[0]):
                    uniq = torch.unique(pixel[m])  # sorted
                    if uniq.numel() != k:
                        ref = None
                        break
                    j = torch.searchsorted(uniq, pixel[m])
                    sig = j * c + chan[m]
                    if ref is None:
                        ref = sig
                    elif not torch.equal(ref, sig):
                        ref = None
                        break
                if ref is not None and torch.equal(ref.sort().values, torch.arange(d)):
                    perm = torch.empty(d, dtype=torch.long)
                    perm[ref] = torch.arange(d)
                    return perm, c, k
        except Exception:
            pass
    return torch.arange(d).view(c, k).t().reshape(-1), c, k


def latent_layout(source: PackingSource, noise: torch.Tensor, token_map: torch.Tensor,
                  num_tokens: int) -> PixelLayout:
    """Map the scheduler's latents to latent pixels and tokens, from the module's token map."""
    tm = token_map.to(noise.device)
    if noise.dim() >= 4:
        if tm.dim() != noise.dim() or tuple(tm.shape[2:]) != tuple(noise.shape[2:]):
            raise LayoutError(
                f"cannot map the scheduler's latents {tuple(noise.shape)} to the model output "
                f"{tuple(tm.shape)} (different grids)"
            )
        spatial = tm[0, 0]
        if not bool((tm[0] == spatial).all()):
            raise LayoutError("the channels of one latent pixel come from different tokens")
        return PixelLayout.channels_first(spatial, num_tokens, channels=noise.shape[1])
    if noise.dim() == 3:
        d = noise.shape[-1]
        if tm.dim() != 3 or tm.shape[1] != noise.shape[1] or tm.shape[2] < d:
            raise LayoutError(
                f"cannot map the scheduler's packed latents {tuple(noise.shape)} to the model output "
                f"{tuple(tm.shape)}"
            )
        perm, c, k = packed_structure(source, d)
        perm = perm.to(noise.device)
        rows = tm[0, :, :d].index_select(-1, perm).view(-1, k, c)
        if not bool((rows == rows[:, :, :1]).all()):
            raise LayoutError("the channels of one packed latent pixel come from different tokens")
        return PixelLayout.packed(rows[:, :, 0], perm, num_tokens, channels=c)
    raise LayoutError(f"latents of shape {tuple(noise.shape)} are neither [B, C, *grid] nor packed [B, M, D]")
