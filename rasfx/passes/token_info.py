"""The token axes of a graph node: ``node.meta["rasfx_tokens"]``, written by the token
analysis (``token_analysis.analyze_tokens``), and the one set of readers for it.

A ``TokenInfo`` is
* a tuple of ``Axis`` (sorted by dim; ``()``: no token axis) for a tensor-valued node,
* a list with one such tuple per element (``None`` for a non-tensor element) for a node with
  several outputs (``split``, ``chunk``, an op returning a tuple),
* ``None`` for a node without a tensor value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch.fx as fx

TOKENS = "rasfx_tokens"  # the node.meta key


@dataclass(frozen=True)
class Axis:
    """A token axis: ``dim`` of a tensor of size ``N + extra``; the image segment starts at
    ``offset`` (``None`` = unknown; a tuple: one offset per batch row, as in a joint sequence
    whose rows hold prompts of different lengths before the image, Lumina 2).

    ``outer > 1``: a *folded* axis of size ``outer * N`` (``extra`` is 0) holding ``outer``
    blocks of the N tokens, block-major: the batch folded into the token axis (Latte's temporal
    layout ``[B*H*W, F, C]``, ``x.view(1, -1, heads, dim)`` over a batch). Its offset is 0 when
    that layout is proven by the ops that made it, ``None`` otherwise."""

    dim: int
    extra: int = 0
    offset: Optional[int | tuple] = 0
    outer: int = 1

    def full_size(self, n_img: int) -> int:
        return self.outer * (n_img + self.extra)


TokenInfo = Union[tuple, list, None]  # see the module docstring


def token_info(node: fx.Node) -> TokenInfo:
    return node.meta.get(TOKENS)


def token_axes(node: fx.Node) -> tuple:
    """The token axes of a tensor-valued node (``()`` if none, or for a multi-output node)."""
    info = node.meta.get(TOKENS)
    return info if isinstance(info, tuple) else ()


def per_output_axes(node: fx.Node) -> list | None:
    """One entry per tensor output (a tuple of axes, ``None`` for a non-tensor element);
    ``None`` for a node without a tensor value."""
    info = node.meta.get(TOKENS)
    if isinstance(info, tuple):
        return [info]
    if isinstance(info, list):
        return [tuple(e) if e is not None else None for e in info]
    return None


def first_output_axes(node: fx.Node) -> tuple:
    """Token axes of the node's (first) output (empty: none)."""
    info = node.meta.get(TOKENS)
    if isinstance(info, list):
        info = info[0] if info else None
    return tuple(info) if info else ()


def all_token_axes(node: fx.Node) -> list:
    """Every token axis of every output of the node."""
    info = node.meta.get(TOKENS)
    if isinstance(info, tuple):
        return list(info)
    if isinstance(info, list):
        return [a for elem in info if elem for a in elem]
    return []


def has_token_axes(node: fx.Node) -> bool:
    return bool(all_token_axes(node))


def offsets_known(node: fx.Node) -> bool:
    """Whether the image segment's offset is known on every token axis of the node."""
    return all(a.offset is not None for a in all_token_axes(node))


def tokens_kept(shape_in, a_in: Axis, shape_out, a_out: Axis) -> bool:
    """Whether a reshape from ``shape_in`` (token axis ``a_in``) to ``shape_out`` (``a_out``)
    keeps every token's values in place: as many elements before the token axis (folded
    blocks included) and the same token length on both sides."""
    before_in = math.prod(int(s) for s in shape_in[: a_in.dim]) * a_in.outer
    before_out = math.prod(int(s) for s in shape_out[: a_out.dim]) * a_out.outer
    return before_in == before_out and int(shape_in[a_in.dim]) * a_out.outer == int(shape_out[a_out.dim]) * a_in.outer
