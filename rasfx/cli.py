"""The ``rasfx`` command line: ``rasfx inspect MODEL`` shows what the compiler did to a model.

Exit codes: 0 success; 1 the model could not be loaded, captured or transformed (e.g.
``rasfx.UnsupportedModelError``), or an external tool is missing; 2 usage errors (unknown
MODEL, stage, format, option value, or a filter that matches nothing). User errors print
one ``rasfx: error: ...`` message, never a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
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

from . import errors

__all__ = ["CONFIG_CLASSES", "LoadedModel", "ModelLoadError", "UsageError", "capture_model", "load_model", "main"]

PROG = "rasfx"
KV_CACHE_OFF = "kv_cache off (--no-kv-cache): active queries attend to the active tokens only"


class UsageError(errors.UsageError):
    """Bad command-line usage (exit code 2); also a ``rasfx.UsageError`` (a ``ValueError``)."""


class ModelLoadError(errors.RasfxError):
    """The model named on the command line could not be built (exit code 1)."""


@dataclass
class LoadedModel:
    model: Any
    inputs: dict
    name: str
    source: str  # "preset" | "config" | "factory"
    notes: tuple = ()
    cacheable: bool = False
    extra: dict = field(default_factory=dict)


# ===================================================================================== versions


def _dist_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "?"


def version_string() -> str:
    from . import __version__

    return f"rasfx {__version__} (torch {_dist_version('torch')}, diffusers {_dist_version('diffusers')}, " \
           f"Python {sys.version.split()[0]})"


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


def load_model(spec: str, *, height: int | None = None, width: int | None = None, batch: int = 1,
               seed: int = 0, meta: bool = False, frames: int | None = None) -> LoadedModel:
    """Resolve a MODEL argument: a preset name, a diffusers model folder / ``config.json``,
    or ``package.module:factory``. Raises ``UsageError`` (unknown MODEL, bad sizes) or
    ``ModelLoadError`` (the model cannot be built)."""
    from .presets import PRESETS

    if not isinstance(batch, int) or batch < 1:
        raise UsageError(f"--batch must be an int >= 1, got {batch!r}")
    for opt, v in (("--height", height), ("--width", width), ("--frames", frames)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise UsageError(f"{opt} must be a positive int, got {v!r}")
    if spec in PRESETS:
        return _load_preset(spec, height, width, batch, seed, meta, frames)
    if os.path.exists(spec):
        return _load_config(spec, height, width, batch, seed, meta, frames)
    if ":" in spec and _looks_like_factory(spec):
        return _load_factory(spec, height, width, batch, seed, meta, frames)
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


def _load_preset(name, height, width, batch, seed, meta, frames) -> LoadedModel:
    from .presets import get_preset

    p = get_preset(name)
    if frames is not None and frames != p.frames:
        raise UsageError(f"--frames applies to video model configs; preset {name} has "
                         f"{p.frames if p.frames else 'no'} frames fixed")
    try:
        kwargs = p.inputs(batch, height, width, seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        model = p.build(seed)
    except Exception as e:  # diffusers version differences and the like
        raise ModelLoadError(f"preset {name}: building {p.model_class} failed: {type(e).__name__}: {e}") from e
    notes = ()
    if meta:
        model = model.to("meta")
        kwargs = _meta_tree(kwargs)
        notes = ("built on the meta device (--meta): shapes only, no weights",)
    return LoadedModel(model, kwargs, name, "preset", notes, cacheable=True)


def _load_factory(spec, height, width, batch, seed, meta, frames) -> LoadedModel:
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
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{spec} is not callable; a factory returns (model, example_kwargs)")
    offered = {"height": height, "width": width, "batch": batch, "seed": seed, "frames": frames}
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
    notes = ()
    if meta:
        model = model.to("meta")
        kwargs = _meta_tree(kwargs)
        notes = ("built on the meta device (--meta): shapes only, no weights",)
    return LoadedModel(model, kwargs, spec, "factory", notes)


# ------------------------------------------------------------------------------ diffusers configs


def _randn(g, *shape):
    import torch

    return torch.randn(*shape, generator=g, dtype=torch.float32)


def _mask(g, batch, length):
    import torch

    lens = torch.randint(max(1, length // 2), length + 1, (batch,), generator=g)
    return (torch.arange(length)[None, :] < lens[:, None]).to(torch.int64)


def _flow_t(g, batch):
    import torch

    return (torch.rand((), generator=g) * 1000.0).expand(batch).clone()


def _int_t(g, batch):
    import torch

    return torch.randint(0, 1000, (), generator=g)[None].expand(batch).clone()


def _cfg_sd3(model, cfg, b, h, w, f, g):
    # StableDiffusion3Pipeline: CLIP-L/G (77) + T5 (256) tokens
    return dict(hidden_states=_randn(g, b, cfg["in_channels"], h, w),
                encoder_hidden_states=_randn(g, b, 333, cfg["joint_attention_dim"]),
                pooled_projections=_randn(g, b, cfg["pooled_projection_dim"]), timestep=_flow_t(g, b),
                joint_attention_kwargs=None, return_dict=False)


def _cfg_flux(model, cfg, b, h, w, f, g):
    import torch

    T = 512
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    kw = dict(hidden_states=_randn(g, b, h * w, cfg["in_channels"]), timestep=_flow_t(g, b) / 1000,
              pooled_projections=_randn(g, b, cfg["pooled_projection_dim"]),
              encoder_hidden_states=_randn(g, b, T, cfg["joint_attention_dim"]), txt_ids=torch.zeros(T, 3),
              img_ids=ids.reshape(h * w, 3), joint_attention_kwargs=None, return_dict=False)
    kw["guidance"] = torch.full([b], 3.5) if cfg.get("guidance_embeds") else None
    return kw


def _cfg_pixart(model, cfg, b, h, w, f, g):
    import torch

    T = 300
    added = {"resolution": None, "aspect_ratio": None}
    if getattr(model, "use_additional_conditions", False):
        added = {"resolution": torch.tensor([[h * 8.0, w * 8.0]]).repeat(b, 1),
                 "aspect_ratio": torch.tensor([[h / w]]).repeat(b, 1)}
    return dict(hidden_states=_randn(g, b, cfg["in_channels"], h, w),
                encoder_hidden_states=_randn(g, b, T, cfg["caption_channels"]), encoder_attention_mask=_mask(g, b, T),
                timestep=_int_t(g, b), added_cond_kwargs=added, return_dict=False)


def _cfg_dit(model, cfg, b, h, w, f, g):
    import torch

    if h != w:
        raise UsageError(f"DiTTransformer2DModel only supports square inputs, got {h}x{w}")
    classes = int(cfg.get("num_embeds_ada_norm") or 1000)
    return dict(hidden_states=_randn(g, b, cfg["in_channels"], h, w), timestep=_int_t(g, b),
                class_labels=torch.randint(0, classes, (b,), generator=g), return_dict=False)


def _cfg_sana(model, cfg, b, h, w, f, g):
    T = 300
    return dict(hidden_states=_randn(g, b, cfg["in_channels"], h, w),
                encoder_hidden_states=_randn(g, b, T, cfg["caption_channels"]), encoder_attention_mask=_mask(g, b, T),
                timestep=_flow_t(g, b), attention_kwargs=None, return_dict=False)


def _cfg_wan(model, cfg, b, h, w, f, g):
    kw = dict(hidden_states=_randn(g, b, cfg["in_channels"], f, h, w), timestep=_flow_t(g, b),
              encoder_hidden_states=_randn(g, b, 512, cfg["text_dim"]), attention_kwargs=None, return_dict=False)
    if cfg.get("image_dim"):
        kw["encoder_hidden_states_image"] = _randn(g, b, 257, cfg["image_dim"])
    return kw


def _cfg_auraflow(model, cfg, b, h, w, f, g):
    return dict(hidden_states=_randn(g, b, cfg["in_channels"], h, w),
                encoder_hidden_states=_randn(g, b, 256, cfg["joint_attention_dim"]), timestep=_flow_t(g, b) / 1000,
                attention_kwargs=None, return_dict=False)


def _cfg_cogview4(model, cfg, b, h, w, f, g):
    import torch

    size = torch.tensor([[h * 8.0, w * 8.0]]).repeat(b, 1)
    return dict(hidden_states=_randn(g, b, cfg["in_channels"], h, w),
                encoder_hidden_states=_randn(g, b, 128, cfg["text_embed_dim"]), timestep=_flow_t(g, b),
                original_size=size.clone(), target_size=size.clone(), crop_coords=torch.zeros(b, 2),
                attention_kwargs=None, return_dict=False)


@dataclass(frozen=True)
class ConfigClass:
    """How ``rasfx inspect`` builds the inputs of a diffusers class from its config."""

    inputs: Callable
    default_hw: Callable  # cfg -> (height, width) of the image input
    multiple: Callable = lambda cfg: int(cfg.get("patch_size") or 1) if isinstance(cfg.get("patch_size"), int) else 2
    video: bool = False
    doc: str = ""


def _sample_hw(default):
    def hw(cfg):
        s = cfg.get("sample_size") or default
        return (s, s) if isinstance(s, int) else tuple(s)
    return hw


#: diffusers classes whose inputs ``rasfx inspect`` builds from a config (height/width:
#: latent pixels; Flux: the packed token grid; Wan: per frame, ``--frames`` latent frames).
CONFIG_CLASSES: OrderedDict[str, ConfigClass] = OrderedDict([
    ("SD3Transformer2DModel", ConfigClass(_cfg_sd3, _sample_hw(128), doc="333 text tokens")),
    ("FluxTransformer2DModel", ConfigClass(_cfg_flux, lambda cfg: (64, 64), lambda cfg: 1,
                                           doc="packed [B, h*w, C] tokens, 512 text tokens")),
    ("PixArtTransformer2DModel", ConfigClass(_cfg_pixart, _sample_hw(128), doc="300 text tokens with mask")),
    ("DiTTransformer2DModel", ConfigClass(_cfg_dit, _sample_hw(32), doc="class-conditional, square")),
    ("SanaTransformer2DModel", ConfigClass(_cfg_sana, _sample_hw(32), doc="300 text tokens with mask")),
    ("WanTransformer3DModel", ConfigClass(_cfg_wan, lambda cfg: (60, 104), lambda cfg: 2, video=True,
                                          doc="video [B, C, F, H, W], 512 text tokens")),
    ("AuraFlowTransformer2DModel", ConfigClass(_cfg_auraflow, _sample_hw(64), doc="256 text tokens")),
    ("CogView4Transformer2DModel", ConfigClass(_cfg_cogview4, _sample_hw(128), doc="128 text tokens")),
])

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                 "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json", "model.safetensors")


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


def _load_config(spec, height, width, batch, seed, meta, frames) -> LoadedModel:
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
        raise ModelLoadError(f"diffusers {_dist_version('diffusers')} has no class {cls_name} ({cfg_path})")
    if info.video and frames is None:
        frames = 21
    elif not info.video and frames is not None:
        raise UsageError(f"--frames applies to video models; {cls_name} is an image model")
    h0, w0 = info.default_hw(cfg)
    h, w = height or h0, width or w0
    mult = info.multiple(cfg)
    if h % mult or w % mult:
        raise UsageError(f"{cls_name}: --height/--width must be multiples of the patch size {mult}, got {h}x{w}")
    notes = []
    try:
        with torch.device("meta"):
            meta_model = cls.from_config(cfg)
    except Exception as e:
        raise ModelLoadError(f"building {cls_name} from {cfg_path} failed: {type(e).__name__}: {e}") from e
    nbytes = sum(t.numel() * t.element_size() for t in list(meta_model.parameters()) + list(meta_model.buffers()))
    avail = _available_ram()
    weights = [folder / f for f in _WEIGHT_FILES if (folder / f).is_file()]
    if meta or should_build_on_meta(nbytes, avail):
        model = meta_model
        why = "--meta" if meta else (f"the weights need ~{nbytes / 2**30:.1f} GiB, "
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
    g = torch.Generator().manual_seed(int(seed))
    try:
        kwargs = info.inputs(model, cfg, batch, h, w, frames, g)
    except KeyError as e:
        raise ModelLoadError(f"{cfg_path}: config lacks {e} needed to build the inputs of {cls_name}") from None
    if next(iter(model.parameters()), torch.empty(0)).is_meta:
        kwargs = _meta_tree(kwargs)
    notes.append(f"inputs built from the config: {info.doc}; image input {h}x{w}"
                 + (f", {frames} frames" if info.video else ""))
    return LoadedModel(model, kwargs, str(spec), "config", tuple(notes))


# ===================================================================================== argparse


EPILOG_INSPECT = """\
MODEL is one of:
  a preset name                 sd3-tiny, flux-tiny, wan-tiny ... (see rasfx presets)
  a diffusers model folder      path/to/transformer (or a pipeline folder, or its config.json);
                                random weights when no weights file is present; built on the
                                meta device with --meta or when the weights would not fit in RAM;
                                classes: SD3, Flux, PixArt, DiT, Sana, Wan, AuraFlow, CogView4
                                transformers (see rasfx presets)
  package.module:factory        a function returning (model, example_kwargs); it receives
                                height/width/batch/seed/frames when it accepts them

