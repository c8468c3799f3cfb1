"""Token analysis: find the image-token axis of every node from the graph itself.

What it computes (no model names, no per-model tables): the same forward is captured at
two resolutions; nodes are aligned by their op sequence, and a tensor dimension whose size
is ``N + c`` at both resolutions (``N`` = number of image tokens, ``c`` a constant) is a
token axis. ``c > 0`` marks a sequence that concatenates the image tokens with ``c``
conditioning tokens; where the image segment sits (its offset) is propagated from the
``cat``/``slice``/``split`` nodes that build and cut such sequences. An attention mask over
such a joint sequence, passed in or built from ``ones``/``arange``, takes the offset of the
queries / keys it masks (counter ``masks_located``: sources located that way; these locating
steps are in ``token_segments``).

``N`` itself is found as the size that scales exactly with the image area (grid inputs) or
is the packed sequence length (packed inputs), or that length over ``p`` where a Conv1d of
kernel == stride == ``p`` patchifies the sequence (``sequence_patch``, counter
``sequence_patched``). A dim of ``k * N`` (``k`` a multiple of the
batch) is the batch folded into the token axis (``Axis.outer = k``; Latte's temporal layout
``[B*H*W, F, C]``), accepted where the ops that make it prove the block-major layout
(``token_folds``). A graph with several token grids of different sizes (a U-Net), a fold
whose layout is not proven, or no token grid (a model without image tokens) is rejected.
Tensors whose dim 0 holds several rows per sample (``[B*F, H*W, C]``) are marked for per-row
active sets (``batch_rows.annotate_row_groups``, counter ``row_groups``).

Invariants: the graph is not modified; every node gets ``node.meta["rasfx_tokens"]`` (a
``token_info.TokenInfo``: a tuple of axes for tensor outputs, a list of them for multi-output
nodes, ``None`` for non-tensors; read it with ``token_info``'s functions) and, where int arguments vary with the resolution,
``node.meta["rasfx_ints"]`` (``{leaf position: (a, b)}`` meaning ``a * N + b``, or
``None`` when the variation is not linear in N).
"""

from __future__ import annotations

import difflib
import operator
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Optional, cast

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import TooFewTokensError, UnsupportedModelError
from .batch_rows import annotate_row_groups, annotate_rows
from .op_rules import MATMUL_OPS, SDPA_OPS
from .token_folds import fold_axis, fold_base, fold_offset, folded_error, involves_fold, unproven_fold
from .token_info import Axis, token_axes
from .token_segments import NEW_TENSOR, PINNED, locate_masks, locate_row_writes, locate_tables, per_row

aten = torch.ops.aten


@dataclass
class TokenAnalysis:
    num_tokens: int  # N at the captured resolution
    num_tokens_alt: int  # N at the analysis resolution
    matched: int
    unmatched: list[str] = field(default_factory=list)
    stats: Counter = field(default_factory=Counter)


def _key(node: fx.Node) -> str:
    if node.op == "call_function":
        return f"f:{node.target}"
    if node.op in ("placeholder", "get_attr"):
        return f"{node.op}:{node.target}"
    return node.op


def align(g1: fx.Graph, g2: fx.Graph) -> dict[fx.Node, fx.Node]:
    """Pairs of nodes doing the same thing in two captures of one forward."""
    n1, n2 = list(g1.nodes), list(g2.nodes)
    sm = difflib.SequenceMatcher(a=[_key(n) for n in n1], b=[_key(n) for n in n2], autojunk=False)
    pairs = {}
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            for k in range(i2 - i1):
                pairs[n1[i1 + k]] = n2[j1 + k]
    return pairs


def _tensors(val: Any) -> list[Optional[torch.Tensor]]:
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [v if isinstance(v, torch.Tensor) else None for v in val]
    return []


def _area_pairs(pairs, area1: int, area2: int, smallest: int = 2) -> Counter:
    counts: Counter = Counter()
    for a, b in pairs.items():
        for t1, t2 in zip(_tensors(a.meta.get("val")), _tensors(b.meta.get("val"))):
            if t1 is None or t2 is None or t1.dim() != t2.dim():
                continue
            for s1, s2 in zip(t1.shape, t2.shape):
                s1, s2 = int(s1), int(s2)
                if s1 >= smallest and s1 != s2 and s1 * area2 == s2 * area1:
                    counts[(s1, s2)] += 1
    return counts


