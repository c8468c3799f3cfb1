"""The execution target of a transformed model: how its graphs run, decided once.

``RASModule`` makes one ``ExecutionTarget`` from its ``TransformConfig`` when the model is
transformed and hands it down: the graph runner runs its ``mode``, the compiler reads the
cache layout when it plans a capture (``plan_capture(contiguous_attention=...)``) and the
module picks the fused graph variants where ``fuses(device)``. Nothing flows back: the
runtime only runs the graphs it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels

#: ``auto``: CUDA graphs for CUDA tensors, eager otherwise (the default).
MODES = ("auto", "eager", "compile", "cuda_graph", "compile+cuda_graph")


def contiguous_attention_caches(mode: str) -> bool:
    """Memory layout of the attention caches for a runner ``mode``: the producer's (a dense
    fill is a plain copy) or contiguous. Under inductor a contiguous cache is written in place,
    a permuted one was measured to be copied whole each step (for SDPA and as a mutated input);
    A/B in benchmarks/bench_models.py (mode suffix "@producer-layout")."""
    return "compile" in mode


def fusion_pays_off(device: torch.device) -> bool:
    """Kernel fusion (``passes.fuse_kernels``) pays off where its Triton kernels run: CUDA with Triton."""
    return torch.device(device).type == "cuda" and kernels.triton_available()


@dataclass(frozen=True)
class ExecutionTarget:
    """How the graphs of one ``RASModule`` run.

    mode: the runner's mode (``MODES``: eager, compiled and/or CUDA graphs).
    fuse: ``TransformConfig.fuse`` (``"auto"``, True or False): run the fused graph variants.
    contiguous_attention: allocate the attention caches contiguous instead of in the producer's
        layout; fixed per capture (the dense variant may write producers into the caches through
        views that assume the layout).
    """

    mode: str = "auto"
    fuse: object = False
    contiguous_attention: bool = False

    @classmethod
    def of(cls, config) -> "ExecutionTarget":
        """The target a ``TransformConfig`` asks for."""
        return cls(config.mode, config.fuse, contiguous_attention_caches(config.mode))

    def fuses(self, device: torch.device) -> bool:
        """Whether a capture on ``device`` runs the fused graph variants."""
        return fusion_pays_off(device) if self.fuse == "auto" else bool(self.fuse)
