"""Plan the active region: which nodes run on the active tokens only.

Walks the analysed graph in topological order and gives every node a mode:
- ``F``: runs as captured, at full length (sources of token axes such as the patch
  embedding and positional tables, cheap ops on full inputs, opaque ops);
- ``A``: runs on the active tokens only (sizes that are ``a*N+b`` become ``a*n+b``);
- ``-``: does not touch token axes.

and records the edges where a value changes form:
- ``gathers``: an ``A`` node reads an ``F`` value -> gather its active rows;
- ``sites``: a node needs an ``A`` value at full length (token-mixing operands, opaque
  ops, the graph output / unpatchify) -> a cache at that edge supplies the inactive rows.

Invariants: the graph is not modified; the plan is keyed by node names; every ``A`` node
has all its token-bearing inputs in ``A`` form (or ``F`` form for its ``full`` operands);
every token axis of an ``A`` tensor has a known image-segment offset, so that gathers and
caches can be indexed. Conservative choices are recorded in ``plan.conservative`` with
their reason, never taken silently; so is a tail after the region (the nodes up to the
output) that reads this step's inputs, where inactive tokens' outputs would be recomputed
instead of reused.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..errors import UnsupportedModelError
from .batch_rows import ROW_GROUPS, SHARED_TABLE
from .op_rules import SDPA_OPS, classify, mutated_input
from .token_analysis import model_line
from .token_segments import NEW_TENSOR
from .token_info import Axis, has_token_axes, offsets_known, token_axes

aten = torch.ops.aten


@dataclass
class Site:
    producer: str  # node name of the active value
    consumer: str  # node name that needs it at full length
    kind: str  # "attention" | "mixing" | "opaque" | "output"
    axis: Axis
    shape: tuple
    dtype: torch.dtype
    device: torch.device
    reason: str = ""
    stride: tuple | None = None  # the captured layout, when it is a permutation of a dense one


@dataclass
class RegionPlan:
    mode: dict = field(default_factory=dict)  # node name -> "A" | "F" | "-"
    gathers: list = field(default_factory=list)  # (producer, consumer)
    sites: list = field(default_factory=list)  # [Site]
    conservative: list = field(default_factory=list)  # (node name, target, reason)
    counters: Counter = field(default_factory=Counter)

    def is_active(self, node: fx.Node) -> bool:
        """True when ``node``'s value is an active-only tensor (carries a token axis)."""
        return self.mode.get(node.name) == "A" and has_token_axes(node)


def _gatherable(node: fx.Node) -> bool:
    axes = token_axes(node)
    return len(axes) == 1 and axes[0].offset is not None


def _batchless(node: fx.Node) -> bool:
    """A token-bearing tensor whose token axis is its first dim (no batch dim before it)."""
    return any(a.dim == 0 for a in token_axes(node))


def _row_gatherable(node: fx.Node) -> bool:
    """A several-axis operand (attention mask) gathered along its first token axis only."""
    axes = token_axes(node)
    return bool(axes) and axes[0].offset is not None


