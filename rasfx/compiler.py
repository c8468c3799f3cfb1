"""The order of rasfx's graph passes, declared once, and the loop that runs them.

A model is compiled in three stages, each a list of passes run by ``run_passes``:

* ``CAPTURE_PASSES``, once per input signature, on the graph ``torch.export`` captured
  (``capture.py``): strip the shape asserts, find the token axes, move ops on a token grid
  onto the flat token axis, plan the active region. They annotate the graph; only
  ``strip_asserts`` and ``flatten_token_grids`` change it.
* ``VARIANT_PASSES``, once per graph variant (dense / shared / rowwise, fused or not), on a
  copy of the captured graph: gathers, resized shape arguments, cache sites, the row exchange of
  the context-parallel variants, the rewrite context's clean-up, the optional kernel fusion, the
  per-prompt prologue.
* ``LOWERING_PASSES``, on a copy of a variant right before ``torch.compile``.

``run_passes`` records each pass's counter and stamps every node a pass creates with
``node.meta["rasfx_created_by"] = <pass name>`` (unless the pass stamped it itself; graph
inputs are left to ``explain``, which groups them as the variant's inputs), so that
``rasfx.explain`` / ``rasfx inspect`` read where a node comes from instead of guessing.
Adding a pass is one file in ``rasfx/passes/`` and one entry in one of these lists.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch.fx as fx

from . import passes
from .errors import CaptureError, UnsupportedModelError

CREATED_BY = "rasfx_created_by"


@dataclass(frozen=True)
class Pass:
    """One entry of a pass list. ``run(state)`` returns its counter: an int (recorded under
    ``counter``, or the pass name), a mapping of counts, or None. ``when(state)``: run only if
    true (None: always)."""

    name: str
    run: Callable[[Any], Any]
    counter: Optional[str] = None
    when: Optional[Callable[[Any], bool]] = None


def run_passes(gm: fx.GraphModule, pass_list: tuple[Pass, ...], state: Any) -> Counter:
    """Run ``pass_list`` in order on ``state`` (whose graph is ``gm``); their counters."""
    counters: Counter = Counter()
    for p in pass_list:
        if p.when is not None and not p.when(state):
            continue
        before = set(gm.graph.nodes)
        result = p.run(state)
        for node in gm.graph.nodes:
            if node not in before and node.op != "placeholder":  # inputs: explain groups them itself
                node.meta.setdefault(CREATED_BY, p.name)
        if isinstance(result, bool) or result is None:
            continue
        if isinstance(result, int):
            counters[p.counter or p.name] += result
        else:
            counters.update(result)
    return counters


# ------------------------------------------------------------------ per input signature


@dataclass
class CaptureState:
    """What the capture passes read and produce."""

    model_name: str
    gm: fx.GraphModule
    gm_alt: fx.GraphModule
    resolutions: dict  # the two resolutions (the description of a second_resolution_candidates entry)
    kv_cache: bool
    op_rules: Optional[dict]
    user_inputs: set
    analysis: Any = None
    plan: Any = None


def _strip_asserts(s: CaptureState) -> int:
    passes.strip_asserts(s.gm_alt)
    return passes.strip_asserts(s.gm)


def _analyze_tokens(s: CaptureState) -> None:
    try:
        s.analysis = passes.analyze_tokens(s.gm, s.gm_alt, s.resolutions)
    except (UnsupportedModelError, CaptureError):
        raise
    except Exception as e:  # e.g. shapes that stay symbolic in the captured graph
        raise CaptureError(
            f"token analysis failed on the captured graph of {s.model_name}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}{_data_dependent_origin(s.gm)}"
        ) from e


def _flatten_token_grids(s: CaptureState) -> Optional[int]:
    moved = passes.flatten_token_grids(s.gm)
    return moved or None  # counted only where the model puts its tokens on a grid (most do not)


def _plan_regions(s: CaptureState) -> Counter:
    s.plan = passes.plan_regions(s.gm, s.kv_cache, s.op_rules, s.user_inputs)
    return s.plan.counters


def _data_dependent_origin(gm: fx.GraphModule) -> str:
    """Where the first data-dependent size of the graph comes from (``torch.nonzero``, a
    boolean mask index), as the model's source line; empty when every size is static."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    for node in gm.graph.nodes:
        if node.op == "call_function" and free_unbacked_symbols(node.meta.get("val")):
            return (
                f". The first data-dependent size comes from {node.target} at "
                f"{passes.token_analysis.model_line(node)!r}: rasfx needs every size of the graph fixed by the "
                "input shapes (a length computed from a tensor's values, e.g. the valid prompt tokens, cannot be "
                "sized); see docs/limitations.md"
            )
    return ""


CAPTURE_PASSES: tuple[Pass, ...] = (
    Pass("strip_asserts", _strip_asserts, counter="asserts"),
    Pass("analyze_tokens", _analyze_tokens),
    Pass("flatten_token_grids", _flatten_token_grids, counter="grid_ops_flattened"),
    Pass("plan_regions", _plan_regions),
)


# ------------------------------------------------------------------ per graph variant


@dataclass
class VariantState:
    """What the variant passes read and produce."""

    gm: fx.GraphModule
    ctx: Any  # passes.context.RewriteContext
    fused: bool
    invariant_inputs: Optional[frozenset]
    dynamic_positions: list
    hoisted: Any = None
    extra: dict = field(default_factory=dict)


def _finalize(s: VariantState) -> None:
    s.ctx.finalize()


def _hoist(s: VariantState) -> Optional[Counter]:
    s.hoisted = passes.hoist_invariants(s.gm, set(s.invariant_inputs or ()), set(s.dynamic_positions))
    return s.hoisted.counters if s.hoisted is not None else None


VARIANT_PASSES: tuple[Pass, ...] = (
    Pass("insert_gathers", lambda s: passes.insert_gathers(s.ctx), counter="gathers"),
    Pass("resize_token_shapes", lambda s: passes.resize_token_shapes(s.ctx), counter="resized_args"),
    Pass("insert_cache_sites", lambda s: passes.insert_cache_sites(s.ctx)),
    # context parallelism (rasfx.ParallelConfig): the parallel_* variants only
    Pass("exchange_active_rows", lambda s: passes.exchange_active_rows(s.ctx, s.extra["parallel"]),
         when=lambda s: bool(s.extra.get("parallel"))),
    Pass("finalize_context", lambda s: _finalize(s)),  # inputs first, dead code out, recompile
    Pass("fuse_kernels", lambda s: passes.fuse_kernels(s.gm), when=lambda s: s.fused),
    Pass("hoist_invariants", _hoist, when=lambda s: s.invariant_inputs is not None),
)

LOWERING_PASSES: tuple[Pass, ...] = (
    Pass("lower_cache_ops", lambda gm: passes.lower_cache_ops(gm)),
)


def lower(gm: fx.GraphModule) -> Counter:
    """Run ``LOWERING_PASSES`` on ``gm`` (a copy of a variant, before ``torch.compile``)."""
    return run_passes(gm, LOWERING_PASSES, gm)


#: every pass, in the order the stages run them (explain lists its diffs in this order)
PASS_ORDER: tuple[str, ...] = tuple(p.name for p in (*CAPTURE_PASSES, *VARIANT_PASSES, *LOWERING_PASSES))
