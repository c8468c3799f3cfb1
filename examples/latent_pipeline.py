"""``LatentShapesPipeline``: class-conditional sampling from rasfx's small latent-space Flux DiT.

The model folder (``models/shapes-latent-dit``, written by ``train_latent_dit.py``) is a
diffusers-style pipeline folder:

* ``model_index.json``: ``_class_name`` ``LatentShapesPipeline`` and its components;
* ``transformer/``: a diffusers ``FluxTransformer2DModel`` (double- and single-stream blocks,
  3-axis RoPE, no guidance embedding) with ``patch_size`` 1 and ``in_channels`` = the VAE's
  latent channels: every latent pixel of the 16x16 latent is one image token (256 tokens);
* ``vae/``: a small diffusers ``AutoencoderKL`` (64x64 RGB <-> (C, 16, 16) latents, spatial factor
  4) whose config holds the latent ``scaling_factor`` and ``shift_factor`` measured on the data;
* ``scheduler/``: the ``FlowMatchEulerDiscreteScheduler`` config (shift 1.0, no dynamic shifting);
* ``class_embeddings.safetensors``, ``classes.json``: the learned conditioning table that replaces
  Flux's text encoders (``ClassEmbeddings`` of ``shapes_pipeline.py``; last row = null class).

The loop is the one of diffusers' ``FluxPipeline``: the (B, C, 16, 16) latents are packed into
(B, 256, C) tokens (``_pack_latents``; patch 1, so packing is a transpose), the scheduler works on
the packed latents, each step makes **one** transformer call on the batch ``[uncond, cond]`` (2B)
inside ``transformer.cache_context("cond")`` (diffusers' cache hooks need it) with
``timestep = t / 1000`` (Flux multiplies by 1000 inside the model), then classifier-free guidance
and ``scheduler.step``; at the end ``_unpack_latents`` and the VAE decode
(``z / scaling_factor + shift_factor``).

Example::

    pipe = load_latent_pipeline("models/shapes-latent-dit", device="cpu")
    images = pipe(["star", 3], generator=torch.Generator().manual_seed(0)).images  # (2, 3, 64, 64) in [0, 1]
"""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from shapes_pipeline import ClassConditionalFlowPipeline, ClassEmbeddings, images_to_output

__all__ = ["LatentShapesPipeline", "load_latent_pipeline", "text_ids", "image_ids"]

TRANSFORMER_SUBFOLDER = "transformer"
VAE_SUBFOLDER = "vae"
SCHEDULER_SUBFOLDER = "scheduler"


def image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(height * width, 3) Flux position ids of the latent grid: (0, row, column), row-major."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).to(dtype)