def plan_regions(
    gm: fx.GraphModule, kv_cache: bool = True, op_rules: dict | None = None, user_inputs: set | None = None
) -> RegionPlan:
    """Plan every node (see module docstring). ``kv_cache=False``: attention reads the
    active keys/values only (an ablation; not RAS). ``op_rules``: user rules consulted first
    (``TransformConfig.op_rules``). ``user_inputs``: names of the placeholders that are the
    call's inputs (the rest are weights); None counts every placeholder as an input."""
    plan = RegionPlan()
    for node in gm.graph.nodes:
        ins = [i for i in node.all_input_nodes if has_token_axes(i)]
        if node.target in NEW_TENSOR:  # reads its input's dtype and device only: a source
            ins = []
        if node.op == "placeholder" or node.op == "get_attr":
            plan.mode[node.name] = "F" if has_token_axes(node) else "-"
            continue
        if node.op == "output":
            for i in ins:
                if plan.is_active(i):
                    _add_site(plan, i, node, "output", "graph output")
            continue
        if not ins:
            plan.mode[node.name] = "F" if has_token_axes(node) else "-"
            continue
        rule = classify(node, kv_cache, op_rules)
        target = mutated_input(node)
        if target is not None and target in ins:
            _plan_mutation(plan, node, ins, rule, target)
            continue
        passing = [i for i in ins if i not in rule.full and i not in rule.rows]
        if rule.kind == "opaque":
            _run_full(plan, node, ins, "opaque", rule.reason)
            continue
        any_active = any(plan.is_active(i) for i in passing)
        # A table without a batch dim (token axis first: RoPE positions [N, 3]) starts no region:
        # per-row active sets cannot be laid on it; it is gathered where it meets the batch.
        want_active = passing and (any_active or not (rule.cheap or all(_batchless(i) for i in passing)))
        # a table of which one row is taken for all rows starts no region (batch_rows.SHARED_TABLE)
        want_active = want_active and (any_active or not node.meta.get(SHARED_TABLE))
        can_active = (
            node.meta.get("rasfx_ints") is not None
            and offsets_known(node)
            and all(plan.is_active(i) or _gatherable(i) for i in passing)
            and all(not plan.is_active(i) and _row_gatherable(i) for i in rule.rows)
            and (has_token_axes(node) or rule.kind == "tokenwise")
        )
        if want_active and can_active:
            plan.mode[node.name] = "A"
            for i in [*passing, *(i for i in ins if i in rule.rows)]:
                if not plan.is_active(i):
                    plan.gathers.append((i.name, node.name))
            for i in ins:  # graph order: deterministic site (and cache) numbering
                if i in rule.full and plan.is_active(i):
                    kind = "attention" if node.target in SDPA_OPS else "mixing"
                    _add_site(plan, i, node, kind, rule.reason)
            continue
        if want_active and any_active:
            why = "sizes not linear in the token count" if node.meta.get("rasfx_ints") is None else "token segment not located"
            _run_full(plan, node, ins, "opaque", why)
            continue
        # all inputs full and the op is cheap (or cannot run active): keep it at full length
        _run_full(plan, node, ins, rule.kind if rule.kind == "mixing" else "opaque", rule.reason, record=False)
    _mark_output_sites(gm, plan)
    _check_tail(gm, plan, user_inputs)
    _note_row_groups(gm, plan)
    plan.counters["active_nodes"] = sum(1 for m in plan.mode.values() if m == "A")
    plan.counters["gathers"] = len({p for p, _ in plan.gathers})
    plan.counters["sites"] = len(plan.sites)
    for s in plan.sites:
        plan.counters[f"sites_{s.kind}"] += 1
    return plan


def _plan_mutation(plan: RegionPlan, node: fx.Node, ins, rule, target: fx.Node) -> None:
    """An in-place op runs in the form of the tensor it writes to: rewriting that operand
    (gather, cache) would send the write to a copy and lose it."""
    if plan.is_active(target):
        if rule.kind != "tokenwise" or node.meta.get("rasfx_ints") is None or not all(
            plan.is_active(i) or _gatherable(i) for i in ins
        ):
            raise UnsupportedModelError(
                f"in-place op {node.target} ({node.name}) writes to an active-token tensor but cannot run on "
                f"active tokens ({rule.reason or 'inputs not located'}); at {model_line(node)}. "
                "Rewrite it out of place, or report the model to rasfx."
            )
        plan.mode[node.name] = "A"
        for i in ins:
            if not plan.is_active(i):
                plan.gathers.append((i.name, node.name))
        return
    _run_full(plan, node, ins, "opaque", rule.reason or "in-place op on a full-length tensor")


