"""Data-dependent Python on the prompt's values, specialised per prompt.

Some forwards read tensor values into Python: Lumina 2 takes the text lengths from the mask
(``mask.sum(1).tolist()``) to lay out its joint sequence, Mochi keeps the valid text tokens with
``torch.nonzero(mask)``, HunyuanImage reorders the text with ``text[mask]``. ``torch.export``
cannot trace a value it does not know. When those values depend only on inputs that stay the
same between denoising steps (the prompt's masks and embeddings), rasfx runs the forward once
eagerly to read them, exports the forward with them as constants (``ReadsReplay``), and keys
the capture on the values of the inputs they were computed from (``value_key``): another
prompt with another mask is another signature, captured anew, never a graph specialised to
the old mask; the same prompt (images 2..N of a session) reuses the capture.

A read computed from an input that changes at every step (the image input, the timestep) or
from the weights cannot be specialised: it is left to torch, and when the export fails, the
error names that read, its source line and the input it comes from (``blocked``).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, cast

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.proxy_tensor import get_proxy_mode, get_proxy_slot
from torch.overrides import TorchFunctionMode

T = torch.Tensor
# The forward arguments that change at every denoising step besides the image input (the
# default of ``TransformConfig.varying_inputs``): values read from them are never specialised.
STEP_INPUTS = ("timestep", "timesteps", "t", "sigma", "sigmas")
# Python reads of tensor values, and ops whose output size depends on values, each named as the
# model writes it (for errors). Their result is recorded eagerly and replayed as a constant.
_READS: dict[Callable, str] = {
    T.tolist: ".tolist()", T.item: ".item()", T.__bool__: "bool(tensor)", T.__int__: "int(tensor)",
    T.__float__: "float(tensor)", T.__index__: "a tensor used as an index", T.numpy: ".numpy()",
    T.nonzero: ".nonzero()", torch.nonzero: "torch.nonzero", torch.argwhere: "torch.argwhere",
    T.argwhere: ".argwhere()", torch.unique: "torch.unique", T.unique: ".unique()", torch.bincount: "torch.bincount",
    T.bincount: ".bincount()",
}
# Ops whose output size depends on the values of some of their operands only (a mask, the
# repeats): those are recorded as integer indices, and the op is replayed with them.
_INDEXING = {T.__getitem__: "indexing with a boolean mask", T.__setitem__: "assignment through a boolean mask"}
_SELECTS = {torch.masked_select: "torch.masked_select", T.masked_select: ".masked_select()"}
_REPEATS = {torch.repeat_interleave: "torch.repeat_interleave", T.repeat_interleave: ".repeat_interleave()"}
_SKIP = (os.path.dirname(torch.__file__), os.path.dirname(__file__))


def _site() -> tuple[str, int, str]:
    """(file, line, function) of the innermost frame of the model's own code."""
    f: Any = sys._getframe(2)
    while f is not None and f.f_code.co_filename.startswith(_SKIP):
        f = f.f_back
    return (f.f_code.co_filename, f.f_lineno, f.f_code.co_name) if f is not None else ("?", 0, "?")


def _index_items(args: tuple) -> list:
    index = args[1] if len(args) > 1 else None
    return list(index) if isinstance(index, tuple) else [index]


def _bool_indices(args: tuple) -> list:
    """The boolean tensors in the index of ``x[index]`` / ``x[index] = v``."""
    return [v for v in _index_items(args) if isinstance(v, torch.Tensor) and v.dtype == torch.bool]


