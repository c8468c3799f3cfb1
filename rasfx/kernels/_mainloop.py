"""The main loop, epilogue and launch shared by the gather and scatter GeMMs.

Both kernels compute `x_rows @ weight.T + bias` for one [BLOCK_M, BLOCK_N (+ BLOCK_N2)]
output tile; they differ only in where a tile's rows come from and go to:

- gather_linear reads x at rows `index[i]` (a row gather in the prologue) and writes y densely;
- linear_scatter_ reads x densely (by TMA where it can) and writes cache rows `index[i]`.

So the kernels compute their row pointers and masks and call `grouped_tile`, `matmul_tile` and
`store_tile` below (Triton inlines `jit` functions into the caller, so the shared code costs
nothing at run time); `launch_row_gemm` holds the launch plumbing of both.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from ._common import (
    build_launchable,
    dot_input_precision,
    jit,
    launch_mode,
    rows_bucket,
    tile_columns,
    tl,
    tma_descriptor,
    triton,
)

__all__ = ["grouped_tile", "matmul_tile", "store_tile", "launch_row_gemm"]


@jit
def grouped_tile(pid, n, N, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid`, in grouped order: GROUP_M row tiles share
    each weight column tile while it is in L2."""
    num_pid_m = tl.cdiv(n, BLOCK_M)
    num_pid_n = tl.cdiv(N, TILE_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@jit
def matmul_tile(
    x_ptr,  # activations: a pointer, or (X_TMA) a TMA descriptor over x as [rows, K]
    x_rows,  # [BLOCK_M] int64 element offsets of the tile's x rows (pointer path)
    x_row_mask,  # [BLOCK_M] rows to load (MASK_X_ROWS); masked rows read as zero
    x_row0,  # X_TMA: the descriptor row of the tile's first x row
    stride_xk,
    w_ptr,  # weight [N, K]: a pointer, or (W_TMA) a descriptor with [BLOCK_N, BLOCK_K] blocks
    w2_ptr,  # W_TMA and BLOCK_N2 > 0: a descriptor with [BLOCK_N2, BLOCK_K] blocks
    w_row0,  # first output column of the tile
    stride_wn,
    stride_wk,
    N,
    K,
    MASK_X_ROWS: tl.constexpr,
    X_TMA: tl.constexpr,
    W_TMA: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_N2: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 accumulators (acc [BLOCK_M, BLOCK_N], acc2 [BLOCK_M, BLOCK_N2]) of the tile's x rows
    times weight rows w_row0 ... w_row0 + BLOCK_N + BLOCK_N2 (transposed). With BLOCK_N2 == 0,
    acc2 is a placeholder the caller must not use."""
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    # Wrapped column ids keep the weight loads in bounds without a mask; the extra columns
    # are dropped by the store mask.
    offs_wn = (w_row0 + tl.arange(0, BLOCK_N)) % N  # [BLOCK_N]
    if not X_TMA:
        x_ptrs = x_ptr + x_rows[:, None] + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    if not W_TMA:
        w_ptrs = w_ptr + offs_wn[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = acc
    if BLOCK_N2 > 0:  # the second column block: its own weight tiles and accumulator
        if not W_TMA:
            offs_wn2 = (w_row0 + BLOCK_N + tl.arange(0, BLOCK_N2)) % N  # [BLOCK_N2]
            w2_ptrs = w_ptr + offs_wn2[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N2]
        acc2 = tl.zeros((BLOCK_M, BLOCK_N2), dtype=tl.float32)

    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k0 * BLOCK_K
        if X_TMA:
            a = x_ptr.load([x_row0, k0 * BLOCK_K])  # [BLOCK_M, BLOCK_K], zero-filled past the end
        elif MASK_X_ROWS:
            if EVEN_K:
                a = tl.load(x_ptrs, mask=x_row_mask[:, None], other=0.0)
            else:
                a = tl.load(x_ptrs, mask=x_row_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
        elif EVEN_K:
            a = tl.load(x_ptrs)
        else:
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        if W_TMA:
            b = w_ptr.load([w_row0, k0 * BLOCK_K]).T  # [BLOCK_K, BLOCK_N]
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
                b2 = w2_ptr.load([w_row0 + BLOCK_N, k0 * BLOCK_K]).T  # [BLOCK_K, BLOCK_N2]
            elif EVEN_K:
                b2 = tl.load(w2_ptrs)
            else:
                b2 = tl.load(w2_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            if DOT_IN_FP32:
                b2 = b2.to(tl.float32)
            acc2 = tl.dot(a, b2, acc2, input_precision=INPUT_PRECISION)
            if not W_TMA:
                w2_ptrs += BLOCK_K * stride_wk
        if not X_TMA:
            x_ptrs += BLOCK_K * stride_xk
        if not W_TMA:
            w_ptrs += BLOCK_K * stride_wk
    return acc, acc2


@jit
def store_tile(
    acc,
    acc2,
    out_rows,  # [BLOCK_M] pointers to the first element of each output row
    row_mask,  # [BLOCK_M] rows to write
    w_row0,  # first output column of the tile
    N,
    stride_oc,
    bias_ptr,  # [N]; never read when HAS_BIAS is False
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_N2: tl.constexpr,
):
    """Add the bias in fp32, round once to the output dtype and store the tile's rows."""
    offs_n = w_row0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n % N).to(tl.float32)[None, :]
    y = acc.to(out_rows.dtype.element_ty)
    tl.store(out_rows[:, None] + offs_n[None, :] * stride_oc, y, mask=row_mask[:, None] & (offs_n < N)[None, :])
    if BLOCK_N2 > 0:
        offs_n2 = w_row0 + BLOCK_N + tl.arange(0, BLOCK_N2)  # [BLOCK_N2]
        if HAS_BIAS:
            acc2 += tl.load(bias_ptr + offs_n2 % N).to(tl.float32)[None, :]
        y2 = acc2.to(out_rows.dtype.element_ty)
        tl.store(out_rows[:, None] + offs_n2[None, :] * stride_oc, y2, mask=row_mask[:, None] & (offs_n2 < N)[None, :])


@functools.lru_cache(maxsize=None)
def _launchable(kernel, interpret: bool, tune: bool):
    """`kernel` wrapped for launch, built once per (kernel, interpreter on, autotuning on).

    `interpret` only keys the cache: build_launchable jits for the mode in force now.
    """
    return build_launchable(kernel, tune)


def launch_row_gemm(
    kernel,
    *,
    x: Tensor,
    index: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    out: Tensor,
    M: int,
    x_tma: bool,
) -> None:
    """Launch a row-indexed GeMM kernel (gather or scatter) over x: [B, rows, K] and out:
    [B, rows', N], n = index.shape[-1] output rows per batch row; arguments already validated,
    no empty dimension. `x_tma`: the kernel may read x by TMA as one [B * n, K] view."""
    B, K = x.shape[0], x.shape[2]
    N = weight.shape[0]  # weight: [N, K]
    n = index.shape[-1]  # index: [n] or [B, n]
    interpret, tune, meta = launch_mode()
    launchable = _launchable(kernel, interpret, tune)
    stride_ib = 0 if index.dim() == 1 else index.stride(0)  # 0: one index row shared by the batch
    # Triton's interpreter multiplies bf16 tiles as their raw uint16 bits; an exact
    # upcast to fp32 gives the same products and fp32 sums that the tensor cores compute.
    dot_in_fp32 = interpret and x.dtype == torch.bfloat16

    x_contiguous_rows = x_tma and x.stride(0) == n * x.stride(1)
    x_desc = tma_descriptor(x.reshape(B * n, K), meta, "BLOCK_M") if x_contiguous_rows else None
    w_desc = tma_descriptor(weight, meta, "BLOCK_N")
    w2_desc = tma_descriptor(weight, meta, "BLOCK_N2") if w_desc is not None else None

    def grid(cfg):
        return (triton.cdiv(n, cfg["BLOCK_M"]) * triton.cdiv(N, tile_columns(cfg)), B)

    launchable[grid](
        x if x_desc is None else x_desc,
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
        X_TMA=x_desc is not None,
        W_TMA=w_desc is not None,
        **meta,
    )
