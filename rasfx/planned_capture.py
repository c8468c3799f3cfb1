"""One input signature, captured and planned: ``plan_capture`` exports the model (at the call's
resolution and at a second one), runs the capture passes (token analysis, region plan) and
returns a ``PlannedCapture``, which builds its runnable graph variants (dense / shared /
rowwise, fused or not) on first use. Nothing here is compiled: ``runtime.py`` runs the
variants eagerly, under ``torch.compile`` or as CUDA graphs."""

from __future__ import annotations

import functools
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from . import passes
from .capture import Capture, describe_signature, export_specialised
from .prompt_values import STEP_INPUTS
from .second_resolution import find_image_input, image_batch, resized_model, second_resolution_candidates
from .errors import CaptureError, UnsupportedModelError, UsageError
from . import compiler
from .compiler import CaptureState, VariantState, run_passes
from .passes.context import RewriteContext
from .passes.batch_rows import ROW_GROUPS, ROWS
from .passes.token_analysis import model_line

aten = torch.ops.aten

# Graph variants of one capture: dense; one index set for all rows; per-row index sets; the
# same two with the kernel fusion pass; and the two across the ranks of a context-parallel group.
VARIANTS = ("dense", "shared", "rowwise", "fused", "fused_shared", "fused_rowwise", "parallel_shared",
            "parallel_rowwise")


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


@dataclass
class GraphVariant:
    name: str
    gm: fx.GraphModule
    caches: list
    counters: Counter
    hoisted: "passes.Hoisted | None" = None  # the step-invariant prologue (hoist_invariants)
    unused: frozenset = frozenset()  # graph-input positions the graph no longer reads (hoisted away)

    def call_args(self, flat: list, active_index: torch.Tensor | None, caches: list,
                  hoisted_values: list | None = None) -> list:
        """``gm``'s arguments, in the order of its graph inputs: the capture's inputs (``flat``),
        the active index (the ``ras_index`` input the rewrite context adds; ``None`` in
        ``dense``, which has none), the slot's caches (``ras_cache_*``), and the hoisted
        values: ``hoisted_values`` (the runtime computes them once per prompt, ``RASModule``),
        else computed here by the prologue."""
        if (active_index is None) != (self.name == "dense"):
            raise UsageError(f"the {self.name} graph takes {'no' if self.name == 'dense' else 'an'} active index")
        args = [*flat, *caches] if active_index is None else [*flat, active_index, *caches]
        if self.hoisted is not None:
            if hoisted_values is None:
                hoisted_values = self.hoisted.prologue(*[flat[i] for i in self.hoisted.inputs])
            args += hoisted_values
        return args


@dataclass
class PlannedCapture:
    """Everything rasfx knows about one input signature."""

    capture: Capture
    analysis: passes.TokenAnalysis
    plan: passes.RegionPlan
    image_key: str
    batch: int
    counters: Counter = field(default_factory=Counter)
    variants: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)  # seconds per stage (export, analysis, build_<variant>)
    # which image token produced each element of the first output (RASModule.token_map, made on first use)
    token_map: torch.Tensor | None = None
    # Attention caches allocated contiguous instead of in the producer's layout (the runner's
    # choice, fixed per capture: the dense variant may write producers into the caches through
    # views that assume the layout).
    contiguous_attention: bool = False
    # Graph-input positions whose values stay the same between steps (weights, constants,
    # prompt tensors): what the graph computes from them alone is hoisted into a prologue.
    # None: hoisting off.
    invariant_inputs: frozenset | None = None

    @functools.cached_property
    def dynamic_positions(self) -> list[int]:
        """Graph-input positions of the user's inputs (the rest are weights and constants)."""
        return [i for i, (kind, _) in enumerate(self.capture.input_sources) if kind == "user"]

    @property
    def device(self) -> torch.device:
        return next(s.device for s in self.plan.sites) if self.plan.sites else torch.device("cpu")

    @property
    def num_tokens(self) -> int:
        return self.analysis.num_tokens

    def variant(self, name: str) -> GraphVariant:
        if name not in self.variants:
            self.variants[name] = build_variant(self, name)
            ref = self.variants.get("dense")
            got = self.variants[name]
            if ref is not None and "@" not in name and (  # a parallel variant may hold 1/R of the heads
                    [(c.shape, c.dtype) for c in ref.caches] != [(c.shape, c.dtype) for c in got.caches]):
                raise AssertionError("graph variants disagree on their caches")
        return self.variants[name]


