"""RASModule: a transformed model with explicit, per-slot runtime state."""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.utils.hooks import RemovableHandle

from .capture import bind_inputs, input_signature
from .prompt_values import value_key
from .errors import CaptureError, InvalidIndexError, RASWarning, TooFewTokensError, UnsupportedModelError, UsageError
from .graph_build import CompiledCapture, compile_capture, conservative_report
from .runtime import GraphRunner, WorkCounts

log = logging.getLogger("rasfx")
aten = torch.ops.aten


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


class RASModule(torch.nn.Module):
    """A model whose forward can compute a subset of its image tokens.

    ``forward`` has the model's signature and return structure. ``set_active`` chooses the
    image tokens of the next forwards; ``reset`` starts a new image (the next forward is
    dense); ``release`` frees the memory rasfx holds. Weights are the model's own (shared,
    never copied); ``state_dict()`` is the model's.

    Lifetime of the state (docs/reliability.md): per input signature, the capture, its graph
    variants, CUDA graphs / compiled functions and each slot's caches are made once and kept
    across images; ``reset()`` invalidates the caches' contents without freeing them;
    ``release()`` frees caches, graphs and compiled functions (the exports stay);
    ``reset(captures=True)`` drops everything; the ``max_captures`` LRU drops whole signatures.
    Returned outputs never share memory with any of it.
    """

    def __init__(self, model: torch.nn.Module, config):
        super().__init__()
        self.model = model
        self.config = config
        self._init_state()

    def _init_state(self) -> None:
        self._captures: "OrderedDict[Any, CompiledCapture]" = OrderedDict()
        self._slots: dict[str, SlotState] = {}
        self._slot_name = "default"
        self._lock = threading.RLock()
        self._resolvers: dict = {}
        self._dense_only: dict[Any, str] = {}  # signature -> why it runs the plain model
        # signature -> input leaves whose values its captures are specialised on (prompt_values)
        self._value_leaves: dict[Any, tuple] = {}
        self._value_memo: dict = {}  # value_key's memo: the same mask tensor is not read again
        self._structure = _Structure()
        # (forward's function, its inspect.Signature): checks the kwargs of a call
        self._forward_signature: Optional[tuple[Any, inspect.Signature]] = None
        self.runner = GraphRunner(self.config.mode)

    # ------------------------------------------------------------------ copy and pickle
    def __getstate__(self):
        """Copies and pickles hold the model and the config; captures, caches and graphs are
        not copied (a copy captures again on its first forward, with its own caches)."""
        state = dict(self.__dict__)
        for name in ("_captures", "_slots", "_slot_name", "_lock", "_resolvers", "_dense_only", "_structure",
                     "_forward_signature", "runner", "_value_leaves", "_value_memo"):
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._init_state()

    # ------------------------------------------------------------------ state dict: the model's
    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------ public state API
    @property
    def _slot(self) -> SlotState:
        return self._slots.setdefault(self._slot_name, SlotState())

    @contextlib.contextmanager
    def cache_context(self, name: str):
        """Use an independent state slot (caches + active set), e.g. per CFG branch."""
        if not isinstance(name, str) or not name:
            raise UsageError(f"cache_context name must be a non-empty string, got {name!r}")
        previous = self._slot_name
        self._slot_name = name
        try:
            yield self
        finally:
            self._slot_name = previous

    def reset(self, captures: bool = False) -> None:
        """Start a new image: every slot's active set is dropped and its next forward is dense
        (it rewrites every cache row). Nothing is freed: caches, captured CUDA graphs and
        compiled functions are reused by the next image of an input signature already seen.

        ``captures=True`` also frees everything (``release()``) and drops the captures: the next
        forward captures the model again (needed only after a change rasfx cannot see, e.g. a
        plain attribute that the forward reads; submodule, processor and hook changes are
        detected).
        """
        for slot in self._slots.values():
            slot.signature, slot.index, slot.checked_for, slot.filled, slot.last_dense = None, None, None, False, True
        if captures:
            with self._lock:
                self.release()
                self._captures.clear()
                self._resolvers.clear()
                self._dense_only.clear()
                self._value_leaves.clear()
                self._value_memo.clear()

    def release(self) -> None:
        """Free the memory rasfx holds besides the model: every cache, step-invariant value,
        captured CUDA graph and compiled function. The exports (``torch.export`` captures and
        their graph variants) stay: the next forward of a known signature is dense, exports
        nothing, and captures its CUDA graphs / compiles again."""
        self._slots.clear()
        self.runner.clear()

    def work_counts(self) -> dict:
        """Work done so far (cumulative): ``exports`` (captures of the model with torch.export,
        each followed by the passes), ``graph_captures`` (CUDA graphs), ``compiles`` (shapes
        compiled by torch.compile), and their seconds (``export_s``, ``passes_s``,
        ``graph_capture_s`` (includes a compilation that happens during the capture), ``compile_s``)."""
        w = self.runner.work
        return {"exports": self._work["exports"], "export_s": self._work["export_s"],
                "passes_s": self._work["passes_s"], "graph_captures": w["graph_captures"],
                "graph_capture_s": w["graph_capture_s"], "compiles": w["compiled_shapes"], "compile_s": w["compile_s"]}

    @property
    def _work(self) -> WorkCounts:
        return self.runner.work  # one counter for the module's and the runner's work

    @property
    def num_image_tokens(self) -> Optional[int]:
        if self._slot.signature in self._dense_only:
            return 1
        cc = self._current_capture()
        return cc.num_tokens if cc is not None else None

    @property
    def last_forward_dense(self) -> bool:
        return self._slot.last_dense

    def cache_bytes(self) -> int:
        """Bytes held by the caches of every slot (every input signature seen and not evicted)."""
        return sum(s.cache_bytes() for s in self._slots.values())

    def hoisted_bytes(self) -> int:
        """Bytes held by the step-invariant values of every slot (computed once per prompt,
        see ``TransformConfig.hoist_invariants``; a variant whose prologue is the same shares them)."""
        return sum(s.hoisted_bytes() for s in self._slots.values())

    def set_active(self, index: Optional[torch.Tensor], check: bool = True) -> None:
        """Image tokens computed by the following forwards of the current slot.

        ``index``: LongTensor ``[n]`` (shared by all batch rows) or ``[B, n]`` (per row) of
        image-token positions in the model's own token order; ``None`` = dense. The tensor is
        copied: changing it afterwards changes nothing. Its values are checked against the
        image tokens of the forward that uses it.
        ``check=False`` skips the checks that read values (range, duplicates), which need a
        device sync; the sampler passes indices that are valid by construction.
        Raises ``InvalidIndexError`` (a ``ValueError``) before any state changes.
        """
        if index is None:
            self._slot.index = None
            return
        index = self._validate_index(index, check)
        slot = self._slot
        cc = self._captures.get(slot.signature)
        if cc is not None and index.dim() == 2 and index.shape[0] != cc.batch:
            raise InvalidIndexError(f"per-row active index has {index.shape[0]} rows but the batch has {cc.batch}")
        slot.index = index
        slot.checked_for = -1 if not check else self._slot_tokens()

    # ------------------------------------------------------------------ forward
    def forward(self, *args, **kwargs):
        kwargs = self._bind(args, kwargs)
        sig = self._signature(kwargs)
        with self._lock:
            changed = self._structure.changed(self.model, full=not self._slot.filled)
            if changed and (self._captures or self._dense_only):
                warnings.warn(
                    f"rasfx: {type(self.model).__name__} changed since it was captured ({changed}); capturing it "
                    "again, this forward runs dense",
                    RASWarning,
                    stacklevel=2,
                )
                self.reset(captures=True)
            cc = self._get_capture(sig, kwargs)
            if cc is not None:
                sig = cc.capture.signature  # keyed on prompt values on its first capture (_get_capture)
        slot = self._slot
        if cc is None:  # this signature runs the plain model (see _get_capture)
            slot.signature, slot.index, slot.filled = sig, None, False
            slot.last_dense = True
            slot.forwards += 1
            return self.model(**kwargs)
        leaves = pytree.tree_leaves(kwargs)
        flat = self._resolver(cc)(leaves)
        if slot.signature != sig:
            if slot.signature is not None and slot.index is not None:
                warnings.warn(
                    "rasfx: the input signature changed (resolution, batch, dtype or device); "
                    "running dense and dropping the active set",
                    stacklevel=2,
                )
                slot.index = None
            slot.signature, slot.filled = sig, False
        # the active set, when this step runs RAS (None: a dense step)
        index = slot.index if slot.filled and sig in slot.buffers else None
        dense = index is None
        if index is not None:
            self._check_index_for(cc, slot, index)
            name = "shared" if index.dim() == 1 else "rowwise"
            variant = self._variant(cc, f"fused_{name}" if self._fuse(cc) else name)
        else:
            variant = self._variant(cc, "dense")
        # Inference only: caches are written in place and carry no autograd history. They are
        # ordinary tensors even inside torch.inference_mode, so that a later call outside it
        # can still write them.
        with torch.inference_mode(False), torch.no_grad():  # (this order: inference_mode(False) enables grad)
            buffers = slot.buffers.get(sig)
            if buffers is None:
                buffers = slot.buffers[sig] = SignatureBuffers([c.allocate(cc.contiguous_attention) for c in variant.caches])
            # Inputs only the hoisted prologue reads (prompt tensors) are not passed to the step
            # graph: a CUDA graph neither copies them nor is captured again when they change.
            graph_inputs = list(flat)
            for i in variant.unused:
                if i < len(flat):
                    graph_inputs[i] = None
            graph_args = [*graph_inputs, *buffers.caches] if index is None else [*graph_inputs, index, *buffers.caches]
            if variant.hoisted is not None:
                graph_args += _hoisted_values(buffers, variant.hoisted, flat)
            dynamic = [i for i in cc.dynamic_positions if i not in variant.unused] + ([] if dense else [len(flat)])
            key = (self._slot_name, variant.name, sig, None if index is None else tuple(index.shape))
            slot.filled = False  # until the step completes: an exception leaves some caches half written
            flat_out = self.runner.run(variant, graph_args, dynamic, key)
        slot.last_dense = dense
        slot.filled = True
        slot.forwards += 1
        return cc.capture.unflatten_outputs(_unaliased(flat_out, buffers.storage_ptrs()))

    # ------------------------------------------------------------------ introspection
    def captures(self) -> list[CompiledCapture]:
        return list(self._captures.values())

    def _current_capture(self) -> Optional[CompiledCapture]:
        sig = self._slot.signature
        if sig is not None and sig in self._captures:
            return self._captures[sig]
        return next(reversed(self._captures.values()), None)

    def token_map(self) -> torch.Tensor:
        """For the last captured signature: a LongTensor shaped like the model's (first)
        output, each element the image token that produced it (-1: none)."""
        if self._slot.signature in self._dense_only:
            raise UnsupportedModelError(self._dense_only[self._slot.signature])
        cc = self._current_capture()
        if cc is None:
            raise UsageError("token_map() needs one forward first (the map is derived from the captured graph)")
        if "token_map" not in cc.timings:
            self._variant(cc, "shared")  # built here so that its passes count in work_counts()
            cc.timings["token_map"] = _token_map(cc)
        return cc.timings["token_map"]

    # ------------------------------------------------------------------ internals
    def _bind(self, args: tuple, kwargs: dict) -> dict:
        """The call's inputs by parameter name; an argument the model does not take raises the
        ``TypeError`` the model itself would raise."""
        if args:
            return bind_inputs(self.model, args, kwargs)
        forward = self.model.forward
        fn = getattr(forward, "__func__", forward)
        sig = self._forward_signature
        if sig is None or sig[0] is not fn:
            sig = self._forward_signature = (fn, inspect.signature(forward))
        try:
            sig[1].bind(**kwargs)
        except TypeError as e:
            raise TypeError(f"{type(self.model).__name__}.forward(): {e}") from None
        return dict(kwargs)

    def _signature(self, kwargs: dict) -> tuple:
        """The call's input signature; for inputs whose values earlier captures of it were
        specialised on (``rasfx.prompt_values``: a prompt mask read into Python), with a key
        of those values: another prompt is another signature."""
        sig = input_signature(self.model, kwargs)
        leaves = self._value_leaves.get(sig)
        return sig if leaves is None else (*sig, value_key(kwargs, leaves, self._value_memo))

    def _get_capture(self, sig, kwargs) -> Optional[CompiledCapture]:
        """The capture of ``sig``, made on first use; None for a signature that runs dense.
        A capture specialised on prompt values is stored under ``sig`` keyed on them (its
        ``capture.signature``)."""
        if sig in self._dense_only:
            return None
        cc = self._captures.get(sig)
        if cc is None:
            log.info("rasfx: capturing %s for a new input signature", type(self.model).__name__)
            t0 = time.perf_counter()
            try:
                cc = compile_capture(self.model, kwargs, self.config.image_input, sig, self.config.kv_cache,
                                     self.config.op_rules, self.runner.contiguous_attention_caches,
                                     self.config.varying_inputs if self.config.hoist_invariants else None)
            except TooFewTokensError as e:
                self._dense_only[sig] = str(e)
                warnings.warn(f"rasfx: {e}; this input signature runs dense", RASWarning, stacklevel=3)
                return None
            except CaptureError:
                own = _plain_model_error(self.model, kwargs)
                if own is not None:  # not rasfx's limitation: the inputs are wrong for the model itself
                    own.add_note(f"rasfx: {type(self.model).__name__} raises this on these inputs without rasfx "
                                 "too (so rasfx could not capture it); fix the inputs")
                    raise own from None
                raise
            finally:
                self._work["exports"] += 1
                self._work["export_s"] += time.perf_counter() - t0
            if cc.capture.value_leaves:
                base = input_signature(self.model, kwargs)
                leaves = tuple(sorted({*self._value_leaves.get(base, ()), *cc.capture.value_leaves}))
                self._value_leaves[base] = leaves
                sig = cc.capture.signature = (*base, value_key(kwargs, leaves, self._value_memo))
            self._captures[sig] = cc
            report = conservative_report(self.model, cc)
            if report is not None:
                warnings.warn(f"rasfx: {report}", RASWarning, stacklevel=3)
            while len(self._captures) > self.config.max_captures:
                old, evicted = self._captures.popitem(last=False)
                self._resolvers.pop(old, None)
                self.runner.drop_signature(old, list(evicted.variants.values()))
                for slot in self._slots.values():
                    slot.buffers.pop(old, None)
                    if slot.signature == old:  # its caches are gone: its next forward is dense
                        slot.filled = False
        else:
            self._captures.move_to_end(sig)
        return cc

    def _variant(self, cc: CompiledCapture, name: str):
        """A graph variant of ``cc``, built by the passes on first use (timed as ``passes_s``)."""
        if name in cc.variants:
            return cc.variants[name]
        t0 = time.perf_counter()
        try:
            return cc.variant(name)
        finally:
            self._work["passes_s"] += time.perf_counter() - t0

    def _resolver(self, cc: CompiledCapture):
        r = self._resolvers.get(cc.capture.signature)
        if r is None:
            r = self._resolvers[cc.capture.signature] = cc.capture.input_resolver(self.model)
        return r

    def _validate_index(self, index, check: bool) -> torch.Tensor:
        if not isinstance(index, torch.Tensor):
            raise InvalidIndexError(f"active index must be a torch.Tensor of token positions, got {type(index).__name__}")
        if index.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise InvalidIndexError(f"active index must have an integer dtype (int64), got {index.dtype}")
        if index.dim() not in (1, 2):
            raise InvalidIndexError(f"active index must be [n] or [B, n], got shape {tuple(index.shape)}")
        if index.shape[-1] == 0:
            raise InvalidIndexError("active index is empty: at least one image token must be computed (None = dense)")
        device = self._model_device()
        if device is not None and index.device != device:
            raise InvalidIndexError(f"active index is on {index.device}, the model on {device}; move it with .to()")
        index = index.to(torch.int64, copy=True)  # a snapshot: the caller may reuse its tensor
        if check:
            _check_values(index, self._slot_tokens())
        return index

    def _slot_tokens(self) -> Optional[int]:
        """Image tokens of the current slot's signature; None when it has none yet (after
        ``reset()``: the forward that uses an index checks its range)."""
        sig = self._slot.signature
        cc = self._captures.get(sig) if sig is not None else None
        return cc.num_tokens if cc is not None else None

    def _check_index_for(self, cc: CompiledCapture, slot: SlotState, index) -> None:
        """Checks the active index against the signature of the forward that uses it."""
        if index.dim() == 2 and index.shape[0] != cc.batch:
            raise InvalidIndexError(
                f"per-row active index has {index.shape[0]} rows but the batch has {cc.batch}"
            )
        if index.shape[-1] > cc.num_tokens:
            raise InvalidIndexError(f"active index has {index.shape[-1]} entries but there are {cc.num_tokens} image tokens")
        if slot.checked_for not in (-1, cc.num_tokens):
            _check_values(index, cc.num_tokens)
            slot.checked_for = cc.num_tokens

    def _fuse(self, cc: CompiledCapture) -> bool:
        fuse = self.config.fuse
        if fuse == "auto":
            from .passes.fuse_kernels import profitable

            return profitable(cc.device)
        return bool(fuse)

    def _model_device(self) -> Optional[torch.device]:
        for p in self.model.parameters():
            return p.device
        return None

    def extra_repr(self) -> str:
        return f"captures={len(self._captures)}, slots={list(self._slots)}"