def _mark_output_sites(gm: fx.GraphModule, plan: RegionPlan) -> None:
    """A site after which no node runs active ends the region: it feeds the output
    (unpatchify and the like). Those are ``output`` sites, not conservative choices."""
    feeds_active: dict = {}
    for node in reversed(gm.graph.nodes):
        feeds_active[node.name] = any(plan.mode.get(u.name) == "A" or feeds_active.get(u.name) for u in node.users)
    ends = set()
    for site in plan.sites:
        if site.kind == "opaque" and not feeds_active.get(site.consumer, False):
            site.kind, site.reason = "output", "end of the token region"
            ends.add(site.consumer)
    plan.conservative = [c for c in plan.conservative if c[0] not in ends]


def _check_tail(gm: fx.GraphModule, plan: RegionPlan, user_inputs: set | None) -> None:
    """The token-bearing nodes between the token region and the graph output (the tail) run
    at full length on every step. When they only re-lay out the cached rows (unpatchify), an
    inactive token's output is its cached one. A tail node that also reads a value computed
    from this call's inputs outside the region (a timestep modulation, a skip from the
    input) recomputes the inactive tokens' outputs instead of reusing them: recorded as a
    conservative choice (the output cache is not at the model output)."""
    fresh: set = set()  # values computed from this call's inputs, not through active nodes
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if user_inputs is None or node.name in user_inputs:
                fresh.add(node.name)
        elif plan.mode.get(node.name) != "A" and any(
            i.name in fresh and plan.mode.get(i.name) != "A" for i in node.all_input_nodes
        ):
            fresh.add(node.name)
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    tail: set = set()  # what runs at full length after the region, up to the output
    todo = list(output.all_input_nodes)
    while todo:
        node = todo.pop()
        if node.name not in tail and plan.mode.get(node.name) != "A":
            tail.add(node.name)
            todo.extend(node.all_input_nodes)
    carries = {n.name for n in gm.graph.nodes if n.name in tail
               and (has_token_axes(n) or any(has_token_axes(i) for i in n.all_input_nodes))}
    for node in gm.graph.nodes:
        if node.name not in carries or node.op == "placeholder":
            continue
        entering = [i.name for i in node.all_input_nodes
                    if i.name in fresh and (i.name not in carries or i.op == "placeholder")]
        if entering:
            plan.conservative.append((
                node.name, str(node.target),
                f"after the token region, reads {', '.join(entering[:3])}: inactive tokens' outputs are "
                "recomputed with this step's values instead of reused",
            ))


def _note_row_groups(gm: fx.GraphModule, plan: RegionPlan) -> None:
    """Rows folded into the batch dim (``batch_rows.ROW_GROUPS``: Latte's frames in
    ``[B*F, H*W, C]``) are not tokens of their own: the active set is one set of token
    positions for all of a sample's rows. Recorded once, at the first active node that has them."""
    for node in gm.graph.nodes:
        m = node.meta.get(ROW_GROUPS, 1)
        if m > 1 and plan.is_active(node):
            plan.conservative.append((
                node.name, str(node.target),
                f"dim 0 holds {m} rows per sample (frames or views folded into the batch): they share one active set "
                f"of token positions, so a position is computed in all {m} rows or in none (no set per row of them)",
            ))
            return


def _run_full(plan: RegionPlan, node: fx.Node, ins, kind: str, reason: str, record: bool = True) -> None:
    plan.mode[node.name] = "F" if has_token_axes(node) else "-"
    active = [i for i in ins if plan.is_active(i)]
    for i in active:
        _add_site(plan, i, node, kind, reason)
    if active and record and kind == "opaque":
        plan.conservative.append((node.name, str(node.target), reason))


def _add_site(plan: RegionPlan, producer: fx.Node, consumer: fx.Node, kind: str, reason: str) -> None:
    axes = token_axes(producer)
    val = producer.meta["val"]
    # Keep the producer's memory layout (e.g. [B, S, H, D] permuted to [B, H, S, D]):
    # writing a cache in its own layout is a plain copy, and attention reads it as before.
    stride = tuple(val.stride()) if torch._prims_common.is_non_overlapping_and_dense_or_false(val) else None
    plan.sites.append(
        Site(producer.name, consumer.name, kind, axes[0], tuple(val.shape), val.dtype, val.device, reason, stride)
    )
