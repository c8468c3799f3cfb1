"""Helpers shared by the rasfx Triton kernels.

Availability and dispatch (`triton_available`, `use_triton`), the autotuning config
sets, dtype/precision mapping and index validation live here so that the two kernel
files only hold their kernel, launcher and reference.

This module must stay importable with only torch installed: Triton is optional.
"""

from __future__ import annotations

import os

import torch

from ..errors import InvalidIndexError, UsageError
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is an optional dependency: the PyTorch references run instead.
    triton = None
    tl = None

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

__all__ = [
    "jit",
    "triton_available",
    "use_triton",
    "interpret_enabled",
    "check_index",
    "check_index_arg",
    "dot_input_precision",
    "autotune_enabled",
    "build_launchable",
    "cpu_range_check",
    "launch_mode",
    "matmul_configs",
    "prune_matmul_configs",
    "rows_bucket",
    "tile_columns",
    "tile_key",
    "tile_meta",
    "FasterPath",
    "kernel_path",
    "tma_descriptor",
]


def jit(fn):
    """`triton.jit` when Triton imports, else the identity, so kernel files import without it.

    The kernels are re-jitted for the mode in force at their first launch (see
    `build_launchable`); this decoration only marks them as Triton kernels.
    """
    return triton.jit(fn) if triton is not None else fn


_TRUE_STRINGS = ("1", "true", "yes", "on", "y")


def triton_available() -> bool:
    """True when `import triton` succeeded."""
    return triton is not None