def _hoisted_values(buffers: SignatureBuffers, hoisted, flat: list) -> list:
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


def _plain_model_error(model: torch.nn.Module, kwargs: dict) -> Exception | None:
    """The exception the model itself raises on ``kwargs`` (None if it runs)."""
    try:
        with torch.no_grad():
            model(**kwargs)
    except Exception as e:
        return e
    return None


def _tensor_key(x) -> tuple:
    """What identifies the value of an input: the object (held, so its id cannot be reused),
    its storage and its version counter (None: an inference tensor, which has none)."""
    if not isinstance(x, torch.Tensor):
        return (x, None, 0)
    return (x, x.data_ptr(), None if x.is_inference() else x._version)


def _same_key(a: tuple, b: tuple) -> bool:
    return a[0] is b[0] and a[1] == b[1] and a[2] is not None and a[2] == b[2]


def _unaliased(outputs: list, internal: frozenset) -> list:
    """The outputs, with every tensor that shares storage with rasfx's state (an output read
    straight from the output cache) replaced by a copy: the caller may keep or edit it."""
    return [o.clone() if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in internal else o
            for o in outputs]


# A prompt that changes between images recomputes once per image; one that changes on every
# forward (a per-step input missing from varying_inputs) is worth a word after a few.
_RECOMPUTE_WARN_AFTER = 3


