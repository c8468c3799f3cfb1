"""Build a model and the inputs of one forward from a MODEL string, and capture it: what
``rasfx inspect MODEL`` and ``rasfx.explain("MODEL")`` run.

MODEL is a preset name (:mod:`rasfx.presets`), a diffusers model folder or its ``config.json``
(the classes in :data:`CONFIG_CLASSES`), or ``package.module:factory``. Importing this module
imports neither torch nor diffusers; loading a model does.
"""

from __future__ import annotations

import importlib
import inspect as _inspect
import json
import os
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RasfxError, UsageError

__all__ = ["CONFIG_CLASSES", "ConfigClass", "LoadedModel", "ModelLoadError", "capture_model", "load_model",
           "should_build_on_meta"]


class ModelLoadError(RasfxError):
    """The model named on the command line could not be built (exit code 1)."""


@dataclass
class LoadedModel:
    """A model built from a MODEL string and the keyword arguments of one forward."""

    model: Any
    inputs: dict
    name: str
    source: str  # "preset" | "config" | "factory"
    notes: tuple = ()
    cacheable: bool = False
    extra: dict = field(default_factory=dict)


def dist_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "?"


# ===================================================================================== model loading


def _meta_tree(obj):
    import torch
    import torch.utils._pytree as pytree

    return pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), obj)


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def should_build_on_meta(param_bytes: int, available: int | None) -> bool:
    """Build on the meta device when the weights would not fit in (80% of) available RAM."""
    return available is not None and param_bytes > 0.8 * available