def interpret_enabled() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1).

    Read at call time, not import time: the kernels are built lazily for the mode in
    force at their launch (see `build_launchable`), so a test module can set the
    variable even after another module imported `rasfx.kernels`.
    """
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE_STRINGS


def use_triton(t: Tensor) -> bool:
    """Whether the Triton kernel (rather than the PyTorch reference) handles tensor `t`.

    True when Triton imports and either `t` is on CUDA, or TRITON_INTERPRET=1 and `t` is
    on the CPU (the interpreter runs the kernel with NumPy; used by the CPU test-suite).
    """
    if not triton_available():
        return False
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and interpret_enabled()


# ----------------------------------------------------------------------------------
# Index validation
# ----------------------------------------------------------------------------------

_INDEX_DTYPES = (torch.int32, torch.int64)


def check_index_arg(index: Tensor, batch: int, name: str = "index") -> None:
    """Metadata-only checks of a row index (dtype, rank, batch size); never syncs.

    index: [n] (shared by every batch row) or [B, n] (one row list per batch row).
    """
    if not isinstance(index, Tensor):
        raise InvalidIndexError(f"{name} must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype not in _INDEX_DTYPES:
        raise InvalidIndexError(f"{name} must be int64 or int32, got {index.dtype}")
    if index.dim() not in (1, 2):
        raise InvalidIndexError(f"{name} must have shape [n] or [B, n], got {tuple(index.shape)}")
    if index.dim() == 2 and index.shape[0] != batch:
        raise InvalidIndexError(f"{name} of shape [B, n] must have B == {batch} (the batch size), got {tuple(index.shape)}")


def check_index(index: Tensor, M: int, *, unique: bool = False) -> None:
    """Full validation of a row index into a dimension of size `M`; raises ValueError.

    Checks dtype and rank, that every value lies in [0, M), and with `unique=True` that
    no row of the index repeats a value (a scatter with repeats has no defined winner).
    Reading the values forces a host-device sync on CUDA, which is why the launchers
    do not call this on their fast path; call it when the index comes from untrusted
    code, or in tests.
    """
    check_index_arg(index, index.shape[0] if index.dim() == 2 else 1)
    if index.numel() == 0:
        return
    _check_range(index, M)
    if unique:
        rows = index.reshape(-1, index.shape[-1])  # rows: [B or 1, n]
        sorted_rows = rows.sort(dim=-1).values
        if bool((sorted_rows[:, 1:] == sorted_rows[:, :-1]).any()):
            raise InvalidIndexError("index has repeated values within a row; a scatter needs unique rows")


def _check_range(index: Tensor, M: int) -> None:
    lo = int(index.min())
    hi = int(index.max())
    if lo < 0 or hi >= M:
        raise InvalidIndexError(f"index values must lie in [0, {M}), got min {lo} and max {hi}")


def cpu_range_check(index: Tensor, M: int) -> None:
    """Range check done by the launchers only when it costs no host-device sync (CPU index)."""
    if index.device.type == "cpu" and index.numel() > 0:
        _check_range(index, M)


# ----------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------


def dot_input_precision(dtype: torch.dtype) -> str:
    """`input_precision` for tl.dot on `dtype` operands.

    fp16/bf16 operands run on the tensor cores at their own precision (the argument is
    ignored). For fp32 we follow PyTorch's own switch, so the fused kernel rounds like
    the F.linear it replaces: TF32 when `torch.backends.cuda.matmul.allow_tf32` is True
    (i.e. `torch.set_float32_matmul_precision("high")`), exact fp32 ("ieee") otherwise,
    which is PyTorch's default.
    """
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# ----------------------------------------------------------------------------------
# Autotuning
# ----------------------------------------------------------------------------------


def rows_bucket(batch: int, n: int) -> int:
    """Autotune key for the rows of one launch: batch x active rows per batch row, rounded
    up to a multiple of 128 (the usual tile height). Launches that cut into the same row
    tiles share a tuning; ratios whose tile counts differ are tuned apart (with power-of-two
    buckets the 6144-row r=0.75 launch ran the tile tuned for 8192 rows: 63% of cuBLAS on
    an H100, see docs/performance.md)."""
    return int(batch) * (-(-int(n) // 128) * 128)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, BLOCK_N2])
# BLOCK_N2 (default 0) widens a tile by a second column block beside BLOCK_N: 128 + 64 = 192
# columns divide the 1536- and 3072-wide layers of SD3 and Flux into 8 and 16 column tiles, so
# 1024-4096-row GeMMs fill the 132 SMs in whole waves where 128- or 256-wide tiles leave the
# last wave half empty (triton block sizes must be powers of two, hence two blocks).
# Hopper: wgmma-friendly 128-wide tiles with deep TMA / cp.async pipelines (228 KiB of smem).
_HOPPER_TILES = (
    (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 128, 64, 8, 3, 64),
    (128, 128, 64, 8, 4, 64),
    (128, 128, 64, 8, 5, 64),
    (64, 128, 64, 4, 4, 64),
    (64, 128, 128, 4, 3, 64),
)
# Everything else (Ampere, Ada, ...): the classic mma.sync tiles that fit 99-164 KiB.
_DEFAULT_TILES = (
    (128, 128, 32, 4, 4),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 3),
)
# The interpreter runs each program in NumPy, so one small tile keeps the tests quick.
_INTERPRET_TILE = (16, 32, 32, 4, 1)
# With RASFX_KERNELS_AUTOTUNE=0 on the GPU: a tile that fits every GPU and dtype.
_UNTUNED_TILE = (64, 64, 32, 4, 3)


def tile_key(tile: tuple) -> tuple:
    """A tile tuple with its optional BLOCK_N2 filled in: (BM, BN, BK, warps, stages, BN2)."""
    return tuple(tile) + (0,) * (6 - len(tile))


def tile_meta(tile: tuple) -> dict:
    """Launch keywords (block sizes, GROUP_M, warps, stages) of a tile tuple."""
    bm, bn, bk, warps, stages, bn2 = tile_key(tile)
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_N2": bn2, "BLOCK_K": bk, "GROUP_M": 8,
            "num_warps": warps, "num_stages": stages}


def tile_columns(meta: dict) -> int:
    """Output columns one program computes: BLOCK_N plus the optional second block."""
    return meta["BLOCK_N"] + meta.get("BLOCK_N2", 0)


def _tile_of(cfg) -> tuple:
    kw = cfg.kwargs
    return (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], cfg.num_warps, cfg.num_stages, kw.get("BLOCK_N2", 0))


def _config(tile: tuple):
    meta = tile_meta(tile)
    warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
    return triton.Config(meta, num_warps=warps, num_stages=stages, pre_hook=set_descriptor_blocks)


def set_descriptor_blocks(nargs: dict) -> None:
    """Give the TMA descriptors among a launch's arguments the tile of the config about to
    run: ``x_ptr`` [BLOCK_M, BLOCK_K] rows, ``w_ptr`` [BLOCK_N, BLOCK_K] and ``w2_ptr``
    [BLOCK_N2, BLOCK_K] weight rows (a descriptor's block shape is part of the compiled
    kernel's signature; an unused ``w2_ptr``, BLOCK_N2 = 0, gets BLOCK_N rows)."""
    for name, rows in (("x_ptr", "BLOCK_M"), ("w_ptr", "BLOCK_N"), ("w2_ptr", "BLOCK_N2")):
        arg = nargs.get(name)
        if TensorDescriptor is not None and isinstance(arg, TensorDescriptor):
            arg.block_shape = [nargs.get(rows) or nargs["BLOCK_N"], nargs["BLOCK_K"]]


def autotune_enabled() -> bool:
    """Autotuning is on unless RASFX_KERNELS_AUTOTUNE=0 (quick GPU test runs, debugging)."""
    return os.environ.get("RASFX_KERNELS_AUTOTUNE", "1").strip().lower() in _TRUE_STRINGS


def launch_mode() -> tuple[bool, bool, dict]:
    """(interpret, tune, meta) for a launch now.

    interpret: Triton's CPU interpreter is on. tune: launch through the autotuner.
    meta: the fixed launch config to pass when not tuning (one small tile under the
    interpreter, whose programs run in NumPy and are slow), else empty.
    """
    interpret = interpret_enabled()
    tune = not interpret and autotune_enabled()
    if tune:
        return interpret, tune, {}
    return interpret, tune, tile_meta(_INTERPRET_TILE if interpret else _UNTUNED_TILE)


def build_launchable(kernel, tune: bool):
    """Wrap a `jit` kernel of this package for launch in the mode in force now.

    Re-jits `kernel.fn`: Triton picks interpreter or compiler when a function is jitted,
    so the launch-time mode must win over the import-time one. Adds the EVEN_K
    heuristic (K % BLOCK_K == 0 drops the K masks) and, when tuning, the autotuner,
    keyed on N, K, the row-count bucket, bias presence and fp32 precision (Triton adds
    the tensor dtypes to the key itself). Re-running a config while tuning is harmless
    for both kernels: they rewrite the same elements with the same values.

    Candidates are timed as CUDA-graph replays: these GeMMs take 10-300 us, so timing eager
    launches measures the host's launch path and picks tiles at random (seen on an H200:
    the chosen tile ran at 37% of cuBLAS where the best one reached 65%).
    """
    fn = triton.jit(getattr(kernel, "fn", kernel))
    fn = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(fn)
    if not tune:
        return fn
    return triton.autotune(
        configs=matmul_configs(),
        key=["N", "K", "ROWS_BUCKET", "HAS_BIAS", "INPUT_PRECISION", "X_TMA", "W_TMA"],
        prune_configs_by={"early_config_prune": prune_matmul_configs},
        use_cuda_graph=True,
    )(fn)


def matmul_configs() -> list:
    """Autotuning candidates for the gather/scatter GeMMs on the GPU.

    Holds the Hopper set and the default set; `prune_matmul_configs` keeps the one that
    suits the GPU at hand.
    """
    return [_config(t) for t in _HOPPER_TILES + _DEFAULT_TILES]


def _shared_memory_limit(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    # Older torch builds lack the opt-in field; 99 KiB is a conservative opt-in limit.
    return int(getattr(props, "shared_memory_per_block_optin", 99 * 1024))


def prune_matmul_configs(configs, named_args, **kwargs):
    """`early_config_prune` hook for autotune (the kernels name their activation `x_ptr`).

    Keeps the Hopper set on sm_90 and newer and the default set elsewhere, and drops configs
    whose pipelined operand tiles cannot fit in shared memory for the operand dtype
    (fp32 needs twice the bf16 footprint), so autotuning does not compile them.
    """
    x = named_args["x_ptr"]
    x = getattr(x, "base", x)  # a TMA descriptor: its tensor
    device = x.device
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
    wanted = {tile_key(t) for t in (_HOPPER_TILES if hopper else _DEFAULT_TILES)}
    limit = _shared_memory_limit(device) if device.type == "cuda" else 99 * 1024
    itemsize = x.element_size()
    kept = []
    for cfg in configs:
        bm, bn, bk, _, stages, bn2 = tile = _tile_of(cfg)
        if tile in wanted and (bm + bn + bn2) * bk * itemsize * max(1, stages) <= limit:
            kept.append(cfg)
    # Never return an empty list: the untuned tile fits every GPU and dtype.
    return kept or [_config(_UNTUNED_TILE)]


# ----------------------------------------------------------------------------------
# TMA (Hopper's tensor memory accelerator)
# ----------------------------------------------------------------------------------


def tma_enabled() -> bool:
    """TMA operand loads are on unless RASFX_KERNELS_TMA=0 (A/B benchmarks, debugging)."""
    return os.environ.get("RASFX_KERNELS_TMA", "1").strip().lower() in _TRUE_STRINGS


def tma_descriptor(t: Tensor, meta: dict, rows: str):
    """A TMA descriptor over the 2-D operand ``t`` ([rows, K], K contiguous), or None where
    TMA cannot serve it: Triton without descriptors, a GPU older than Hopper (sm_90), fp32
    operands, RASFX_KERNELS_TMA=0, or a layout TMA cannot address (inner stride != 1, row
    stride or base not 16-byte aligned). Under TRITON_INTERPRET=1 CPU tensors qualify too,
    so the CPU tests run the TMA path of the kernels.

    ``meta``: the fixed launch config (empty when autotuning: each config's pre-hook sets
    the block shape, see `set_descriptor_blocks`); ``rows``: the meta key of the tile's
    row count ("BLOCK_M" for activations, "BLOCK_N" / "BLOCK_N2" for weights). Out-of-bounds parts of
    a tile read as zeros, which is what the K tail and the last row tile need.
    """
    if TensorDescriptor is None or not tma_enabled() or t.dim() != 2:
        return None
    if t.dtype not in (torch.float16, torch.bfloat16):
        return None
    if t.device.type == "cuda":
        if torch.cuda.get_device_capability(t.device)[0] < 9:
            return None
    elif not (t.device.type == "cpu" and interpret_enabled()):
        return None
    es = t.element_size()
    if t.stride(1) != 1 or (t.stride(0) * es) % 16 or t.data_ptr() % 16 or t.shape[0] == 0:
        return None
    block = [meta.get(rows) or 16, meta.get("BLOCK_K", 32)]  # placeholder until the pre-hook runs
    return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], block)


