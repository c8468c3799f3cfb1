"""How a graph variant runs: eagerly, through ``torch.compile``, and/or replayed as a CUDA graph.

A RAS step is cheap in FLOPs but launches as many kernels as a dense step; on a fast GPU
an eager step is bound by launch overhead. Replaying a CUDA graph removes that overhead.
Shapes are static per (variant, active count): the sampler rounds the active count to a
few buckets, so each bucket is captured once and replayed for every later step and image.

Runtime state is explicit: one ``GraphRunner`` per ``RASModule``. What it holds lives as long
as the caches it reads: captured graphs and compiled functions survive ``RASModule.reset()``
(a new image), are dropped per input signature when the module's LRU evicts a capture
(``drop_signature``), and all at once by ``clear()`` (``RASModule.release()``).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, cast

import torch

from .errors import ConfigError, RASWarning
from .planned_capture import copy_graph_module
from .compiler import lower
from .target import MODES

log = logging.getLogger("rasfx")

#: Work done by name: counts (``exports``, ``graph_captures``...) and seconds (``export_s``...).
#: At run time a ``Counter`` (an unknown name reads 0), typed as a dict because typeshed's
#: ``Counter`` holds int values only.
WorkCounts = dict[str, float]


class GraphKey(NamedTuple):
    """What one CUDA graph / compiled shape is for: the cache slot whose caches it reads in
    place, the graph variant, the input signature and the active index's shape (None: dense)."""

    slot: str
    variant: str
    signature: Any
    index_shape: Optional[tuple]


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    buffers: dict  # position -> static buffer of each dynamic input (copied into before each replay)
    outputs: Any
    # (position, data_ptr) of the tensors the graph reads in place (weights, caches, per-prompt
    # values): checked before each replay, not held (a replaced weight is not kept alive)
    static_ptrs: list