@dataclass(frozen=True)
class LoadOptions:
    """How to build a MODEL and its inputs (``rasfx inspect``'s model options). ``None`` sizes
    take the model's defaults; ``text_tokens`` (configs only): the length of the text
    conditioning, else found next to the weights or the pipeline's default."""

    height: int | None = None
    width: int | None = None
    batch: int = 1
    seed: int = 0
    meta: bool = False
    frames: int | None = None
    text_tokens: int | None = None

    def check(self) -> None:
        if not isinstance(self.batch, int) or self.batch < 1:
            raise UsageError(f"--batch must be an int >= 1, got {self.batch!r}")
        for opt, v in (("--height", self.height), ("--width", self.width), ("--frames", self.frames),
                       ("--text-tokens", self.text_tokens)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise UsageError(f"{opt} must be a positive int, got {v!r}")


def load_model(spec: str, *, height: int | None = None, width: int | None = None, batch: int = 1,
               seed: int = 0, meta: bool = False, frames: int | None = None,
               text_tokens: int | None = None) -> LoadedModel:
    """Resolve a MODEL argument: a preset name, a diffusers model folder / ``config.json``,
    or ``package.module:factory``. Raises ``UsageError`` (unknown MODEL, bad sizes) or
    ``ModelLoadError`` (the model cannot be built)."""
    from .presets import PRESETS

    opts = LoadOptions(height, width, batch, seed, meta, frames, text_tokens)
    opts.check()
    if spec in PRESETS:
        return _load_preset(spec, opts)
    if os.path.exists(spec):
        return _load_config(spec, opts)
    if ":" in spec and _looks_like_factory(spec):
        return _load_factory(spec, opts)
    import difflib

    close = difflib.get_close_matches(spec, list(PRESETS), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise UsageError(
        f"MODEL {spec!r} is not a preset, an existing folder or config.json, or package.module:factory{hint}; "
        f"presets: {', '.join(PRESETS)}"
    )


def _looks_like_factory(spec: str) -> bool:
    mod, _, attr = spec.partition(":")
    ident = r"[A-Za-z_][A-Za-z0-9_]*"
    import re

    return bool(re.fullmatch(rf"{ident}(\.{ident})*", mod)) and bool(re.fullmatch(rf"{ident}(\.{ident})*", attr))


_META_NOTE = "built on the meta device (--meta): shapes only, no weights"


def _load_preset(name: str, opts: LoadOptions) -> LoadedModel:
    from .presets import get_preset

    p = get_preset(name)
    if opts.frames is not None and opts.frames != p.frames:
        raise UsageError(f"--frames applies to video model configs; preset {name} has "
                         f"{p.frames if p.frames else 'no'} frames fixed")
    if opts.text_tokens is not None:
        raise UsageError(f"--text-tokens applies to model configs; preset {name} has its text length fixed")
    try:
        kwargs = p.inputs(opts.batch, opts.height, opts.width, opts.seed)
    except ValueError as e:  # a size the preset cannot take
        raise UsageError(str(e)) from None
    try:
        model = p.build(opts.seed)
    except Exception as e:  # diffusers version differences and the like
        raise ModelLoadError(f"preset {name}: building {p.model_class} failed: {type(e).__name__}: {e}") from e
    notes: tuple[str, ...] = ()
    if opts.meta:
        model = model.to("meta")
        kwargs = _meta_tree(kwargs)
        notes = (_META_NOTE,)
    return LoadedModel(model, kwargs, name, "preset", notes, cacheable=True)


def _load_factory(spec: str, opts: LoadOptions) -> LoadedModel:
    import torch

    mod_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(f"cannot import module {mod_name!r} of {spec!r}: {e}") from None
    except Exception as e:
        raise ModelLoadError(f"importing {mod_name!r} failed: {type(e).__name__}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{spec} is not callable; a factory returns (model, example_kwargs)")
    offered = {"height": opts.height, "width": opts.width, "batch": opts.batch, "seed": opts.seed,
               "frames": opts.frames, "text_tokens": opts.text_tokens}
    try:
        params = _inspect.signature(obj).parameters
        takes_kw = any(p.kind is _inspect.Parameter.VAR_KEYWORD for p in params.values())
        kw = {k: v for k, v in offered.items() if v is not None and (k in params or takes_kw)}
    except (TypeError, ValueError):
        kw = {}
    try:
        result = obj(**kw)
    except Exception as e:
        raise ModelLoadError(f"factory {spec} raised {type(e).__name__}: {e}") from e
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)
            and isinstance(result[1], dict)):
        raise ModelLoadError(f"factory {spec} must return (torch.nn.Module, dict of forward keyword arguments), "
                             f"got {type(result).__name__}")
    model, kwargs = result
    from .module import RASModule

    if isinstance(model, RASModule):
        model = model.model
    notes: tuple[str, ...] = ()
    if opts.meta:
        model = model.to("meta")
        kwargs = _meta_tree(kwargs)
        notes = (_META_NOTE,)
    return LoadedModel(model, kwargs, spec, "factory", notes)


# ------------------------------------------------------------------------------ diffusers configs


def _randn(g: Any, *shape: int) -> Any:
    import torch

    return torch.randn(*shape, generator=g, dtype=torch.float32)


