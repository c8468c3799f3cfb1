"""Capture a model's forward as an ATen-level fx graph (``torch.export``, non-strict).

A capture is made per *input signature* (shapes, dtypes, devices of the tensor inputs,
values of the non-tensor inputs, train/eval mode): a new signature is captured anew, so a
graph specialised to one resolution is never run on another. Parameters are not copied:
the graph takes them as inputs and every call reads the live tensors of the model.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import sys
import sysconfig
import threading
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from .errors import CaptureError
from .prompt_values import ReadsReplay, placeholder_leaves, record

log = logging.getLogger("rasfx")


class _KwargsModule(torch.nn.Module):
    """Calls the model with keyword arguments only; export sees a plain kwargs signature.
    ``reads``: replays the forward's reads of tensor values (``prompt_values``)."""

    def __init__(self, model: torch.nn.Module, reads: Optional[ReadsReplay] = None):
        super().__init__()
        self.model = model
        self.reads = reads

    def forward(self, **kwargs):
        if self.reads is None:
            return self.model(**kwargs)
        self.reads.leaves = placeholder_leaves(kwargs)
        with self.reads:
            return self.model(**kwargs)


def bind_inputs(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Map positional and keyword arguments to the forward's parameter names."""
    if not args:
        return dict(kwargs)
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"arguments do not match {type(model).__name__}.forward: {e}") from None
    out = {}
    for name, value in bound.arguments.items():
        param = inspect.signature(model.forward).parameters[name]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            raise CaptureError(f"{type(model).__name__}.forward takes *{name}; pass its inputs by keyword")
        else:
            out[name] = value
    return out


def _leaf_key(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.dtype, x.device.type, x.device.index)
    if x is None or isinstance(x, (bool, int, float, str)):
        return ("C", type(x).__name__, x)
    return ("O", type(x).__name__, repr(x))


def input_signature(model: torch.nn.Module, kwargs: dict) -> tuple:
    """Hashable key of everything a capture specialises on."""
    leaves, spec = pytree.tree_flatten(kwargs)
    return (str(spec), tuple(_leaf_key(x) for x in leaves), model.training)


def describe_signature(sig: tuple) -> str:
    parts = []
    for key in sig[1]:
        if key[0] == "T":
            parts.append(f"{tuple(key[1])}:{str(key[2]).replace('torch.', '')}@{key[3]}")
    return ", ".join(parts)


# torch.export keeps tracing state in process-wide globals (the proxy dispatch mode, the
# "is exporting" flag): two exports at once, even of different models, corrupt each other.
# Every capture of every RASModule takes this lock.
EXPORT_LOCK = threading.RLock()

_DATA_DEPENDENT = ("data-dependent", "GuardOnDataDependentSymNode", "item()", "tolist", "nonzero", "Could not guard")


def export(model: torch.nn.Module, kwargs: dict) -> ExportedProgram:
    """Non-strict ``torch.export`` of ``model(**kwargs)``; clear error when it fails."""
    return export_specialised(model, kwargs)[0]


def export_specialised(model: torch.nn.Module, kwargs: dict, varying: Optional[Iterable[str]] = None,
                       specialise: bool = False) -> tuple[ExportedProgram, tuple[int, ...]]:
    """``export``, and where it fails on the forward's reads of tensor values (``.tolist()``,
    ``nonzero``, a boolean mask index...) and ``varying`` (the inputs that change at every
    step) is given: the forward exported again with the values it reads from the other inputs
    as constants (``rasfx.prompt_values``). Returns the program and the positions of the input
    leaves those values were computed from (``()``: none; the capture must be keyed on their
    values). ``specialise``: skip the plain attempt (a second capture of a specialised model)."""
    first: Optional[Exception] = None
    plain: Optional[ExportedProgram] = None
    if not specialise:
        try:
            plain = _export(model, kwargs, None)
        except CaptureError as e:
            if varying is None:
                raise
            first = e
        else:  # sizes computed from values (``nonzero`` on the prompt mask) are specialised too
            if _data_dependent_sizes(plain):
                plain = _folded_export(model, kwargs) or plain
            if varying is None or not _data_dependent_sizes(plain):
                return plain, ()
    try:
        table = record(model, kwargs)
    except Exception as e:  # the model itself fails on these inputs: the export's error says where
        if first is not None:
            raise first from None
        if specialise:  # inputs rasfx made (another resolution): a candidate that failed
            frame = model_frame(e)
            at = f" at {frame}" if frame else ""
            raise CaptureError(f"{type(model).__name__} fails on these inputs{at}: {type(e).__name__}: {e}") from e
        raise
    if not table:
        if plain is not None:
            return plain, ()
        if first is not None:
            raise first
    reads = ReadsReplay(table, {}, varying or ())
    try:
        ep = _export(model, kwargs, reads)
    except CaptureError as e:
        if plain is not None and not reads.blocked:
            return plain, ()
        if reads.blocked:
            raise CaptureError(
                f"{e.args[0]}\nData-dependent reads rasfx could not specialise (only values computed from inputs "
                "that stay the same between steps, such as the prompt's masks, can be): "
                + "; ".join(dict.fromkeys(reads.blocked))
            ) from e.__cause__
        raise
    if plain is not None and _data_dependent_sizes(ep):
        return plain, ()
    return ep, tuple(sorted(reads.keyed))