# Bumped whenever any nn.Module in the process registers a submodule (setattr, add_module,
# peft/LoRA layer swaps): lets every RASModule skip its structure walk while nothing changed.
_MODULE_REGISTRATIONS = [0]


def _count_registration(module, name, submodule):
    _MODULE_REGISTRATIONS[0] += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_registration)


# Hook-based features of diffusers (HookRegistry: cache hooks, group offloading, layerwise
# casting) and accelerate (CPU offload): they replace forwards and move weights at run time.
_FOREIGN_HOOKS = {"_diffusers_hook": "a diffusers hook (enable_cache, group offloading or layerwise casting)",
                  "_hf_hook": "an accelerate hook (enable_model_cpu_offload / enable_sequential_cpu_offload)"}


class _Structure:
    """What a capture bakes in beyond the weights: the module tree (a replaced submodule,
    e.g. a LoRA layer, brings its own forward and parameters), the attention processors and
    forwards set on instances (plain attributes), and forward hooks and pre-hooks (run by
    ``Module.__call__``, so they are part of the captured graph).

    Checked on every forward at the cost of a few identity tests (and a few dict reads per
    LoRA layer): the full walk runs when a module was registered anywhere in the process (a
    global counter), when a hook was registered anywhere (``RemovableHandle.next_id``), or when
    ``full`` is asked for (the module asks on the first forward of an image; that walk also
    catches what the counters miss: instance forwards, processors set where there were none,
    diffusers / accelerate hooks, deleted submodules). Holds the objects themselves, so an id
    cannot be reused while they are compared."""

    def __init__(self) -> None:
        self.version = (-1, -1)
        self.records: list = []
        self.processors: list = []
        self.hooked: list = []  # (module, its hook keys) of the modules that had hooks
        self.tuners: list = []  # (module, its adapter state) of LoRA / PEFT layers
        self.global_hooks: tuple = ((), ())

    def changed(self, model: torch.nn.Module, full: bool = False) -> str:
        """What differs from the last call's structure ('' if nothing; the first call records it).
        Raises ``UnsupportedModelError`` for diffusers / accelerate hooks."""
        version = (_MODULE_REGISTRATIONS[0], RemovableHandle.next_id)
        if (not full and self.version == version
                and all(m.__dict__.get("processor") is p for m, p in self.processors)
                and all(_hook_keys(m) == k for m, k in self.hooked)
                and all(_tuner_state(m) == t for m, t in self.tuners)
                and _hook_keys(None) == self.global_hooks):
            return ""
        first = self.version[0] < 0
        records, global_hooks = _walk(model), _hook_keys(None)
        reason = ""
        if not first:
            reason = _difference(model, self.records, records) or (
                "a global module hook was added or removed" if global_hooks != self.global_hooks else "")
        self.version, self.records, self.global_hooks = version, records, global_hooks
        self.processors = [(r[0], r[1]) for r in records if r[1] is not None]
        self.hooked = [(r[0], r[3]) for r in records if r[3] != ((), ())]
        self.tuners = [(r[0], r[4]) for r in records if r[4] is not None]
        return reason