def text_ids(num_tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(num_tokens, 3) Flux position ids of the condition tokens: all zero, as in FluxPipeline."""
    return torch.zeros(num_tokens, 3, device=device, dtype=dtype)


class LatentShapesPipeline(ClassConditionalFlowPipeline):
    """Class-conditional rectified-flow sampler for the latent shapes DiT, with classifier-free guidance.

    Construct from parts, ``LatentShapesPipeline(transformer, scheduler, vae, class_embeddings=...)``,
    or from a model folder, ``LatentShapesPipeline.from_pretrained(folder)`` (local folders only).
    Same call signature and output as ``ShapesPipeline``; ``latents`` are (B, C, 16, 16).
    """

    model_cpu_offload_seq = "transformer->vae"

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        class_embeddings: ClassEmbeddings | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        # A plain attribute (see ShapesPipeline): tiny, float32 on the CPU, moved at each call.
        self.class_embeddings = class_embeddings
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        """Side of the square latent grid (image size / the VAE's spatial factor)."""
        return int(self.vae.config.sample_size) // self.vae_scale_factor

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, folder: str | os.PathLike, torch_dtype: torch.dtype = torch.float32, **kwargs
    ) -> LatentShapesPipeline:
        """Load transformer, VAE, scheduler and class table from a local pipeline folder.

        ``kwargs`` go to both models' ``from_pretrained`` (e.g. ``device_map``).
        """
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder!r} is not a local model folder (see models/shapes-latent-dit)")
        transformer = FluxTransformer2DModel.from_pretrained(
            folder, subfolder=TRANSFORMER_SUBFOLDER, torch_dtype=torch_dtype, **kwargs
        )
        vae = AutoencoderKL.from_pretrained(folder, subfolder=VAE_SUBFOLDER, torch_dtype=torch_dtype, **kwargs)
        for model in (transformer, vae):  # guard: some diffusers loading paths keep the file's dtype
            if model.dtype != torch_dtype:
                model.to(torch_dtype)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder=SCHEDULER_SUBFOLDER)
        return cls(transformer=transformer, scheduler=scheduler, vae=vae, class_embeddings=ClassEmbeddings.load(folder))

    def save_pretrained(self, folder: str | os.PathLike, **kwargs) -> None:  # type: ignore[override]
        """diffusers' layout (model_index.json + one subfolder per component) plus the class table."""
        folder = os.fspath(folder)
        super().save_pretrained(folder, **kwargs)
        if self.class_embeddings is not None:
            self.class_embeddings.save(folder)

    # ------------------------------------------------------------------ latents
    @staticmethod
    def _pack_latents(latents: torch.Tensor, batch_size: int, num_channels_latents: int, height: int, width: int):
        """(B, C, H, W) -> (B, H * W, C): one token per latent pixel (patch 1), row-major."""
        return latents.reshape(batch_size, num_channels_latents, height * width).transpose(1, 2)

    @staticmethod
    def _unpack_latents(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, H * W, C) -> (B, C, H, W); the inverse of ``_pack_latents``."""
        batch_size, _, channels = latents.shape
        return latents.transpose(1, 2).reshape(batch_size, channels, height, width)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) normalised latents -> (B, 3, H, W) images in [-1, 1] (not clamped)."""
        cfg = self.vae.config
        z = latents.to(self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return self.vae.decode(z, return_dict=False)[0]

    # ------------------------------------------------------------------ sampling
    def noise_shape(self, batch: int) -> tuple[int, ...]:
        """(B, C, h, w): latents, unpacked (the pipeline packs them for the scheduler and the model)."""
        return (batch, self.transformer.config.in_channels, self.latent_size, self.latent_size)

    def _prepare(self, noise: torch.Tensor, enc: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """(B, C, h, w) -> packed (B, h * w, C) tokens, and Flux's position ids."""
        batch, channels, height, width = noise.shape
        ids = {
            "img_ids": image_ids(height, width, device=noise.device, dtype=noise.dtype),  # (h * w, 3)
            "txt_ids": text_ids(enc.shape[1], device=noise.device, dtype=noise.dtype),  # (T, 3)
        }
        return self._pack_latents(noise, batch, channels, height, width), ids

    def _predict(self, model_input, t, enc, pooled, extra):
        # FluxPipeline's convention: timestep = t / 1000 = sigma (the model multiplies by 1000);
        # one cache context for the batched [uncond, cond] call (diffusers' cache hooks need one).
        with self.transformer.cache_context("cond"):
            return self.transformer(
                hidden_states=model_input,
                timestep=t.expand(model_input.shape[0]).to(model_input.dtype) / 1000,
                encoder_hidden_states=enc,
                pooled_projections=pooled,
                return_dict=False,
                **extra,
            )[0]

    def _postprocess(self, latents: torch.Tensor, output_type: str):
        size = self.latent_size
        latents = self._unpack_latents(latents, size, size)  # (B, C, h, w)
        if output_type == "latent":
            return latents
        return images_to_output(self.decode_latents(latents), output_type)


def load_latent_pipeline(
    folder: str | os.PathLike = "models/shapes-latent-dit",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LatentShapesPipeline:
    """``LatentShapesPipeline.from_pretrained(folder, torch_dtype=dtype)`` moved to ``device``."""
    pipe = LatentShapesPipeline.from_pretrained(folder, torch_dtype=dtype)
    return pipe.to(device)