def build_variant(cc: PlannedCapture, name: str) -> GraphVariant:
    """``dense`` | ``shared`` | ``rowwise``; a ``fused_`` prefix adds the kernel fusion pass
    (``fused`` alone means ``fused_shared``), a ``parallel_`` prefix the row exchange of
    context parallelism for ``@<ranks>:<attention>`` (``passes/exchange_active_rows.py``:
    ``parallel_shared@4:heads``)."""
    t0 = time.perf_counter()
    kind, _, parallel = name.partition("@")
    if kind not in VARIANTS or bool(parallel) != kind.startswith("parallel_"):
        raise UsageError(f"unknown graph variant {name!r}; one of {VARIANTS} (parallel ones with @<ranks>:<attention>)")
    base = {"fused": "shared"}.get(kind, kind.removeprefix("fused_").removeprefix("parallel_"))
    gm = copy_graph_module(cc.capture.graph_module)
    ctx = RewriteContext(gm, cc.plan, cc.num_tokens, base, contiguous_attention=cc.contiguous_attention)
    if kind in ("rowwise", "parallel_rowwise"):
        _check_rowwise(cc)
    state = VariantState(gm, ctx, fused=kind != base and not parallel, invariant_inputs=cc.invariant_inputs,
                         dynamic_positions=cc.dynamic_positions, extra={"parallel": parallel})
    counters = run_passes(gm, compiler.VARIANT_PASSES, state)  # read at call time: a pass added to the list runs
    hoisted = state.hoisted
    cc.timings[f"build_{name}"] = time.perf_counter() - t0
    unused = frozenset(i for i, p in enumerate(n for n in gm.graph.nodes if n.op == "placeholder") if not p.users)
    return GraphVariant(name, gm, ctx.caches, counters, hoisted, unused)


def _check_rowwise(cc: PlannedCapture) -> None:
    nodes = {n.name: n for n in cc.capture.graph_module.graph.nodes}
    for site in cc.plan.sites:
        rows = nodes[site.producer].meta.get(ROWS) if site.producer in nodes else None
        if rows is not None and rows[2]:  # one row, its batch dim selected away: a 1-D index row
            continue
        if site.axis.outer == cc.batch:  # a folded axis of one block per row: a 1-D index (ops.fold_index)
            continue
        groups = nodes[site.producer].meta.get(ROW_GROUPS, 1) if site.producer in nodes else 1
        if site.axis.dim == 0 or site.shape[0] != groups * (cc.batch if rows is None else rows[1] - rows[0]):
            raise UnsupportedModelError(
                f"per-row active sets need the batch in dim 0 of every cached tensor; {site.producer} has shape "
                f"{site.shape} (batch {cc.batch}). Use one index set [n] shared by all rows."
            )


def _analysis_capture(model: torch.nn.Module, kwargs: dict, image_key: str, varying: set, specialise: bool):
    """(exported program, description of the two resolutions) at a second resolution, whether
    the model had to be resized for it (``resized_model``: a model built for one input size), and the errors of
    the attempts. Plain attempts first; resized ones only when every plain one fails.
    ``specialise``: the first capture was specialised on prompt values; so is this one."""
    candidates = second_resolution_candidates(kwargs, image_key)
    errors: dict[str, list[str]] = {}  # error message -> the candidates that failed with it

    def export(alt_kwargs):
        return export_specialised(model, alt_kwargs, varying if specialise else None, specialise)[0]

    for alt_kwargs, desc in candidates:
        try:
            return (export(alt_kwargs), desc), False, errors
        except CaptureError as e:
            errors.setdefault(str(e), []).append(_candidate(desc))
    for alt_kwargs, desc in candidates:
        with resized_model(model, desc, kwargs[image_key]) as changed:
            if not changed:
                continue
            try:
                return (export(alt_kwargs), desc), True, errors
            except CaptureError as e:
                errors.setdefault(str(e), []).append(_candidate(desc) + " (model resized)")
    return None, False, errors


def invariant_inputs(capture: Capture, kwargs: dict, varying: set) -> frozenset:
    """Graph-input positions of the weights, constants and the user inputs not named in
    ``varying`` (the inputs that change at every step: the image input, the timestep)."""
    leaf_keys = [key for key, value in kwargs.items() for _ in pytree.tree_leaves(value)]
    return frozenset(
        i for i, (kind, ref) in enumerate(capture.input_sources) if kind != "user" or leaf_keys[ref] not in varying
    )


def _brief(message: str) -> str:
    """A capture error without its lead-in and its advice: where it failed and torch's error."""
    text = re.sub(r"^torch\.export could not capture \S+", "failed", message)
    return text.split(". rasfx ", 1)[0]