def _mask(g: Any, batch: int, length: int) -> Any:
    import torch

    lens = torch.randint(max(1, length // 2), length + 1, (batch,), generator=g)
    return (torch.arange(length)[None, :] < lens[:, None]).to(torch.int64)


def _flow_t(g: Any, batch: int) -> Any:
    import torch

    return (torch.rand((), generator=g) * 1000.0).expand(batch).clone()


def _int_t(g: Any, batch: int) -> Any:
    import torch

    return torch.randint(0, 1000, (), generator=g)[None].expand(batch).clone()


@dataclass(frozen=True)
class InputSizes:
    """Sizes of the inputs built from a config: batch, image input height/width (latent
    pixels; Flux: the packed grid), latent frames (video), text tokens (None: no text input)."""

    batch: int
    height: int
    width: int
    frames: int | None
    text_tokens: int | None


def _cfg_sd3(model: Any, cfg: dict, s: InputSizes, g: Any) -> dict:
    b, t = s.batch, s.text_tokens or 1
    return dict(hidden_states=_randn(g, b, cfg["in_channels"], s.height, s.width),
                encoder_hidden_states=_randn(g, b, t, cfg["joint_attention_dim"]),
                pooled_projections=_randn(g, b, cfg["pooled_projection_dim"]), timestep=_flow_t(g, b),
                joint_attention_kwargs=None, return_dict=False)


def _cfg_flux(model: Any, cfg: dict, s: InputSizes, g: Any) -> dict:
    import torch

    b, h, w, t = s.batch, s.height, s.width, s.text_tokens or 1
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    kw = dict(hidden_states=_randn(g, b, h * w, cfg["in_channels"]), timestep=_flow_t(g, b) / 1000,
              pooled_projections=_randn(g, b, cfg["pooled_projection_dim"]),
              encoder_hidden_states=_randn(g, b, t, cfg["joint_attention_dim"]), txt_ids=torch.zeros(t, 3),
              img_ids=ids.reshape(h * w, 3), joint_attention_kwargs=None, return_dict=False)
    kw["guidance"] = torch.full([b], 3.5) if cfg.get("guidance_embeds") else None
    return kw


def _cfg_pixart(model: Any, cfg: dict, s: InputSizes, g: Any) -> dict:
    import torch

    b, h, w, t = s.batch, s.height, s.width, s.text_tokens or 1
    added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
    if getattr(model, "use_additional_conditions", False):
        added = {"resolution": torch.tensor([[h * 8.0, w * 8.0]]).repeat(b, 1),
                 "aspect_ratio": torch.tensor([[h / w]]).repeat(b, 1)}
    return dict(hidden_states=_randn(g, b, cfg["in_channels"], h, w),
                encoder_hidden_states=_randn(g, b, t, cfg["caption_channels"]), encoder_attention_mask=_mask(g, b, t),
                timestep=_int_t(g, b), added_cond_kwargs=added, return_dict=False)


def _cfg_dit(model: Any, cfg: dict, s: InputSizes, g: Any) -> dict:
    import torch

    if s.height != s.width:
        raise UsageError(f"DiTTransformer2DModel only supports square inputs, got {s.height}x{s.width}")
    classes = int(cfg.get("num_embeds_ada_norm") or 1000)
    return dict(hidden_states=_randn(g, s.batch, cfg["in_channels"], s.height, s.width), timestep=_int_t(g, s.batch),
                class_labels=torch.randint(0, classes, (s.batch,), generator=g), return_dict=False)


def _cfg_sana(model: Any, cfg: dict, s: InputSizes, g: Any) -> dict:
    b, t = s.batch, s.text_tokens or 1
    return dict(hidden_states=_randn(g, b, cfg["in_channels"], s.height, s.width),
                encoder_hidden_states=_randn(g, b, t, cfg["caption_channels"]), encoder_attention_mask=_mask(g, b, t),
                timestep=_flow_t(g, b), attention_kwargs=None, return_dict=False)


def _cfg_wan(model: Any, cfg: dict, s: InputSizes, g: Any) -> dict:
    b, t = s.batch, s.text_tokens or 1
    kw = dict(hidden_states=_randn(g, b, cfg["in_channels"], s.frames or 1, s.height, s.width),
              timestep=_flow_t(g, b), encoder_hidden_states=_randn(g, b, t, cfg["text_dim"]), attention_kwargs=None,
              return_dict=False)
    if cfg.get("image_dim"):
        kw["encoder_hidden_states_image"] = _randn(g, b, 257, cfg["image_dim"])
    return kw


def _cfg_auraflow(model: Any, cfg: dict, s: InputSizes, g: Any) -> dict:
    b, t = s.batch, s.text_tokens or 1
    return dict(hidden_states=_randn(g, b, cfg["in_channels"], s.height, s.width),
                encoder_hidden_states=_randn(g, b, t, cfg["joint_attention_dim"]), timestep=_flow_t(g, b) / 1000,
                attention_kwargs=None, return_dict=False)


def _cfg_cogview4(model: Any, cfg: dict, s: InputSizes, g: Any) -> dict:
    import torch

    b, t = s.batch, s.text_tokens or 1
    size = torch.tensor([[s.height * 8.0, s.width * 8.0]]).repeat(b, 1)
    return dict(hidden_states=_randn(g, b, cfg["in_channels"], s.height, s.width),
                encoder_hidden_states=_randn(g, b, t, cfg["text_embed_dim"]), timestep=_flow_t(g, b),
                original_size=size.clone(), target_size=size.clone(), crop_coords=torch.zeros(b, 2),
                attention_kwargs=None, return_dict=False)


def _patch_multiple(cfg: dict) -> int:
    p = cfg.get("patch_size")
    return int(p or 1) if isinstance(p, int) else 2


@dataclass(frozen=True)
class ConfigClass:
    """How ``rasfx inspect`` builds the inputs of a diffusers class from its config.

    ``text_tokens``: the length of the text conditioning its pipeline passes by default
    (``None``: no text input); ``text_dim``: the config key of the text features' width."""

    inputs: Callable[[Any, dict, InputSizes, Any], dict]
    default_hw: Callable[[dict], tuple[int, int]]  # cfg -> (height, width) of the image input
    multiple: Callable[[dict], int] = _patch_multiple
    video: bool = False
    doc: str = ""
    text_tokens: int | None = None
    text_dim: str = ""
    pipeline: str = ""

    def describe(self) -> str:
        text = f"{self.text_tokens} text tokens by default ({self.pipeline})" if self.text_tokens else ""
        return "; ".join(x for x in (self.doc, text) if x)


def _sample_hw(default: int) -> Callable[[dict], tuple[int, int]]:
    def hw(cfg: dict) -> tuple[int, int]:
        s = cfg.get("sample_size") or default
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))
    return hw


