"""Flatten token grids: ops on image tokens laid out as a grid run on the flat token axis.

A model may spread its token axis back over the grid dims before its last ops
(Kandinsky 5's output layer: ``x.view(B, F, H, W, C)``, then a LayerNorm, a timestep
modulation ``* (scale[:, None, None] + 1) + shift[:, None, None]`` and the output
projection on ``[B, F, H, W, C]``). No single dim of those tensors has the token count, so
the token analysis finds no token axis on them: the token region would end at the view,
and the timestep-modulated head would recompute every token's output at every step.

The rewrite: a view that splits a token axis of ``N`` into consecutive grid dims
(``[.., N, ..] -> [.., F, H, W, ..]``, every other dim unchanged) is moved past the ops
that treat each grid position alike, which then run on the flat token axis:

* pointwise ops whose other operands are the same grid (flattened too) or broadcast over
  every grid dim (size 1 there, or of a lower rank: a ``[B, 1, 1, 1, C]`` modulation is
  reshaped to ``[B, 1, C]``);
* dtype casts (``to``, ``_to_copy``, ``type_as``) and ``clone``;
* ``layer_norm`` / ``rms_norm`` over trailing dims after the grid dims, ``linear`` when the
  last dim is not a grid dim.

Anything else (an op over the grid: a table with a value per grid position, a convolution,
the unpatchify view; an in-place op) keeps reading the grid, at full length: the token
region ends before it, as before the rewrite.

The view then follows the last of them and the token analysis of the new nodes is the flat
input's (the token axis at the view's split dim); the plan treats them like any token-wise
op. Exact: each output element is computed from the same values by the same op.

Invariants: a rewrite only where the view splits a token axis and nothing else; the replaced
nodes are erased, every user of one reads the grid view of its flat replacement. Counter:
``grid_ops_flattened`` (ops moved onto the flat token axis).
"""

from __future__ import annotations

import math
from typing import Optional, cast

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .batch_rows import ROWS
from .op_rules import is_pointwise, mutated_input
from .token_info import TOKENS, Axis, token_axes

aten = torch.ops.aten

_SPLIT_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unflatten.int}
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default, aten.clone.default}
_NORMS = {aten.layer_norm.default: 1, aten.rms_norm.default: 1}  # op -> position of normalized_shape


def flatten_token_grids(gm: fx.GraphModule) -> int:
    """Rewrite ``gm`` in place (see the module docstring); the number of ops moved."""
    moved = 0
    for node in list(gm.graph.nodes):
        split = _grid_split(node)
        if split is not None:
            moved += _sink(gm.graph, node, *split)
    if moved:
        gm.recompile()
    return moved


def _shape(node: fx.Node) -> tuple:
    return tuple(int(s) for s in node.meta["val"].shape)


def _grid_split(node: fx.Node) -> Optional[tuple[int, int, Axis]]:
    """(first grid dim, number of grid dims, token axis of the flat input) when ``node`` is a
    view that splits the token axis of its input into consecutive dims and changes nothing else."""
    if node.op != "call_function" or node.target not in _SPLIT_VIEWS or token_axes(node):
        return None
    src = node.args[0]
    if not isinstance(src, fx.Node) or len(token_axes(src)) != 1:
        return None
    axis = token_axes(src)[0]
    sin, sout = _shape(src), _shape(node)
    d, k = axis.dim, len(sout) - len(sin) + 1
    if k < 2 or sout[:d] != sin[:d] or sout[d + k:] != sin[d + 1:] or math.prod(sout[d:d + k]) != sin[d]:
        return None
    return d, k, axis


def _sink(graph: fx.Graph, view: fx.Node, d: int, k: int, axis: Axis) -> int:
    """Move the grid view ``view`` down past every op that can run on the flat tokens."""
    flat_of = {view: cast(fx.Node, view.args[0])}  # grid node -> the same values on the flat token axis
    todo, moved = [view], 0
    while todo:
        grid = todo.pop()
        for user in list(grid.users):
            if user in flat_of or not _runs_flat(user, grid, d, k, flat_of):
                continue
            flat = _flat_copy(graph, user, d, k, axis, flat_of)
            with graph.inserting_after(flat):
                regrid = graph.create_node("call_function", aten.reshape.default, (flat, list(_shape(user))),
                                           name=f"{user.name}_grid")
            regrid.meta.update(user.meta)
            regrid.meta[TOKENS] = ()
            regrid.meta["rasfx_ints"] = None  # runs at full length: its sizes are never resized
            user.replace_all_uses_with(regrid)
            graph.erase_node(user)
            flat_of[regrid] = flat
            todo.append(regrid)
            moved += 1
    for grid in reversed(list(flat_of)):  # the views whose every user now runs flat
        if not grid.users:
            graph.erase_node(grid)
    return moved