# ----------------------------------------------------------------------------------
# Fused or unfused, per shape
# ----------------------------------------------------------------------------------

_PATHS = ("auto", "fused", "unfused")


def kernel_path() -> str:
    """RASFX_KERNELS_PATH: ``auto`` (default: per shape, the faster of the two, measured once),
    ``fused`` (always the Triton kernel) or ``unfused`` (always F.linear + indexing)."""
    value = os.environ.get("RASFX_KERNELS_PATH", "auto").strip().lower()
    if value not in _PATHS:
        raise UsageError(f"RASFX_KERNELS_PATH must be one of {', '.join(_PATHS)}, got {value!r}")
    return value


def cuda_graph_ms(fn, reps: int = 20) -> float:
    """Milliseconds per call of ``fn`` replayed inside one CUDA graph (``reps`` calls per
    replay): these GeMMs take 10-300 us, so eager timing would measure the launch path."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside the capture (cuBLAS handles, Triton compilation)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(reps):
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


class FasterPath:
    """Per shape, whether the fused Triton GeMM or the unfused PyTorch path (F.linear plus
    ``index_select`` / ``index_copy_``) runs: the faster of the two, timed once per key as
    CUDA-graph replays, so a fused op is never slower than the path it replaces (the Triton
    kernels lose to ``index_select`` + cuBLAS in some shapes, e.g. B=1 gathers on an H200).

    Only measured on CUDA (``measure=True``) and outside a CUDA-graph capture; elsewhere the
    fused kernel runs (the CPU tests check it under TRITON_INTERPRET=1). ``RASFX_KERNELS_PATH``
    forces one path. State is per op, resettable (``choices.clear()``).
    """

    def __init__(self, timer=None):
        self.choices: dict = {}  # key -> True (fused) / False (unfused)
        self.timings: dict = {}  # key -> (fused ms, unfused ms)
        self._timer = timer or cuda_graph_ms

    def use_fused(self, key, measure: bool, fused, unfused) -> bool:
        forced = kernel_path()
        if forced != "auto":
            return forced == "fused"
        if key in self.choices:
            return self.choices[key]
        if not measure or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            return True  # nothing to time here (CPU, or inside a CUDA-graph capture): the kernel
        fused()  # autotuning happens here, outside the timing
        fused_ms, unfused_ms = self._timer(fused), self._timer(unfused)
        self.timings[key] = (fused_ms, unfused_ms)
        self.choices[key] = fused_ms <= unfused_ms
        return self.choices[key]