def _folded_export(model: torch.nn.Module, kwargs: dict) -> Optional[ExportedProgram]:
    """The forward exported with small tensors built from Python numbers kept as constants
    (fake tensors propagate a constant up to ``CONSTANT_NUMEL_LIMIT`` elements, 1 by default):
    HiDream builds ``img_sizes = torch.tensor([h, w]).repeat(B, 1)`` from the input's shape and
    slices its output by those values, sizes that are unknown to the trace otherwise. Those
    values follow from the input signature alone, so the capture stays valid for it. None: still
    data-dependent (or failed)."""
    from torch._subclasses import fake_tensor

    limit = fake_tensor.CONSTANT_NUMEL_LIMIT
    with EXPORT_LOCK:
        fake_tensor.CONSTANT_NUMEL_LIMIT = 4096
        try:
            ep = _export(model, kwargs, None)
        except CaptureError:
            return None
        finally:
            fake_tensor.CONSTANT_NUMEL_LIMIT = limit
    return None if _data_dependent_sizes(ep) else ep


def _data_dependent_sizes(ep: ExportedProgram) -> bool:
    """Whether a size in the graph is computed from tensor values (an unbacked symbol)."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    return any(free_unbacked_symbols(n.meta.get("val")) for n in ep.graph.nodes if "val" in n.meta)


def _export(model: torch.nn.Module, kwargs: dict, reads: Optional[ReadsReplay]) -> ExportedProgram:
    wrapper = _KwargsModule(model, reads)
    with EXPORT_LOCK, warnings.catch_warnings(), torch.no_grad(), _quiet_logs(), _restore_export_flag(), \
            _attributes_restored(model), _stderr_of_this_thread_dropped():
        warnings.simplefilter("ignore")
        try:
            return _inline_wrappers(torch.export.export(wrapper, (), kwargs, strict=False))
        except Exception as e:  # export raises many types; all mean "cannot capture"
            raise CaptureError(_export_failure(model, e)) from e


_KEEP = ("_parameters", "_buffers", "_modules")


@contextlib.contextmanager
def _attributes_restored(model: torch.nn.Module):
    """Models that cache a table on their first call (a RoPE helper object keeping
    ``freqs_cis``, an attribute set lazily in ``forward``) would keep the capture's fake
    tensors and fail in every later eager call. The attributes of every submodule, and of the
    plain objects they hold, are put back as they were before the capture (added ones removed)."""
    saved: list[tuple[dict, dict]] = []
    seen: set[int] = set()
    for mod in model.modules():
        for obj in (mod, *(v for k, v in vars(mod).items() if k not in _KEEP)):
            d = getattr(obj, "__dict__", None)
            if not isinstance(d, dict) or id(d) in seen or isinstance(obj, (torch.Tensor, type)):
                continue
            if obj is not mod and isinstance(obj, torch.nn.Module):
                continue  # a submodule: saved on its own
            seen.add(id(d))
            saved.append((d, {k: v for k, v in d.items() if k not in _KEEP}))
    try:
        yield
    finally:
        for d, before in saved:
            for key in [k for k in d if k not in before and k not in _KEEP]:
                del d[key]
            for key, value in before.items():
                if d.get(key) is not value:
                    d[key] = value


def _wrapper_hops() -> tuple:
    names = ("wrap_with_autocast", "wrap_with_set_grad_enabled")
    return tuple(op for op in (getattr(torch.ops.higher_order, n, None) for n in names) if op is not None)


def _inline_wrappers(ep: ExportedProgram) -> ExportedProgram:
    """``torch.autocast`` / ``torch.set_grad_enabled`` regions in the forward (the original
    Wan code wraps residual adds and its head in ``autocast(float32)``) are captured as
    wrapper higher-order ops whose bodies the planner cannot see into. Re-tracing the
    program with an empty decomposition table inlines them, with the dtype casts that
    autocast makes written out as ops, so the graph computes exactly what the forward did."""
    hops = _wrapper_hops()
    bodies = {n.name: _body_traces(ep, n) for n in ep.graph.nodes if n.op == "call_function" and n.target in hops}
    if not bodies:
        return ep
    ep = ep.run_decompositions({})
    for node in ep.graph.nodes:
        _restore_body_trace(node, bodies)
    return ep


def _body_traces(ep: ExportedProgram, hop: fx.Node) -> dict[str, str]:
    """The stack traces of the nodes of a wrapper op's body, by node name."""
    traces: dict[str, str] = {}
    for arg in hop.args:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            body = getattr(ep.graph_module, str(arg.target), None)
            if isinstance(body, fx.GraphModule):
                traces.update((n.name, n.meta["stack_trace"]) for n in body.graph.nodes if n.meta.get("stack_trace"))
    return traces


