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
from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from shapes_pipeline import ClassEmbeddings, ClassLabelsMixin, LabelLike, images_to_output

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


class LatentShapesPipeline(ClassLabelsMixin, DiffusionPipeline):
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
    @torch.no_grad()
    def __call__(
        self,
        class_labels: LabelLike,
        num_inference_steps: int = 28,
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        num_images_per_label: int = 1,
        sigmas: list[float] | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[LatentShapesPipeline, int, torch.Tensor, dict], dict] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Sample images.

        Args:
            class_labels: class ids and/or captions naming a shape ("a red striped star");
                B = len(class_labels) * num_images_per_label.
            num_inference_steps: Euler steps of the flow-matching scheduler.
            guidance_scale: classifier-free guidance weight; <= 1 disables guidance (batch B, not 2B).
            generator: for the initial noise (CPU generators give the same noise on every device).
            latents: optional initial noise (B, C, h, w) = (B, latent channels, 16, 16), unpacked
                (the layout of ``ShapesPipeline``'s pixels); replaces the generator's.
            sigmas: optional custom sigma schedule passed to ``scheduler.set_timesteps``.
            output_type: "pt" -> (B, 3, H, W) float in [0, 1]; "np" -> (B, H, W, 3) numpy in [0, 1];
                "pil" -> list of PIL images; "latent" -> the final (B, C, h, w) latents, unpacked
                and not decoded.
            joint_attention_kwargs: forwarded to the transformer (attention processors).
            callback_on_step_end: ``fn(pipe, step_index, timestep, {"latents": x}) -> dict`` with the
                packed (B, h * w, C) latents the scheduler integrates (FluxPipeline's convention); a
                returned "latents" replaces them.
        """
        device = self._execution_device
        dtype = self.transformer.dtype
        labels = self.labels_to_tensor(class_labels).repeat_interleave(int(num_images_per_label))  # (B,)
        batch = labels.shape[0]
        do_cfg = guidance_scale > 1.0

        # Conditioning: (B, T, D) tokens and (B, P) pooled vectors; [uncond, cond] for guidance (2B).
        enc, pooled = self.class_embeddings.lookup(labels, device, dtype)
        if do_cfg:
            null = torch.full_like(labels, self.class_embeddings.null_index)
            enc_u, pooled_u = self.class_embeddings.lookup(null, device, dtype)
            enc, pooled = torch.cat([enc_u, enc]), torch.cat([pooled_u, pooled])

        # Initial noise (B, C, h, w), packed to (B, h * w, C) tokens for the scheduler and the model.
        channels, size = self.transformer.config.in_channels, self.latent_size
        shape = (batch, channels, size, size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape} (unpacked B, C, h, w), got {tuple(latents.shape)}")
            latents = latents.to(device=device, dtype=dtype)
        latents = self._pack_latents(latents, batch, channels, size, size)  # (B, h * w, C)
        img_ids = image_ids(size, size, device=device, dtype=dtype)  # (h * w, 3)
        txt_ids = text_ids(enc.shape[1], device=device, dtype=dtype)  # (T, 3)

        # Timesteps as FluxPipeline with a fixed shift (no dynamic shifting): t = sigma * 1000.
        if sigmas is not None:
            self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)

        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                model_input = torch.cat([latents] * 2) if do_cfg else latents  # (2B or B, h * w, C)
                timestep = t.expand(model_input.shape[0]).to(dtype) / 1000  # the model multiplies by 1000
                with self.transformer.cache_context("cond"):
                    velocity = self.transformer(
                        hidden_states=model_input,
                        timestep=timestep,
                        encoder_hidden_states=enc,
                        pooled_projections=pooled,
                        img_ids=img_ids,
                        txt_ids=txt_ids,
                        joint_attention_kwargs=joint_attention_kwargs,
                        return_dict=False,
                    )[0]  # predicted velocity (noise - x0), same shape as model_input
                if do_cfg:
                    v_uncond, v_cond = velocity.chunk(2)
                    velocity = v_uncond + guidance_scale * (v_cond - v_uncond)
                latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    out = callback_on_step_end(self, i, t, {"latents": latents}) or {}
                    latents = out.pop("latents", latents)
                progress_bar.update()

        latents = self._unpack_latents(latents, size, size)  # (B, C, h, w)
        if output_type == "latent":
            images = latents
        else:
            images = images_to_output(self.decode_latents(latents), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def load_latent_pipeline(
    folder: str | os.PathLike = "models/shapes-latent-dit",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LatentShapesPipeline:
    """``LatentShapesPipeline.from_pretrained(folder, torch_dtype=dtype)`` moved to ``device``."""
    pipe = LatentShapesPipeline.from_pretrained(folder, torch_dtype=dtype)
    return pipe.to(device)
