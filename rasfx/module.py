"""RASModule: a transformed model with explicit, per-slot runtime state."""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .capture import bind_inputs, input_signature
from .errors import InvalidIndexError, RASWarning, TooFewTokensError
from .graph_build import CompiledCapture, compile_capture
from .runtime import GraphRunner

log = logging.getLogger("rasfx")
aten = torch.ops.aten


@dataclass
class SlotState:
    """Runtime state of one cache slot (e.g. one CFG branch): caches and the active set."""

    signature: Any = None
    caches: Optional[list] = None
    index: Optional[torch.Tensor] = None  # [n] or [B, n], int64, on the model's device
    index_checked: bool = False
    last_dense: bool = True
    forwards: int = 0
    # prologue code -> [the user inputs it read with their versions, the hoisted values, recompute streak]
    hoisted: dict = field(default_factory=dict)

    def cache_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.caches or [])

    def hoisted_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for entry in self.hoisted.values() for t in entry[1])


class RASModule(torch.nn.Module):
    """A model whose forward can compute a subset of its image tokens.

    ``forward`` has the model's signature and return structure. ``set_active`` chooses the
    image tokens of the next forwards; ``reset`` drops every cache. Weights are the model's
    own (shared, never copied); ``state_dict()`` is the model's.
    """

    def __init__(self, model: torch.nn.Module, config):
        super().__init__()
        self.model = model
        self.config = config
        self._captures: "OrderedDict[Any, CompiledCapture]" = OrderedDict()
        self._slots: dict[str, SlotState] = {}
        self._slot_name = "default"
        self._lock = threading.RLock()
        self._resolvers: dict = {}
        self._dense_only: dict[Any, str] = {}  # signature -> why it runs the plain model
        self._structure = _Structure()
        self.runner = GraphRunner(config.mode)

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
            raise ValueError(f"cache_context name must be a non-empty string, got {name!r}")
        previous = self._slot_name
        self._slot_name = name
        try:
            yield self
        finally:
            self._slot_name = previous

    def reset(self, captures: bool = False) -> None:
        """Drop every cache, active set and captured CUDA graph; the next forward is dense.

        ``captures=True`` also drops the captured graphs: the next forward captures the model
        again (needed only after a change rasfx cannot see, e.g. a plain attribute that the
        forward reads; submodule and attention-processor swaps are detected).
        """
        self._slots.clear()
        self.runner.clear()
        if captures:
            with self._lock:
                self._captures.clear()
                self._resolvers.clear()
                self._dense_only.clear()

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
        """Bytes held by the caches of every slot."""
        return sum(s.cache_bytes() for s in self._slots.values())

    def hoisted_bytes(self) -> int:
        """Bytes held by the step-invariant values of every slot (computed once per prompt,
        see ``TransformConfig.hoist_invariants``; a variant whose prologue is the same shares them)."""
        return sum(s.hoisted_bytes() for s in self._slots.values())

    def set_active(self, index: Optional[torch.Tensor], check: bool = True) -> None:
        """Image tokens computed by the following forwards of the current slot.

        ``index``: LongTensor ``[n]`` (shared by all batch rows) or ``[B, n]`` (per row) of
        image-token positions in the model's own token order; ``None`` = dense.
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
        # check=False: trusted by the caller (e.g. the sampler's top-k), never read back
        slot.index_checked = (not check) or self.num_image_tokens is not None

    # ------------------------------------------------------------------ forward
    def forward(self, *args, **kwargs):
        kwargs = bind_inputs(self.model, args, kwargs)
        sig = input_signature(self.model, kwargs)
        with self._lock:
            if self._structure.changed(self.model) and (self._captures or self._dense_only):
                warnings.warn(
                    f"rasfx: {type(self.model).__name__} changed since it was captured (a submodule or an "
                    "attention processor was replaced); capturing it again, this forward runs dense",
                    RASWarning,
                    stacklevel=2,
                )
                self.reset(captures=True)
            cc = self._get_capture(sig, kwargs)
        slot = self._slot
        if cc is None:  # this signature runs the plain model (see _get_capture)
            slot.signature, slot.caches, slot.index = sig, None, None
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
            if slot.signature is not None:
                slot.index = None
            slot.signature, slot.caches = sig, None
            slot.hoisted.clear()
        index = slot.index
        dense = index is None or slot.caches is None
        if not dense:
            self._check_index_for(cc, slot, index, kwargs)
        if dense:
            variant = cc.variant("dense")
        else:
            name = "shared" if index.dim() == 1 else "rowwise"
            variant = cc.variant(f"fused_{name}" if self._fuse(cc) else name)
        if slot.caches is None:
            self.runner.drop(self._slot_name)
            slot.caches = [c.allocate(cc.contiguous_attention) for c in variant.caches]
        args = [*flat, *slot.caches] if dense else [*flat, index, *slot.caches]
        if variant.hoisted is not None:
            args += _hoisted_values(slot, variant.hoisted, flat)
        # inputs only the hoisted prologue reads need no copy into a CUDA graph's buffers
        dynamic = [i for i in cc.dynamic_positions if i not in variant.unused] + ([] if dense else [len(flat)])
        key = (self._slot_name, variant.name, sig, None if dense else tuple(index.shape))
        # Inference only: the caches are written in place and carry no autograd history.
        with torch.no_grad():
            flat_out = self.runner.run(variant, args, dynamic, key)
        slot.last_dense = dense
        slot.forwards += 1
        return cc.capture.unflatten_outputs(flat_out)

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
            raise RuntimeError(self._dense_only[self._slot.signature])
        cc = self._current_capture()
        if cc is None:
            raise RuntimeError("token_map() needs one forward first (the map is derived from the captured graph)")
        if "token_map" not in cc.timings:
            cc.timings["token_map"] = _token_map(cc)
        return cc.timings["token_map"]

    # ------------------------------------------------------------------ internals
    def _get_capture(self, sig, kwargs) -> Optional[CompiledCapture]:
        """The capture of ``sig``, made on first use; None for a signature that runs dense."""
        if sig in self._dense_only:
            return None
        cc = self._captures.get(sig)
        if cc is None:
            log.info("rasfx: capturing %s for a new input signature", type(self.model).__name__)
            try:
                cc = compile_capture(self.model, kwargs, self.config.image_input, sig, self.config.kv_cache,
                                     self.config.op_rules, self.runner.contiguous_attention_caches,
                                     self.config.varying_inputs if self.config.hoist_invariants else None)
            except TooFewTokensError as e:
                self._dense_only[sig] = str(e)
                warnings.warn(f"rasfx: {e}; this input signature runs dense", RASWarning, stacklevel=3)
                return None
            self._captures[sig] = cc
            while len(self._captures) > self.config.max_captures:
                old, _ = self._captures.popitem(last=False)
                self._resolvers.pop(old, None)
        else:
            self._captures.move_to_end(sig)
        return cc

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
        index = index.to(torch.int64)
        if check:
            n_img = self.num_image_tokens
            _check_values(index, n_img)
        return index

    def _check_index_for(self, cc: CompiledCapture, slot: SlotState, index, kwargs) -> None:
        if index.dim() == 2 and index.shape[0] != cc.batch:
            raise InvalidIndexError(
                f"per-row active index has {index.shape[0]} rows but the batch has {cc.batch}"
            )
        if index.shape[-1] > cc.num_tokens:
            raise InvalidIndexError(f"active index has {index.shape[-1]} entries but there are {cc.num_tokens} image tokens")
        if not slot.index_checked:
            _check_values(index, cc.num_tokens)
            slot.index_checked = True

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


def _hoisted_values(slot: SlotState, hoisted, flat: list) -> list:
    """The prologue's values for these inputs: computed once, reused while every user input
    it reads is the same tensor at the same version (an in-place change bumps the version).
    Refreshed in place, so CUDA graphs that read them stay valid."""
    # inference tensors have no version counter: always recompute (never stale)
    key = [(flat[i], None if flat[i].is_inference() else flat[i]._version)
           if isinstance(flat[i], torch.Tensor) else (None, 0) for i in hoisted.user_inputs]
    code = hoisted.prologue.code
    entry = slot.hoisted.get(code)
    if entry is not None:
        same = [a is b and va is not None and va == vb for (a, va), (b, vb) in zip(entry[0], key)]
        if all(same):
            entry[2] = 0
            return entry[1]
        entry[2] += 1
        if entry[2] == _RECOMPUTE_WARN_AFTER:
            changed = [n for n, ok in zip(hoisted.user_names, same) if not ok]
            warnings.warn(
                f"rasfx: {', '.join(changed)} changed on {entry[2]} consecutive forwards, so the work rasfx does "
                "once per prompt from them was redone each time. If they change at every denoising step, name "
                "them in TransformConfig(varying_inputs=...) (or set hoist_invariants=False).",
                RASWarning,
                stacklevel=3,
            )
    with torch.no_grad():
        values = hoisted.prologue(*[flat[i] for i in hoisted.inputs])
    if entry is not None:
        for stored, value in zip(entry[1], values):
            stored.copy_(value)
        entry[0] = key
        return entry[1]
    slot.hoisted[code] = [key, values, 0]  # inputs read, values, consecutive recomputes
    return values


# A prompt that changes between images recomputes once per image; one that changes on every
# forward (a per-step input missing from varying_inputs) is worth a word after a few.
_RECOMPUTE_WARN_AFTER = 3


# Bumped whenever any nn.Module in the process registers a submodule (setattr, add_module,
# peft/LoRA layer swaps): lets every RASModule skip its structure walk while nothing changed.
_MODULE_REGISTRATIONS = [0]


def _count_registration(module, name, submodule):
    _MODULE_REGISTRATIONS[0] += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_registration)


class _Structure:
    """What a capture bakes in beyond the weights: the module tree (a replaced submodule,
    e.g. a LoRA layer, brings its own forward and parameters) and the attention processors
    (plain attributes, so they are compared on every forward; a few dozen identity tests).
    Holds the objects themselves, so an id cannot be reused while they are compared."""

    def __init__(self) -> None:
        self.version = -1
        self.modules: list = []
        self.processors: list = []

    def changed(self, model: torch.nn.Module) -> bool:
        """Whether the structure differs from the last call's (the first call records it)."""
        if self.version == _MODULE_REGISTRATIONS[0] and all(
            m.__dict__.get("processor") is p for m, p in self.processors
        ):
            return False
        first = self.version < 0
        modules, processors = _walk(model)
        changed = not first and (
            len(modules) != len(self.modules)
            or any(a is not b for a, b in zip(modules, self.modules))
            or len(processors) != len(self.processors)
            or any(a[1] is not b[1] for a, b in zip(processors, self.processors))
        )
        self.version, self.modules, self.processors = _MODULE_REGISTRATIONS[0], modules, processors
        return changed