def _restore_body_trace(node: fx.Node, bodies: dict[str, dict[str, str]]) -> None:
    """Inlining traces a wrapper's body as generated code, so its nodes' stack traces point at
    that code (``<eval_with_key>``) instead of the model's: they get back the trace of the body node
    of the same name, or else of the body's first node with one (``model_line`` names it in errors)."""
    frames = re.findall(r'File "([^"]*)"', str(node.meta.get("stack_trace", "")))
    if not frames or not frames[-1].startswith("<"):
        return
    sources = list(node.meta.get("from_node") or ())
    while sources:
        source = sources.pop()
        traces = bodies.get(source.name)
        if traces:
            node.meta["stack_trace"] = traces.get(node.name) or next(iter(traces.values()))
            return
        sources.extend(getattr(source, "from_node", ()))


def model_frame(e: BaseException) -> str | None:
    """``file:line (function): code`` of the innermost frame of the model's own code in
    ``e``'s traceback (torch's, rasfx's and the standard library's frames skipped)."""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(__file__), sysconfig.get_paths()["stdlib"])
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        if not os.path.abspath(frame.filename).startswith(skip) and not frame.filename.startswith("<"):
            return f"{frame.filename}:{frame.lineno} ({frame.name}): {(frame.line or '').strip()}"
    return None


def _export_failure(model: torch.nn.Module, e: Exception) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    frame = model_frame(e)
    at = f" at {frame}" if frame else ""
    where = f"torch.export could not capture {type(model).__name__}.forward{at}: {type(e).__name__}: {first.rstrip('.')}. "
    lifted = _LIFTED.search(text)
    if lifted is not None:
        return f"torch.export could not capture {type(model).__name__}.forward: " + _lifted_constant(model, lifted.group(1))
    if any(k in text for k in _DATA_DEPENDENT):
        return where + (
            "rasfx needs a forward without data-dependent Python control flow (e.g. .item()/.tolist() on "
            "tensors); see docs/limitations.md."
        )
    return where + (
        "rasfx captures the forward with torch.export (non-strict); run torch.export.export on the model "
        "with the same inputs to see the full error, and see docs/limitations.md."
    )


# torch.export's check that no tensor made during tracing became a constant of the program
_LIFTED = re.compile(r"fake tensor in the exported program constant's list.*?model attribute: (?:model\.)?(\S+?)\."
                     r"lifted_tensor", re.S)


def _lifted_constant(model: torch.nn.Module, path: str) -> str:
    """What to say when torch.export lifted a tensor made in the forward of submodule ``path``
    as a constant: the ``.data`` writes of that module's code (CogVideoX 2B rebuilds its sin-cos
    table through ``joint.data[...].copy_()`` at any size but the one it was built for), with
    their lines, which torch.export cannot trace."""
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        mod = model
    lines = []
    for fn in vars(type(mod)).values():
        if not inspect.isfunction(fn):
            continue
        src, first = inspect.getsourcelines(fn)
        lines += [f"{inspect.getsourcefile(fn)}:{first + i} ({fn.__name__}): {line.strip()}"
                  for i, line in enumerate(src) if re.search(r"\.data\b", line)]
    found = f"; its code writes a tensor through .data at {'; '.join(lines)}" if lines else ""
    return (
        f"a tensor made in the forward of {path!r} ({type(mod).__name__}) was lifted as a constant torch.export "
        f"cannot trace{found}. A model that rebuilds a table this way at sizes other than the one it was built for "
        "(CogVideoX 2B's positions: sample_height, sample_width, sample_frames) can be captured only at that size: "
        "run it there, or build the model for the size you need; see docs/limitations.md."
    )


