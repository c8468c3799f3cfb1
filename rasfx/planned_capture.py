"""One input signature, captured and planned: ``plan_capture`` exports the model (at the call's
resolution and at a second one), runs the capture passes (token analysis, region plan) and
returns a ``PlannedCapture``, which builds its runnable graph variants (dense / shared /
rowwise, fused or not) on first use. Nothing here is compiled: ``runtime.py`` runs the
variants eagerly, under ``torch.compile`` or as CUDA graphs."""

from __future__ import annotations

import copy
import functools
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Generator, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from . import passes
from .capture import Capture, describe_signature, export_specialised, model_frame
from .joint_masks import joint_mask_candidates
from .prompt_values import STEP_INPUTS
from .joint_sequence import joint_sequence_candidates
from .second_resolution import (find_image_input, image_batch, image_grid_candidates, padding_neutral_candidates,
                                patchified_candidates, resized_model, second_resolution_candidates, token_padding)
from .errors import CaptureError, TooFewTokensError, UnsupportedModelError, UsageError
from . import compiler
from .compiler import CaptureState, VariantState, run_passes
from .passes.context import RewriteContext
from .passes.batch_rows import ROW_GROUPS, ROWS, batch_dims
from .passes.insert_gathers import gather_rank
from .passes.op_rules import SDPA_OPS
from .passes.token_analysis import model_line
from .tokenwise_modules import Choice, TokenwiseModules, module_nodes, node_module

aten = torch.ops.aten

# Graph variants of one capture: dense; one index set for all rows; per-row index sets; the
# same two with the kernel fusion pass; and the two across the ranks of a context-parallel group.
VARIANTS = ("dense", "shared", "rowwise", "fused", "fused_shared", "fused_rowwise", "parallel_shared",
            "parallel_rowwise")


#: The last resized attempts also resize tables of up to this many rows more than the tokens (tokens
#: the model makes itself: U-ViT's time and class tokens, a few register tokens), after the attempts
#: without, which a table of that length that is not per-token (a text table) could break.
EXTRA_TOKENS = 16


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
    # the modules the graph runs eagerly as one token-wise op each (``tokenwise_modules``): they
    # may synchronise with the host, so the graph is not captured as a CUDA graph
    host_sync: tuple = ()

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
    # the approximations the token map makes, one note each (token_map.derive_token_map)
    token_map_notes: list[str] = field(default_factory=list)
    # Attention caches allocated contiguous instead of in the producer's layout (the runner's
    # choice, fixed per capture: the dense variant may write producers into the caches through
    # views that assume the layout).
    contiguous_attention: bool = False
    # Graph-input positions whose values stay the same between steps (weights, constants,
    # prompt tensors): what the graph computes from them alone is hoisted into a prologue.
    # None: hoisting off.
    invariant_inputs: frozenset | None = None
    # the modules captured as one token-wise op each (``tokenwise_modules``), with why
    tokenwise: list[Choice] = field(default_factory=list)

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
    host_sync = tuple(dict.fromkeys(node_module(n) for n in module_nodes(gm)))
    return GraphVariant(name, gm, ctx.caches, counters, hoisted, unused, host_sync)


def _check_rowwise(cc: PlannedCapture) -> None:
    """Per-row active sets ``[B, n]`` index the batch rows in dim 0: refused, naming the model
    line, when a cached or gathered tensor holds something else there (a sequence-first
    ``[S, B, D]`` stream, a stacked ``[3, B, ...]`` position table)."""
    graph = cc.capture.graph_module.graph
    nodes = {n.name: n for n in graph.nodes}
    # where the graph proves each tensor's batch dim: a dim 0 of the batch's size by coincidence
    # (q / k / v stacked as [3, B, ...] at batch 3) is not the batch
    moved = {n.name for n, (dim, _) in batch_dims(graph, cc.batch).items() if dim != 0}
    for producer_name, consumer_name in cc.plan.gathers:
        _check_rowwise_gather(cc, nodes[producer_name], nodes[consumer_name], producer_name in moved)
    for site in cc.plan.sites:
        rows = nodes[site.producer].meta.get(ROWS) if site.producer in nodes else None
        if rows is not None and rows[2]:  # one row, its batch dim selected away: a 1-D index row
            continue
        if site.axis.outer == cc.batch:  # a folded axis of one block per row: a 1-D index (ops.fold_index)
            continue
        groups = nodes[site.producer].meta.get(ROW_GROUPS, 1) if site.producer in nodes else 1
        if (site.axis.dim == 0 or site.producer in moved
                or site.shape[0] != groups * (cc.batch if rows is None else rows[1] - rows[0])):
            where = f" at {model_line(nodes[site.producer])}" if site.producer in nodes else ""
            raise UnsupportedModelError(
                f"per-row active sets need the batch in dim 0 of every cached tensor; {site.producer}{where} has "
                f"shape {site.shape} (batch {cc.batch}). Use one index set [n] shared by all rows."
            )


