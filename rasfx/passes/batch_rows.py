"""The batch rows a tensor holds: a per-sample loop over the batch (``x[i]``, ``x[i:i + 1]``,
Mochi's attention of each prompt over its own valid text tokens) makes tensors of some rows
only; per-row active sets must use those rows of the index (``annotate_rows``). A tensor whose
dim 0 holds several rows per sample (frames folded into the batch) repeats each row of the
index (``annotate_row_groups``)."""

from __future__ import annotations

import math
import operator
from typing import cast

import torch
import torch.fx as fx

from .op_rules import is_pointwise

aten = torch.ops.aten

ROWS = "rasfx_rows"  # (start, stop, squeezed): the batch rows a tensor holds, when not all of them
SHARED_TABLE = "rasfx_shared_table"  # True: a table (or what builds it) of which the graph takes one row for all


def annotate_rows(graph: fx.Graph, batch: int) -> int:
    """A per-sample loop over the batch (``x[i]``, ``x[i:i + 1]``, Mochi's attention of each
    prompt over its own valid text tokens) makes tensors that hold some rows of the batch
    only. Each such token-bearing node gets ``meta["rasfx_rows"] = (start, stop, squeezed)``
    (``squeezed``: the batch dim was selected away), so that per-row active sets use those
    rows of the index; tensors of the whole batch get none. Only a cut of a tensor whose dim 0
    is proven to be the batch counts (``batch_dims``): PRX's fused ``[3, B, H, L, D]`` q / k / v
    cut by ``qkv[0]`` at batch 3 is not a row. Returns the number of nodes marked."""
    marked = 0
    whole = {node for node, layout in batch_dims(graph, batch).items() if layout == (0, 1)}
    shared = _single_row_sources(graph, batch, whole)
    _mark_shared_tables(shared)
    for node in graph.nodes:
        if node.op != "call_function" or not _has_token_axes(node):
            continue
        if node.args and node.args[0] in shared and node.target in (aten.slice.Tensor, aten.select.int):
            continue
        rows = _rows_of(node, batch, whole)
        if rows is not None:
            node.meta[ROWS] = rows
            marked += 1
    return marked


def _single_row_sources(graph: fx.Graph, batch: int, whole: set) -> set:
    """Whole-batch tensors (``whole``: batch in dim 0) of which the graph takes one row only
    (Flux's ``img_ids[0]``: a table shared by every row, not a loop over the batch): their rows
    are not marked."""
    taken: dict = {}
    for node in graph.nodes:
        if node.target not in (aten.slice.Tensor, aten.select.int) or not node.args:
            continue
        src = node.args[0]
        if (src not in whole or ROWS in src.meta
                or (node.args[1] if len(node.args) > 1 else 0) != 0):
            continue
        taken.setdefault(src, set()).add(tuple(node.args[2:4]))
    return {src for src, rows in taken.items() if len(rows) == 1} if batch > 1 else set()


def _mark_shared_tables(shared: set) -> None:
    """Mark ``SHARED_TABLE`` on the tables of ``shared`` and on the token-bearing nodes they are
    built from (OmniGen's RoPE: ``(inv_freq @ position_ids[:, None]).transpose(1, 2)``, then
    ``cat(...)[0]``): they must run at full length (``plan_regions``), since a per-row active set
    gathered before the one row is taken would give every row the active positions of that row."""
    todo = list(shared)
    while todo:
        node = todo.pop()
        if node.op != "call_function" or node.meta.get(SHARED_TABLE):
            continue
        node.meta[SHARED_TABLE] = True
        todo.extend(i for i in node.all_input_nodes if _has_token_axes(i))


def _has_token_axes(node: fx.Node) -> bool:
    info = node.meta.get("rasfx_tokens")
    return bool(info) if isinstance(info, tuple) else isinstance(info, list) and any(bool(e) for e in info)


