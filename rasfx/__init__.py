"""rasfx: region-adaptive sampling for any diffusion transformer, as a compiler pass."""

from . import ops  # registers the rasfx:: ops
from .errors import CaptureError, ConfigError, InvalidIndexError, RasfxError, UnsupportedModelError
from .module import RASModule
from .transform import TransformConfig, transform

__all__ = [
    "CaptureError", "ConfigError", "InvalidIndexError", "RASModule", "RasfxError", "TransformConfig",
    "UnsupportedModelError", "transform",
]
__version__ = "0.1.0"
