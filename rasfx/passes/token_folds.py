"""Folded token axes: the image tokens folded with the batch into one dim, for the token
analysis (``token_analysis.analyze_tokens``).

Latte's temporal blocks run on ``[B*H*W, F, C]`` (``[B, F, HW, C]`` permuted and reshaped),
the original PixArt cross-attention on ``x.view(1, -1, heads, dim)`` over a batch: a dim of
size ``k * N`` (``k`` a multiple of the batch at both resolutions) holding ``k`` blocks of the N
tokens, block-major (``Axis.outer = k``). Such a dim is found by its size, but its layout is
only taken as proven where the ops that made it keep each block's tokens contiguous:

* a reshape (``view``, ``reshape``, ``flatten``, ``unflatten``) that keeps the number of
  elements before the token axis and the token length (``token_info.tokens_kept``);
* ``repeat_interleave(x, N, dim)`` of a tensor without tokens (Latte's per-sample timestep
  table repeated for every token);
* an op ``op_rules`` classifies token-wise or mixing, from an input folded the same way that
  it does not contract (attention queries).

Anything else leaves the folded axis unlocated (offset ``None``, ``unproven_fold``), and the
token analysis rejects the model, naming the op (``folded_error``; grids of which none is a
proven fold get the U-Net message). This module does not modify the graph.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import UnsupportedModelError
from .op_rules import classify
from .token_info import Axis, token_axes, tokens_kept

aten = torch.ops.aten

_RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
             aten.unflatten.int)


def fold_base(pairs: list, batch: int):
    """``(base, folds)`` when every token grid of ``pairs`` (``[(size, size at the other
    resolution)]``) is one grid ``base`` or ``k`` copies of it with ``k`` a multiple of the batch
    (``folds``: those ``k``); None otherwise."""
    base = min(pairs)
    folds = set()
    for s1, s2 in pairs:
        if (s1, s2) == base:
            continue
        k = s1 // base[0]
        if batch < 2 or k < 2 or k % batch or (s1, s2) != (k * base[0], k * base[1]):
            return None
        folds.add(k)
    return base, frozenset(folds)


def fold_axis(d: int, s1: int, s2: int, n1: int, n2: int, folds: frozenset):
    """The folded axis of dim ``d`` (sizes ``s1``, ``s2`` at the two resolutions), or None."""
    k = s1 // n1
    if k in folds and (s1, s2) == (k * n1, k * n2):
        return Axis(d, 0, None, k)
    return None


def involves_fold(node: fx.Node, ax: Axis, ins: list) -> bool:
    """Whether ``ax`` of ``node`` is folded or comes out of a reshape of a folded axis."""
    return ax.outer > 1 or (node.target in _RESHAPES and any(a.outer > 1 for _, a in ins))


def fold_offset(node: fx.Node, ax: Axis, ins: list, fits: dict | None):
    """Offset of an axis that ``involves_fold``: 0 where the layout is proven (see the module
    docstring), its input's where a reshape keeps the token layout, else None."""
    t = node.target
    if not ins:  # a source: only repeat_interleave(x, N, dim) of a token-free tensor is proven
        if t is aten.repeat_interleave.self_int and fits and fits.get(1) == (1, 0):
            src = node.args[0]
            dim = node.args[2] if len(node.args) > 2 else None
            if isinstance(src, fx.Node) and isinstance(dim, int):
                sval = src.meta["val"]
                if dim % sval.dim() == ax.dim and int(sval.shape[ax.dim]) == ax.outer:
                    return 0
        return None
    if t in _RESHAPES:
        src = node.args[0]
        if not isinstance(src, fx.Node):
            return None
        for a in token_axes(src):
            if a.offset is not None and tokens_kept(src.meta["val"].shape, a, node.meta["val"].shape, ax):
                return a.offset
        return None
    if ax.outer == 1:
        return None
    rule = classify(node)  # the axis passes through the operands a token-wise or mixing op does not contract
    if rule.kind == "opaque":
        return None
    offsets = {a.offset for i, a in ins if a.outer == ax.outer and a.extra == 0 and i not in rule.full}
    return 0 if offsets == {0} else None


def unproven_fold(graph: fx.Graph):
    """``(node, axis)``: the first folded axis left unlocated (its layout is not proven), or
    None; and whether any folded axis is located."""
    located, first_open = False, None
    for node in graph.nodes:
        for a in token_axes(node):
            if a.outer > 1 and a.offset is None:
                first_open = first_open or (node, a)
            elif a.outer > 1:
                located = True
    return first_open, located


def folded_error(large: int, small: int, where: str) -> UnsupportedModelError:
    """The error for a dim of ``large = k x small`` tokens whose fold rasfx cannot follow."""
    return UnsupportedModelError(
        f"a dimension of {large} = {large // small} x {small} image tokens{where}: the model folds the batch (or "
        "frames) into the token axis in a layout rasfx cannot follow. rasfx follows folds made by reshapes that "
        "keep each sample's tokens contiguous ([B, N, C] -> [B*N, C], `x.view(1, -1, heads, dim)`, "
        "[B, HW, F, C] -> [B*HW, F, C]) and `repeat_interleave(N)` of a per-sample tensor; otherwise keep the "
        "batch in its own dim in that code (e.g. `x.view(B, -1, heads, dim)`)."
    )
