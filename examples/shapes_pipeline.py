"""``ShapesPipeline``: class-conditional sampling from rasfx's small pixel-space SD3 DiT.

The model folder (``models/shapes-dit``, written by ``train_small_dit.py``) holds

* ``config.json`` + ``diffusion_pytorch_model.safetensors``: a diffusers ``SD3Transformer2DModel``
  (in_channels = out_channels = 3, 64x64 pixels, patch 2 -> 1024 image tokens); load it alone with
  ``SD3Transformer2DModel.from_pretrained(folder, torch_dtype=torch.float32)``;
* ``scheduler/scheduler_config.json``: the ``FlowMatchEulerDiscreteScheduler`` config;
* ``class_embeddings.safetensors``: the learned conditioning table, ``encoder_hidden_states``
  (K+1, T, D) and ``pooled_projections`` (K+1, P); row K is the null class for classifier-free
  guidance;
* ``classes.json``: class names and the null index.

There is no text encoder and no VAE: a class label (or a caption naming a shape, e.g.
``"a red striped star"``) selects a row of the table, and the transformer denoises RGB pixels
directly. The denoising loop is the one of diffusers' ``StableDiffusion3Pipeline``
(``scheduler.set_timesteps`` -> per step one batched transformer call on ``[uncond, cond]``
(batch 2B), guidance, ``scheduler.step``), so code that patches the SD3 transformer or its
attention processors (e.g. rasfx's RAS pass) sees the same calls as with SD3.

Example::

    pipe = load_shapes_pipeline("models/shapes-dit", device="cpu")
    images = pipe(["star", 3, "a red striped heart"], generator=torch.Generator().manual_seed(0)).images
    # images: (3, 3, 64, 64) float in [0, 1]
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

__all__ = [
    "ClassConditionalFlowPipeline",
    "ClassEmbeddings",
    "ShapesPipeline",
    "images_to_output",
    "load_pipeline",
    "load_shapes_pipeline",
]

CLASS_EMBEDDINGS_FILE = "class_embeddings.safetensors"
CLASSES_FILE = "classes.json"
SCHEDULER_SUBFOLDER = "scheduler"

LabelLike = int | str | Sequence[int | str] | torch.Tensor


@dataclass
class ClassEmbeddings:
    """The conditioning table that replaces SD3's text encoders.

    encoder: (K+1, T, D) float32 token embeddings, fed as ``encoder_hidden_states``.
    pooled:  (K+1, P) float32 vectors, fed as ``pooled_projections``.
    Row ``null_index`` (= K) is the unconditional ("null") class used for guidance.
    """

    encoder: torch.Tensor
    pooled: torch.Tensor
    class_names: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def null_index(self) -> int:
        return len(self.class_names)

    def lookup(
        self, labels: torch.Tensor, device: torch.device | str, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) int labels in [0, K] -> ((B, T, D), (B, P)) on ``device`` in ``dtype``."""
        idx = labels.to(self.encoder.device, torch.long)
        return (
            self.encoder[idx].to(device=device, dtype=dtype),
            self.pooled[idx].to(device=device, dtype=dtype),
        )

    def label_of(self, item: int | str) -> int:
        """A class id (int) or a caption / class name naming one shape -> class id."""
        if isinstance(item, str):
            words = re.findall(r"[a-z]+", item.lower())
            for word in reversed(words):  # the shape noun comes last in the data's captions
                for cand in (word, word.removesuffix("s")):
                    if cand in self.class_names:
                        return self.class_names.index(cand)
            raise ValueError(f"no known shape in {item!r}; known: {', '.join(self.class_names)}")
        label = int(item)
        if not 0 <= label <= self.null_index:
            raise ValueError(f"class label {label} not in [0, {self.null_index}] ({self.null_index} = null class)")
        return label

    def save(self, folder: str) -> None:
        from safetensors.torch import save_file

        save_file(
            {
                "encoder_hidden_states": self.encoder.detach().float().cpu().contiguous(),
                "pooled_projections": self.pooled.detach().float().cpu().contiguous(),
            },
            os.path.join(folder, CLASS_EMBEDDINGS_FILE),
        )
        meta = {"class_names": list(self.class_names), "null_class_index": self.null_index, **self.extra}
        with open(os.path.join(folder, CLASSES_FILE), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def load(cls, folder: str) -> ClassEmbeddings:
        from safetensors.torch import load_file

        tensors = load_file(os.path.join(folder, CLASS_EMBEDDINGS_FILE))
        with open(os.path.join(folder, CLASSES_FILE)) as f:
            meta = json.load(f)
        names = list(meta.pop("class_names"))
        null = meta.pop("null_class_index", len(names))
        if null != len(names):
            raise ValueError(f"{CLASSES_FILE}: null_class_index must be the last row ({len(names)}), got {null}")
        enc, pooled = tensors["encoder_hidden_states"].float(), tensors["pooled_projections"].float()
        if enc.shape[0] != len(names) + 1 or pooled.shape[0] != len(names) + 1:
            raise ValueError(f"class table has {enc.shape[0]} rows, expected {len(names) + 1}")
        return cls(encoder=enc, pooled=pooled, class_names=names, extra=meta)


def images_to_output(images: torch.Tensor, output_type: str):
    """(B, 3, H, W) images in [-1, 1] -> "pt" (B, 3, H, W) in [0, 1], "np" (B, H, W, 3) numpy in
    [0, 1] or "pil" (list of PIL images)."""
    images = (images.float() / 2 + 0.5).clamp(0, 1)  # (B, 3, H, W) in [0, 1]
    if output_type == "pt":
        return images
    arr = images.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    if output_type == "np":
        return arr
    if output_type == "pil":
        return DiffusionPipeline.numpy_to_pil(arr)
    raise ValueError(f"output_type must be 'pt', 'np', 'pil' or 'latent', got {output_type!r}")


class ClassConditionalFlowPipeline(DiffusionPipeline):
    """The sampling loop both shapes pipelines share (``ShapesPipeline``, ``LatentShapesPipeline``):
    class labels -> rows of ``class_embeddings``, initial noise, ``scheduler.set_timesteps``, then
    per step one transformer call on the batch ``[uncond, cond]`` (2B), guidance and
    ``scheduler.step``. A subclass says how noise becomes the scheduler's latents and the model's
    extra inputs (``_prepare``), how one transformer call is made (``_predict``) and how the final
    latents become the output (``_postprocess``).
    """

    class_embeddings: ClassEmbeddings | None

    def noise_shape(self, batch: int) -> tuple[int, ...]:
        """Shape of the initial noise (and of ``latents=``) for ``batch`` images."""
        raise NotImplementedError(f"{type(self).__name__} must define noise_shape (ClassConditionalFlowPipeline subclass)")

    def _prepare(self, noise: torch.Tensor, enc: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Initial noise -> (the latents the scheduler integrates, extra transformer kwargs)."""
        return noise, {}

    def _predict(self, model_input: torch.Tensor, t: torch.Tensor, enc: torch.Tensor, pooled: torch.Tensor,
                 extra: dict[str, Any]) -> torch.Tensor:
        """One transformer call at scheduler timestep ``t`` -> the velocity, shaped like ``model_input``."""
        raise NotImplementedError(f"{type(self).__name__} must define _predict (ClassConditionalFlowPipeline subclass)")

    def _postprocess(self, latents: torch.Tensor, output_type: str):
        """Final latents -> the pipeline output for ``output_type``."""
        raise NotImplementedError(f"{type(self).__name__} must define _postprocess (ClassConditionalFlowPipeline subclass)")

    def labels_to_tensor(self, class_labels: LabelLike) -> torch.Tensor:
        """int / str / list of them / tensor -> (B,) int64 CPU tensor of class ids."""
        if self.class_embeddings is None:
            raise RuntimeError(f"{type(self).__name__} has no class_embeddings; pass them or use from_pretrained")
        if isinstance(class_labels, torch.Tensor):
            items = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, (int, str)):
            items = [class_labels]
        else:
            items = list(class_labels)
        return torch.tensor([self.class_embeddings.label_of(i) for i in items], dtype=torch.long)

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
        callback_on_step_end: Callable[[ClassConditionalFlowPipeline, int, torch.Tensor, dict], dict] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Sample images.

        Args:
            class_labels: class ids and/or captions naming a shape ("a red striped star");
                B = len(class_labels) * num_images_per_label.
            num_inference_steps: Euler steps of the flow-matching scheduler.
            guidance_scale: classifier-free guidance weight; <= 1 disables guidance (batch B, not 2B).
            generator: for the initial noise (as in diffusers: CPU generators give the same noise
                on every device).
            latents: optional initial noise of shape ``noise_shape(B)``; replaces the generator's.
                ``ShapesPipeline``: (B, 3, 64, 64) pixels; ``LatentShapesPipeline``: (B, C, 16, 16)
                latents, unpacked.
            sigmas: optional custom sigma schedule passed to ``scheduler.set_timesteps``.
            output_type: "pt" -> (B, 3, H, W) float in [0, 1]; "np" -> (B, H, W, 3) numpy in [0, 1];
                "pil" -> list of PIL images; "latent" -> the final sample in the layout of ``latents``
                (``ShapesPipeline``: the raw (B, 3, H, W) sample in [-1, 1]; ``LatentShapesPipeline``:
                the (B, C, h, w) latents, not decoded).
            joint_attention_kwargs: forwarded to the transformer (attention processors).
            callback_on_step_end: ``fn(pipe, step_index, timestep, {"latents": x}) -> dict`` with
                the latents the scheduler integrates (``LatentShapesPipeline``: packed (B, h * w, C),
                FluxPipeline's convention); a returned "latents" replaces them (diffusers' convention).
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

        # Initial noise x_1 ~ N(0, I), then the scheduler's layout and the model's extra inputs.
        shape = self.noise_shape(batch)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            latents = latents.to(device=device, dtype=dtype)
        latents, extra = self._prepare(latents, enc)

        # Timesteps as StableDiffusion3Pipeline / FluxPipeline with a fixed shift: t = sigma * 1000.
        if sigmas is not None:
            self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)

        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                model_input = torch.cat([latents] * 2) if do_cfg else latents  # (2B or B, ...)
                velocity = self._predict(  # predicted velocity (noise - x0), same shape as model_input
                    model_input, t, enc, pooled, {**extra, "joint_attention_kwargs": joint_attention_kwargs}
                )
                if do_cfg:
                    v_uncond, v_cond = velocity.chunk(2)
                    velocity = v_uncond + guidance_scale * (v_cond - v_uncond)
                latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    out = callback_on_step_end(self, i, t, {"latents": latents}) or {}
                    latents = out.pop("latents", latents)
                progress_bar.update()

        images = self._postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


class ShapesPipeline(ClassConditionalFlowPipeline):
    """Class-conditional rectified-flow sampler for the shapes DiT, with classifier-free guidance.

    Construct from parts, ``ShapesPipeline(transformer, scheduler, class_embeddings=...)``, or from a
    model folder, ``ShapesPipeline.from_pretrained(folder)`` (local folders only; see module doc).
    """

    model_cpu_offload_seq = "transformer"

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        class_embeddings: ClassEmbeddings | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        # A plain attribute, not a registered component: the table is tiny, lives on the CPU in
        # float32 and is moved to the transformer's device/dtype at each call.
        self.class_embeddings = class_embeddings

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, folder: str | os.PathLike, torch_dtype: torch.dtype = torch.float32, **kwargs
    ) -> ShapesPipeline:
        """Load transformer, scheduler and class table from a local model folder.

        ``kwargs`` go to ``SD3Transformer2DModel.from_pretrained`` (e.g. ``device_map``).
        """
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder!r} is not a local model folder (see models/shapes-dit)")
        transformer = SD3Transformer2DModel.from_pretrained(folder, torch_dtype=torch_dtype, **kwargs)
        if transformer.dtype != torch_dtype:  # guard: some diffusers loading paths keep the file's dtype
            transformer.to(torch_dtype)
        if os.path.isfile(os.path.join(folder, SCHEDULER_SUBFOLDER, "scheduler_config.json")):
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder=SCHEDULER_SUBFOLDER)
        else:
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        return cls(transformer=transformer, scheduler=scheduler, class_embeddings=ClassEmbeddings.load(folder))

    def save_pretrained(self, folder: str | os.PathLike, **kwargs) -> None:  # type: ignore[override]
        """Write the folder layout ``from_pretrained`` reads (transformer at the top level)."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        self.transformer.save_pretrained(folder, **kwargs)
        self.scheduler.save_pretrained(os.path.join(folder, SCHEDULER_SUBFOLDER))
        if self.class_embeddings is not None:
            self.class_embeddings.save(folder)

    # ------------------------------------------------------------------ sampling
    def noise_shape(self, batch: int) -> tuple[int, ...]:
        """(B, 3, H, W): the model denoises pixels."""
        cfg = self.transformer.config
        return (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def _predict(self, model_input, t, enc, pooled, extra):
        # SD3's convention (StableDiffusion3Pipeline): timestep = t = sigma * 1000.
        return self.transformer(
            hidden_states=model_input,
            timestep=t.expand(model_input.shape[0]),
            encoder_hidden_states=enc,
            pooled_projections=pooled,
            return_dict=False,
            **extra,
        )[0]

    def _postprocess(self, sample: torch.Tensor, output_type: str):
        if output_type == "latent":
            return sample
        return images_to_output(sample, output_type)


def load_shapes_pipeline(
    folder: str | os.PathLike = "models/shapes-dit",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ShapesPipeline:
    """``ShapesPipeline.from_pretrained(folder, torch_dtype=dtype)`` moved to ``device``."""
    pipe = ShapesPipeline.from_pretrained(folder, torch_dtype=dtype)
    return pipe.to(device)


def load_pipeline(
    folder: str | os.PathLike = "models/shapes-dit",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """Load either shipped model folder: a ``LatentShapesPipeline`` where the folder's
    ``model_index.json`` names it (``models/shapes-latent-dit``), else a ``ShapesPipeline``
    (``models/shapes-dit``, which has no ``model_index.json``)."""
    index = os.path.join(os.fspath(folder), "model_index.json")
    if os.path.isfile(index):
        with open(index) as f:
            class_name = json.load(f).get("_class_name")
        if class_name == "LatentShapesPipeline":
            from latent_pipeline import load_latent_pipeline  # examples/ is on sys.path with this module

            return load_latent_pipeline(folder, device=device, dtype=dtype)
        raise ValueError(f"{index}: unknown pipeline class {class_name!r}; expected LatentShapesPipeline")
    return load_shapes_pipeline(folder, device=device, dtype=dtype)