def _rows_of(node: fx.Node, batch: int, whole: set):
    t, args = node.target, node.args
    src = args[0] if args and isinstance(args[0], fx.Node) else None
    if t is operator.getitem and src is not None and src.target is aten.unbind.int and src.args[1:2] in ((), (0,)):
        t, src = aten.select.int, cast(fx.Node, src.args[0])  # x.unbind(0)[i] (Z-Image's unpatchify) is x[i]
        args = (src, 0, args[1])
    if t in (aten.slice.Tensor, aten.select.int) and src is not None and (args[1] if len(args) > 1 else 0) == 0:
        val = src.meta.get("val")
        before = src.meta.get(ROWS)
        if not isinstance(val, torch.Tensor) or val.dim() == 0 or (before is None and src not in whole):
            return None
        if before is not None and before[2]:
            return before  # dim 0 is no longer the batch
        base, size = (before[0], before[1] - before[0]) if before else (0, batch)
        if t is aten.select.int:
            i = cast(int, args[2]) % size
            return (base + i, base + i + 1, True)
        start = cast(int, args[2]) if len(args) > 2 and args[2] is not None else 0
        end = cast(int, args[3]) if len(args) > 3 and args[3] is not None else size
        start, end = max(0, start + size if start < 0 else start), min(size, end + size if end < 0 else end)
        if len(args) > 4 and args[4] != 1:
            return None
        rows = (base + start, base + end, False)
        return None if rows == (0, batch, False) else rows
    if t in (aten.cat.default, aten.concat.default, aten.stack.default) and args:
        dim = cast(int, args[1] if len(args) > 1 else node.kwargs.get("dim", 0))
        parts = cast("list[tuple[int, int, bool]]", [p.meta.get(ROWS) for p in cast("list[fx.Node]", args[0])])
        if dim == 0 and parts and all(p is not None and p[2] == (t is aten.stack.default) for p in parts):
            if all(a[1] == b[0] for a, b in zip(parts, parts[1:])):
                rows = (parts[0][0], parts[-1][1], False)
                return None if rows == (0, batch, False) else rows
            return None
    found = {i.meta[ROWS] for i in node.all_input_nodes if ROWS in i.meta}
    return found.pop() if len(found) == 1 else None


ROW_GROUPS = "rasfx_row_groups"  # m: dim 0 holds B*m rows, each sample's m rows consecutive

_RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
             aten.unflatten.int)
# ops that keep dim 0 in place unless their dim argument (at this position) is 0
_DIM_ARG = {aten.slice.Tensor: 1, aten.select.int: 1, aten.narrow.default: 1, aten.cat.default: 1,
            aten.concat.default: 1, aten.chunk.default: 2, aten.split.Tensor: 2, aten.split_with_sizes.default: 2,
            aten.unsqueeze.default: 1, aten.squeeze.dim: 1, aten.softmax.int: 1, aten._softmax.default: 1,
            aten.index_select.default: 1, aten.repeat_interleave.self_int: 2}
_KEEP_DIM0 = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default, aten.linear.default,
              aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.scaled_dot_product_attention.default,
              aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
              aten.detach.default, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.expand.default,
              aten.type_as.default, operator.getitem}


def annotate_row_groups(graph: fx.Graph, batch: int) -> int:
    """Tensors whose dim 0 holds several consecutive rows per sample (Latte's spatial blocks
    run on ``[B*F, H*W, C]``: ``[B, C, F, H, W]`` permuted and reshaped) get
    ``meta["rasfx_row_groups"] = m`` (dim 0 is ``B*m``), so that a per-row active set is
    repeated for each of a sample's rows. Only layouts proven by the graph count: a reshape
    that merges or splits the leading dims of a tensor with the batch (or such groups) in dim 0,
    ``repeat_interleave`` along dim 0, permutes and selects that move those rows to another dim
    and back, and ops that keep them in place. Returns the number of token-bearing nodes marked."""
    marked = 0
    for node, found in batch_dims(graph, batch).items():
        tokens_in_dim0 = any(a.dim == 0 for a in (node.meta.get("rasfx_tokens") or ()) if not isinstance(a, tuple))
        if found[0] == 0 and found[1] > 1 and _has_token_axes(node) and not tokens_in_dim0:  # rows, not tokens
            node.meta[ROW_GROUPS] = found[1]
            marked += 1
    return marked