def find_token_count(pairs, resolutions: dict, folds: bool = True) -> tuple[int, int, frozenset]:
    """(N, N_alt, folds): the number of image tokens at the two resolutions, and the factors
    ``k`` of the dims that hold ``k * N`` tokens (the batch folded into the token axis,
    ``token_folds``; ``folds=False``: such dims are refused as other token grids)."""
    if resolutions["mode"] == "packed":
        n1, n2 = sequence_patch(pairs, resolutions["n"], resolutions["n2"]) or (resolutions["n"], resolutions["n2"])
        if n1 < 2:
            raise TooFewTokensError(f"the image is a single token ({n1} in the sequence): nothing to skip")
        return n1, n2, frozenset()
    (h, w), (h2, w2) = resolutions["hw"], resolutions["hw2"]
    counts = _area_pairs(pairs, h * w, h2 * w2)
    if not counts and _area_pairs(pairs, h * w, h2 * w2, smallest=1):
        raise TooFewTokensError(
            f"the image is a single token at this resolution ({h}x{w} input): nothing to skip"
        )
    if not counts:
        raise UnsupportedModelError(
            "no image-token sequence: no tensor dimension of the graph scales with the image area, "
            "so the model does not process the image as a sequence of tokens (a convolutional model?). "
            "rasfx needs a diffusion transformer."
        )
    (best, freq), *rest = counts.most_common()
    grids = [pair for pair, c in rest if c >= max(3, freq // 10) and pair[0] != best[0]]
    batch = resolutions.get("batch", 1)
    based = fold_base([best, *grids], batch) if grids and folds else None
    if based is not None:  # k x N: checked once the axes are located (token_folds.unproven_fold)
        return (*based[0], based[1])
    folded = [pair for pair in grids if batch > 1 and batch * min(pair[0], best[0]) == max(pair[0], best[0])]
    if folded and len(folded) == len(grids):
        small, large = sorted((best[0], folded[0][0]))
        line = _first_line(pairs, max(best, folded[0]))
        raise folded_error(large, small, f" (first at {line!r})" if line else "")
    if grids:
        sizes = ", ".join(str(p[0]) for p in [best, *grids])
        line = _first_line(pairs, grids[0])
        where = f"; the first tensor with {grids[0][0]} comes from {line!r}" if line else ""
        raise UnsupportedModelError(
            f"several token grids of different sizes ({sizes} tokens{where}): this looks like a U-Net, a "
            "multi-scale model, or attention over a reduced grid (keys/values compressed by a strided conv or "
            "pooling), whose token sets do not map one-to-one; rasfx supports transformers with one image-token "
            "sequence at full resolution."
        )
    return (*best, frozenset())


_CONVS = (aten.conv1d.default, aten.convolution.default)
# ops that mix the features of the sequence: a conv after one of them is no patch embedding
_LAYERS = (*_CONVS, *MATMUL_OPS, *SDPA_OPS, aten.conv2d.default, aten.conv3d.default, aten.conv_transpose1d.default)


def sequence_patch(pairs, n1: int, n2: int) -> Optional[tuple[int, int]]:
    """The token counts of a packed sequence of ``n1`` (``n2`` in the other capture) positions
    that a strided Conv1d patchifies, the 1-D analogue of a Conv2d patch embedding (ACE-Step:
    ``[B, C, L] -> [B, D, L / p]``, kernel == stride == ``p``): the conv's output lengths, when
    its input is the sequence (also padded up to a multiple of ``p``) at both resolutions; None
    without such a conv (the positions are the tokens). The first such conv in graph order, of
    any input whose length is the sequence's (a conditioning input of that length patchified while
    the image is not would be taken for the image's patches: not seen in a model so far).
    Conservative: only a conv of the inputs themselves (no matmul, attention or conv before
    it) counts; a strided conv inside the blocks (keys compressed over the tokens) does not
    make the tokens patches."""
    for a, b in pairs.items():
        if a.op != "call_function" or a.target not in _CONVS or b.target is not a.target or _after_layer(a):
            continue
        x, weight = a.args[0], a.args[1]
        args: list[Any] = [*a.args, *[None] * 9]  # the ATen schema's tensors, int lists and flags
        if a.target is aten.convolution.default and args[6]:  # transposed: an unpatchify, not a patchify
            continue
        if not isinstance(x, fx.Node) or not isinstance(weight, fx.Node) or not isinstance(b.args[0], fx.Node):
            continue
        vals = [n.meta.get("val") for n in (x, b.args[0], weight)]
        if not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in vals):
            continue
        x1, x2, w = cast("list[torch.Tensor]", vals)
        p = int(w.shape[-1])
        stride, padding = list(args[3] or [1]), list(args[4] or [0])
        dilation = list(args[5] or [1])
        if p < 2 or stride != [p] or any(padding) or any(d != 1 for d in dilation):
            continue
        if int(x1.shape[-1]) in (n1, -(-n1 // p) * p) and int(x2.shape[-1]) in (n2, -(-n2 // p) * p):
            return int(x1.shape[-1]) // p, int(x2.shape[-1]) // p
    return None


def _after_layer(node: fx.Node) -> bool:
    """Whether an op of ``_LAYERS`` computes an input of ``node`` (directly or not)."""
    todo, seen = list(node.all_input_nodes), set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target in _LAYERS:
            return True
        todo.extend(n.all_input_nodes)
    return False


def _first_line(pairs, sizes: tuple[int, int]) -> str:
    """``op at model line`` of the first op with a dim of ``sizes[0]`` that is ``sizes[1]`` in
    the other capture."""
    for a, b in pairs.items():
        if a.op != "call_function":
            continue
        for t1, t2 in zip(_tensors(a.meta.get("val")), _tensors(b.meta.get("val"))):
            if t1 is not None and t2 is not None and t1.dim() == t2.dim() and any(
                (int(x), int(y)) == sizes for x, y in zip(t1.shape, t2.shape)
            ):
                return f"{a.target} at {model_line(a)}"
    return ""


def model_line(node: fx.Node) -> str:
    """``file:line (function): code`` of the innermost frame of the model's own code that
    produced ``node`` (frames of torch and rasfx skipped), from the stack trace torch.export
    records (the form of ``capture.model_frame``); the node name without one."""
    lines = node.meta.get("stack_trace", "").strip().splitlines()
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))
    for i in range(len(lines) - 2, -1, -1):
        m = re.match(r'\s*File "([^"]+)", line (\d+), in (\S+)', lines[i])
        if m and not m.group(1).startswith((*skip, "<")):
            return f"{m.group(1)}:{m.group(2)} ({m.group(3)}): {lines[i + 1].strip()}"
    return lines[-1].strip() if lines else node.name


def _axes_of(t1: torch.Tensor, t2: Optional[torch.Tensor], n1: int, n2: int, extras: set,
             folds: frozenset = frozenset()) -> tuple:
    axes = []
    for d in range(t1.dim()):
        s1 = int(t1.shape[d])
        if t2 is not None:
            s2 = int(t2.shape[d])
            if s1 >= n1 and s1 - n1 == s2 - n2 and s1 != s2:
                axes.append(Axis(d, s1 - n1, None))
            elif folds and (folded := fold_axis(d, s1, s2, n1, n2, folds)) is not None:
                axes.append(folded)
        elif s1 >= n1 and (s1 - n1) in extras:
            axes.append(Axis(d, s1 - n1, None))
    return tuple(axes)


def _int_leaves(node: fx.Node) -> list:
    return pytree.tree_leaves((node.args, node.kwargs))


def _fit_ints(a: fx.Node, b: fx.Node, n1: int, n2: int) -> Optional[dict]:
    la, lb = _int_leaves(a), _int_leaves(b)
    if len(la) != len(lb):
        return None
    fits = {}
    for i, (x, y) in enumerate(zip(la, lb)):
        if type(x) is int and type(y) is int and x != y:
            num = y - x
            if num % (n2 - n1) != 0 or num // (n2 - n1) < 1:
                return None
            k = num // (n2 - n1)
            fits[i] = (k, x - k * n1)
    return fits


# ---------------------------------------------------------------- offsets of image segments


def _input_axes(node: fx.Node) -> list[tuple[fx.Node, Axis]]:
    out: list[tuple[fx.Node, Axis]] = []
    for arg in node.all_input_nodes:
        info = arg.meta.get("rasfx_tokens")
        if isinstance(info, tuple):
            out.extend((arg, ax) for ax in info)
        elif isinstance(info, list):
            out.extend((arg, ax) for elem in info if elem for ax in elem)
    return out


def _segment(offset, extra, n, start, end, size):
    """Image segment of [offset, offset+n) seen through a slice [start, end) of a sequence
    of ``size``: the new offset, or None when the slice does not hold the whole segment."""
    if isinstance(offset, tuple):
        rows = tuple(_segment(o, extra, n, start, end, size) for o in offset)
        return None if None in rows else per_row(rows)
    if offset is None:
        return None
    start = max(0, start + size if start < 0 else start)
    end = min(size, end + size if end < 0 else end)
    if start <= offset and end >= offset + n:
        return offset - start
    return None


def _shift(offset, by: int):
    if offset is None:
        return None
    return tuple(o + by for o in offset) if isinstance(offset, tuple) else offset + by


def _propagate_offsets(graph: fx.Graph, n1: int) -> None:
    for node in graph.nodes:
        info = node.meta.get("rasfx_tokens")
        if not info:
            continue
        ins = _input_axes(node)
        if isinstance(info, list):
            node.meta["rasfx_tokens"] = [
                tuple(_resolve_axis(node, ax, ins, n1, k) for ax in elem) if elem is not None else None
                for k, elem in enumerate(info)
            ]
        else:
            node.meta["rasfx_tokens"] = tuple(_resolve_axis(node, ax, ins, n1, None) for ax in info)


def _resolve_axis(node: fx.Node, ax: Axis, ins, n1: int, elem: Optional[int]) -> Axis:
    # The casts below state the ATen schema of each op (fx types every argument as any
    # ``Argument``): the tensor arguments are nodes, dims and bounds are ints.
    t = node.target
    if involves_fold(node, ax, ins):
        return replace(ax, offset=fold_offset(node, ax, ins, node.meta.get("rasfx_ints")))
    if not ins or t in NEW_TENSOR:  # a source: the image input, or a tensor located by locate_masks / locate_row_writes
        pinned = node.meta.get(PINNED, {}).get(ax.dim)
        if pinned is None and elem is not None and t in (aten.split.Tensor, aten.split_with_sizes.default):
            src = cast(fx.Node, node.args[0])
            sdim = cast(int, node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % src.meta["val"].dim()
            pinned = _piece_offset(src, sdim, node.meta["val"], elem, ax.extra) if sdim == ax.dim else None
        return replace(ax, offset=0 if ax.extra == 0 else pinned)
    if t is operator.getitem:
        src = cast(fx.Node, node.args[0])
        infos = src.meta.get("rasfx_tokens")
        k = node.args[1]
        if isinstance(infos, list) and isinstance(k, int) and k < len(infos) and infos[k]:
            for a in infos[k]:
                if a.extra == ax.extra:
                    return replace(ax, offset=a.offset)
        return replace(ax, offset=None)
    if t in (aten.cat.default, aten.concat.default):
        tensors = cast("list[fx.Node]", node.args[0])
        cat_dim = cast(int, node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0))
        rank = node.meta["val"].dim()
        if cat_dim % rank == ax.dim:
            pos, found = 0, None
            for inp in tensors:
                val = inp.meta["val"]
                axes = inp.meta.get("rasfx_tokens") or ()
                here = [a for a in axes if a.dim == ax.dim] if isinstance(axes, tuple) else []
                if here:
                    if found is not None or here[0].offset is None:
                        return replace(ax, offset=None)
                    found = _shift(here[0].offset, pos)
                pos += int(val.shape[ax.dim])
            return replace(ax, offset=found)
    if elem is not None and t in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
        src = cast(fx.Node, node.args[0])
        sval = src.meta["val"]
        sdim = cast(int, node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % sval.dim()
        src_axes = [a for a in (src.meta.get("rasfx_tokens") or ()) if a.dim == sdim]
        if src_axes:
            pieces = node.meta["val"]
            start = sum(int(p.shape[sdim]) for p in pieces[:elem])
            end = start + int(pieces[elem].shape[sdim])
            off = _segment(src_axes[0].offset, src_axes[0].extra, n1, start, end, int(sval.shape[sdim]))
            return replace(ax, offset=off)
    if t in (aten.select.int, aten.slice.Tensor) and cast(int, node.args[1] if len(node.args) > 1 else 0) == 0:
        src = cast(fx.Node, node.args[0])
        by_row = [a for a in (src.meta.get("rasfx_tokens") or ()) if isinstance(a.offset, tuple) and a.extra == ax.extra]
        if by_row and by_row[0].dim != 0:  # rows of the batch: their own offsets
            offsets = by_row[0].offset
            if t is aten.select.int:
                return replace(ax, offset=offsets[cast(int, node.args[2]) % len(offsets)])
            start = cast(int, node.args[2]) if len(node.args) > 2 and node.args[2] is not None else 0
            end = cast(int, node.args[3]) if len(node.args) > 3 and node.args[3] is not None else len(offsets)
            step = cast(int, node.args[4]) if len(node.args) > 4 else 1
            return replace(ax, offset=per_row(offsets[start:end:step]) if offsets[start:end:step] else None)
    if t in (aten.slice.Tensor, aten.narrow.default):
        src = cast(fx.Node, node.args[0])
        sval = src.meta["val"]
        sdim = cast(int, node.args[1] if len(node.args) > 1 else 0) % sval.dim()
        src_axes = [a for a in (src.meta.get("rasfx_tokens") or ()) if a.dim == sdim]
        if src_axes and sdim == ax.dim:
            size = int(sval.shape[sdim])
            if t is aten.slice.Tensor:
                start = cast(int, node.args[2]) if len(node.args) > 2 and node.args[2] is not None else 0
                end = cast(int, node.args[3]) if len(node.args) > 3 and node.args[3] is not None else size
                step = cast(int, node.args[4]) if len(node.args) > 4 else 1
                if step != 1:
                    return replace(ax, offset=None)
            else:
                start, length = cast(int, node.args[2]), cast(int, node.args[3])
                end = start + length
            return replace(ax, offset=_segment(src_axes[0].offset, src_axes[0].extra, n1, start, end, size))
    if t in (aten.constant_pad_nd.default, aten.pad.default):  # the left width shifts the segment
        src = cast(fx.Node, node.args[0])
        pad = cast("list[int]", node.args[1])
        rank = node.meta["val"].dim()
        left = pad[2 * (rank - 1 - ax.dim)] if 2 * (rank - 1 - ax.dim) < len(pad) else 0
        src_axes = [a for a in (src.meta.get("rasfx_tokens") or ()) if a.dim == ax.dim]
        if src_axes and src_axes[0].offset is not None:
            return replace(ax, offset=_shift(src_axes[0].offset, left))
        return replace(ax, offset=None)
    # token-wise ops keep the segment: take it from an input axis with the same extra. They
    # align their operands position by position, so an operand of unknown offset (a table of
    # [text, image] positions, CogVideoX's sin-cos buffer) has the other operands' segment.
    offs = {a.offset for _, a in ins if a.extra == ax.extra and a.outer == 1}
    if len(offs) == 2 and None in offs:
        offs.discard(None)
    if len(offs) == 1:
        return replace(ax, offset=offs.pop())
    return replace(ax, offset=None)


def _piece_offset(src: fx.Node, dim: int, pieces, elem: int, extra: int):
    """The image segment of piece ``elem`` of a split of ``src`` along ``dim``, where ``src``
    (no token axis: a length that sums the pieces') is a concatenation of sequences of the
    pieces' sizes along ``dim``, seen through ops that keep the positions of ``dim`` (Z-Image
    embeds and pads the tokens of all samples at once, ``linear(cat(x_i))``, and looks up their
    RoPE rows at once, ``table[cat(ids_i)[:, k]]``, then ``split(seqlens)``): the piece is the
    ``elem``-th sequence, with its segment. None when no such concatenation is found."""
    sizes = [int(p.shape[dim]) for p in pieces]
    todo, seen = [(src, dim)], set()
    while todo:
        node, d = todo.pop()
        if node in seen or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        seen.add(node)
        t, rank = node.target, node.meta["val"].dim()
        if t in (aten.cat.default, aten.concat.default):
            parts = cast("list[fx.Node]", node.args[0])
            cat_dim = cast(int, node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % rank
            if cat_dim != d:  # features side by side (a RoPE table of several axes)
                todo.extend((part, d) for part in parts)
            elif [int(p.meta["val"].shape[d]) for p in parts] == sizes:
                axes = [a for a in token_axes(parts[elem]) if a.dim == d and a.extra == extra]
                return axes[0].offset if axes else None
        elif t is aten.linear.default and d < rank - 1:  # each row on its own
            todo.append((cast(fx.Node, node.args[0]), d))
        elif t is aten.select.int:
            sel = cast(int, node.args[1]) % (rank + 1)
            todo.append((cast(fx.Node, node.args[0]), d + 1 if sel <= d else d))
        elif t is aten.index.Tensor and len(cast(list, node.args[1])) == 1:  # table[ids]: a row per id
            ids = cast("list[fx.Node]", node.args[1])[0]
            if isinstance(ids, fx.Node) and d < ids.meta["val"].dim():
                todo.append((ids, d))
        elif t is not None and torch.Tag.pointwise in getattr(t, "tags", ()):  # broadcast, right-aligned
            size = int(node.meta["val"].shape[d])
            for arg in node.all_input_nodes:
                val = arg.meta.get("val")
                k = d - rank + val.dim() if isinstance(val, torch.Tensor) else -1
                if k >= 0 and int(cast(torch.Tensor, val).shape[k]) == size:
                    todo.append((arg, k))
    return None


# ---------------------------------------------------------------- the pass


def analyze_tokens(gm: fx.GraphModule, gm_alt: fx.GraphModule, resolutions: dict) -> TokenAnalysis:
    """Annotate every node of ``gm`` with its token axes (see module docstring)."""
    pairs = align(gm.graph, gm_alt.graph)
    n1, n2, folds = find_token_count(pairs, resolutions)
    extras: set = set()
    for a, b in pairs.items():
        for t1, t2 in zip(_tensors(a.meta.get("val")), _tensors(b.meta.get("val"))):
            if t1 is not None and t2 is not None and t1.dim() == t2.dim():
                extras.update(ax.extra for ax in _axes_of(t1, t2, n1, n2, set()))
    result = TokenAnalysis(num_tokens=n1, num_tokens_alt=n2, matched=len(pairs))
    if resolutions["mode"] == "packed" and n1 != resolutions["n"]:
        result.stats["sequence_patched"] = 1  # the tokens are patches of the sequence (sequence_patch)
    for node in gm.graph.nodes:
        other = pairs.get(node)
        if other is None and node.op not in ("output",):
            result.unmatched.append(node.name)
        val = node.meta.get("val")
        vals = _tensors(val)
        alts = _tensors(other.meta.get("val")) if other is not None else [None] * len(vals)
        infos: list[Optional[tuple]] = []
        for t1, t2 in zip(vals, alts if len(alts) == len(vals) else [None] * len(vals)):
            if t1 is None:
                infos.append(None)
                continue
            if t2 is not None and t2.dim() != t1.dim():
                t2 = None
            infos.append(_axes_of(t1, t2, n1, n2, extras, folds))
        if isinstance(val, torch.Tensor):
            node.meta["rasfx_tokens"] = infos[0]
        elif isinstance(val, (list, tuple)):
            node.meta["rasfx_tokens"] = infos
        else:
            node.meta["rasfx_tokens"] = None
        if other is not None:
            fits = _fit_ints(node, other, n1, n2)
            node.meta["rasfx_ints"] = fits
        else:
            node.meta["rasfx_ints"] = {} if not any(type(x) is int for x in _int_leaves(node)) else None
        if any(node.meta["rasfx_tokens"] if isinstance(node.meta["rasfx_tokens"], tuple) else ()):
            result.stats["token_nodes"] += 1
    _propagate_offsets(gm.graph, n1)
    result.stats["row_writes_located"] = locate_row_writes(gm.graph, n1)
    if result.stats["row_writes_located"]:
        _propagate_offsets(gm.graph, n1)
    result.stats["masks_located"] = locate_masks(gm.graph)
    if result.stats["masks_located"]:
        _propagate_offsets(gm.graph, n1)
    result.stats["tables_located"] = locate_tables(gm.graph)
    if result.stats["tables_located"]:
        _propagate_offsets(gm.graph, n1)
    unproven, located = unproven_fold(gm.graph)
    if unproven is not None and located:
        node, ax = unproven
        raise folded_error(ax.outer * n1, n1, f" (first at {node.target} at {model_line(node)!r})")
    if unproven is not None:  # no fold proven: grids of different sizes (a U-Net?)
        find_token_count(pairs, resolutions, folds=False)
    if resolutions.get("batch"):
        result.stats["row_subsets"] = annotate_rows(gm.graph, resolutions["batch"])
        grouped = annotate_row_groups(gm.graph, resolutions["batch"])
        if grouped:
            result.stats["row_groups"] = grouped
    return result