@contextlib.contextmanager
def _restore_export_flag():
    # A failed export can leave torch.compiler's "is exporting" flag set, after which every
    # torch.compile in the process is silently skipped.
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    try:
        yield
    finally:
        if flag is not None:
            torch.compiler._is_exporting_flag = flag


@dataclass
class Capture:
    """One exported graph, and how to call it with a model's live parameters. Holds the graph
    and the lifted constants, not the ``ExportedProgram`` (whose state dict would keep weights
    that the model has since replaced alive for as long as the capture)."""

    constants: dict
    graph_module: torch.fx.GraphModule
    # per graph input: ("param"|"buffer", fqn) | ("const", name) | ("user", position in flat leaves)
    input_sources: list[tuple[str, Any]]
    user_output_positions: list[int]
    out_spec: Any
    in_spec: Any
    signature: tuple
    extra: dict = field(default_factory=dict)
    # positions (in the flat input leaves) of the inputs whose values the graph was specialised
    # on (``rasfx.prompt_values``): the capture is valid for those values only
    value_leaves: tuple = ()

    @classmethod
    def from_program(cls, ep: ExportedProgram, signature: tuple, value_leaves: tuple = ()) -> "Capture":
        sources: list[tuple[str, Any]] = []
        user_pos = 0
        for spec in ep.graph_signature.input_specs:
            if spec.kind == InputKind.PARAMETER:
                sources.append(("param", spec.target.removeprefix("model.")))
            elif spec.kind == InputKind.BUFFER:
                sources.append(("buffer", spec.target.removeprefix("model.")))
            elif spec.kind == InputKind.CONSTANT_TENSOR:
                sources.append(("const", spec.target))
            elif spec.kind == InputKind.USER_INPUT:
                sources.append(("user", user_pos))
                user_pos += 1
            else:
                raise CaptureError(f"unsupported graph input kind {spec.kind} ({spec.arg}); rasfx supports plain modules")
        outs = [i for i, s in enumerate(ep.graph_signature.output_specs) if s.kind == OutputKind.USER_OUTPUT]
        for s in ep.graph_signature.output_specs:
            if s.kind not in (OutputKind.USER_OUTPUT,):
                raise CaptureError(
                    f"the forward mutates state ({s.kind.name} {s.target}); rasfx needs a forward without side effects"
                )
        return cls(
            constants=dict(ep.constants),
            graph_module=ep.graph_module,
            input_sources=sources,
            user_output_positions=outs,
            out_spec=ep.call_spec.out_spec,
            in_spec=ep.call_spec.in_spec,
            signature=signature,
            value_leaves=tuple(value_leaves),
        )

    def input_resolver(self, model: torch.nn.Module) -> Callable[[list], list]:
        """Returns f(flat user leaves) -> the graph's flat inputs, reading live parameters."""
        # each called with the flat user leaves (Callable[..., Any]: the lambdas bind their
        # values as default arguments, a signature mypy cannot match to Callable[[list], Any])
        getters: list[Callable[..., Any]] = []
        for kind, ref in self.input_sources:
            if kind in ("param", "buffer"):
                owner_path, _, name = ref.rpartition(".")
                owner = model.get_submodule(owner_path) if owner_path else model
                table = owner._parameters if kind == "param" else owner._buffers
                getters.append(lambda leaves, t=table, n=name: t[n])
            elif kind == "const":
                value = self.constants[ref]
                getters.append(lambda leaves, v=value: v)
            else:
                getters.append(lambda leaves, i=ref: leaves[i])
        return lambda leaves: [g(leaves) for g in getters]

    def unflatten_outputs(self, flat_outputs) -> Any:
        user = [flat_outputs[i] for i in self.user_output_positions]
        return pytree.tree_unflatten(user, self.out_spec)


def capture(model: torch.nn.Module, kwargs: dict) -> Capture:
    sig = input_signature(model, kwargs)
    return Capture.from_program(export(model, kwargs), sig)


class _DropThread:
    """A stream that drops what one thread writes and passes the rest on."""

    def __init__(self, stream, thread: int):
        self.stream, self.thread = stream, thread

    def write(self, text):
        return len(text) if threading.get_ident() == self.thread else self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def _stderr_of_this_thread_dropped():
    # A failed export prints its partial graph (the whole model) to stderr; the error we raise
    # says where it failed.
    stream = sys.stderr
    sys.stderr = _DropThread(stream, threading.get_ident())
    try:
        yield
    finally:
        sys.stderr = stream


@contextlib.contextmanager
def _quiet_logs():
    # A failed trial export logs full tracebacks from fake-tensor internals; the error we
    # raise already says what failed.
    names = ("torch._subclasses.fake_tensor", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
