"""Registered ops of the transformed graph, and the small helpers around them.

The cache-aware nodes are ``torch.library.custom_op``s with fake implementations, so
``torch.export`` and ``torch.compile`` see them as single nodes with known shapes and
known mutations (the caches are graph inputs that the op writes in place).

Index conventions (see ``RASModule.set_active``):
- ``index`` of shape ``[n]``: the same token positions for every batch row;
- ``index`` of shape ``[B, n]``: per-row positions; tensors then carry the batch in dim 0;
- ``index=None``: dense, every position is fresh.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import UnsupportedModelError


def _expand_rowwise_index(index: Tensor, like: Tensor, dim: int) -> Tensor:
    # index: [B, n] -> broadcast to like's shape with n at `dim` (batch in dim 0)
    shape = [1] * like.dim()
    shape[0] = index.shape[0]
    shape[dim] = index.shape[1]
    sizes = list(like.shape)
    sizes[0] = index.shape[0]
    sizes[dim] = index.shape[1]
    return index.view(shape).expand(sizes)


def write_rows_(cache: Tensor, x: Tensor, index: Optional[Tensor], dim: int) -> None:
    """cache[..., index, ...] = x along ``dim`` (plain PyTorch; the reference semantics)."""
    dim = dim % cache.dim()
    if index is None:
        cache.copy_(x)
    elif index.dim() == 1:
        cache.index_copy_(dim, index, x)
    else:
        cache.scatter_(dim, _expand_rowwise_index(index, x, dim), x)


@torch.library.custom_op("rasfx::cache_write_", mutates_args=("cache",))
def cache_write_(cache: Tensor, x: Tensor, index: Optional[Tensor], dim: int) -> None:
    """Write the fresh rows ``x`` of the active tokens into a full-length ``cache``.

    After the call ``cache`` holds fresh values at ``index`` and the values of the most
    recent forward that computed them everywhere else; the graph then reads ``cache`` as
    the full-length operand of a token-mixing op.
    """
    write_rows_(cache, x, index, dim)


@cache_write_.register_fake
def _(cache, x, index, dim):
    return None


@torch.library.custom_op("rasfx::ras_attention", mutates_args=("k_cache", "v_cache"))
def ras_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    index: Optional[Tensor],
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Cache-aware attention: queries of the active tokens against full-length keys/values.

    q: [B, H, Lq, D] (active tokens, plus conditioning tokens)
    k, v: [B, H, Lk_active, D] fresh keys/values of the active positions
    k_cache, v_cache: [B, H, Lk, D] full-length caches, updated in place at ``index``
    index: positions of k/v rows inside the full key axis ([n] or [B, n]); None = dense
    """
    write_rows_(k_cache, k, index, k.dim() - 2)
    write_rows_(v_cache, v, index, v.dim() - 2)
    if index is None:
        # Dense step: the fresh tensors equal the caches; reading them avoids a dependency
        # on the cache writes.
        keys, values = k, v
    else:
        keys, values = k_cache, v_cache
    kwargs = {"enable_gqa": True} if enable_gqa else {}
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs
    )
    return _canonical_layout(out)


def _canonical_layout(out: Tensor) -> Tensor:
    # SDPA's output strides depend on the backend and on q's strides, but the fake kernel
    # must promise one layout (inductor asserts it). [B, H, L, D] outputs get the layout of
    # a [B, L, H, D] tensor seen through transpose(1, 2): what the flash / efficient / cuDNN
    # backends produce anyway (no copy there), and what the model's following
    # transpose(1, 2).reshape(B, L, H * D) reads without a copy.
    if out.dim() == 4:
        return out.transpose(1, 2).contiguous().transpose(1, 2)
    return out.contiguous()