def _check_rowwise_gather(cc: PlannedCapture, producer: fx.Node, consumer: fx.Node, moved: bool) -> None:
    """The check ``ops.gather_tokens`` makes on a per-row gather when it runs, made on the
    producer's captured shape so that the error names the model line: its index has one row
    per batch row the value holds (``batch_rows.ROWS`` / ``ROW_GROUPS``, as
    ``RewriteContext.token_index``), and a value whose dim 0 is neither that nor 1, or whose
    batch the graph puts in another dim (``moved``), is refused."""
    val, axes = producer.meta.get("val"), passes.token_axes(producer)
    rows = producer.meta.get(ROWS)
    if not isinstance(val, torch.Tensor) or not axes or axes[0].outer > 1 or (rows is not None and rows[2]):
        return  # a 1-D index (one row selected away, a folded axis): gathered with index_select
    count = (cc.batch if rows is None else rows[1] - rows[0]) * producer.meta.get(ROW_GROUPS, 1)
    if val.dim() >= gather_rank(consumer, producer) and (moved or val.shape[0] not in (1, count)):
        raise UnsupportedModelError(
            f"per-row active sets need the batch in dim 0 of every tensor gathered by rows; one has shape "
            f"{tuple(val.shape)} for {count} rows (tokens in dim {axes[0].dim}): {producer.target} at "
            f"{model_line(producer)}. Use one index set [n] shared by all rows."
        )


def _export_tokenwise(model: torch.nn.Module, kwargs: dict, varying: set, tokenwise: TokenwiseModules):
    """``export_specialised`` with ``tokenwise``'s modules captured as one op each; after a
    failure on a read of tensor values in a token-wise module, that module's class is chosen
    too and the export runs again (``TokenwiseModules.choose_after``: a new class each time)."""
    while True:
        try:
            with tokenwise.applied():
                return export_specialised(model, kwargs, varying)
        except CaptureError as e:
            if not tokenwise.choose_after(e, kwargs):
                raise


def _analysis_captures(model: torch.nn.Module, kwargs: dict, image_key: str, varying: set, specialise: bool,
                       gm: fx.GraphModule, errors: dict, tokens: Callable[[], int | None]
                       ) -> Iterator[tuple[tuple, bool]]:
    """Captures at a second resolution, for the token analysis, in the order to try them:
    (exported program, description of the two resolutions) and whether the model had to be resized for it
    (``resized_model``: a model built for one input size); those of ``_candidate_captures`` for
    ``second_resolution_candidates``, then, when none of these captured, for
    ``image_grid_candidates`` (the other inputs on the image's grid resized too), then for
    ``patchified_candidates`` (an image input patchified by the pipeline, resized along its
    tokens), then for ``joint_mask_candidates`` (a boolean mask over a joint sequence whose image
    part follows the image, QwenImage 2.1's ``img_mask``), last for ``joint_sequence_candidates``
    (position ids and a square mask over a joint [prefix, image] sequence continued with the image).
    ``errors`` gets the capture errors: message -> (the model line it failed at, the candidates that
    failed with it). ``specialise``: the first capture was specialised on prompt values; so is this one."""

    def export(alt_kwargs):
        return export_specialised(model, alt_kwargs, varying if specialise else None, specialise)[0]

    for candidates in (second_resolution_candidates, image_grid_candidates, patchified_candidates,
                       joint_mask_candidates, joint_sequence_candidates):
        if (yield from _candidate_captures(model, candidates(kwargs, image_key), kwargs, image_key, gm, export,
                                           errors, tokens)):
            return


def _candidate_captures(model: torch.nn.Module, candidates: list, kwargs: dict, image_key: str, gm: fx.GraphModule,
                        export: Callable, errors: dict, tokens: Callable[[], int | None]
                        ) -> Generator[tuple[tuple, bool], None, bool]:
    """The captures of ``candidates`` (see ``_analysis_captures``): the first plain attempt that
    captures (at a size whose padding is that of the first capture ``gm`` when the model pads
    its tokens: ``_keep_padding``); after it (the caller asks for another when the analysis of
    that one found no token region) or when every plain one fails, resized ones (``tokens()``:
    the image's token count the analysis of the plain one found, if it did), last resized ones
    that also resize tables of a few rows more than the tokens (``EXTRA_TOKENS``). The other plain
    sizes are not tried after one captured: a model whose sequence does not follow one size
    follows no other. Returns whether any candidate captured."""
    captured = False
    for alt_kwargs, desc in candidates:
        try:
            alt = export(alt_kwargs), desc
        except CaptureError as e:
            _record(errors, e, _candidate(desc))
            continue
        captured = True
        yield _keep_padding(gm, alt, kwargs, image_key, export), False
        break
    for extra in (0, EXTRA_TOKENS):
        for alt_kwargs, desc in candidates:
            with resized_model(model, desc, kwargs[image_key], tokens(), extra) as changed:
                if not changed:
                    continue
                try:
                    ep = export(alt_kwargs)
                except CaptureError as e:
                    _record(errors, e, _candidate(desc) + (" (model resized)" if not extra else
                                                          f" (model resized, tables of up to {extra} extra rows too)"))
                    continue
            captured = True
            yield (ep, desc), True
    return captured