def _operands(node: fx.Node) -> list:
    return pytree.tree_leaves((node.args, node.kwargs))


def _runs_flat(node: fx.Node, grid: fx.Node, d: int, k: int, flat_of: dict) -> bool:
    """Whether ``node`` (a user of ``grid``) treats every position of the grid dims alike."""
    if node.op != "call_function" or not isinstance(node.meta.get("val"), torch.Tensor) or mutated_input(node):
        return False  # an in-place op writes to the grid's storage: it stays on it
    rank, t = len(_shape(grid)), node.target
    if t in _CASTS or t in _NORMS or t is aten.linear.default:
        others = _operands(node)[1:]  # weights, dtypes, shapes; type_as's reference (its dtype only)
        if node.args[0] is not grid or t is not aten.type_as.default and any(a in flat_of for a in others):
            return False
        if t in _NORMS:
            return len(cast("list[int]", node.args[_NORMS[t]])) <= rank - d - k
        return t is not aten.linear.default or d + k < rank
    if not is_pointwise(t) or len(_shape(node)) != rank or _shape(node)[d:d + k] != _shape(grid)[d:d + k]:
        return False
    return all(_broadcasts(a, rank, d, k) for a in _operands(node) if isinstance(a, fx.Node) and a not in flat_of)


def _broadcasts(operand: fx.Node, rank: int, d: int, k: int) -> bool:
    """An operand of size 1 on every grid dim it reaches (aligned from the right)."""
    val = operand.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() > rank:
        return False
    lead = rank - val.dim()
    return all(int(val.shape[i - lead]) == 1 for i in range(max(d, lead), d + k))


def _flat_copy(graph: fx.Graph, node: fx.Node, d: int, k: int, axis: Axis, flat_of: dict) -> fx.Node:
    """``node`` on the flat token axis: grid operands replaced by their flat values, broadcast
    operands with their grid dims collapsed into one."""
    rank = len(_shape(node))

    def flat_operand(a):
        if a in flat_of:
            return flat_of[a]
        val = a.meta.get("val")
        if not isinstance(val, torch.Tensor) or rank - val.dim() >= d + k:  # reaches no grid dim
            return a
        lead = rank - val.dim()
        first = max(d, lead) - lead
        shape = [*val.shape[:first], 1, *val.shape[d + k - lead:]]
        with graph.inserting_before(node):
            collapsed = graph.create_node("call_function", aten.reshape.default, (a, shape), name=f"{a.name}_flat")
        collapsed.meta.update(a.meta)
        collapsed.meta.update(val=val.reshape(shape), rasfx_ints={})
        collapsed.meta[TOKENS] = ()
        return collapsed

    if node.target in _CASTS or node.target in _NORMS or node.target is aten.linear.default:
        args, kwargs = pytree.tree_map_only(fx.Node, lambda a: flat_of.get(a, a), (node.args, node.kwargs))
    else:
        args, kwargs = pytree.tree_map_only(fx.Node, flat_operand, (node.args, node.kwargs))
    with graph.inserting_before(node):
        flat = graph.create_node("call_function", node.target, tuple(args), kwargs, name=f"{node.name}_flat")
    shape = _shape(node)
    flat.meta.update(node.meta)
    flat.meta["val"] = node.meta["val"].reshape(*shape[:d], math.prod(shape[d:d + k]), *shape[d + k:])
    flat.meta[TOKENS] = (axis,)
    source = cast(fx.Node, flat_of[next(a for a in _operands(node) if a in flat_of)])
    if ROWS in source.meta:
        flat.meta[ROWS] = source.meta[ROWS]
    return flat
