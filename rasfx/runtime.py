"""How a graph variant runs: eagerly, through ``torch.compile``, and/or replayed as a CUDA graph.

A RAS step is cheap in FLOPs but launches as many kernels as a dense step; on a fast GPU
an eager step is bound by launch overhead. Replaying a CUDA graph removes that overhead.
Shapes are static per (variant, active count): the sampler rounds the active count to a
few buckets, so each bucket is captured once and replayed for every later step and image.

Runtime state is explicit: one ``GraphRunner`` per ``RASModule``; ``clear()`` frees every
captured graph and compiled function.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .graph_build import copy_graph_module
from .passes import lower_cache_ops

log = logging.getLogger("rasfx")

MODES = ("eager", "compile", "cuda_graph", "compile+cuda_graph")


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: list  # static input buffers (the dynamic ones are copied into these)
    dynamic: list  # positions of inputs copied in before each replay
    outputs: Any


class GraphRunner:
    def __init__(self, mode: str = "eager"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self._compiled: dict = {}
        self._graphs: dict = {}
        self._pool = None
        self.stats = {"captures": 0, "replays": 0, "compiles": 0, "compiled_shapes": 0}
        self._compiled_keys: set = set()
        # Memory layout of the attention caches: the producer's (a dense fill is a plain copy)
        # or contiguous. Under inductor a contiguous cache is written in place, a permuted one
        # was measured to be copied whole each step (for SDPA and as a mutated input); A/B in
        # benchmarks/bench_models.py (mode suffix "@producer-layout"). Read when a signature is
        # captured and fixed for that capture (CompiledCapture.contiguous_attention).
        self.contiguous_attention_caches = "compile" in mode

    def clear(self) -> None:
        self._compiled.clear()
        self._compiled_keys.clear()
        self._graphs.clear()
        self._pool = None

    def drop(self, slot: str) -> None:
        """Forget the CUDA graphs of one slot (its caches were reallocated)."""
        for key in [k for k in self._graphs if k[0] == slot]:
            del self._graphs[key]

    def _fn(self, variant) -> Callable:
        if "compile" not in self.mode:
            return variant.gm
        fn = self._compiled.get(id(variant))
        if fn is None:
            _raise_recompile_limit()
            fn = self._compiled[id(variant)] = torch.compile(_lowered(variant.gm), dynamic=False)
            self.stats["compiles"] += 1
        return fn

    def run(self, variant, args: list, dynamic: list[int], key: tuple):
        """Run ``variant.gm(*args)``. ``dynamic``: positions of inputs whose values change
        between calls (user inputs, index); all others (weights, caches) keep their
        storage, which lets a captured CUDA graph read them in place."""
        fn = self._fn(variant)
        if "compile" in self.mode and key[1:] not in self._compiled_keys:  # key[0]: the cache slot
            fn = self._announce_compile(fn, variant, key)
        use_graph = "cuda_graph" in self.mode and any(
            isinstance(a, torch.Tensor) and a.is_cuda for a in args
        )
        if not use_graph:
            return fn(*args)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(fn, args, dynamic)
        else:
            for i in entry.dynamic:
                if isinstance(args[i], torch.Tensor):
                    entry.inputs[i].copy_(args[i])
        entry.graph.replay()
        self.stats["replays"] += 1
        # The outputs live in the graph's memory and are overwritten by the next replay.
        return [o.clone() if isinstance(o, torch.Tensor) else o for o in entry.outputs]

    def _announce_compile(self, fn, variant, key) -> Callable:
        """``fn`` for the first call of a new (variant, shape): torch.compile compiles then,
        which takes tens of seconds on a real model; say so, and how long it took."""
        self._compiled_keys.add(key[1:])
        self.stats["compiled_shapes"] += 1
        shape = "all tokens" if key[-1] is None else f"active index {list(key[-1])}"
        log.info("rasfx: compiling the %s graph for %s (first use of this shape; later steps reuse it)",
                 variant.name, shape)

        first = [True]

        def timed(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            if first[0]:  # a CUDA-graph capture calls it again (warm-ups, capture)
                first[0] = False
                log.info("rasfx: %s graph for %s compiled in %.1f s", variant.name, shape, time.perf_counter() - t0)
            return out

        return timed

    def _capture(self, fn, args, dynamic) -> _Captured:
        static = list(args)
        for i in dynamic:
            if isinstance(args[i], torch.Tensor):
                static[i] = args[i].clone()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # Warm-up outside the capture: compilation, cuBLAS/cuDNN handles, autotuning.
            # Re-running a step is idempotent: caches get the same rows written again.
            for _ in range(2):
                fn(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = fn(*static)
        self.stats["captures"] += 1
        return _Captured(graph, static, [i for i in dynamic if isinstance(args[i], torch.Tensor)], outputs)


def _lowered(gm: "torch.fx.GraphModule") -> "torch.fx.GraphModule":
    """A copy of ``gm`` (sharing its parameters) whose cache ops are plain in-place ATen
    writes, which Inductor fuses into the kernels producing the rows (lower_cache_ops)."""
    lowered = copy_graph_module(gm)
    lower_cache_ops(lowered)
    return lowered


def _raise_recompile_limit() -> None:
    # Each active-count bucket is one static shape: allow enough entries for them.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < 64:
            setattr(cfg, name, 64)
