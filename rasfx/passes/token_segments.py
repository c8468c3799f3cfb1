"""Where the image segment sits in tensors whose own history does not say (part of the token
analysis, ``token_analysis.analyze_tokens``): an attention mask over a joint sequence takes the
offset of the queries / keys it masks (``locate_masks``), a tensor built row by row from a
constructor takes the offsets of the image tokens copied into its rows (``locate_row_writes``),
a table combined position by position with a located tensor takes that tensor's
(``locate_tables``). Each pins the offsets on the sources (``node.meta[PINNED]``: {dim: offset})
and returns how many it pinned; the caller propagates the offsets again.

Invariants: the graph is not modified; only the ``PINNED`` meta of source nodes is written.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.fx as fx

from .token_info import token_axes

aten = torch.ops.aten


def per_row(offsets: tuple):
    """Per-row offsets, one int when every row has the same."""
    return offsets[0] if len(set(offsets)) == 1 else tuple(offsets)


PINNED = "rasfx_pinned_offsets"  # {dim: offset} of a source, set by locate_masks
_SDPA = (aten.scaled_dot_product_attention.default,)
# ops that keep a sequence's positions in place (no reordering, no slicing along it)
_IN_PLACE_OF_POSITION = {
    aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten.expand.default, aten.clone.default,
    aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.rsub.Scalar, aten.neg.default, aten.where.self,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default,
    aten.type_as.default, aten.eq.Scalar, aten.ne.Scalar, aten.ge.Tensor, aten.ge.Scalar, aten.gt.Scalar,
    aten.lt.Tensor, aten.lt.Scalar, aten.le.Scalar, aten.logical_not.default, aten.logical_and.default,
    aten.logical_or.default, aten.bitwise_not.default, aten.bitwise_and.Tensor, aten.bitwise_or.Tensor,
    aten.__and__.Tensor, aten.__or__.Tensor, aten.mul.Scalar, aten.add.Scalar,
}


def locate_masks(graph: fx.Graph) -> int:
    """An attention mask over a joint (text + image) sequence built from an input or a
    constructor (``ones``, ``arange``) has no located image segment: nothing in its own
    history says where the image tokens sit. Its query / key columns index the same sequence
    as the query / key tensors, so it takes their segment offset. The offset is pinned on the
    sources the mask is built from (through ops that keep positions in place) and the caller
    propagates again. Returns the number of sources pinned."""
    pinned = 0
    for node in graph.nodes:
        if node.target not in _SDPA or len(node.args) < 3:
            continue
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if not isinstance(mask, fx.Node) or not token_axes(mask):
            continue
        q, k = node.args[0], node.args[1]
        rank = mask.meta["val"].dim()
        known: dict[int, set] = {}
        for dim, partner in ((rank - 2, q), (rank - 1, k)):
            axes = [a for a in token_axes(partner) if a.dim == partner.meta["val"].dim() - 2]
            mine = [a for a in token_axes(mask) if a.dim == dim]
            if axes and mine and axes[0].offset is not None and mine[0].extra == axes[0].extra:
                known[mine[0].extra] = known.get(mine[0].extra, set()) | {axes[0].offset}
        offsets = {extra: offs.pop() for extra, offs in known.items() if len(offs) == 1}
        pinned += _pin_sources(mask, offsets)
    return pinned


# constructors that take a tensor for its dtype and device only: sources of their values
NEW_TENSOR = (aten.new_zeros.default, aten.new_ones.default, aten.new_full.default, aten.new_empty.default)


def locate_row_writes(graph: fx.Graph, n1: int) -> int:
    """A joint sequence built row by row (Lumina 2: ``joint[i, L_i:L_i + N] = x[i]``, the
    text lengths ``L_i`` read from the prompt mask): a tensor made by a constructor has no
    located image segment, but each copy of image tokens into a slice of one of its rows says
    where that row's segment starts. When every row gets one, the offsets are pinned on the
    constructor (one per row, ``Axis.offset`` a tuple, when they differ). A copy into a slice
    of every row at once (HiDream pads its tokens to a fixed length: ``out[:, :, :N] = x``)
    pins one offset. Returns the number of tensors located."""
    found: dict = {}  # (source node, token dim) -> {row: offset}
    for node in graph.nodes:
        if node.target is not aten.copy_.default or len(node.args) < 2:
            continue
        dst, src = node.args[0], node.args[1]
        if not isinstance(dst, fx.Node) or not isinstance(src, fx.Node):
            continue
        src_axes = [a for a in token_axes(src) if a.extra == 0 and isinstance(a.offset, int)]
        dst_axes = [a for a in token_axes(dst) if a.extra == 0]
        if not src_axes or not dst_axes:
            continue
        where = _row_slice(dst, dst_axes[0].dim)
        if where is not None:
            base, dim, row, start = where
            found.setdefault((base, dim), {})[row] = start + src_axes[0].offset
    located = 0
    for (base, dim), rows in found.items():
        if any(a.offset is not None for a in token_axes(base)):
            continue
        if list(rows) == [None]:  # every row at once
            base.meta.setdefault(PINNED, {})[dim] = rows[None]
            located += 1
            continue
        batch = int(base.meta["val"].shape[0])
        if dim == 0 or None in rows or sorted(rows) != list(range(batch)):
            continue
        pins = base.meta.setdefault(PINNED, {})
        pins[dim] = per_row(tuple(rows[r] for r in range(batch)))
        located += 1
    return located


def _row_slice(node: fx.Node, dim: int):
    """(constructor, its token dim, batch row, slice start) when ``node`` is
    ``constructor[row, ..., start:start + N, ...]`` (selects of other dims allowed), with
    ``dim`` the token dim of ``node``; the row None when it is ``constructor[..., start:start + N, ...]``
    (every row); None otherwise."""
    start = None
    while True:
        t = node.target
        if start is not None and node.op == "call_function" and _sourced(node):
            return node, dim, None, start
        if t is aten.slice.Tensor:
            sdim = cast(int, node.args[1]) % cast(fx.Node, node.args[0]).meta["val"].dim()
            if sdim != dim or start is not None:
                return None
            start = cast(int, node.args[2]) if len(node.args) > 2 and node.args[2] is not None else 0
            node = cast(fx.Node, node.args[0])
        elif t is aten.select.int:
            sdim = cast(int, node.args[1]) % cast(fx.Node, node.args[0]).meta["val"].dim()
            if sdim == 0:
                base = cast(fx.Node, node.args[0])
                if start is None or not _sourced(base) or base.op != "call_function":
                    return None
                return base, dim + 1, cast(int, node.args[2]) % int(base.meta["val"].shape[0]), start
            if sdim <= dim:
                dim += 1
            node = cast(fx.Node, node.args[0])
        else:
            return None


def _sourced(node: fx.Node) -> bool:
    """A constructor: made from no token-bearing tensor (or from one's dtype and device only)."""
    return node.target in NEW_TENSOR or not any(token_axes(i) for i in node.all_input_nodes)


def locate_tables(graph: fx.Graph) -> int:
    """A table over the joint sequence (RoPE cos / sin of [global token, image], Stable Audio)
    of unknown segment, combined position by position with a located tensor: the table has
    that tensor's segment. Pins it on the table's sources; returns the number pinned."""
    pinned = 0
    for node in graph.nodes:
        if node.target not in _IN_PLACE_OF_POSITION:
            continue
        for ax in token_axes(node):
            if ax.offset is None or isinstance(ax.offset, tuple) or ax.outer > 1:
                continue
            for i in node.all_input_nodes:
                if any(a.offset is None and a.extra == ax.extra and a.outer == 1 for a in token_axes(i)):
                    pinned += _pin_sources(i, {ax.extra: ax.offset}, tables=True)
    return pinned


# ops that keep a table's positions along the token axis whatever else they do: the RoPE
# frequencies of positions passed in (OmniGen: ``(inv_freq @ position_ids[:, None]).transpose(1, 2)``,
# ``cat((freqs, freqs), -1)[0].cos()``)
_TABLE_UNARY = {aten.cos.default, aten.sin.default, aten.transpose.int, aten.permute.default, aten.t.default}


def _table_parents(node: fx.Node, parents: list[fx.Node]) -> list[fx.Node]:
    """The inputs of ``node`` whose token axes index the same positions as ``node``'s: all of them
    for an op of ``_TABLE_UNARY``; for ``select`` / ``slice`` / ``cat`` along another dim than the
    input's token axis, that input; for ``bmm`` / ``matmul`` the operands whose token axis is not
    the contracted dim. None for any other op (conservative: the walk stops there)."""
    t = node.target
    if t in _TABLE_UNARY:
        return parents
    if t in (aten.select.int, aten.slice.Tensor, aten.cat.default):
        first = node.args[0]
        src = cast("list[fx.Node]", first) if t is aten.cat.default else [cast(fx.Node, first)]
        rank = src[0].meta["val"].dim()
        dim = cast(int, node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % rank
        return [p for p in parents if p in src and all(a.dim != dim for a in token_axes(p))]
    if t in (aten.bmm.default, aten.matmul.default):
        a, b = node.args[0], node.args[1]
        return [p for p in parents if (p is a and all(x.dim != p.meta["val"].dim() - 1 for x in token_axes(p)))
                or (p is b and p is not a and all(x.dim != p.meta["val"].dim() - 2 for x in token_axes(p)))]
    return []


def _pin_sources(mask: fx.Node, offsets: dict, tables: bool = False) -> int:
    """Pin ``offsets`` ({extra: offset}) on the sources of ``mask`` whose axes of that extra
    are unlocated, walking back through position-keeping ops only (``tables``: also through the
    ops of ``_table_parents``, which build a table from positions)."""
    count, seen, todo = 0, set(), [mask]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        open_axes = [a for a in token_axes(node) if a.offset is None and a.extra in offsets and a.outer == 1]
        if not open_axes:
            continue
        parents = [i for i in node.all_input_nodes if token_axes(i)] if node.target not in NEW_TENSOR else []
        if not parents:
            pins = node.meta.setdefault(PINNED, {})
            for a in open_axes:
                pins[a.dim] = offsets[a.extra]
            count += 1
        elif node.target in _IN_PLACE_OF_POSITION:
            todo.extend(parents)
        elif tables:
            todo.extend(_table_parents(node, parents))
    return count
