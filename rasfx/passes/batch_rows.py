"""The batch rows a tensor holds: a per-sample loop over the batch (``x[i]``, ``x[i:i + 1]``,
Mochi's attention of each prompt over its own valid text tokens) makes tensors of some rows
only; per-row active sets must use those rows of the index (``annotate_rows``)."""

from __future__ import annotations

import operator
from typing import cast

import torch
import torch.fx as fx

aten = torch.ops.aten

ROWS = "rasfx_rows"  # (start, stop, squeezed): the batch rows a tensor holds, when not all of them


def annotate_rows(graph: fx.Graph, batch: int) -> int:
    """A per-sample loop over the batch (``x[i]``, ``x[i:i + 1]``, Mochi's attention of each
    prompt over its own valid text tokens) makes tensors that hold some rows of the batch
    only. Each such token-bearing node gets ``meta["rasfx_rows"] = (start, stop, squeezed)``
    (``squeezed``: the batch dim was selected away), so that per-row active sets use those
    rows of the index; tensors of the whole batch get none. Returns the number of nodes marked."""
    marked = 0
    shared = _single_row_sources(graph, batch)
    for node in graph.nodes:
        if node.op != "call_function" or not _has_token_axes(node):
            continue
        if node.args and node.args[0] in shared and node.target in (aten.slice.Tensor, aten.select.int):
            continue
        rows = _rows_of(node, batch)
        if rows is not None:
            node.meta[ROWS] = rows
            marked += 1
    return marked


def _single_row_sources(graph: fx.Graph, batch: int) -> set:
    """Whole-batch tensors of which the graph takes one row only (Flux's ``img_ids[0]``: a
    table shared by every row, not a loop over the batch): their rows are not marked."""
    taken: dict = {}
    for node in graph.nodes:
        if node.target not in (aten.slice.Tensor, aten.select.int) or not node.args:
            continue
        src = node.args[0]
        val = src.meta.get("val") if isinstance(src, fx.Node) else None
        if (not isinstance(val, torch.Tensor) or val.dim() == 0 or int(val.shape[0]) != batch or ROWS in src.meta
                or (node.args[1] if len(node.args) > 1 else 0) != 0):
            continue
        taken.setdefault(src, set()).add(tuple(node.args[2:4]))
    return {src for src, rows in taken.items() if len(rows) == 1} if batch > 1 else set()


def _has_token_axes(node: fx.Node) -> bool:
    info = node.meta.get("rasfx_tokens")
    return bool(info) if isinstance(info, tuple) else isinstance(info, list) and any(bool(e) for e in info)


def _rows_of(node: fx.Node, batch: int):
    t, args = node.target, node.args
    src = args[0] if args and isinstance(args[0], fx.Node) else None
    if t is operator.getitem and src is not None and src.target is aten.unbind.int and src.args[1:2] in ((), (0,)):
        t, src = aten.select.int, cast(fx.Node, src.args[0])  # x.unbind(0)[i] (Z-Image's unpatchify) is x[i]
        args = (src, 0, args[1])
    if t in (aten.slice.Tensor, aten.select.int) and src is not None and (args[1] if len(args) > 1 else 0) == 0:
        val = src.meta.get("val")
        before = src.meta.get(ROWS)
        if not isinstance(val, torch.Tensor) or val.dim() == 0 or (before is None and int(val.shape[0]) != batch):
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
