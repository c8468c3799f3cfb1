"""rasfx: region-adaptive sampling for any diffusion transformer, as a compiler pass.

    ras = rasfx.transform(model)                     # the compiler (any DiT nn.Module)
    rasfx.enable(pipe, rasfx.RASConfig(ratio=0.25))  # the sampler inside a diffusers pipeline
"""

from . import ops  # registers the rasfx:: ops  # noqa: F401
from .config import RASConfig
from .errors import (
    ArgumentTypeError, CaptureError, ConfigError, InvalidIndexError, RasfxError, RASWarning, TooFewTokensError, UnsupportedModelError,
    UsageError,
)
from .explain import Explanation, explain
from .module import RASModule
from .passes.op_rules import OpRule
from .pipeline import disable, enable, enabled, is_enabled, release, stats
from .run_stats import RunStats, StepStats, heatmap_image, save_heatmap
from .transform import TransformConfig, transform

__all__ = [
    "ArgumentTypeError", "CaptureError", "ConfigError", "Explanation", "explain", "InvalidIndexError", "OpRule", "RASConfig", "RASModule", "RASWarning", "RasfxError",
    "RunStats", "StepStats", "TooFewTokensError", "TransformConfig", "UnsupportedModelError", "UsageError", "disable", "enable", "enabled",
    "heatmap_image", "is_enabled", "release", "save_heatmap", "stats", "transform",
]
__version__ = "0.1.0"
