"""rasfx: region-adaptive sampling for any diffusion transformer, as a compiler pass.

    ras = rasfx.transform(model)                     # the compiler (any DiT nn.Module)
    rasfx.enable(pipe, rasfx.RASConfig(ratio=0.25))  # the sampler inside a diffusers pipeline

The public names are imported on first use (PEP 562), so ``import rasfx`` and the ``rasfx``
command's ``--help`` do not import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "ArgumentTypeError": "errors", "CaptureError": "errors", "ConfigError": "errors", "InvalidIndexError": "errors",
    "RasfxError": "errors", "RASWarning": "errors", "TooFewTokensError": "errors",
    "UnsupportedModelError": "errors", "UsageError": "errors",
    "RASConfig": "config", "ParallelConfig": "parallel.config", "ParallelError": "errors",
    "Explanation": "explain", "explain": "explain",
    "RASModule": "module", "RASModuleProtocol": "pipeline.contract",
    "OpRule": "passes.op_rules",
    "disable": "pipeline", "enable": "pipeline", "enabled": "pipeline", "is_enabled": "pipeline",
    "release": "pipeline", "stats": "pipeline",
    "RunStats": "run_stats", "StepStats": "run_stats",
    "heatmap_figure": "heatmaps", "heatmap_image": "heatmaps", "save_heatmap": "heatmaps",
    "TransformConfig": "transform", "transform": "transform",
}
__all__ = [  # the names of _EXPORTS
    "ArgumentTypeError", "CaptureError", "ConfigError", "disable", "enable", "enabled", "explain", "Explanation",
    "heatmap_figure", "heatmap_image", "InvalidIndexError", "is_enabled", "OpRule", "ParallelConfig",
    "ParallelError", "RASConfig", "RasfxError",
    "RASModule", "RASModuleProtocol", "RASWarning", "release", "RunStats", "save_heatmap", "stats", "StepStats",
    "TooFewTokensError", "transform", "TransformConfig", "UnsupportedModelError", "UsageError",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rasfx' has no attribute {name!r}")
    if module != "errors":
        importlib.import_module(".ops", __name__)  # registers the rasfx:: ops before any graph uses them
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Importing the submodule ``rasfx.transform`` (or ``rasfx.explain``) sets the package
    attribute of that name to the module; the public name is the function, so keep it."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .config import RASConfig
    from .errors import (
        ArgumentTypeError, CaptureError, ConfigError, InvalidIndexError, ParallelError, RasfxError, RASWarning,
        TooFewTokensError, UnsupportedModelError, UsageError,
    )
    from .explain import Explanation, explain
    from .module import RASModule
    from .parallel.config import ParallelConfig
    from .passes.op_rules import OpRule
    from .pipeline import disable, enable, enabled, is_enabled, release, stats
    from .pipeline.contract import RASModuleProtocol
    from .heatmaps import heatmap_figure, heatmap_image, save_heatmap
    from .run_stats import RunStats, StepStats
    from .transform import TransformConfig, transform