#: diffusers classes whose inputs ``rasfx inspect`` builds from a config (height/width:
#: latent pixels; Flux: the packed token grid; Wan: per frame, ``--frames`` latent frames).
CONFIG_CLASSES: OrderedDict[str, ConfigClass] = OrderedDict([
    ("SD3Transformer2DModel", ConfigClass(_cfg_sd3, _sample_hw(128), text_tokens=333, text_dim="joint_attention_dim",
                                          pipeline="StableDiffusion3Pipeline: CLIP 77 + T5 256")),
    ("FluxTransformer2DModel", ConfigClass(_cfg_flux, lambda cfg: (64, 64), lambda cfg: 1,
                                           doc="packed [B, h*w, C] tokens", text_tokens=512,
                                           text_dim="joint_attention_dim", pipeline="FluxPipeline")),
    ("PixArtTransformer2DModel", ConfigClass(_cfg_pixart, _sample_hw(128), doc="text mask", text_tokens=300,
                                             text_dim="caption_channels", pipeline="PixArtSigmaPipeline")),
    ("DiTTransformer2DModel", ConfigClass(_cfg_dit, _sample_hw(32), doc="class-conditional, square")),
    ("SanaTransformer2DModel", ConfigClass(_cfg_sana, _sample_hw(32), doc="text mask", text_tokens=300,
                                           text_dim="caption_channels", pipeline="SanaPipeline")),
    ("WanTransformer3DModel", ConfigClass(_cfg_wan, lambda cfg: (60, 104), lambda cfg: 2, video=True,
                                          doc="video [B, C, F, H, W]", text_tokens=512, text_dim="text_dim",
                                          pipeline="WanPipeline")),
    ("AuraFlowTransformer2DModel", ConfigClass(_cfg_auraflow, _sample_hw(64), text_tokens=256,
                                               text_dim="joint_attention_dim", pipeline="AuraFlowPipeline")),
    ("CogView4Transformer2DModel", ConfigClass(_cfg_cogview4, _sample_hw(128), text_tokens=128,
                                               text_dim="text_embed_dim", pipeline="CogView4Pipeline")),
])

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                 "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json", "model.safetensors")
#: the forward argument that carries the text conditioning (all classes above that take text)
_TEXT_INPUT = "encoder_hidden_states"