def batch_dims(graph: fx.Graph, batch: int) -> dict[fx.Node, tuple[int, int]]:
    """node -> (the dim holding its B*m batch rows, m), for the tensors whose layout the graph
    proves (``_groups_of``); any other tensor whose dim 0 has the batch size is taken as
    ``(0, 1)``, the batch in dim 0 (an input, or an op without a layout rule), unless one of its
    inputs is proven to hold the batch in another dim: then dim 0 having the batch's size says
    nothing (``flip`` of a ``[3, B, H, L, D]`` q / k / v at batch 3) and its layout stays unknown."""
    groups: dict[fx.Node, tuple[int, int]] = {}
    for node in graph.nodes:
        size = _dim0(node)
        if size is None:
            continue
        found = _groups_of(node, batch, groups)
        moved = any(groups[i][0] != 0 for i in node.all_input_nodes if i in groups)
        if found is None and size == batch and not moved:
            found = (0, 1)
        if found is not None:
            groups[node] = found
    return groups


def _groups_of(node: fx.Node, batch: int, groups: dict):
    t, args = node.target, node.args
    if t in _KEEP_DIM0 or is_pointwise(t):
        if t is operator.getitem:
            return groups.get(cast(fx.Node, args[0]))
        size = _dim0(node)
        same = [i for i in node.all_input_nodes if i in groups and groups[i][0] == 0 and _dim0(i) == size]
        if same:
            return groups[same[0]]
        moved = {groups[i] for i in node.all_input_nodes if i in groups and _rank(i) == _rank(node)}
        return moved.pop() if len(moved) == 1 else None  # the batch elsewhere, e.g. in dim 1 of [3, B, H, L, D]
    if t in (aten.stack.default, aten.cat.default, aten.concat.default) and args and isinstance(args[0], (list, tuple)):
        parts: set[tuple[int, int] | None] = {groups.get(p) for p in args[0]}
        layout = parts.pop() if len(parts) == 1 else None
        if layout is None:
            return None
        (bd, m), d = layout, cast(int, args[1] if len(args) > 1 else node.kwargs.get("dim", 0))
        if t is aten.stack.default:  # torch.stack([q, k, v]): the batch moves one dim on when stacked before it
            d %= _rank(node)
            return bd + (d <= bd), m
        return None if d % _rank(node) == bd else (bd, m)
    src = args[0] if args and isinstance(args[0], fx.Node) else None
    if src is None or src not in groups:
        return None
    (bd, m), sval = groups[src], src.meta["val"]
    rank = sval.dim() if isinstance(sval, torch.Tensor) else 0
    if t is aten.permute.default:
        return [d % rank for d in cast("list[int]", args[1])].index(bd), m
    if t is aten.transpose.int:
        a, b = (cast(int, d) % rank for d in args[1:3])
        return {a: b, b: a}.get(bd, bd), m
    if t in (aten.unbind.int, aten.select.int):
        u = cast(int, args[1] if len(args) > 1 else 0) % rank
        return None if u == bd else (bd - (u < bd), m)
    if bd != 0:
        return None
    size = _dim0(node)
    if size is None or size % batch:
        return None
    if t in _RESHAPES:
        prefixes = {math.prod(int(s) for s in sval.shape[:j]) for j in range(1, rank + 1)}
        return (0, size // batch) if size in prefixes or int(sval.shape[0]) % size == 0 else None
    if t in _DIM_ARG:
        pos = _DIM_ARG[t]
        dim = cast(int, args[pos] if len(args) > pos else node.kwargs.get("dim", 0))
        if t is aten.repeat_interleave.self_int:
            return (0, m * cast(int, args[1])) if dim is not None and dim % rank == 0 else (0, m)
        return (0, m) if dim % rank != 0 and int(sval.shape[0]) == size else None
    return None


def _rank(node: fx.Node) -> int:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else -1


def _dim0(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    first = val[0] if isinstance(val, (list, tuple)) and val else val
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else None