def _hook_keys(m: Optional[torch.nn.Module]) -> tuple:
    if m is None:
        g = torch.nn.modules.module
        return (tuple(g._global_forward_hooks), tuple(g._global_forward_pre_hooks))
    return (tuple(m._forward_hooks), tuple(m._forward_pre_hooks))


def refuse_foreign_hooks(model: torch.nn.Module, m: torch.nn.Module | None = None) -> None:
    """Raises ``UnsupportedModelError`` if ``m`` (default: any submodule of ``model``) carries a
    diffusers or accelerate hook, naming the module and the fix."""
    for sub in [m] if m is not None else model.modules():
        for attr, what in _FOREIGN_HOOKS.items():
            hook = sub.__dict__.get(attr)
            if hook is None or (attr == "_diffusers_hook" and not getattr(hook, "hooks", True)):
                continue  # a diffusers registry without hooks: what its cache_context() leaves behind
            name = next((n for n, x in model.named_modules() if x is sub), "") or type(model).__name__
            raise UnsupportedModelError(
                f"rasfx: {name} carries {what}. rasfx captures the model's forward as a graph and cannot run "
                "forwards that such hooks replace at run time. Remove them first (e.g. "
                "pipe.transformer.disable_cache(), or keep the model on its device instead of offloading "
                "it), or call rasfx.disable(pipe) before adding them; see docs/limitations.md."
            )


