"""Modules captured as one opaque token-wise op.

Some modules cannot be captured by ``torch.export`` but need not be: HiDream's MoE
feed-forward routes its tokens to experts with ``bincount().cpu().numpy()`` (values read into
Python, per token), yet each token's output depends only on that token and the weights. Such a
module is captured as one graph node, ``rasfx::tokenwise_module(x, key)``: its real
implementation calls the module's own forward eagerly on the rows it receives, its fake one
gives the output's shape. ``passes.op_rules`` classifies the node as token-wise, so on a RAS step
it runs on the active tokens only.

Which modules (``TokenwiseModules``): the ones ``TransformConfig.tokenwise_modules`` names (a
class, a class name or a module path), and, automatically, the module in which an export failed
on a read of tensor values (found from the failure's traceback, innermost first), with every
module of its class. Each is checked eagerly on the model's real inputs before it is used
(``_probe``): every call takes one tensor ``[..., N, C]`` and returns one ``[..., N, C']``, and
the outputs of a random subset of the token rows (of all batch rows) are those of the full call
when they are given beside other tokens (zeros, then large random rows), in a random order,
within the dtype's precision. A module that
fails is refused (a named one: ``UnsupportedModelError``; an automatic candidate: the export's
error stands, with the reason appended).

The node synchronises with the host whenever the module does (HiDream's ``.cpu()``): the graph
runner does not capture a graph holding it as a CUDA graph (``runtime.GraphRunner``); under
``torch.compile`` it is one opaque call (its fake implementation gives the shapes).
"""

from __future__ import annotations

import contextlib
import itertools
import traceback
import types
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.fx as fx

from .capture import model_frame
from .errors import CaptureError, UnsupportedModelError

# key -> module; module -> key (stable: the two captures of a signature give the node the same
# int argument, which the token analysis would otherwise take for a size); key -> output spec
_MODULES: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
_KEYS: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()
_OUT_SPECS: dict[int, tuple[int, Optional[torch.dtype]]] = {}  # key -> (C', dtype or None: the input's)
_NEXT_KEY = itertools.count()

# markers of an export failure on a read of tensor values (the capture error's text)
_VALUE_READS = ("data-dependent", "guardondatadependentsymnode", "item()", "tolist", "nonzero", "could not guard",
                "tensor subclasses", ".numpy()")


def _key_of(module: torch.nn.Module) -> int:
    key = _KEYS.get(module)
    if key is None:
        key = _KEYS[module] = next(_NEXT_KEY)
        _MODULES[key] = module
        weakref.finalize(module, _OUT_SPECS.pop, key, None)  # the spec goes with the module
    return key


def eager_forward(module: torch.nn.Module) -> Callable:
    """The module's own forward, not the one ``TokenwiseModules.applied`` puts in its place."""
    forward = module.__dict__.get("forward")
    if forward is not None and hasattr(forward, "rasfx_original"):
        forward = forward.rasfx_original
    return forward if forward is not None else types.MethodType(type(module).forward, module)


@torch.library.custom_op("rasfx::tokenwise_module", mutates_args=())
def tokenwise_module(x: torch.Tensor, key: int) -> torch.Tensor:
    """The module registered under ``key``, run eagerly on ``x``'s rows."""
    module = _MODULES.get(key)
    if module is None:
        raise UnsupportedModelError(f"the module of rasfx::tokenwise_module {key} no longer exists; capture again "
                                    "(RASModule.reset(captures=True))")
    with torch.no_grad():
        out = eager_forward(module)(x)
    # a custom op may not return its input or a view of it
    return out.clone() if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() else out


@tokenwise_module.register_fake
def _(x: torch.Tensor, key: int) -> torch.Tensor:
    if key not in _OUT_SPECS:
        module = _MODULES.get(key)
        raise UnsupportedModelError(
            f"{type(module).__name__ if module is not None else 'a module'} runs as one token-wise op during the "
            "capture, but the eager forward on the same inputs never called it, so its output could not be checked "
            "or sized; take it out of TransformConfig.tokenwise_modules")
    channels, dtype = _OUT_SPECS[key]
    return x.new_empty((*x.shape[:-1], channels), dtype=dtype or x.dtype)


TOKENWISE_OP = torch.ops.rasfx.tokenwise_module.default