def _find_config(spec: str) -> tuple[Path, Path]:
    path = Path(spec)
    if path.is_file():
        if path.suffix != ".json":
            raise UsageError(f"MODEL {spec!r} is a file but not a config.json")
        return path, path.parent
    for cand in (path / "config.json", path / "transformer" / "config.json"):
        if cand.is_file():
            return cand, cand.parent
    raise UsageError(f"folder {spec!r} has no config.json (nor transformer/config.json of a pipeline folder)")


def stored_text_tokens(folder: Path, width: int | None) -> tuple[int, str] | None:
    """The text length of conditioning stored next to a model's weights: a ``.safetensors``
    file (other than the weights) holding an ``encoder_hidden_states`` tensor ``[..., T, D]``
    with ``D`` = the model's text width (e.g. a learned class-embedding table). ``(T, what)``
    or None."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        if path.name in _WEIGHT_FILES:
            continue
        try:
            with safe_open(str(path), "pt") as f:
                if _TEXT_INPUT not in f.keys():
                    continue
                shape = list(f.get_slice(_TEXT_INPUT).get_shape())
        except Exception:  # not a readable safetensors file: not conditioning
            continue
        if len(shape) >= 2 and (width is None or shape[-1] == width):
            return int(shape[-2]), f"{path.name}: {_TEXT_INPUT} {shape}"
    return None


def _text_tokens(info: ConfigClass, cfg: dict, folder: Path, requested: int | None) -> tuple[int | None, str]:
    """Text length of the inputs and where it comes from: ``--text-tokens``, conditioning
    stored with the model, or the pipeline's default."""
    if info.text_tokens is None:
        if requested is not None:
            raise UsageError("--text-tokens: this model class takes no text input")
        return None, ""
    if requested is not None:
        return requested, f"{requested} text tokens (--text-tokens)"
    width = cfg.get(info.text_dim)
    stored = stored_text_tokens(folder, width if isinstance(width, int) else None)
    if stored is not None:
        return stored[0], f"{stored[0]} text tokens (from {stored[1]})"
    return info.text_tokens, (f"{info.text_tokens} text tokens ({info.pipeline} default; "
                              "--text-tokens N for another length)")