def _tuner_state(m: torch.nn.Module):
    """The Python state a LoRA / PEFT layer's forward branches on (scales, active adapters,
    disabled, merged), or None for other modules. ``set_adapters``, ``fuse_lora``,
    ``disable_adapters`` change it without touching the module tree. A few dict reads: it is
    compared on every forward for every such layer."""
    d = m.__dict__
    scaling = d.get("scaling")
    if not isinstance(scaling, dict) or "merged_adapters" not in d:
        return None
    active = d.get("_active_adapter")
    return (tuple(scaling.items()), tuple(active) if isinstance(active, list) else active,
            d.get("_disable_adapters", False), tuple(d["merged_adapters"]))


def _walk(model: torch.nn.Module) -> list:
    """Per module (depth first): (module, processor, instance forward, hook keys, adapter state)."""
    records, stack = [], [model]
    while stack:
        m = stack.pop()
        d = m.__dict__
        refuse_foreign_hooks(model, m)
        forward = d.get("forward") if m is not model else None  # the root's is rasfx's own in a pipeline
        records.append((m, d.get("processor"), forward, _hook_keys(m), _tuner_state(m)))
        stack.extend(c for c in m._modules.values() if c is not None)
    return records


def _difference(model: torch.nn.Module, old: list, new: list) -> str:
    def where(m) -> str:
        return next((n for n, x in model.named_modules() if x is m), "") or type(model).__name__

    if len(old) != len(new) or any(a[0] is not b[0] for a, b in zip(old, new)):
        return "a submodule was replaced"
    for a, b in zip(old, new):
        if a[1] is not b[1]:
            return f"the attention processor of {where(b[0])} was replaced"
        if a[2] is not b[2]:
            return f"the forward of {where(b[0])} was replaced"
        if a[3] != b[3]:
            return f"a forward hook or pre-hook of {where(b[0])} was added or removed"
        if a[4] != b[4]:
            return f"the adapters of {where(b[0])} were scaled, switched, merged or unmerged"
    return ""