def module_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The ``rasfx::tokenwise_module`` nodes of ``gm``."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is TOKENWISE_OP]


def node_module(node: fx.Node) -> str:
    """``path (Class)`` of the module a ``rasfx::tokenwise_module`` node runs."""
    module = _MODULES.get(node.args[1]) if isinstance(node.args[1], int) else None
    stack = node.meta.get("nn_module_stack")
    path = str(list(stack.values())[-1][0]).removeprefix("model.") if stack else "?"
    return f"{path} ({type(module).__name__})"


@dataclass(frozen=True)
class Choice:
    """One module run as a token-wise op: its path, its class name and why."""

    path: str
    cls: str
    reason: str


class TokenwiseModules:
    """The modules of one model captured as ``rasfx::tokenwise_module`` (module docstring):
    ``selectors`` (``TransformConfig.tokenwise_modules``: classes, class names, module paths)
    and the classes chosen after failed exports (kept across input signatures)."""

    def __init__(self, model: torch.nn.Module, selectors: tuple = ()):
        self.model = model
        self.selectors = tuple(selectors)
        self.auto: dict[type, str] = {}  # class -> why it was chosen

    def _selected(self) -> list[tuple[str, torch.nn.Module, str]]:
        out, matched = [], set()
        for path, module in self.model.named_modules():
            if not path:
                continue
            for sel in self.selectors:
                if sel is type(module) or sel == type(module).__name__ or sel == path:
                    matched.add(sel if isinstance(sel, str) else sel.__name__)
                    out.append((path, module, "named in TransformConfig.tokenwise_modules"))
                    break
            else:
                if type(module) in self.auto:
                    out.append((path, module, self.auto[type(module)]))
        missing = [s if isinstance(s, str) else s.__name__ for s in self.selectors
                   if (s if isinstance(s, str) else s.__name__) not in matched]
        if missing:
            raise UnsupportedModelError(
                f"TransformConfig.tokenwise_modules names {missing}, which match no submodule of "
                f"{type(self.model).__name__} (by class, class name or path such as 'blocks.0.ff'); fix the names")
        return out

    def choices(self) -> list[Choice]:
        """The modules captured as one token-wise op, with why."""
        return [Choice(path, type(m).__name__, reason) for path, m, reason in self._selected()]

    def prepare(self, kwargs: dict) -> None:
        """Check the selected modules on the model's inputs ``kwargs`` (``_probe``) and record
        their output shapes for the fake implementation. Raises ``UnsupportedModelError``
        naming a module that is not token-wise."""
        selected = self._selected()
        if selected:
            failures = _probe(self.model, [m for _, m, _ in selected], kwargs)
            for path, module, _ in selected:
                if id(module) in failures:
                    raise UnsupportedModelError(
                        f"{path} ({type(module).__name__}) cannot run as one token-wise op: {failures[id(module)]}; "
                        "take it out of TransformConfig.tokenwise_modules")

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The chosen modules' forwards replaced by the op while a capture runs."""
        patched = []
        for path, module, _ in self._selected():
            original = module.__dict__.get("forward")
            module.forward = _op_forward(_key_of(module), original)
            patched.append((module, original))
        try:
            yield
        finally:
            for module, original in patched:
                if original is None:
                    del module.forward
                else:
                    module.forward = original

    def choose_after(self, error: CaptureError, kwargs: dict) -> bool:
        """After a failed export: choose the innermost module of ``error``'s traceback that
        is token-wise (with every module of its class) when the export failed on a read of
        tensor values. True: chosen, export again; False: nothing to choose (``error`` stands,
        with a note naming the modules that were tried and why they do not qualify)."""
        if not any(m in str(error).lower() for m in _VALUE_READS):
            return False
        names = {id(m): p for p, m in self.model.named_modules() if p}
        tried = []
        for module in _failing_modules(error, names):
            cls = type(module)
            if cls in self.auto:
                continue
            group = [m for m in self.model.modules() if type(m) is cls]
            failures = _probe(self.model, group, kwargs, uncalled=True)
            if not failures:
                self.auto[cls] = f"torch.export failed in it: {_torch_error(error)}"
                return True
            failed, why = next(iter(failures.items()))  # the module of the class that failed the check
            tried.append(f"{names.get(failed, names[id(module)])} ({cls.__name__}): {why}")
        if tried:
            error.add_note("rasfx: the failing modules cannot run as one token-wise op either (TransformConfig."
                           "tokenwise_modules): " + "; ".join(tried))
        return False


