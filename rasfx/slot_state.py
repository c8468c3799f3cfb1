"""Per-slot runtime state of a ``RASModule``: the active index, and per input signature the
caches and the step-invariant (hoisted) values; the checks of an active index's values."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .errors import InvalidIndexError, RASWarning


@dataclass
class SignatureBuffers:
    """What one slot keeps for one input signature: the caches and the step-invariant values.
    Allocated on the signature's first forward and kept across ``reset()`` (a new image):
    captured CUDA graphs read them in place."""

    caches: list
    # prologue code -> [the inputs it read (tensor, storage, version), the hoisted values, recompute streak]
    hoisted: dict = field(default_factory=dict)
    _ptrs: Optional[frozenset] = None

    def nbytes(self, hoisted: bool = False) -> int:
        tensors = [t for e in self.hoisted.values() for t in e[1]] if hoisted else self.caches
        return sum(t.numel() * t.element_size() for t in tensors)

    def storage_ptrs(self) -> frozenset:
        """Storages of every tensor held here (an output sharing one is copied before it is returned)."""
        if self._ptrs is None:
            tensors = [*self.caches, *(t for e in self.hoisted.values() for t in e[1])]
            self._ptrs = frozenset(t.untyped_storage().data_ptr() for t in tensors)
        return self._ptrs


@dataclass
class SlotState:
    """Runtime state of one cache slot (e.g. one CFG branch): the active set, and per input
    signature the caches. ``filled``: the caches of ``signature`` hold a whole step (a dense
    forward ran since the last ``reset()`` or signature change), so a RAS forward may read them."""

    signature: Any = None
    index: Optional[torch.Tensor] = None  # [n] or [B, n], int64, on the model's device; a copy
    checked_for: Optional[int] = None  # image-token count the index values were checked against (-1: trusted)
    filled: bool = False
    last_dense: bool = True
    forwards: int = 0
    buffers: dict = field(default_factory=dict)  # signature -> SignatureBuffers

    @property
    def caches(self) -> Optional[list]:
        b = self.buffers.get(self.signature)
        return b.caches if b is not None else None

    def cache_bytes(self) -> int:
        return sum(b.nbytes() for b in self.buffers.values())

    def hoisted_bytes(self) -> int:
        return sum(b.nbytes(hoisted=True) for b in self.buffers.values())



def hoisted_values(buffers: SignatureBuffers, hoisted, flat: list) -> list:
    """The prologue's values for these inputs: computed once, reused while every input it
    reads (prompt tensors and weights) is the same tensor, with the same storage, at the same
    version (an in-place change bumps the version: weight edits, ``load_state_dict``, a fused
    LoRA). Refreshed in place, so CUDA graphs that read them stay valid."""
    key = [_tensor_key(flat[i]) for i in hoisted.inputs]
    code = hoisted.prologue.code
    entry = buffers.hoisted.get(code)
    if entry is not None:
        same = [_same_key(a, b) for a, b in zip(entry[0], key)]
        if all(same):
            entry[2] = 0
            return entry[1]
        entry[2] += 1
        changed = {i for i, ok in zip(hoisted.inputs, same) if not ok}
        if entry[2] == _RECOMPUTE_WARN_AFTER and changed & set(hoisted.user_inputs):
            names = [n for i, n in zip(hoisted.user_inputs, hoisted.user_names) if i in changed]
            warnings.warn(
                f"rasfx: {', '.join(names)} changed on {entry[2]} consecutive forwards, so the work rasfx does "
                "once per prompt from them was redone each time. If they change at every denoising step, name "
                "them in TransformConfig(varying_inputs=...) (or set hoist_invariants=False).",
                RASWarning,
                stacklevel=3,
            )
    values = hoisted.prologue(*[flat[i] for i in hoisted.inputs])
    if entry is not None:
        for stored, value in zip(entry[1], values):
            stored.copy_(value)
        entry[0] = key
        return entry[1]
    buffers.hoisted[code] = [key, values, 0]  # inputs read, values, consecutive recomputes
    buffers._ptrs = None
    return values


def _tensor_key(x) -> tuple:
    """What identifies the value of an input: the object (held, so its id cannot be reused),
    its storage and its version counter (None: an inference tensor, which has none)."""
    if not isinstance(x, torch.Tensor):
        return (x, None, 0)
    return (x, x.data_ptr(), None if x.is_inference() else x._version)


def _same_key(a: tuple, b: tuple) -> bool:
    return a[0] is b[0] and a[1] == b[1] and a[2] is not None and a[2] == b[2]


def unaliased(outputs: list, internal: frozenset) -> list:
    """The outputs, with every tensor that shares storage with rasfx's state (an output read
    straight from the output cache) replaced by a copy: the caller may keep or edit it."""
    return [o.clone() if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in internal else o
            for o in outputs]


# A prompt that changes between images recomputes once per image; one that changes on every
# forward (a per-step input missing from varying_inputs) is worth a word after a few.
_RECOMPUTE_WARN_AFTER = 3


def check_index_values(index: torch.Tensor, n_img: Optional[int]) -> None:
    if index.numel() == 0:
        return
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or (n_img is not None and hi >= n_img):
        bound = f"[0, {n_img})" if n_img is not None else "[0, N)"
        raise InvalidIndexError(f"active index out of range: values span [{lo}, {hi}], image tokens are {bound}")
    rows = index.view(-1, index.shape[-1]).sort(dim=-1).values
    if bool((rows[:, 1:] == rows[:, :-1]).any()):
        raise InvalidIndexError("active index has duplicate token positions")