class GraphRunner:
    def __init__(self, mode: str = "auto"):
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self._compiled: dict = {}  # id(variant) -> (variant, compiled fn); the variant pins the id
        self._graphs: dict = {}
        self._no_graph: set = set()  # keys whose CUDA-graph capture failed in "auto" mode: run eagerly
        self._pool: Optional["torch.cuda._POOL_HANDLE"] = None  # the CUDA graphs' shared memory pool
        self._compiled_keys: set = set()
        # What ran, cumulative: (graph, mode) -> calls, graph = "variant" or "variant [index shape]";
        # a caller takes differences (``rasfx.stats`` reports the modes of a pipeline run), and
        # why a graph ran in another mode than the one asked for (graph -> reason).
        self.ran: Counter = Counter()
        self.fallbacks: dict[str, str] = {}
        self._warned: set[str] = set()
        # Work done, cumulative over the runner's life (counts and seconds); never reset, so a
        # caller can take differences (``rasfx.stats`` reports them per pipeline run).
        self.work = cast(WorkCounts, Counter())

    @property
    def stats(self) -> dict:
        """Counts of the work done so far (kept for callers of the earlier dict)."""
        return {"captures": self.work["graph_captures"], "replays": self.work["replays"],
                "compiles": self.work["compiles"], "compiled_shapes": self.work["compiled_shapes"]}

    def resolved_mode(self, device: torch.device) -> str:
        """The mode that runs for tensors on ``device``: CUDA graphs need CUDA tensors, so on
        other devices ``auto`` and ``cuda_graph`` run eagerly and ``compile+cuda_graph`` compiled."""
        cuda = torch.device(device).type == "cuda"
        if self.mode == "auto":
            return "cuda_graph" if cuda else "eager"
        if not cuda and "cuda_graph" in self.mode:
            return self.mode.removesuffix("+cuda_graph").replace("cuda_graph", "eager")
        return self.mode

    def clear(self) -> None:
        """Free every captured graph and compiled function."""
        self.fallbacks.clear()
        self._warned.clear()
        self._compiled.clear()
        self._compiled_keys.clear()
        self._graphs.clear()
        self._no_graph.clear()
        self._pool = None

    def drop_signature(self, signature, variants) -> None:
        """Forget what was captured or compiled for one input signature (its capture was
        evicted; ``variants``: its graph variants)."""
        for key in [k for k in self._graphs if k.signature == signature]:
            del self._graphs[key]
        self._no_graph = {k for k in self._no_graph if k.signature != signature}
        self._compiled_keys = {k for k in self._compiled_keys if k[1] != signature}  # (variant, signature, shape)
        for v in variants:
            self._compiled.pop(id(v), None)

    def graph_count(self) -> int:
        return len(self._graphs)

    def _fn(self, variant) -> Callable:
        if "compile" not in self.mode:
            return variant.gm
        entry = self._compiled.get(id(variant))
        if entry is None:
            _raise_recompile_limit()
            entry = self._compiled[id(variant)] = (variant, torch.compile(_lowered(variant.gm), dynamic=False))
            self.work["compiles"] += 1
        return entry[1]

    def _record(self, graph: str, mode: str, fallback: str | None = None) -> None:
        """Count a call of ``graph`` in ``mode``; ``fallback``: why it is not the mode asked for
        (a ``RASWarning``, once per reason)."""
        self.ran[(graph, mode)] += 1
        if fallback is not None and graph not in self.fallbacks:
            self.fallbacks[graph] = fallback
            if fallback not in self._warned:
                self._warned.add(fallback)
                warnings.warn(f"rasfx: TransformConfig(mode={self.mode!r}) runs {mode}: {fallback}", RASWarning,
                              stacklevel=4)

    def run(self, variant, args: list, dynamic: list[int], key: GraphKey | tuple):
        """Run ``variant.gm(*args)`` (``args``: ``variant.call_args(...)``). ``dynamic``:
        positions of inputs whose values change between calls (user inputs, index); all others
        (weights, caches) keep their storage, which lets a captured CUDA graph read them in
        place. ``key``: a ``GraphKey`` (slot, variant name, signature, index shape). Returned
        tensors are never the graph's own buffers."""
        key = GraphKey(*key)
        fn = self._fn(variant)
        if "compile" in self.mode and key[1:] not in self._compiled_keys:  # a compiled shape serves every slot
            fn = self._announce_compile(fn, variant, key)
        graph = variant.name if key.index_shape is None else f"{variant.name} {list(key.index_shape)}"
        plain = "compile" if "compile" in self.mode else "eager"
        wants_graph = self.mode == "auto" or "cuda_graph" in self.mode
        cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
        if not (wants_graph and cuda) or key in self._no_graph:
            fallback = None
            if wants_graph and self.mode != "auto" and not cuda:  # auto: eager is its choice off CUDA
                fallback = "CUDA graphs need CUDA tensors and the model's inputs are not on a CUDA device"
            self._record(graph, plain, fallback)
            return fn(*args)
        entry = self._graphs.get(key)
        if entry is not None and any(args[i].data_ptr() != p for i, p in entry.static_ptrs):
            # a weight was replaced by a tensor with other storage (``param.data = ...``,
            # ``load_state_dict(assign=True)``): the graph would read the old one
            log.info("rasfx: a tensor the %s graph reads in place was replaced; capturing it again", variant.name)
            del self._graphs[key]
            entry = None
        if entry is None:
            try:
                entry = self._graphs[key] = self._capture(fn, args, dynamic)
            except Exception as e:
                if self.mode != "auto":
                    raise
                self._no_graph.add(key)
                self._record(graph, plain, f"CUDA-graph capture of the {graph} graph failed ({type(e).__name__}: "
                                           f"{str(e).splitlines()[0] if str(e) else ''}); pass "
                                           "TransformConfig(mode='eager') to skip the attempt")
                return fn(*args)
        else:
            for i, buffer in entry.buffers.items():
                buffer.copy_(args[i])
        self._record(graph, "compile+cuda_graph" if plain == "compile" else "cuda_graph")
        entry.graph.replay()
        self.work["replays"] += 1
        # The outputs live in the graph's memory and are overwritten by the next replay.
        return [o.clone() if isinstance(o, torch.Tensor) else o for o in entry.outputs]

    def _announce_compile(self, fn, variant, key) -> Callable:
        """``fn`` for the first call of a new (variant, shape): torch.compile compiles then,
        which takes tens of seconds on a real model; say so, and how long it took."""
        self._compiled_keys.add(key[1:])
        self.work["compiled_shapes"] += 1
        shape = "all tokens" if key.index_shape is None else f"active index {list(key.index_shape)}"
        log.info("rasfx: compiling the %s graph for %s (first use of this shape; later steps and images reuse it)",
                 variant.name, shape)

        first = [True]

        def timed(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            if first[0]:  # a CUDA-graph capture calls it again (warm-ups, capture)
                first[0] = False
                seconds = time.perf_counter() - t0
                self.work["compile_s"] += seconds
                log.info("rasfx: %s graph for %s compiled in %.1f s", variant.name, shape, seconds)
            return out

        return timed

    def _capture(self, fn, args, dynamic) -> _Captured:
        t0 = time.perf_counter()
        buffers = {i: args[i].clone() for i in dynamic if isinstance(args[i], torch.Tensor)}
        static = [buffers.get(i, a) for i, a in enumerate(args)]
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        caller = torch.cuda.current_stream()
        stream = torch.cuda.Stream()
        stream.wait_stream(caller)
        try:
            with torch.cuda.stream(stream):
                # Warm-up outside the capture: compilation, cuBLAS/cuDNN handles, autotuning.
                # Re-running a step is idempotent: caches get the same rows written again.
                for _ in range(2):
                    fn(*static)
            caller.wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = fn(*static)
        except BaseException:
            # a failed capture can leave its side stream current: the caller's stream comes back,
            # after the work queued on the side stream
            torch.cuda.set_stream(caller)
            caller.wait_stream(stream)
            raise
        self.work["graph_captures"] += 1
        self.work["graph_capture_s"] += time.perf_counter() - t0
        ptrs = [(i, a.data_ptr()) for i, a in enumerate(args) if i not in buffers and isinstance(a, torch.Tensor)]
        return _Captured(graph, buffers, outputs, ptrs)


def _lowered(gm: "torch.fx.GraphModule") -> "torch.fx.GraphModule":
    """A copy of ``gm`` (sharing its parameters) whose cache ops are plain in-place ATen
    writes, which Inductor fuses into the kernels producing the rows (lower_cache_ops)."""
    lowered = copy_graph_module(gm)
    lower(lowered)
    return lowered


def _raise_recompile_limit() -> None:
    # Each active-count bucket is one static shape: allow enough entries for them.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < 64:
            setattr(cfg, name, 64)