def _load_config(spec: str, opts: LoadOptions) -> LoadedModel:
    import torch

    cfg_path, folder = _find_config(spec)
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {cfg_path}: {e}") from None
    if not isinstance(cfg, dict) or "_class_name" not in cfg:
        raise UsageError(f"{cfg_path} is not a diffusers model config (no _class_name)")
    cls_name = cfg["_class_name"]
    info = CONFIG_CLASSES.get(cls_name)
    if info is None:
        raise ModelLoadError(
            f"{cfg_path}: rasfx inspect does not know how to build inputs for {cls_name}; supported classes: "
            f"{', '.join(CONFIG_CLASSES)}. For another class use a factory: rasfx inspect package.module:factory "
            "(returning (model, example_kwargs))"
        )
    import diffusers

    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise ModelLoadError(f"diffusers {dist_version('diffusers')} has no class {cls_name} ({cfg_path})")
    frames = opts.frames
    if info.video and frames is None:
        frames = 21
    elif not info.video and frames is not None:
        raise UsageError(f"--frames applies to video models; {cls_name} is an image model")
    h0, w0 = info.default_hw(cfg)
    h, w = opts.height or h0, opts.width or w0
    mult = info.multiple(cfg)
    if h % mult or w % mult:
        raise UsageError(f"{cls_name}: --height/--width must be multiples of the patch size {mult}, got {h}x{w}")
    text_tokens, text_note = _text_tokens(info, cfg, folder, opts.text_tokens)
    notes = []
    try:
        with torch.device("meta"):
            meta_model = cls.from_config(cfg)
    except Exception as e:
        raise ModelLoadError(f"building {cls_name} from {cfg_path} failed: {type(e).__name__}: {e}") from e
    nbytes = sum(t.numel() * t.element_size() for t in list(meta_model.parameters()) + list(meta_model.buffers()))
    avail = _available_ram()
    weights = [folder / f for f in _WEIGHT_FILES if (folder / f).is_file()]
    if opts.meta or should_build_on_meta(nbytes, avail):
        model = meta_model
        why = "--meta" if opts.meta else (f"the weights need ~{nbytes / 2**30:.1f} GiB, "
                                          f"{(avail or 0) / 2**30:.1f} GiB of RAM available")
        notes.append(f"built on the meta device ({why}): shapes only, no weights")
    else:
        del meta_model
        try:
            if weights:
                model = cls.from_pretrained(str(folder))
                notes.append(f"weights loaded from {folder}")
            else:
                model = cls.from_config(cfg)
                notes.append("random weights (no weights file next to the config; --meta skips them)")
        except Exception as e:
            raise ModelLoadError(f"building {cls_name} from {folder} failed: {type(e).__name__}: {e}") from e
    model.eval()
    g = torch.Generator().manual_seed(int(opts.seed))
    try:
        kwargs = info.inputs(model, cfg, InputSizes(opts.batch, h, w, frames, text_tokens), g)
    except KeyError as e:
        raise ModelLoadError(f"{cfg_path}: config lacks {e} needed to build the inputs of {cls_name}") from None
    if next(iter(model.parameters()), torch.empty(0)).is_meta:
        kwargs = _meta_tree(kwargs)
    notes.append("inputs built from the config: " + "; ".join(x for x in (
        info.doc, text_note, f"image input {h}x{w}" + (f", {frames} frames" if info.video else "")) if x))
    return LoadedModel(model, kwargs, str(spec), "config", tuple(notes))


# ===================================================================================== capture

#: captures of presets kept for repeated in-process calls (tests, notebooks):
#: (spec, options) -> (LoadedModel, PlannedCapture). A preset is deterministic in its options.
_CAPTURES: OrderedDict[tuple, tuple] = OrderedDict()
_MAX_CAPTURES = 4


def capture_model(spec: str, *, height: int | None = None, width: int | None = None, batch: int = 1,
                  seed: int = 0, meta: bool = False, frames: int | None = None, text_tokens: int | None = None,
                  image_input: str | None = None, kv_cache: bool = True) -> tuple[LoadedModel, Any]:
    """``load_model`` + capture (the forward is not run): ``(LoadedModel, PlannedCapture)``.
    Captures of presets are kept for repeated in-process calls."""
    key = (spec, height, width, batch, seed, meta, frames, text_tokens, image_input, kv_cache)
    hit = _CAPTURES.get(key)
    if hit is not None:
        _CAPTURES.move_to_end(key)
        return hit
    loaded = load_model(spec, height=height, width=width, batch=batch, seed=seed, meta=meta, frames=frames,
                        text_tokens=text_tokens)
    cc = plan_model(loaded.model, loaded.inputs, image_input=image_input, kv_cache=kv_cache)
    if loaded.cacheable:
        _CAPTURES[key] = (loaded, cc)
        while len(_CAPTURES) > _MAX_CAPTURES:
            _CAPTURES.popitem(last=False)
    return loaded, cc


def plan_model(model: Any, inputs: dict, *, image_input: str | None = None, kv_cache: bool = True) -> Any:
    """The ``PlannedCapture`` of ``model`` for ``inputs`` (its forward's keyword arguments),
    with ``rasfx.transform``'s model checks (U-Net, already transformed) and the graphs as the
    runtime builds them by default (the forward is not run)."""
    from .capture import input_signature
    from .planned_capture import plan_capture
    from .transform import TransformConfig, transform

    transform(model)
    kwargs = dict(inputs)
    return plan_capture(model, kwargs, image_input, input_signature(model, kwargs), kv_cache=kv_cache,
                        varying_inputs=TransformConfig().varying_inputs)
