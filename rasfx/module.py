"""RASModule: a transformed model with explicit, per-slot runtime state."""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
import warnings
from collections import OrderedDict
from typing import Any, Optional

import torch
import torch.utils._pytree as pytree

from .capture import bind_inputs, input_signature
from .prompt_values import value_key
from .errors import CaptureError, InvalidIndexError, RASWarning, TooFewTokensError, UnsupportedModelError, UsageError
from .planned_capture import PlannedCapture, conservative_report, plan_capture, tokenwise_report
from .model_structure import ModelStructure
from .runtime import GraphKey, GraphRunner, WorkCounts
from .target import ExecutionTarget
from .slot_state import SignatureBuffers, SlotState, check_index_values, hoisted_values, unaliased
from .token_map import token_map_of
from .tokenwise_modules import TokenwiseModules

log = logging.getLogger("rasfx")


class RASModule(torch.nn.Module):
    """A model whose forward can compute a subset of its image tokens.

    ``forward`` has the model's signature and return structure. ``set_active`` chooses the
    image tokens of the next forwards; ``reset`` starts a new image (the next forward is
    dense); ``release`` frees the memory rasfx holds. Weights are the model's own (shared,
    never copied); ``state_dict()`` is the model's. ``target`` (an ``ExecutionTarget``): how
    its graphs run (mode, fused variants, cache layout), decided once from the config.

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
        self._captures: "OrderedDict[Any, PlannedCapture]" = OrderedDict()
        self._slots: dict[str, SlotState] = {}
        self._slot_name = "default"
        self._lock = threading.RLock()
        self._resolvers: dict = {}
        self._dense_only: dict[Any, str] = {}  # signature -> why it runs the plain model
        # signature -> input leaves whose values its captures are specialised on (prompt_values)
        self._value_leaves: dict[Any, tuple] = {}
        self._value_memo: dict = {}  # value_key's memo: the same mask tensor is not read again
        self._structure = ModelStructure()
        # (forward's function, its inspect.Signature): checks the kwargs of a call
        self._forward_signature: Optional[tuple[Any, inspect.Signature]] = None
        # how the graphs run, decided here once (the runner runs the mode; the compiler gets the
        # cache layout when it plans a capture; forward picks the fused variants)
        self.target = ExecutionTarget.of(self.config)
        self.runner = GraphRunner(self.target.mode)
        self.parallel: Optional[Any] = None  # a rasfx.parallel.ParallelRuntime: context parallelism across its ranks
        # the modules captured as one token-wise op (TransformConfig.tokenwise_modules, and those chosen
        # after failed exports: kept for later signatures)
        self._tokenwise = TokenwiseModules(self.model, self.config.tokenwise_modules)

    # ------------------------------------------------------------------ copy and pickle
    def __getstate__(self):
        """Copies and pickles hold the model and the config; captures, caches and graphs are
        not copied (a copy captures again on its first forward, with its own caches)."""
        state = dict(self.__dict__)
        for name in ("_captures", "_slots", "_slot_name", "_lock", "_resolvers", "_dense_only", "_structure",
                     "_forward_signature", "target", "runner", "parallel", "_value_leaves", "_value_memo",
                     "_tokenwise"):
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
        if self.parallel is not None:  # context parallelism: this rank's share of the tokens (rasfx/parallel)
            name, index = self.parallel.shard(cc, index)
            variant = self._variant(cc, name)
        elif index is not None:
            name = "shared" if index.dim() == 1 else "rowwise"
            variant = self._variant(cc, f"fused_{name}" if self.target.fuses(cc.device) else name)
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
            graph_args = variant.call_args(
                graph_inputs, active_index=index, caches=buffers.caches,
                hoisted_values=None if variant.hoisted is None else hoisted_values(buffers, variant.hoisted, flat))
            # the index input (with context parallelism the group plan, dense steps too) is dynamic
            dynamic = [i for i in cc.dynamic_positions if i not in variant.unused] + ([] if index is None else [len(flat)])
            key = GraphKey(slot=self._slot_name, variant=variant.name, signature=sig,
                           index_shape=None if index is None else tuple(index.shape))
            slot.filled = False  # until the step completes: an exception leaves some caches half written
            with self.parallel.running(variant) if self.parallel is not None else contextlib.nullcontext():
                flat_out = self.runner.run(variant, graph_args, dynamic, key)
        slot.last_dense = dense
        slot.filled = True
        slot.forwards += 1
        return cc.capture.unflatten_outputs(unaliased(flat_out, buffers.storage_ptrs()))

    # ------------------------------------------------------------------ introspection
    def captures(self) -> list[PlannedCapture]:
        return list(self._captures.values())

    def _current_capture(self) -> Optional[PlannedCapture]:
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
        if cc.token_map is not None:
            return cc.token_map
        self._variant(cc, "shared")  # built here so that its passes count in work_counts()
        return token_map_of(cc)  # warns its approximations once per capture (the map is kept)

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

    def _get_capture(self, sig, kwargs) -> Optional[PlannedCapture]:
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
                cc = plan_capture(
                    self.model, kwargs, self.config.image_input, sig, kv_cache=self.config.kv_cache,
                    op_rules=self.config.op_rules, contiguous_attention=self.target.contiguous_attention,
                    varying_inputs=self.config.varying_inputs if self.config.hoist_invariants else None,
                    tokenwise=self._tokenwise)
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
            for report in (conservative_report(self.model, cc), tokenwise_report(self.model, cc)):
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

    def _variant(self, cc: PlannedCapture, name: str):
        """A graph variant of ``cc``, built by the passes on first use (timed as ``passes_s``)."""
        if name in cc.variants:
            return cc.variants[name]
        t0 = time.perf_counter()
        try:
            return cc.variant(name)
        finally:
            self._work["passes_s"] += time.perf_counter() - t0

    def _resolver(self, cc: PlannedCapture):
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
            check_index_values(index, self._slot_tokens())
        return index

    def _slot_tokens(self) -> Optional[int]:
        """Image tokens of the current slot's signature; None when it has none yet (after
        ``reset()``: the forward that uses an index checks its range)."""
        sig = self._slot.signature
        cc = self._captures.get(sig) if sig is not None else None
        return cc.num_tokens if cc is not None else None

    def _check_index_for(self, cc: PlannedCapture, slot: SlotState, index) -> None:
        """Checks the active index against the signature of the forward that uses it."""
        if index.dim() == 2 and index.shape[0] != cc.batch:
            raise InvalidIndexError(
                f"per-row active index has {index.shape[0]} rows but the batch has {cc.batch}"
            )
        if index.shape[-1] > cc.num_tokens:
            raise InvalidIndexError(f"active index has {index.shape[-1]} entries but there are {cc.num_tokens} image tokens")
        if slot.checked_for not in (-1, cc.num_tokens):
            check_index_values(index, cc.num_tokens)
            slot.checked_for = cc.num_tokens

    def _model_device(self) -> Optional[torch.device]:
        for p in self.model.parameters():
            return p.device
        return None

    def extra_repr(self) -> str:
        return f"captures={len(self._captures)}, slots={list(self._slots)}"


def _plain_model_error(model: torch.nn.Module, kwargs: dict) -> Exception | None:
    """The exception the model itself raises on ``kwargs`` (None if it runs)."""
    try:
        with torch.no_grad():
            model(**kwargs)
    except Exception as e:
        return e
    return None