def _candidate(desc: dict) -> str:
    """A second-resolution candidate in a few characters: ``16x28``, ``N=36``, ``+ tables``."""
    size = "x".join(map(str, desc["hw2"])) if "hw2" in desc else f"N={desc.get('n2')}"
    resized = desc.get("resized")
    return size + (f" with {resized} resized" if isinstance(resized, str) else " with resized inputs" if resized else "")


def plan_capture(
    model: torch.nn.Module, kwargs: dict, image_input: str | None, signature, *, kv_cache: bool = True,
    op_rules: dict | None = None, contiguous_attention: bool = False, varying_inputs: tuple | None = None,
) -> PlannedCapture:
    """Capture ``model`` for one input signature (``kwargs``: a call's keyword arguments;
    ``image_input``: ``TransformConfig.image_input``). ``kv_cache``, ``op_rules``: the
    ``TransformConfig`` fields; ``contiguous_attention``: the execution target's cache layout
    (``target.ExecutionTarget``); ``varying_inputs``: names of the inputs that change at every
    step besides the image input (None: no step-invariant hoisting)."""
    t0 = time.perf_counter()
    image_key = find_image_input(kwargs, image_input)
    step_inputs = {image_key, *(STEP_INPUTS if varying_inputs is None else varying_inputs)}
    ep, value_leaves = export_specialised(model, kwargs, step_inputs)
    cap = Capture.from_program(ep, signature, value_leaves)
    t1 = time.perf_counter()
    alt, resized, errors = _analysis_capture(model, kwargs, image_key, step_inputs, bool(value_leaves))
    if alt is None:
        # the first error in full; the others by where they failed (each torch error once)
        tried = [f"{', '.join(descs)}: {message if i == 0 else _brief(message)}"
                 for i, (message, descs) in enumerate(errors.items())]
        raise CaptureError(
            "could not capture the model at a second resolution, which the token analysis needs to tell "
            f"image-token axes from other dims (captured at {describe_signature(signature)}), not even with its "
            "size-bound tables and attributes resized (a model built for one input size). Tried:\n  "
            + "\n  ".join(tried or ["no candidate resolution (image input must be [B,C,H,W], [B,C,F,H,W] or [B,N,C])"])
        )
    t2 = time.perf_counter()
    gm = cap.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    user_inputs = {n.name for n, (kind, _) in zip(placeholders, cap.input_sources) if kind == "user"}
    batch = image_batch(kwargs[image_key])
    state = CaptureState(type(model).__name__, gm, alt[0].graph_module, dict(alt[1], batch=batch), kv_cache, op_rules,
                         user_inputs)
    counters = run_passes(gm, compiler.CAPTURE_PASSES, state)
    analysis, plan = state.analysis, state.plan
    if plan.counters["active_nodes"] == 0:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no op of the graph can run on a subset of the image tokens "
            f"({len(plan.conservative)} ops handled conservatively, e.g. {plan.conservative[:3]}); "
            "RAS would save nothing."
        )
    cc = PlannedCapture(cap, analysis, plan, image_key, batch, counters, contiguous_attention=contiguous_attention)
    if varying_inputs is not None:
        cc.invariant_inputs = invariant_inputs(cap, kwargs, {image_key, *varying_inputs})
    cc.timings.update(export=t1 - t0, export_alt=t2 - t1, analysis=time.perf_counter() - t2)
    if resized:
        cc.timings["analysis_model_resized"] = 1.0
    return cc


def conservative_report(model: torch.nn.Module, cc: PlannedCapture, limit: int = 4) -> str | None:
    """One paragraph naming the ops the planner ran conservatively (op, module path, model
    line, reason), for a warning when the model is transformed; None when there are none."""
    cons = cc.plan.conservative
    if not cons:
        return None
    nodes = {n.name: n for n in cc.capture.graph_module.graph.nodes}
    items = []
    for name, target, reason in cons[:limit]:
        node = nodes.get(name)
        stack = node.meta.get("nn_module_stack") if node is not None else None
        module = str(list(stack.values())[-1][0]).removeprefix("model.") if stack else ""
        line = model_line(node) if node is not None else name
        items.append(f"{target} in {module or type(model).__name__} ({line!r}): {reason}")
    more = f"; and {len(cons) - limit} more" if len(cons) > limit else ""
    return (
        f"{type(model).__name__}: {len(cons)} op(s) handled conservatively (full length on RAS steps, so RAS "
        f"saves less): " + "; ".join(items) + more + ". `rasfx inspect` lists them; "
        "TransformConfig(op_rules=...) adds a rule for an op rasfx does not know."
    )

