"""Gather-fused GeMM: `y[b, i] = x[b, index[i]] @ weight.T + bias`.

RAS computes only the active image tokens on most steps. The first projection after
the token selection would otherwise materialise `x[:, index]` (a full read and write
of the active rows) before the GeMM reads it again; here the GeMM prologue loads the
selected rows of `x` in place instead (the gather of PIT-style sparse GeMMs).

Public entry point: `gather_linear`, a torch custom op (`torch.ops.rasfx.gather_linear`)
so torch.compile and torch.export keep it as one node. It runs the Triton kernel on
CUDA (and on CPU under TRITON_INTERPRET=1) and the PyTorch reference otherwise.

Precision: operands are loaded in their dtype, products accumulate in fp32, the bias is
added in fp32 and the result is rounded once to x.dtype. fp32 operands use exact fp32
("ieee") unless torch.backends.cuda.matmul.allow_tf32 is set, like F.linear.

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

__all__ = ["gather_linear", "gather_linear_reference", "gather_rows"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------


@jit
def _gather_linear_kernel(
    x_ptr,  # x: [B, M, K] activations; rows are read through idx_ptr
    idx_ptr,  # index: [B, n] or [n] int32/int64 row ids into M (stride_ib == 0 when shared)
    w_ptr,  # weight: [N, K] (nn.Linear layout; W_TMA: a TMA descriptor over it)
    w2_ptr,  # W_TMA: a second descriptor over the weight, [BLOCK_N2, BLOCK_K] blocks; else unused
    bias_ptr,  # bias: [N]; any valid pointer when HAS_BIAS is False (never read)
    y_ptr,  # y: [B, n, N] output
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
    stride_yb,
    stride_yn,
    stride_yc,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # upcast operands before tl.dot (interpreter bf16 workaround)
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: K-masks can be dropped
    X_TMA: tl.constexpr,  # always False: gathered rows are not a TMA tile (kept for the shared autotune key)
    W_TMA: tl.constexpr,  # w_ptr is a TMA descriptor (Hopper): weight tiles arrive by TMA, zero-filled past the end
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_N2: tl.constexpr,  # 0, or a second column block beside BLOCK_N (a 128 + 64 = 192-wide tile)
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N + BLOCK_N2] tile of y for batch row program_id(1)."""
    pid_b = tl.program_id(1).to(tl.int64)  # int64: batch offsets of big caches pass 2**31
    pid_m, pid_n = grouped_tile(tl.program_id(0), n, N, BLOCK_M, BLOCK_N + BLOCK_N2, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] output rows
    m_mask = offs_m < n
    w_row0 = pid_n * (BLOCK_N + BLOCK_N2)

    # The gather: source row of each output row. Out-of-range ids are masked off (they
    # read as zero) so a bad index can never fault; check_index reports them.
    rows = tl.load(idx_ptr + pid_b * stride_ib + offs_m * stride_in, mask=m_mask, other=0).to(tl.int64)
    row_mask = m_mask & (rows >= 0) & (rows < M)
    acc, acc2 = matmul_tile(
        x_ptr, pid_b * stride_xb + rows * stride_xm, row_mask, 0, stride_xk,
        w_ptr, w2_ptr, w_row0, stride_wn, stride_wk, N, K,
        True, False, W_TMA, EVEN_K, DOT_IN_FP32, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_N2, BLOCK_K,
    )
    y_rows = y_ptr + pid_b * stride_yb + offs_m * stride_yn  # [BLOCK_M]
    store_tile(acc, acc2, y_rows, m_mask, w_row0, N, stride_yc, bias_ptr, HAS_BIAS, BLOCK_N, BLOCK_N2)