def _walk(model: torch.nn.Module) -> tuple[list, list]:
    modules, processors, stack = [], [], [model]
    while stack:
        m = stack.pop()
        modules.append(m)
        p = m.__dict__.get("processor")
        if p is not None:
            processors.append((m, p))
        stack.extend(c for c in m._modules.values() if c is not None)
    return modules, processors


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
    """Run the graph tail after the output cache on a tensor of token ids."""
    variant = cc.variant("shared")
    outs = [c for c in variant.caches if c.kind == "output"]
    if not outs:
        raise RuntimeError("the model output does not come from image tokens; no token map")
    errors = []
    for spec in outs:  # the output site that feeds the first output
        try:
            return _probe_tail(cc, variant, spec)
        except RuntimeError as e:
            errors.append(str(e))
    raise RuntimeError("; ".join(errors))


def _probe_tail(cc: CompiledCapture, variant, spec) -> torch.Tensor:
    graph = variant.gm.graph
    start = next(n for n in graph.nodes if n.op == "placeholder" and n.name == spec.name)
    tail: dict[fx.Node, Any] = {}
    shape = [1] * len(spec.shape)
    shape[spec.dim] = spec.shape[spec.dim]
    n_img = cc.num_tokens
    ids = torch.arange(spec.shape[spec.dim], dtype=torch.float64)
    ids = torch.where(ids < n_img, ids, torch.full_like(ids, -1.0))  # conditioning positions -> -1
    # image segment of a concatenated output axis starts at its offset
    site = next(s for s in cc.plan.sites if s.producer == spec.producer)
    if site.axis.extra:
        pos = torch.arange(spec.shape[spec.dim], dtype=torch.float64) - site.axis.offset
        ids = torch.where((pos >= 0) & (pos < n_img), pos, torch.full_like(pos, -1.0))
    tail[start] = ids.view(shape).expand(spec.shape).contiguous()
    env = tail
    for node in graph.nodes:
        if node in env or node.op != "call_function":
            continue
        if not any(a in env for a in node.all_input_nodes):
            continue
        if node.target is torch.ops.rasfx.cache_write_.default:
            continue
        if any(a not in env for a in node.all_input_nodes):
            raise RuntimeError(f"token map: the output tail mixes in {node.name}; cannot derive the token map")
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
        raise RuntimeError("token map: the first output is not derived from the image tokens")
    result = env[node]
    if not torch.equal(result, result.round()):
        raise RuntimeError("token map: the output tail is not a pure data movement")
    return result.round().to(torch.int64).to(spec.device)