def _check_values(index: torch.Tensor, n_img: Optional[int]) -> None:
    if index.numel() == 0:
        return
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or (n_img is not None and hi >= n_img):
        bound = f"[0, {n_img})" if n_img is not None else "[0, N)"
        raise InvalidIndexError(f"active index out of range: values span [{lo}, {hi}], image tokens are {bound}")
    rows = index.view(-1, index.shape[-1]).sort(dim=-1).values
    if bool((rows[:, 1:] == rows[:, :-1]).any()):
        raise InvalidIndexError("active index has duplicate token positions")


def _token_map(cc: CompiledCapture) -> torch.Tensor:
    """Run the graph tail after the output caches on tensors of token ids."""
    variant = cc.variant("shared")
    outs = [c for c in variant.caches if c.kind == "output"]
    if not outs:
        raise UnsupportedModelError("the model output does not come from image tokens; no token map")
    return _probe_tail(cc, variant, outs)


def _site_ids(cc: CompiledCapture, spec) -> torch.Tensor:
    """Token ids along the token axis of the output cache ``spec`` (-1: conditioning positions)."""
    shape = [1] * len(spec.shape)
    shape[spec.dim] = spec.shape[spec.dim]
    n_img = cc.num_tokens
    site = next(s for s in cc.plan.sites if s.producer == spec.producer)
    offsets = site.axis.offset if isinstance(site.axis.offset, tuple) else (site.axis.offset or 0,)
    if len(offsets) > 1 or site.axis.extra:  # image segment of a concatenated axis starts at its offset
        if len(offsets) > 1:
            raise UnsupportedModelError(f"token map: the output cache {spec.name} holds its image segment at another "
                                        "offset in each row")
        pos = torch.arange(spec.shape[spec.dim], dtype=torch.float64) - offsets[0]
        ids = torch.where((pos >= 0) & (pos < n_img), pos, torch.full_like(pos, -1.0))
    else:
        ids = torch.arange(spec.shape[spec.dim], dtype=torch.float64)
        ids = torch.where(ids < n_img, ids, torch.full_like(ids, -1.0))
    return ids.view(shape).expand(spec.shape).contiguous()


