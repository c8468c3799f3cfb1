"""Scatter-fused GeMM: `cache[b, index[i]] = x[b, i] @ weight.T + bias`.

With RAS, attention keys/values of inactive tokens come from a per-layer cache. The
K/V projection of the active tokens would otherwise write its output to a temporary
and then copy the rows into the cache (`index_copy_`); here the GeMM epilogue stores
each output row straight into its cache row (the scatter of PIT-style sparse GeMMs).
Cache rows not named by the index are never touched.

Public entry point: `linear_scatter_`, a mutating torch custom op
(`torch.ops.rasfx.linear_scatter_`, mutates `cache`) so torch.compile and torch.export
keep it as one node. It runs the Triton kernel on CUDA (and on CPU under
TRITON_INTERPRET=1) and the PyTorch reference otherwise.

Precision: operands are loaded in their dtype, products accumulate in fp32, the bias is
added in fp32 and the result is rounded once to cache.dtype (== x.dtype). fp32 operands
use exact fp32 ("ieee") unless torch.backends.cuda.matmul.allow_tf32 is set, like
F.linear.

Repeated values within one row of the index leave which write wins undefined (as with
`index_copy_` on CUDA); `check_index(index, M, unique=True)` detects them.

Inference only: no autograd formula is registered.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UsageError
from ._common import FasterPath, check_index_arg, cpu_range_check, jit, tl, use_triton
from ._mainloop import grouped_tile, launch_row_gemm, matmul_tile, store_tile

__all__ = ["linear_scatter_", "linear_scatter_reference_", "scatter_rows_"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------


@jit
def _linear_scatter_kernel(
    x_ptr,  # x: [B, n, K] activations of the active rows (X_TMA: a TMA descriptor over x as [B * n, K])
    idx_ptr,  # index: [B, n] or [n] int32/int64 destination rows in M (stride_ib == 0 when shared)
    w_ptr,  # weight: [N, K] (nn.Linear layout; W_TMA: a TMA descriptor over it)
    w2_ptr,  # W_TMA: a second descriptor over the weight, [BLOCK_N2, BLOCK_K] blocks; else unused
    bias_ptr,  # bias: [N]; any valid pointer when HAS_BIAS is False (never read)
    cache_ptr,  # cache: [B, M, N], written in place at rows index only
    M,
    n,
    N,
    K,
    ROWS_BUCKET,  # rows_bucket(B, n): autotune key only, unused in the body
    stride_xb,
    stride_xm,
    stride_xk,
    stride_ib,
    stride_in,
    stride_wn,
    stride_wk,
    stride_cb,
    stride_cm,
    stride_cn,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # upcast operands before tl.dot (interpreter bf16 workaround)
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: K-masks can be dropped
    X_TMA: tl.constexpr,  # x_ptr is a TMA descriptor (Hopper): tiles arrive by TMA, zero-filled past the end
    W_TMA: tl.constexpr,  # w_ptr is a TMA descriptor
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_N2: tl.constexpr,  # 0, or a second column block beside BLOCK_N (a 128 + 64 = 192-wide tile)
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N + BLOCK_N2] tile of x @ weight.T for batch row program_id(1),
    stored at cache rows index."""
    pid_b = tl.program_id(1).to(tl.int64)  # int64: batch offsets of big caches pass 2**31
    pid_m, pid_n = grouped_tile(tl.program_id(0), n, N, BLOCK_M, BLOCK_N + BLOCK_N2, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] rows of x
    m_mask = offs_m < n
    w_row0 = pid_n * (BLOCK_N + BLOCK_N2)

    # Wrapped row ids keep the x loads in bounds without a mask; rows past n are dropped by
    # the store mask. A TMA row tile that runs past n reads the next batch row's rows (or
    # zeros past the end): those output rows are dropped the same way.
    x_rows = pid_b * stride_xb + (offs_m % n).to(tl.int64) * stride_xm  # [BLOCK_M]
    x_row0 = (pid_b * n + pid_m * BLOCK_M).to(tl.int32)
    acc, acc2 = matmul_tile(
        x_ptr, x_rows, m_mask, x_row0, stride_xk,
        w_ptr, w2_ptr, w_row0, stride_wn, stride_wk, N, K,
        False, X_TMA, W_TMA, EVEN_K, DOT_IN_FP32, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_N2, BLOCK_K,
    )

    # The scatter: destination cache row of each output row. Out-of-range ids are
    # dropped by the mask so a bad index can never write outside the cache; check_index
    # reports them.
    rows = tl.load(idx_ptr + pid_b * stride_ib + offs_m * stride_in, mask=m_mask, other=0).to(tl.int64)
    row_mask = m_mask & (rows >= 0) & (rows < M)
    c_rows = cache_ptr + pid_b * stride_cb + rows * stride_cm  # [BLOCK_M]
    store_tile(acc, acc2, c_rows, row_mask, w_row0, N, stride_cn, bias_ptr, HAS_BIAS, BLOCK_N, BLOCK_N2)