def _gather_linear_triton(
    x: Tensor, index: Tensor, weight: Tensor, bias: Optional[Tensor], out: Optional[Tensor] = None
) -> Tensor:
    """Launch the Triton kernel; arguments must already be validated.

    `out` ([B, n, N], x.dtype) lets tests hand in a poisoned buffer to prove every
    element is written.
    """
    B, M, K = x.shape  # x: [B, M, K]
    N = weight.shape[0]  # weight: [N, K]
    n = index.shape[-1]  # index: [n] or [B, n]
    if out is None:
        out = torch.empty((B, n, N), dtype=x.dtype, device=x.device)  # out: [B, n, N]
    if B == 0 or n == 0 or N == 0:
        return out
    if K == 0:
        # Empty reduction: the kernel would never touch the (possibly null) operand pointers.
        out.copy_((bias if bias is not None else out.new_zeros(N)).expand_as(out))
        return out
    launch_row_gemm(_gather_linear_kernel, x=x, index=index, weight=weight, bias=bias, out=out, M=M, x_tma=False)
    return out


# ----------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """`x[b, index[i]]` (shared index) or `x[b, index[b, i]]` (per-row index).

    x: [B, M, C], index: [n] or [B, n] -> [B, n, C]
    """
    index = index.long()
    if index.dim() == 1:
        return x.index_select(1, index)
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def gather_linear_reference(x: Tensor, index: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Unfused PyTorch version: gather the rows, then F.linear.

    x: [B, M, K], index: [n] or [B, n], weight: [N, K], bias: [N] -> [B, n, N]
    """
    return F.linear(gather_rows(x, index), weight, bias)


# ----------------------------------------------------------------------------------
# Argument checks and the custom op
# ----------------------------------------------------------------------------------


def _check_args(x: Tensor, index: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """Shape/dtype/device checks; metadata only, so they also run on fake tensors."""
    if x.dim() != 3:
        raise UsageError(f"gather_linear: x must be [B, M, K], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise UsageError(f"gather_linear: x must be float16, bfloat16 or float32, got {x.dtype}")
    B, M, K = x.shape
    check_index_arg(index, B)
    if weight.dim() != 2 or weight.shape[1] != K:
        raise UsageError(f"gather_linear: weight must be [N, K={K}], got shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise UsageError(f"gather_linear: weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    tensors = {"index": index, "weight": weight}
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise UsageError(f"gather_linear: bias must be [N={weight.shape[0]}], got shape {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise UsageError(f"gather_linear: bias dtype {bias.dtype} differs from x dtype {x.dtype}")
        tensors["bias"] = bias
    for name, t in tensors.items():
        if t.device != x.device:
            raise UsageError(f"gather_linear: {name} is on {t.device} but x is on {x.device}")


@torch.library.custom_op("rasfx::gather_linear", mutates_args=())
def gather_linear(x: Tensor, index: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Gather-fused linear: `y[b, i] = x[b, index[i]] @ weight.T + bias` -> [B, n, N].

    x: [B, M, K] float16/bfloat16/float32 (any strides)
    index: [n] int64/int32 shared by all batch rows, or [B, n] one row list per batch row
    weight: [N, K] (x.dtype), bias: [N] (x.dtype) or None

    Index values are range-checked only where that needs no host-device sync (CPU
    tensors); on CUDA out-of-range rows read as zero. Use `check_index(index, M)` to
    validate an untrusted index.
    """
    _check_args(x, index, weight, bias)
    cpu_range_check(index, x.shape[1])
    if use_triton(x):
        key = (x.device, x.dtype, tuple(index.shape), x.shape[1], weight.shape[0], x.shape[2], bias is not None)
        fused = lambda: _gather_linear_triton(x, index, weight, bias)  # noqa: E731
        unfused = lambda: gather_linear_reference(x, index, weight, bias)  # noqa: E731
        return fused() if GATHER_PATH.use_fused(key, x.is_cuda, fused, unfused) else unfused()
    return gather_linear_reference(x, index, weight, bias)


# Which path gather_linear takes per shape (see FasterPath); inspect GATHER_PATH.timings.
GATHER_PATH = FasterPath()


@gather_linear.register_fake
def _gather_linear_fake(x: Tensor, index: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    _check_args(x, index, weight, bias)
    return x.new_empty((x.shape[0], index.shape[-1], weight.shape[0]))
