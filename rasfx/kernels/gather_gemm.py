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

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UsageError
from ._common import (
    FasterPath,
    build_launchable,
    check_index_arg,
    cpu_range_check,
    dot_input_precision,
    jit,
    launch_mode,
    rows_bucket,
    tile_columns,
    tl,
    tma_descriptor,
    triton,
    use_triton,
)

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
    X_TMA: tl.constexpr,  # always False: gathered rows are not a TMA tile on Hopper (kept for the shared autotune key)
    W_TMA: tl.constexpr,  # w_ptr is a TMA descriptor (Hopper): weight tiles arrive by TMA, zero-filled past the end
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_N2: tl.constexpr,  # 0, or a second column block beside BLOCK_N (a 128 + 64 = 192-wide tile)
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N + BLOCK_N2] tile of y for batch row program_id(1)."""
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)  # int64: batch offsets of big caches pass 2**31

    # Grouped tile order: GROUP_M row-tiles share each weight column-tile while it is in L2.
    num_pid_m = tl.cdiv(n, BLOCK_M)
    TILE_N: tl.constexpr = BLOCK_N + BLOCK_N2
    num_pid_n = tl.cdiv(N, TILE_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] output rows
    offs_n = pid_n * TILE_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output columns
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    m_mask = offs_m < n
    n_mask = offs_n < N

    # The gather: source row of each output row. Out-of-range ids are masked off (they
    # read as zero) so a bad index can never fault; check_index reports them.
    rows = tl.load(idx_ptr + pid_b * stride_ib + offs_m * stride_in, mask=m_mask, other=0)
    rows = rows.to(tl.int64)  # [BLOCK_M]
    row_mask = m_mask & (rows >= 0) & (rows < M)

    # Wrapped column ids keep weight loads in bounds without a mask; the extra columns
    # are discarded by the store mask.
    offs_wn = offs_n % N

    # x_ptrs: [BLOCK_M, BLOCK_K], w_ptrs: [BLOCK_K, BLOCK_N]
    x_ptrs = x_ptr + pid_b * stride_xb + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    if not W_TMA:
        w_ptrs = w_ptr + offs_wn[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if BLOCK_N2 > 0:  # the second column block: its own columns, weight tiles and accumulator
        offs_n2 = pid_n * TILE_N + BLOCK_N + tl.arange(0, BLOCK_N2)  # [BLOCK_N2]
        offs_wn2 = offs_n2 % N
        if not W_TMA:
            w2_ptrs = w_ptr + offs_wn2[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N2]
        acc2 = tl.zeros((BLOCK_M, BLOCK_N2), dtype=tl.float32)

    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k0 * BLOCK_K
        if EVEN_K:
            a = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
        else:
            a = tl.load(x_ptrs, mask=row_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
        if W_TMA:
            b = w_ptr.load([pid_n * TILE_N, k0 * BLOCK_K]).T  # [BLOCK_K, BLOCK_N]
        elif EVEN_K:
            b = tl.load(w_ptrs)
        else:
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if BLOCK_N2 > 0:
            if W_TMA:
                b2 = w2_ptr.load([pid_n * TILE_N + BLOCK_N, k0 * BLOCK_K]).T  # [BLOCK_K, BLOCK_N2]
            elif EVEN_K:
                b2 = tl.load(w2_ptrs)
            else:
                b2 = tl.load(w2_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            if DOT_IN_FP32:
                b2 = b2.to(tl.float32)
            acc2 = tl.dot(a, b2, acc2, input_precision=INPUT_PRECISION)
            if not W_TMA:
                w2_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk
        if not W_TMA:
            w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_wn).to(tl.float32)[None, :]  # bias: [BLOCK_N]
    y_rows = y_ptr + pid_b * stride_yb + offs_m[:, None] * stride_yn  # [BLOCK_M, 1]
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_rows + offs_n[None, :] * stride_yc, y, mask=m_mask[:, None] & n_mask[None, :])
    if BLOCK_N2 > 0:
        if HAS_BIAS:
            acc2 += tl.load(bias_ptr + offs_wn2).to(tl.float32)[None, :]
        y2 = acc2.to(y_ptr.dtype.element_ty)
        tl.store(y_rows + offs_n2[None, :] * stride_yc, y2, mask=m_mask[:, None] & (offs_n2 < N)[None, :])


@functools.lru_cache(maxsize=None)
def _launchable(interpret: bool, tune: bool):
    """The kernel wrapped for launch, built once per (interpreter on, autotuning on).

    `interpret` only keys the cache: build_launchable jits for the mode in force now.
    """
    return build_launchable(_gather_linear_kernel, tune)


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

    interpret, tune, meta = launch_mode()
    kernel = _launchable(interpret, tune)
    stride_ib = 0 if index.dim() == 1 else index.stride(0)  # 0: one index row shared by the batch
    # Triton's interpreter multiplies bf16 tiles as their raw uint16 bits; an exact
    # upcast to fp32 gives the same products and fp32 sums that the tensor cores compute.
    dot_in_fp32 = interpret and x.dtype == torch.bfloat16

    w_desc = tma_descriptor(weight, meta, "BLOCK_N")
    w2_desc = tma_descriptor(weight, meta, "BLOCK_N2") if w_desc is not None else None

    def grid(cfg):
        return (triton.cdiv(n, cfg["BLOCK_M"]) * triton.cdiv(N, tile_columns(cfg)), B)

    kernel[grid](
        x,
        index,
        weight if w_desc is None else w_desc,
        weight if w2_desc is None else w2_desc,
        bias if bias is not None else weight,
        out,
        M,
        n,
        N,
        K,
        rows_bucket(B, n),
        x.stride(0),
        x.stride(1),
        x.stride(2),
        stride_ib,
        index.stride(-1),
        weight.stride(0),
        weight.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        HAS_BIAS=bias is not None,
        INPUT_PRECISION="ieee" if dot_in_fp32 else dot_input_precision(x.dtype),
        DOT_IN_FP32=dot_in_fp32,
        X_TMA=False,
        W_TMA=w_desc is not None,
        **meta,
    )
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