def _linear_scatter_triton(cache: Tensor, x: Tensor, index: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """Launch the Triton kernel; arguments must already be validated."""
    B, M, N = cache.shape  # cache: [B, M, N]
    n, K = x.shape[1], x.shape[2]  # x: [B, n, K]
    if B == 0 or n == 0 or N == 0:
        return
    if K == 0:
        # Empty reduction: the kernel would never touch the (possibly null) operand pointers.
        src = (bias if bias is not None else cache.new_zeros(N)).expand(B, n, N)
        scatter_rows_(cache, src, index)
        return
    # TMA operand loads where the layout allows (x rows of all batch rows as one 2-D view).
    launch_row_gemm(_linear_scatter_kernel, x=x, index=index, weight=weight, bias=bias, out=cache, M=M, x_tma=True)


# ----------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------


def scatter_rows_(cache: Tensor, src: Tensor, index: Tensor) -> None:
    """`cache[b, index[i]] = src[b, i]` (shared index) or `cache[b, index[b, i]] = src[b, i]`.

    cache: [B, M, C] (written in place), src: [B, n, C], index: [n] or [B, n]
    """
    index = index.long()
    if index.dim() == 1:
        cache.index_copy_(1, index, src)
    else:
        cache.scatter_(1, index.unsqueeze(-1).expand(-1, -1, cache.shape[-1]), src)


def linear_scatter_reference_(
    cache: Tensor, x: Tensor, index: Tensor, weight: Tensor, bias: Optional[Tensor] = None
) -> None:
    """Unfused PyTorch version: F.linear into a temporary, then copy its rows into the cache.

    cache: [B, M, N], x: [B, n, K], index: [n] or [B, n], weight: [N, K], bias: [N]
    """
    scatter_rows_(cache, F.linear(x, weight, bias), index)


# ----------------------------------------------------------------------------------
# Argument checks and the custom op
# ----------------------------------------------------------------------------------


def _check_args(cache: Tensor, x: Tensor, index: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """Shape/dtype/device checks; metadata only, so they also run on fake tensors."""
    if cache.dim() != 3:
        raise UsageError(f"linear_scatter_: cache must be [B, M, N], got shape {tuple(cache.shape)}")
    if x.dim() != 3:
        raise UsageError(f"linear_scatter_: x must be [B, n, K], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise UsageError(f"linear_scatter_: x must be float16, bfloat16 or float32, got {x.dtype}")
    B, M, N = cache.shape
    if x.shape[0] != B:
        raise UsageError(f"linear_scatter_: x batch size {x.shape[0]} differs from cache batch size {B}")
    check_index_arg(index, B)
    n, K = x.shape[1], x.shape[2]
    if index.shape[-1] != n:
        raise UsageError(f"linear_scatter_: index holds {index.shape[-1]} rows per batch row but x has n={n}")
    if weight.dim() != 2 or weight.shape != (N, K):
        raise UsageError(
            f"linear_scatter_: weight must be [N={N}, K={K}] (cache width, x width), got shape {tuple(weight.shape)}"
        )
    for name, t in (("weight", weight), ("cache", cache)):
        if t.dtype != x.dtype:
            raise UsageError(f"linear_scatter_: {name} dtype {t.dtype} differs from x dtype {x.dtype}")
    tensors = {"cache": cache, "index": index, "weight": weight}
    if bias is not None:
        if bias.shape != (N,):
            raise UsageError(f"linear_scatter_: bias must be [N={N}], got shape {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise UsageError(f"linear_scatter_: bias dtype {bias.dtype} differs from x dtype {x.dtype}")
        tensors["bias"] = bias
    for name, t in tensors.items():
        if t.device != x.device:
            raise UsageError(f"linear_scatter_: {name} is on {t.device} but x is on {x.device}")


@torch.library.custom_op("rasfx::linear_scatter_", mutates_args=("cache",))
def linear_scatter_(cache: Tensor, x: Tensor, index: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> None:
    """Scatter-fused linear, in place: `cache[b, index[i]] = x[b, i] @ weight.T + bias`.

    cache: [B, M, N] written only at the indexed rows (same dtype as x, any strides)
    x: [B, n, K] float16/bfloat16/float32 (any strides)
    index: [n] int64/int32 shared by all batch rows, or [B, n] one row list per batch row
    weight: [N, K] (x.dtype), bias: [N] (x.dtype) or None

    Index values are range-checked only where that needs no host-device sync (CPU
    tensors); on CUDA out-of-range rows are not written. Use
    `check_index(index, M, unique=True)` to validate an untrusted index.
    """
    _check_args(cache, x, index, weight, bias)
    cpu_range_check(index, cache.shape[1])
    if not use_triton(x):
        linear_scatter_reference_(cache, x, index, weight, bias)
        return
    # Timing both paths writes the same rows of the cache twice: harmless (same values).
    key = (x.device, x.dtype, tuple(index.shape), cache.shape[1], weight.shape[0], x.shape[2], bias is not None)
    fused = lambda: _linear_scatter_triton(cache, x, index, weight, bias)  # noqa: E731
    unfused = lambda: linear_scatter_reference_(cache, x, index, weight, bias)  # noqa: E731
    if SCATTER_PATH.use_fused(key, x.is_cuda, fused, unfused):
        fused()
    else:
        unfused()


# Which path linear_scatter_ takes per shape (see FasterPath); inspect SCATTER_PATH.timings.
SCATTER_PATH = FasterPath()


@linear_scatter_.register_fake
def _linear_scatter_fake(
    cache: Tensor, x: Tensor, index: Tensor, weight: Tensor, bias: Optional[Tensor] = None
) -> None:
    _check_args(cache, x, index, weight, bias)