@ras_attention.register_fake
def _(q, k, v, k_cache, v_cache, index, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    shape = (*q.shape[:-1], v.shape[-1])
    if q.dim() == 4:
        b, h, lq, d = shape
        return q.new_empty((b, lq, h, d)).transpose(1, 2)
    return q.new_empty(shape)


def gather_tokens(x: Tensor, index: Tensor, dim: int, rank: int) -> Tensor:
    """Rows of ``x`` at ``index`` along ``dim``.

    ``rank`` is the rank of the consumer's frame: with per-row indices a tensor that lacks
    the batch dim (a positional table) is first lifted to that rank and broadcast over the
    batch, so that broadcasting against the active tensors stays aligned.
    """
    if x.stride(dim) == 0 and x.shape[dim] > 1:
        # A broadcast along the token axis (e.g. an attention mask [B, H, N, N] expanded from
        # [B, 1, 1, N]): every row is the same, so the gather is a narrower broadcast, not
        # a copy of n full rows (which for such a mask is gigabytes).
        sizes = list(x.shape)
        sizes[dim] = index.shape[-1]
        if index.dim() == 2 and x.dim() >= rank and x.shape[0] in (1, index.shape[0]):
            sizes[0] = index.shape[0]
        elif index.dim() == 2:
            return gather_tokens(x.contiguous(), index, dim, rank)
        return x.narrow(dim, 0, 1).expand(sizes)
    if index.dim() == 1:
        return x.index_select(dim, index)
    if x.dim() < rank:
        shift = rank - x.dim()
        x = x.reshape((1,) * shift + tuple(x.shape))
        dim += shift
    if x.shape[0] != index.shape[0]:
        if x.shape[0] != 1:  # e.g. a sequence-first [S, B, D] tensor: its dim 0 is not the batch
            raise UnsupportedModelError(
                f"per-row active sets need the batch in dim 0 of every tensor gathered by rows; one has shape "
                f"{tuple(x.shape)} for {index.shape[0]} rows (tokens in dim {dim}). Use one index set [n] shared by "
                "all rows.")
        x = x.expand(index.shape[0], *x.shape[1:])
    return torch.gather(x, dim, _expand_rowwise_index(index, x, dim))


def sequence_index(index: Tensor, offset: int | tuple, num_image: int, total: int) -> Tensor:
    """Index of the active positions in a sequence that holds the image segment at
    ``[offset, offset + num_image)`` among ``total`` positions (conditioning tokens are
    always active)."""
    if isinstance(offset, (tuple, list)):  # one offset per batch row: a per-row index [B, m]
        return torch.stack([sequence_index(index if index.dim() == 1 else index[b], o, num_image, total)
                            for b, o in enumerate(offset)])
    before = torch.arange(offset, device=index.device, dtype=index.dtype)
    after = torch.arange(offset + num_image, total, device=index.device, dtype=index.dtype)
    if index.dim() == 2:
        b = index.shape[0]
        before = before.expand(b, -1)
        after = after.expand(b, -1)
    return torch.cat([before, index + offset, after], dim=-1)


def index_rows(index: Tensor, start: int, stop: int, squeezed: bool) -> Tensor:
    """The rows of a per-row index ``[B, n]`` that a tensor of some batch rows only needs
    (``token_analysis.annotate_rows``): ``[stop - start, n]``, or ``[n]`` for one row whose
    batch dim was selected away."""
    return index[start] if squeezed else index[start:stop]


def active_count(index: Tensor) -> int:
    """n, the number of active image tokens (a shape, so no device sync)."""
    return index.shape[-1]


def index_groups(index: Tensor, groups: int) -> Tensor:
    """A per-row index ``[B, n]`` for a tensor whose dim 0 holds ``groups`` consecutive rows per
    sample (``[B*F, N, C]``: frames folded into the batch, ``batch_rows.ROW_GROUPS``):
    ``[B*groups, n]``, each sample's positions for each of its rows. A shared index is returned
    as it is."""
    return index.repeat_interleave(groups, dim=0) if index.dim() == 2 else index


def fold_index(index: Tensor, outer: int, num_image: int) -> Tensor:
    """Index of the active positions along a folded token axis of ``outer`` blocks of
    ``num_image`` tokens (``token_info.Axis.outer``): ``[outer * n]``, block-major. A per-row
    index ``[B, n]`` needs one block per row."""
    if index.dim() == 2:
        if index.shape[0] != outer:
            raise UnsupportedModelError(
                f"per-row active sets need a folded token axis of one block of tokens per batch row; this one holds "
                f"{outer} blocks for {index.shape[0]} rows. Use one index set [n] shared by all rows.")
        blocks = index
    else:
        blocks = index.expand(outer, -1)
    starts = torch.arange(outer, device=index.device, dtype=index.dtype).unsqueeze(1) * num_image
    return (blocks + starts).reshape(-1)