def _probe_tail(cc: CompiledCapture, variant, outs: list) -> torch.Tensor:
    """Every output cache holds its token ids; the ops after them that read only such ids are
    run (a model whose tail joins several caches, Lumina 2's per-sample output rows stacked);
    an op that mixes ids with other values is left out, and an error only if the first output
    needs it."""
    graph = variant.gm.graph
    env: dict[fx.Node, Any] = {}
    for spec in outs:
        start = next(n for n in graph.nodes if n.op == "placeholder" and n.name == spec.name)
        env[start] = _site_ids(cc, spec)
    mixed: list[fx.Node] = []
    for node in graph.nodes:
        if node in env or node.op != "call_function":
            continue
        if not any(a in env for a in node.all_input_nodes):
            continue
        if node.target is torch.ops.rasfx.cache_write_.default:
            continue
        if any(a not in env for a in node.all_input_nodes):
            mixed.append(node)
            continue
        args, kwargs = pytree.tree_map_only(fx.Node, lambda a: env[a], (node.args, node.kwargs))
        if node.target in (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout):
            env[node] = args[0]
            continue
        env[node] = node.target(*args, **kwargs)
    output = next(n for n in graph.nodes if n.op == "output")
    flat = pytree.tree_leaves(output.args[0])
    first = cc.capture.user_output_positions[0]
    node = flat[first]
    if node not in env:
        ancestors, todo = set(), [node]
        while todo:
            n = todo.pop()
            if n not in ancestors:
                ancestors.add(n)
                todo.extend(n.all_input_nodes)
        mixed = [n for n in mixed if n in ancestors]
        if mixed:
            raise UnsupportedModelError(f"token map: the output tail mixes in {mixed[0].name}; cannot derive the token map")
        raise UnsupportedModelError("token map: the first output is not derived from the image tokens")
    result = env[node]
    if not torch.equal(result, result.round()):
        raise UnsupportedModelError("token map: the output tail is not a pure data movement")
    return result.round().to(torch.int64).to(outs[0].device)