def _run_capture_passes(model: torch.nn.Module, state: CaptureState) -> Counter:
    """The capture passes on ``state`` (a graph of its own, see ``_attempt_graph``); raises
    ``UnsupportedModelError`` when no op can run on a subset of the image tokens."""
    counters = run_passes(state.gm, compiler.CAPTURE_PASSES, state)
    plan = state.plan
    if plan.counters["active_nodes"] == 0:
        nodes = {n.name: n for n in state.gm.graph.nodes}
        ops = [f"{target} at {model_line(nodes[name]) if name in nodes else name}: {reason}"
               for name, target, reason in plan.conservative[:3]]
        raise UnsupportedModelError(
            f"{type(model).__name__}: no op of the graph can run on a subset of the image tokens "
            f"({len(plan.conservative)} ops handled conservatively, e.g. {'; '.join(ops)}); "
            "RAS would save nothing."
        )
    return counters


def _attends_to_tokens(gm: fx.GraphModule) -> bool:
    """Whether an attention op's queries carry the image tokens, or the graph has no attention op.
    When none do, the sequence the blocks attend over did not follow the image between the two
    captures (tokens padded to a length the model fixes): a resized capture may do better."""
    attention = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_OPS]
    return not attention or any(isinstance(n.args[0], fx.Node) and passes.token_axes(n.args[0]) for n in attention)


def _attempt_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the captured graph for one analysis attempt: the capture passes annotate its
    nodes and ``flatten_token_grids`` rewrites it, so an attempt against another
    second-resolution capture must not start from an earlier attempt's graph. The nodes' meta
    dicts are copied (their values shared), the weights stay graph inputs."""
    return fx.GraphModule(gm, copy.deepcopy(gm.graph))


def _keep_padding(gm: fx.GraphModule, alt: tuple, kwargs: dict, image_key: str, export) -> tuple:
    """``alt`` (program, description), or, when the model pads its image tokens to a multiple
    ``M`` (``second_resolution.token_padding``: the padding differs between the two sizes), a
    capture at a size whose token count differs by a multiple of ``M``, whose padding is the
    same. ``alt`` when no such size captures."""
    padding = token_padding(gm, alt[0].graph_module, alt[1])
    if padding is None:
        return alt
    n, multiple = padding
    for alt_kwargs, desc in padding_neutral_candidates(kwargs, image_key, n, multiple):
        try:
            return export(alt_kwargs), desc
        except CaptureError:
            continue
    return alt


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


def _record(errors: dict, e: CaptureError, candidate: str) -> None:
    """Add a candidate's capture error to ``errors`` (see ``_analysis_captures``)."""
    frame = model_frame(e.__cause__) if e.__cause__ is not None else None
    errors.setdefault(str(e), (frame, []))[1].append(candidate)


def _most_common_frame(errors: dict) -> str:
    """Where most of the failed candidates failed in the model's code (``; N of M candidates
    failed at file:line (function): code``); empty when no error names a model line."""
    frames: Counter = Counter()
    for frame, descs in errors.values():
        if frame is not None:
            frames[frame] += len(descs)
    if not frames:
        return ""
    frame, count = frames.most_common(1)[0]
    return f"; {count} of {sum(len(d) for _, d in errors.values())} candidates failed at {frame}"


def _candidate(desc: dict) -> str:
    """A second-resolution candidate in a few characters: ``16x28``, ``N=36``, ``+ tables``."""
    size = "x".join(map(str, desc["hw2"])) if "hw2" in desc else f"N={desc.get('n2')}"
    resized = desc.get("resized")
    return size + (f" with {resized} resized" if isinstance(resized, str) else " with resized inputs" if resized else "")