def _op_forward(key: int, original: Any) -> Callable:
    def forward(x, *args, **kwargs):
        if args or kwargs or not isinstance(x, torch.Tensor):
            raise UnsupportedModelError("a module run as one token-wise op takes one tensor argument")
        return tokenwise_module(x, key)

    forward.rasfx_original = original  # type: ignore[attr-defined]
    return forward


def _torch_error(error: BaseException) -> str:
    """``ExcType: first line at file:line (function)`` of the torch error behind a capture error."""
    exc: BaseException = error
    while isinstance(exc, CaptureError) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    frame = model_frame(exc)
    return f"{type(exc).__name__}: {text[0] if text else ''}" + (f" at {frame}" if frame else "")


def _failing_modules(error: BaseException, names: dict[int, str]) -> list[torch.nn.Module]:
    """The submodules whose code is on the stack of ``error`` (and its causes), innermost first."""
    found: list[torch.nn.Module] = []
    seen: set[int] = set()
    exc: Optional[BaseException] = error
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        frames = [f for f, _ in traceback.walk_tb(exc.__traceback__)]
        for frame in reversed(frames):
            module = frame.f_locals.get("self")
            if isinstance(module, torch.nn.Module) and id(module) in names and module not in found:
                found.append(module)
        exc = exc.__cause__ or exc.__context__
    return found


def _tolerance(dtype: torch.dtype) -> float:
    return 16 * torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def _probe(model: torch.nn.Module, modules: list, kwargs: dict, uncalled: bool = False) -> dict[int, str]:
    """Run ``model(**kwargs)`` eagerly; at every call of one of ``modules`` check that it is
    token-wise (module docstring) and record its output spec. ``{id(module): why not}``; with
    ``uncalled``, a module the forward never calls (so not checked) counts as a failure too."""
    failures: dict[int, str] = {}
    called: set[int] = set()
    gen = torch.Generator().manual_seed(0)

    def hook(module, args, kw, out):
        called.add(id(module))
        if id(module) in failures:
            return
        why = _check_call(module, args, kw, out, gen)
        if why is not None:
            failures[id(module)] = why
            return
        dtype = None if out.dtype == args[0].dtype else out.dtype
        spec = (int(out.shape[-1]), dtype)
        key = _key_of(module)
        if _OUT_SPECS.setdefault(key, spec) != spec:
            _OUT_SPECS[key] = spec  # the model changed (dtype, width): the last call's spec

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    try:
        with torch.no_grad():
            model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    for m in modules if uncalled else ():
        if id(m) not in called:
            failures.setdefault(id(m), "an eager forward on these inputs never calls it, so it could not be checked")
    return failures


def _check_call(module, args, kw, out, gen: torch.Generator) -> Optional[str]:
    if kw or len(args) != 1 or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
        return "it is not called with one tensor and returns one tensor"
    x = args[0]
    if x.dim() < 2 or out.shape[:-1] != x.shape[:-1]:
        return f"its output {tuple(out.shape)} does not keep the token rows of its input {tuple(x.shape)}"
    rows, out_rows = x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])
    if rows.shape[0] < 2:
        return None
    pick = torch.randperm(rows.shape[0], generator=gen)[: rows.shape[0] // 2 + 1].to(x.device)
    picked, want = rows[pick], out_rows[pick]
    scale = float(rows.float().std()) or 1.0
    # the picked rows beside other tokens (zeros, then large random ones), all in a random order:
    # a token-wise module gives them the outputs they had among all the input's tokens
    for other in (torch.zeros_like(picked), torch.randn(picked.shape, generator=gen).to(picked) * 8 * scale):
        both = torch.cat([picked, other])
        order = torch.randperm(len(both), generator=gen).to(x.device)
        got = eager_forward(module)(both[order].reshape(*([1] * (x.dim() - 2)), len(both), x.shape[-1]))
        got = got.reshape(len(both), -1)[order.argsort()][: len(pick)]
        err = float((got.float() - want.float()).abs().max() / want.abs().max().float().clamp_min(1e-30))
        if not err <= _tolerance(out.dtype):
            return (f"its output for a token changes with the other tokens it is given (relative error {err:.2g}): "
                    "it mixes tokens")
    return None