examples:
  rasfx inspect sd3-tiny                                  summary of the transformed graph
  rasfx inspect flux-tiny --format text --module transformer_blocks.0
  rasfx inspect sd3-tiny --format text --op attention     the attention nodes after the rewrite
  rasfx inspect sd3-tiny --diff analyzed transformed      what the rewrite passes changed
  rasfx inspect wan-tiny --format html -o wan.html        standalone page (inline SVG with Graphviz)
  rasfx inspect sd3-tiny --format svg --module transformer_blocks.1 -o block1.svg
  rasfx inspect ./my-sd3-transformer --meta --ratio 0.3   a real config, shapes only
  rasfx inspect mypkg.models:make_model --format json > graph.json

exit codes: 0 ok, 1 model error (cannot build / capture / transform), 2 usage error
"""

EPILOG_MAIN = """\
commands:
  inspect MODEL   show what the compiler did to a model (rasfx inspect --help)
  presets         list the tiny presets and the diffusers classes a config can name

examples:
  rasfx inspect sd3-tiny
  rasfx inspect flux-tiny --diff analyzed transformed --format text
  rasfx presets
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one message, exit code 2
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from .stages import FORMATS, STAGES, VARIANTS

    parser = _Parser(prog=PROG, description="rasfx: region-adaptive sampling for diffusion transformers, "
                                            "as an fx compiler.",
                     epilog=EPILOG_MAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version_string())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("inspect", help="show what the compiler did to a model",
                       description="Capture MODEL for one input signature (the forward is not run) and show one\n"
                                   "stage of the compiler: the captured graph, the token analysis and region plan,\n"
                                   "the transformed graph, or the difference between two stages.",
                       epilog=EPILOG_INSPECT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="preset name, diffusers model folder or config.json, "
                                                  "or package.module:factory")
    g = p.add_argument_group("what to show")
    g.add_argument("--stage", choices=STAGES, default=None,
                   help="compiler stage (default: transformed; fused: with the Triton gather/scatter GeMM fusion; "
                        "lowered: what torch.compile receives, cache ops as in-place ATen writes)")
    g.add_argument("--variant", choices=VARIANTS, default="shared",
                   help="graph variant of the transformed and lowered stages: shared (one active set, default), rowwise "
                        "(one per batch row), dense")
    g.add_argument("--diff", nargs=2, metavar=("A", "B"), default=None,
                   help="nodes added/removed/changed from stage A to stage B, grouped by pass")
    g.add_argument("--format", choices=FORMATS, default="summary",
                   help="summary (default), text (one line per node), json, dot, svg (needs Graphviz dot), html")
    g.add_argument("-o", "--output", metavar="FILE", default=None, help="write to FILE instead of stdout")
    g.add_argument("--module", metavar="PREFIX", default=None,
                   help="only nodes under this module path (component prefix: transformer_blocks.3)")
    g.add_argument("--op", metavar="SUBSTR", default=None,
                   help="only nodes whose op contains SUBSTR (attention: sdpa and rasfx::ras_attention)")
    g.add_argument("--ratio", type=float, default=0.25, help="share of active tokens for the estimates (default 0.25)")
    g.add_argument("--color", action=argparse.BooleanOptionalAction, default=None,
                   help="colour the text output (default: only on a terminal; NO_COLOR disables)")
    g.add_argument("--no-timings", dest="timings", action="store_false",
                   help="leave out capture timings (reproducible output)")
    m = p.add_argument_group("model inputs")
    m.add_argument("--height", type=int, default=None, help="image input height (latent pixels; packed grid for Flux)")
    m.add_argument("--width", type=int, default=None, help="image input width")
    m.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    m.add_argument("--frames", type=int, default=None, help="latent frames of a video model config (default 21)")
    m.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    m.add_argument("--meta", action="store_true", help="build the model on the meta device (shapes only, no weights)")
    m.add_argument("--image-input", metavar="NAME", default=None, help="forward argument carrying the image tokens")
    m.add_argument("--kv-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="attention reads cached keys/values of inactive tokens (default); --no-kv-cache: "
                        "the paper's ablation, attention over the active tokens only")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks of errors")
    p.add_argument("--version", action="version", version=version_string())

    sub.add_parser("presets", help="list presets and supported config classes",
                   description="List the tiny presets (MODEL names) and the diffusers classes whose inputs "
                               "rasfx inspect builds from a config.json.",
                   epilog="example:\n  rasfx presets", formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser


# ===================================================================================== commands

#: captures of presets kept for repeated in-process calls of ``main`` (tests, notebooks):
#: (spec, options) -> (LoadedModel, CompiledCapture). A preset is deterministic in its options.
_CAPTURES: OrderedDict[tuple, tuple] = OrderedDict()
_MAX_CAPTURES = 4


def capture_model(spec: str, *, height: int | None = None, width: int | None = None, batch: int = 1,
                  seed: int = 0, meta: bool = False, frames: int | None = None,
                  image_input: str | None = None, kv_cache: bool = True):
    """``load_model`` + capture (the forward is not run): ``(LoadedModel, CompiledCapture)``.
    Captures of presets are kept for repeated in-process calls."""
    from .capture import input_signature
    from .graph_build import compile_capture
    from .transform import TransformConfig, transform

    key = (spec, height, width, batch, seed, meta, frames, image_input, kv_cache)
    hit = _CAPTURES.get(key)
    if hit is not None:
        _CAPTURES.move_to_end(key)
        return hit
    loaded = load_model(spec, height=height, width=width, batch=batch, seed=seed, meta=meta, frames=frames)
    transform(loaded.model)  # rasfx.transform's model checks (U-Net, already transformed)
    kwargs = dict(loaded.inputs)
    cc = compile_capture(loaded.model, kwargs, image_input, input_signature(loaded.model, kwargs), kv_cache=kv_cache,
                         varying_inputs=TransformConfig().varying_inputs)  # the graphs as the runtime builds them
    if loaded.cacheable:
        _CAPTURES[key] = (loaded, cc)
        while len(_CAPTURES) > _MAX_CAPTURES:
            _CAPTURES.popitem(last=False)
    return loaded, cc


def _explanation(args):
    from .explain import Explanation, describe_inputs

    loaded, cc = capture_model(args.model, height=args.height, width=args.width, batch=args.batch, seed=args.seed,
                               meta=args.meta, frames=args.frames, image_input=args.image_input,
                               kv_cache=args.kv_cache)
    stage = args.diff[0] if args.diff else (args.stage or "transformed")
    return Explanation(cc, stage=stage, variant=args.variant, ratio=args.ratio, module=args.module, op=args.op,
                       model_name=loaded.name, model_class=type(loaded.model).__name__, source=loaded.source,
                       inputs=describe_inputs(loaded.inputs),
                       notes=loaded.notes + (() if args.kv_cache else (KV_CACHE_OFF,)))


def _use_color(args) -> bool:
    if args.color is not None:
        return args.color
    if args.output or os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return sys.stdout.isatty()


def _cmd_inspect(args) -> int:
    from .stages import STAGES

    if args.diff:
        if args.stage:
            raise UsageError("--diff A B and --stage are exclusive (the diff names both stages)")
        for s in args.diff:
            if s not in STAGES:
                raise UsageError(f"--diff: unknown stage {s!r} (choose from {', '.join(STAGES)})")
        if args.format in ("dot", "svg"):
            raise UsageError("--diff writes summary, text, json or html, not " + args.format)
    if not (0.0 < args.ratio <= 1.0):
        raise UsageError(f"--ratio must be in (0, 1], got {args.ratio}")
    if args.format == "svg":
        import shutil

        from .explain import DOT_BINARY_HINT, ToolMissingError

        if shutil.which("dot") is None:  # before the (slow) capture
            raise ToolMissingError(f"--format svg needs Graphviz's `dot` program, which is not on PATH: {DOT_BINARY_HINT}")
    exp = _explanation(args)
    exp.check_filters()
    color = _use_color(args)
    fmt = args.format
    if args.diff:
        d = exp.diff(args.diff[1], args.variant)
        out = {"summary": lambda: d.summary(color=color), "text": lambda: d.text(color=color),
               "json": d.to_json, "html": lambda: exp.with_stage(args.diff[1]).to_html(diff=d, timings=args.timings)}[fmt]()
    else:
        out = {"summary": lambda: exp.summary(timings=args.timings, color=color),
               "text": lambda: exp.text(color=color),
               "json": lambda: exp.to_json(timings=args.timings),
               "dot": exp.to_dot, "svg": exp.to_svg,
               "html": lambda: exp.to_html(timings=args.timings)}[fmt]()
    _write(out, args.output)
    return 0


def _write(text: str, path: str | None) -> None:
    if path is None or path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as e:
        raise ModelLoadError(f"cannot write {path}: {e.strerror or e}") from None
    print(f"rasfx: wrote {path} ({len(text.encode('utf-8'))} bytes)", file=sys.stderr)


def _cmd_presets(args) -> int:
    from .presets import PRESETS

    lines = ["presets (rasfx inspect NAME):"]
    width = max(len(n) for n in PRESETS)
    for name, p in PRESETS.items():
        lines.append(f"  {name:<{width}}  {p.description}")
    lines.append("")
    lines.append("diffusers classes a config.json may name (inputs built from the config):")
    width = max(len(n) for n in CONFIG_CLASSES)
    for name, info in CONFIG_CLASSES.items():
        lines.append(f"  {name:<{width}}  {info.doc}")
    _write("\n".join(lines) + "\n", None)
    return 0


def main(argv: list | None = None) -> int:
    """Console entry point (``rasfx``). Returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    debug = getattr(args, "debug", False) or bool(os.environ.get("RASFX_DEBUG"))
    prog = f"{PROG} {args.command}"
    from .errors import RasfxError
    from .explain import ExplainError, ToolMissingError

    try:
        if args.command == "presets":
            return _cmd_presets(args)
        return _cmd_inspect(args)
    except (UsageError, ExplainError) as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (ModelLoadError, ToolMissingError, RasfxError) as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. | head
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except Exception as e:  # a bug: say so in one line; --debug shows the traceback
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"{prog}: error: internal error ({type(e).__name__}): {first} (run with --debug for the full message)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