def plan_capture(
    model: torch.nn.Module, kwargs: dict, image_input: str | None, signature, *, kv_cache: bool = True,
    op_rules: dict | None = None, contiguous_attention: bool = False, varying_inputs: tuple | None = None,
    tokenwise: TokenwiseModules | None = None,
) -> PlannedCapture:
    """Capture ``model`` for one input signature (``kwargs``: a call's keyword arguments;
    ``image_input``: ``TransformConfig.image_input``). ``kv_cache``, ``op_rules``: the
    ``TransformConfig`` fields; ``contiguous_attention``: the execution target's cache layout
    (``target.ExecutionTarget``); ``varying_inputs``: names of the inputs that change at every
    step besides the image input (None: no step-invariant hoisting); ``tokenwise``: the
    modules captured as one token-wise op (``TransformConfig.tokenwise_modules``, and those
    chosen after failed exports; None: only the latter)."""
    t0 = time.perf_counter()
    image_key = find_image_input(kwargs, image_input)
    step_inputs = {image_key, *(STEP_INPUTS if varying_inputs is None else varying_inputs)}
    tokenwise = tokenwise or TokenwiseModules(model)
    tokenwise.prepare(kwargs)
    ep, value_leaves = _export_tokenwise(model, kwargs, step_inputs, tokenwise)
    cap = Capture.from_program(ep, signature, value_leaves)
    t1 = time.perf_counter()
    gm = cap.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    user_inputs = {n.name for n, (kind, _) in zip(placeholders, cap.input_sources) if kind == "user"}
    batch = image_batch(kwargs[image_key])
    errors: dict[str, tuple[str | None, list[str]]] = {}
    found: list[int] = []  # the token count an analysis found, for the resized attempts
    failure: UnsupportedModelError | None = None  # of the first second-resolution capture that captured
    blind = None  # the first plan whose attention does not see the image tokens: kept if no other plans
    with tokenwise.applied():
        for alt, resized in _analysis_captures(model, kwargs, image_key, step_inputs, bool(value_leaves), gm,
                                               errors, lambda: found[0] if found else None):
            t2 = time.perf_counter()
            state = CaptureState(type(model).__name__, _attempt_graph(gm), alt[0].graph_module,
                                 dict(alt[1], batch=batch), kv_cache, op_rules, user_inputs)
            try:
                counters = _run_capture_passes(model, state)
            except TooFewTokensError:
                raise
            except UnsupportedModelError as e:  # e.g. a sequence padded to a length the model fixes: try a resized one
                failure = failure or e
            else:
                if _attends_to_tokens(state.gm):
                    break
                blind = blind or (alt, resized)
            if state.analysis is not None and not found:
                found.append(state.analysis.num_tokens)
        else:
            if blind is not None:
                (alt, resized), t2 = blind, time.perf_counter()
                state = CaptureState(type(model).__name__, _attempt_graph(gm), alt[0].graph_module,
                                     dict(alt[1], batch=batch), kv_cache, op_rules, user_inputs)
                counters = _run_capture_passes(model, state)
            elif failure is not None:
                raise failure
            else:
                # the first error in full; the others by where they failed (each torch error once)
                tried = [f"{', '.join(descs)}: {message if i == 0 else _brief(message)}"
                         for i, (message, (_, descs)) in enumerate(errors.items())]
                raise CaptureError(
                    "could not capture the model at a second resolution, which the token analysis needs to tell "
                    f"image-token axes from other dims (captured at {describe_signature(signature)}), not even with "
                    f"its size-bound tables and attributes resized (a model built for one input size){_most_common_frame(errors)}. "
                    "Tried:\n  "
                    + "\n  ".join(tried or ["no candidate resolution (image input must be [B,C,H,W], [B,C,F,H,W], "
                                             "[B,N,C] or pre-patchified [B,N,C,p,p])"])
                )
    cap.graph_module = state.gm  # the attempt whose plan is kept
    analysis, plan = state.analysis, state.plan
    cc = PlannedCapture(cap, analysis, plan, image_key, batch, counters, contiguous_attention=contiguous_attention,
                        tokenwise=tokenwise.choices())
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



def tokenwise_report(model: torch.nn.Module, cc: PlannedCapture) -> str | None:
    """One paragraph naming the modules chosen automatically to run as one token-wise op
    (``tokenwise_modules``), for a warning when the model is transformed; None when none were."""
    auto = [c for c in cc.tokenwise if not c.reason.startswith("named in")]
    if not auto:
        return None
    classes = Counter(c.cls for c in auto)
    items = [f"{n} x {cls} ({next(c for c in auto if c.cls == cls).reason})" for cls, n in classes.items()]
    return (
        f"{type(model).__name__}: runs {len(auto)} module(s) eagerly as one token-wise op each (checked: each "
        "token's output depends on that token only), as torch.export could not capture their code: "
        + "; ".join(items) + ". On a RAS step they run on the active tokens; a graph holding them is not captured "
        "as a CUDA graph. Name them in TransformConfig(tokenwise_modules=...) to skip the failed export."
    )