def _repeats(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The tensor ``repeats`` of ``repeat_interleave(x, repeats, dim)`` (None: an int, or the one-argument form)."""
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    return repeats if isinstance(repeats, torch.Tensor) and repeats.numel() > 1 else None


def _read(func, args, kwargs) -> Optional[tuple[str, list]]:
    """(the construct's name, the tensors whose values decide the result) if ``func(*args,
    **kwargs)`` reads tensor values; None otherwise."""
    if func in _INDEXING:
        masks = _bool_indices(args)
        return (_INDEXING[func], masks) if masks else None
    if func in _SELECTS:
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        return _SELECTS[func], [mask]
    if func in _REPEATS:
        if len(args) == 1 and not kwargs:  # repeat_interleave(repeats): the output is made of the values
            return _REPEATS[func], list(args)
        repeats = _repeats(args, kwargs)
        return (_REPEATS[func] + " with tensor repeats", [repeats]) if repeats is not None else None
    if func is torch.where and len(args) == 1 and not kwargs:
        return "torch.where(condition)", list(args)
    name = _READS.get(func)
    return (name, [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]) if name else None


@dataclass(frozen=True)
class _MaskSlots:
    """What ``x[mask] = values`` (``_mask_write``) records: the row of ``values`` each position of
    the mask takes (``count`` = the number of masked positions, for the others)."""

    slot: T
    count: int


def _mask_write(args: tuple) -> Optional[tuple[T, T, Any]]:
    """``(x, mask, values)`` of ``x[mask] = values`` where ``mask`` covers the leading dims of
    ``x`` (``values``: one row per masked element, as ``x[mask] *= 0.0`` writes back the rows it
    read, or one broadcast to all of them); None for any other assignment."""
    x, index = args[0], args[1] if len(args) > 1 else None
    values = args[2] if len(args) > 2 else None
    if isinstance(index, tuple) and len(index) == 1:
        index = index[0]
    if not (isinstance(x, T) and isinstance(index, T) and index.dtype == torch.bool
            and isinstance(values, (T, bool, int, float))):
        return None
    m = index.dim()
    if tuple(index.shape) != tuple(x.shape[:m]) or (isinstance(values, T) and values.dim() > x.dim() - m + 1):
        return None
    return x, index, values


def true_runs(row: list[bool]) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of ``True`` in ``row``."""
    out, start = [], None
    for i, v in enumerate([*row, False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i - start))
            start = None
    return out


@dataclass(frozen=True)
class _MaskRuns:
    """What ``x[:, mask] = rows`` (``_run_write``) records: (start, length) of each run of ``True`` in the mask."""

    runs: tuple[tuple[int, int], ...]


def _run_write(args: tuple) -> Optional[tuple[T, int, T, T]]:
    """``(x, dim, mask, rows)`` of ``x[:, ..., mask] = rows`` with full slices before a 1-D boolean
    ``mask`` over dim ``dim`` of ``x`` (``dim`` >= 1) and ``rows`` listed per masked element in that dim
    (QwenImage 2.1 writes its image tokens into the joint sequence, ``joint[:, image_pad_mask] =
    hidden_states``); None for any other assignment."""
    x, index = args[0], args[1] if len(args) > 1 else None
    rows = args[2] if len(args) > 2 else None
    if not (isinstance(x, T) and isinstance(index, tuple) and len(index) >= 2 and isinstance(rows, T)):
        return None
    *lead, mask = index
    dim = len(lead)
    if not (all(v == slice(None) for v in lead) and isinstance(mask, T) and mask.dtype == torch.bool
            and mask.dim() == 1 and x.dim() > dim and mask.shape[0] == x.shape[dim]
            and rows.dim() == x.dim()):
        return None
    return x, dim, mask, rows


def _replay_run_write(x: T, dim: int, rows: T, runs: tuple[tuple[int, int], ...]) -> None:
    """``x[:, mask] = rows`` (``_run_write``) as ``x`` made anew of its own slices between the
    mask's runs and the rows each run takes, in order (a ``cat`` along ``dim``): the rows' token
    axis lands at the runs' offsets, as in a joint sequence built by ``cat``, instead of a write by
    the mask's integer indices, which names token positions."""
    pieces, end, taken = [], 0, 0
    for start, length in runs:
        pieces += [x.narrow(dim, end, start - end), rows.narrow(dim, taken, length)]
        end, taken = start + length, taken + length
    pieces.append(x.narrow(dim, end, x.shape[dim] - end))
    lead, trail = x.shape[:dim], x.shape[dim + 1:]
    x.copy_(torch.cat([p.to(x.dtype).expand(*lead, p.shape[dim], *trail) for p in pieces], dim))


def _record(func, args, kwargs):
    """What a read's replay needs (its result, or the integer indices of its mask / repeats), and its result."""
    if func is T.__setitem__ and (run := _run_write(args)) is not None and run[3].shape[run[1]] == int(run[2].sum()):
        return _MaskRuns(tuple(true_runs(run[2].tolist()))), func(*args, **kwargs)
    if func is T.__setitem__ and _mask_write(args) is not None:
        mask = args[1] if isinstance(args[1], T) else args[1][0]
        count = int(mask.sum())
        slot = torch.full(mask.shape, count, dtype=torch.long, device=mask.device)
        slot[mask] = torch.arange(count, device=mask.device)
        return _MaskSlots(slot, count), func(*args, **kwargs)
    out = func(*args, **kwargs)
    if func in _INDEXING:
        return [m.nonzero(as_tuple=True) for m in _bool_indices(args)], out
    if func in _SELECTS:
        x, mask = args[0], args[1] if len(args) > 1 else kwargs["mask"]
        return torch.broadcast_tensors(x, mask)[1].nonzero(as_tuple=True), out
    if func in _REPEATS and not (len(args) == 1 and not kwargs):
        dim = args[2] if len(args) > 2 else kwargs.get("dim")
        x = args[0]
        n = x.numel() if dim is None else x.shape[dim]
        return torch.arange(n, device=x.device).repeat_interleave(cast(torch.Tensor, _repeats(args, kwargs))), out
    return out, out


def _replay(func, args, kwargs, recorded):
    """The read's result from what ``_record`` kept: the op run with integer indices where it
    took a boolean mask or tensor repeats, or the recorded value itself."""
    run = _run_write(args) if isinstance(recorded, _MaskRuns) else None
    if run is not None:
        return _replay_run_write(run[0], run[1], run[3], recorded.runs)
    write = _mask_write(args) if isinstance(recorded, _MaskSlots) else None
    if write is not None:  # recorded for this write: the same shapes make it one again
        return _replay_mask_write(*write, recorded.slot, recorded.count)
    if func in _INDEXING:
        items, k, out = _index_items(args), 0, []
        for v in items:
            if isinstance(v, torch.Tensor) and v.dtype == torch.bool:
                out.extend(recorded[k])
                k += 1
            else:
                out.append(v)
        return func(args[0], tuple(out), *args[2:], **kwargs)
    if func in _SELECTS:
        x, mask = args[0], args[1] if len(args) > 1 else kwargs["mask"]
        return x.expand(torch.broadcast_shapes(x.shape, mask.shape))[recorded]
    if func in _REPEATS and not (len(args) == 1 and not kwargs):
        dim = args[2] if len(args) > 2 else kwargs.get("dim")
        x = args[0]
        return x.flatten().index_select(0, recorded) if dim is None else x.index_select(dim, recorded)
    return recorded


def _replay_mask_write(x: T, mask: T, values: Any, slot: T, count: int) -> None:
    """``x[mask] = values`` (``_mask_write``) as a write of every position of the mask's dims:
    ``slot`` (recorded, of the mask's shape) is the row of ``values`` each masked position takes
    (``count`` for the others: a row of zeros that the mask does not select). Unlike ``x[i, j] =
    values`` by the mask's integer indices, this keeps a per-token tensor per token: the mask and
    the slots are gathered with the active tokens (``op_rules._index_rule``), and the write is the
    same, exact, for every subset of them."""
    trailing = tuple(x.shape[mask.dim():])
    if isinstance(values, T):
        rows = torch.broadcast_to(values.to(x.dtype), (count, *trailing))
    else:
        rows = x.new_full((count, *trailing), values)
    table = torch.cat([rows, rows.new_zeros((1, *trailing))])
    keep = mask.reshape(*mask.shape, *(1,) * len(trailing))
    x.copy_(torch.where(keep, table[slot], x))


class _Reads(TorchFunctionMode):
    """Sees every read of tensor values made by the forward; keys each by its source line and
    its occurrence there (a loop reads one line several times)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def key(self, name: str) -> tuple:
        site = _site()
        n = self.counts[(site, name)]
        self.counts[(site, name)] += 1
        return (site, name, n)


class ReadsRecorder(_Reads):
    """Eager run: what every read needs to be replayed (``_record``); for ``.tolist()``, also
    the ``.item()`` of each element, as a fake tensor's ``tolist`` reads them one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.table: dict = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        read = _read(func, args, kwargs)
        if read is None:
            return func(*args, **kwargs)
        key = self.key(read[0])
        self.table[key], out = _record(func, args, kwargs)
        if func is T.tolist:
            for value in pytree.tree_leaves(out):
                self.table[self.key(_READS[T.item])] = value
        return out


def record(model: torch.nn.Module, kwargs: dict) -> dict:
    """Run ``model(**kwargs)`` eagerly and return the values of its reads."""
    recorder = ReadsRecorder()
    with torch.no_grad(), recorder:
        model(**kwargs)
    return recorder.table


class ReadsReplay(_Reads):
    """During ``torch.export``: a read of a fake tensor computed only from inputs whose values
    may be specialised (not in ``varying``, not the weights) returns the recorded value, a
    constant of the capture; the others are left to torch and listed in ``blocked``.
    ``table=None`` only observes (the first, plain export)."""

    def __init__(self, table: Optional[dict], leaves: dict, varying: Iterable[str]) -> None:
        super().__init__()
        self.table = table
        self.leaves = leaves  # graph placeholder node -> (leaf position, input name)
        self.varying = frozenset(varying)
        self.keyed: set[int] = set()  # leaf positions the baked values were computed from
        self.baked: list[str] = []  # "construct at file:line"
        self.blocked: list[str] = []  # the same, with what they read
        self.seen = 0  # reads of fake tensors

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        read = _read(func, args, kwargs)
        fakes = [a for a in read[1] if isinstance(a, FakeTensor)] if read is not None else []
        if read is None or not fakes:
            return func(*args, **kwargs)
        self.seen += 1
        key = self.key(read[0])
        (file, line, fn) = key[0]
        where = f"{read[0]} at {file}:{line} ({fn})"
        deps = self._dependencies(fakes)
        bad = sorted(d for d in deps if isinstance(d, str))
        if bad:
            self.blocked.append(f"{where} reads values computed from {', '.join(bad)}")
            return func(*args, **kwargs)
        if self.table is None or key not in self.table:
            return func(*args, **kwargs)
        self.keyed.update(d for d in deps if isinstance(d, int))
        self.baked.append(where)
        return _replay(func, args, kwargs, self.table[key])

    def _dependencies(self, fakes: list) -> set:
        """Leaf positions of the specialisable inputs ``fakes`` are computed from, and a
        description (str) of each input they must not depend on."""
        mode = get_proxy_mode()
        if mode is None:
            return set()
        todo = []
        for t in fakes:
            slot = get_proxy_slot(t, mode.tracer, None)
            if slot is not None:
                todo.append(slot.proxy.node)
        deps: set = set()
        seen = set()
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            if node.op == "placeholder":
                pos, name = self.leaves.get(node, (None, None))
                if pos is None:
                    deps.add("the model's weights")
                elif name in self.varying:
                    deps.add(f"the input {name!r}, which changes at every step")
                else:
                    deps.add(pos)
            todo.extend(node.all_input_nodes)
        return deps


def placeholder_leaves(kwargs: dict) -> dict:
    """At the start of the traced forward: graph placeholder node -> (leaf position, input
    name) of each tensor input (the leaves in ``input_signature``'s order)."""
    mode = get_proxy_mode()
    out: dict = {}
    if mode is None:
        return out
    for pos, (path, leaf) in enumerate(pytree.tree_flatten_with_path(kwargs)[0]):
        if isinstance(leaf, torch.Tensor):
            slot = get_proxy_slot(leaf, mode.tracer, None)
            if slot is not None:
                out[slot.proxy.node] = (pos, getattr(path[0], "key", "?") if path else "?")
    return out


def value_key(kwargs: dict, leaves: tuple, memo: Optional[dict] = None) -> tuple:
    """What a capture specialised on prompt values is keyed on: a digest of the values of the
    input leaves ``leaves``. ``memo`` (leaf position -> (tensor, data_ptr, version, digest))
    spares the device sync while the same tensor, unmodified, comes back (a prompt's mask
    is passed again at every step)."""
    flat = pytree.tree_leaves(kwargs)
    digests = []
    for pos in leaves:
        t = flat[pos]
        if not isinstance(t, torch.Tensor):
            digests.append(repr(t))
            continue
        version = None if t.is_inference() else t._version
        hit = memo.get(pos) if memo is not None else None
        if hit is not None and hit[0] is t and hit[1] == t.data_ptr() and version is not None and hit[2] == version:
            digests.append(hit[3])
            continue
        data = t.detach().to("cpu").contiguous()
        digest = hashlib.sha1(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        if memo is not None:
            memo[pos] = (t, t.data_ptr(), version, digest)
        digests.append(digest)
    return ("values", tuple(leaves), tuple(digests))
