"""The preset registry: :class:`Preset`, :data:`PRESETS`, :func:`get_preset`, and what every
preset shares (the weight re-randomisation, the size checks, the seeded input call)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..errors import UsageError


@dataclass(frozen=True)
class KnownFailure:
    """Why rasfx cannot transform a preset yet (with the torch and diffusers versions it is
    tested with): ``reason`` is what ``rasfx presets`` prints, ``error`` a fragment of the error
    that ``rasfx inspect`` reports (tests/test_cli.py checks that the preset still fails with it)."""

    reason: str
    error: str


@dataclass(frozen=True)
class Preset:
    """One tiny model and its pipeline-faithful inputs.

    Attributes:
        name: registry key.
        description: one line: the diffusers class, what the preset exercises.
        build: ``build(seed=0) -> torch.nn.Module``: a new model, eval mode, float32, every
            parameter re-randomised from ``seed``.
        inputs: ``inputs(batch=1, height=None, width=None, seed=0) -> dict``: forward keyword
            arguments (``return_dict=False`` included); ``None`` sizes mean ``default_hw``.
            Raises ``ValueError`` for a size the model cannot take (see ``multiple``,
            ``square_only``, ``max_hw``).
        default_hw: ``(height, width)`` used when none is given.
        multiple: height and width must be multiples of this (the patch size).
        square_only: the model only supports ``height == width`` (DiT).
        max_hw: largest height/width the model's position tables allow (None: no limit).
        frames: number of latent frames of video presets (None for image models).
        model_class: name of the diffusers class.
        known_failure: why rasfx cannot transform this preset yet (None: it can).
        fixed_size: why rasfx captures this preset only at ``default_hw`` although the model
            runs at other sizes (torch.export cannot capture it there; docs/limitations.md),
            None: at every valid size.
    """

    name: str
    description: str
    build: Callable[..., torch.nn.Module]
    inputs: Callable[..., dict]
    default_hw: tuple[int, int]
    multiple: int = 2
    square_only: bool = False
    max_hw: Optional[int] = None
    frames: Optional[int] = None
    model_class: str = ""
    tags: tuple[str, ...] = field(default=())
    known_failure: Optional[KnownFailure] = None
    fixed_size: Optional[str] = None

    def valid_hw(self, height: int, width: int) -> bool:
        try:
            self._check_hw(height, width)
        except ValueError:
            return False
        return True

    def _check_hw(self, height: int, width: int) -> None:
        _check_hw(self, height, width)

# ------------------------------------------------------------------------------------ helpers


def randomize_(model: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    """Re-draw every parameter of ``model`` from a seeded generator so that every path
    contributes and activations stay O(1): matrices ``N(0, gain^2 / fan_in)``, 1-D weights
    (norm scales) ``1 + N(0, 0.1^2)``, biases and other vectors ``N(0, 0.1^2)``."""
    g = torch.Generator().manual_seed(10_007 * int(seed) + 1)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if prm.dim() >= 2:
                fan_in = math.prod(prm.shape[1:])
                std = gain / math.sqrt(max(1, fan_in))
                prm.copy_(std * torch.randn(prm.shape, generator=g, dtype=torch.float32))
            elif leaf == "weight":
                prm.copy_(1.0 + 0.1 * torch.randn(prm.shape, generator=g, dtype=torch.float32))
            else:
                prm.copy_(0.1 * torch.randn(prm.shape, generator=g, dtype=torch.float32))
    return model


def _finish(model: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.to(torch.float32)
    randomize_(model, seed, gain)
    model.eval()
    model.requires_grad_(False)
    return model


def _check_hw(p: Preset, height: int, width: int) -> None:
    for what, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise UsageError(f"{p.name}: {what} must be a positive int, got {v!r}")
        if v % p.multiple:
            raise UsageError(f"{p.name}: {what} must be a multiple of {p.multiple}, got {v}")
        if p.max_hw is not None and v > p.max_hw:
            raise UsageError(f"{p.name}: {what} must be at most {p.max_hw} (position tables), got {v}")
    if p.square_only and height != width:
        raise UsageError(f"{p.name}: {p.model_class} only supports square inputs, got {height}x{width}")

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))

_REGISTRY: dict[str, Preset] = {}


def _register(name, description, model_fn, inputs_fn, default_hw, *, multiple=2, square_only=False,
              max_hw=None, frames=None, model_class="", tags=(), known_failure=None, fixed_size=None):
    holder: dict[str, Preset] = {}

    def build(seed: int = 0) -> torch.nn.Module:
        torch_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(int(seed))
            model = model_fn()
        finally:
            torch.random.set_rng_state(torch_state)
        return _finish(model, seed)

    def inputs(batch: int = 1, height: Optional[int] = None, width: Optional[int] = None, seed: int = 0) -> dict:
        p = holder["p"]
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise UsageError(f"{name}: batch must be an int >= 1, got {batch!r}")
        h = p.default_hw[0] if height is None else height
        w = p.default_hw[1] if width is None else width
        _check_hw(p, h, w)
        kw = inputs_fn(batch, h, w, _gen(seed))
        kw["return_dict"] = False
        return kw

    build.__doc__ = f"Build {model_class} ({name}) with re-randomised weights."
    inputs.__doc__ = f"Forward kwargs of {name}, built as its diffusers pipeline builds them."
    preset = Preset(name, description, build, inputs, tuple(default_hw), multiple, square_only, max_hw, frames,
                    model_class, tuple(tags), known_failure, fixed_size)
    holder["p"] = preset
    _REGISTRY[name] = preset
    return preset


# ------------------------------------------------------------------------------------ lookup

PRESETS: dict[str, Preset] = _REGISTRY


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise UsageError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}") from None
