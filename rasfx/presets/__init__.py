"""Tiny random-weight diffusion transformers, for the CLI, the examples and the tests.

Each :class:`Preset` builds one diffusers DiT class at toy size (widths 16-32, 1-4 layers,
2 heads) with every parameter re-randomised from a seed (diffusers zero-initialises the
AdaLN modulations and output projections, which would make equivalence tests pass
trivially), and builds the keyword arguments of one ``forward`` the way the model's
diffusers pipeline builds them: dtypes, masks, rotary tables, timestep scaling, packing,
``return_dict=False``. Nothing is downloaded.

``height, width`` of :meth:`Preset.inputs` are the size of the image input the model sees:
latent pixels for grid models (``[B, C, H, W]``), the latent ``H, W`` of each frame for
video models (with a small fixed number of frames), and the packed token grid ``h, w``
for packed models (Flux: ``hidden_states`` is ``[B, h*w, C]``).

Usage::

    from rasfx.presets import PRESETS, get_preset
    p = get_preset("sd3-tiny")
    model = p.build(0)
    out = model(**p.inputs(batch=2))[0]
"""

from __future__ import annotations

# Layout: ``registry`` (Preset, PRESETS, get_preset, what every preset shares), ``inputs`` (input
# builders shared by the families), then one module per family of classes, each registering its
# presets on import, in this order (the order of PRESETS): ``image`` and ``video`` (the classes
# rasfx was first checked on), ``extra`` (more classes; NOT_COVERED, the known failures),
# ``extra_image``, ``extra_video``, ``extra_audio`` (the newer classes).
from . import image, video, extra, extra_image, extra_video, extra_audio  # noqa: F401
from .extra import NOT_COVERED, mark_known_failures
from .registry import PRESETS, KnownFailure, Preset, get_preset, randomize_

__all__ = ["KnownFailure", "NOT_COVERED", "Preset", "PRESETS", "get_preset", "randomize_"]

mark_known_failures()
