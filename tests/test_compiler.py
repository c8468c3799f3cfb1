"""The compiler driver (rasfx/compiler.py), the execution target (rasfx/target.py), the token
metadata readers (rasfx/passes/token_info.py) and the named graph arguments, on small hand-made
graphs (no model capture)."""

from __future__ import annotations

import operator
from collections import Counter

import pytest
import torch
import torch.fx as fx

import rasfx
from rasfx.compiler import CREATED_BY, PASS_ORDER, Pass, run_passes
from rasfx.errors import UsageError
from rasfx.explain.views import created_by
from rasfx.passes import token_info
from rasfx.passes.token_info import Axis
from rasfx.planned_capture import GraphVariant
from rasfx.runtime import GraphKey
from rasfx.target import ExecutionTarget


def _graph() -> fx.GraphModule:
    return fx.symbolic_trace(lambda x: torch.relu(x) + 1)


def test_run_passes_records_counters_in_order_and_stamps_created_nodes():
    gm = _graph()
    ran: list[str] = []
    kept: list[fx.Node] = []

    def keep_neg(state):
        ran.append("keep")
        relu = next(n for n in gm.graph.nodes if n.target is torch.relu)
        with gm.graph.inserting_after(relu):
            kept.append(gm.graph.call_function(operator.neg, (relu,)))
        return {"negs": 1, "other": 2}

    def stamped(state):
        ran.append("stamped")
        relu = next(n for n in gm.graph.nodes if n.target is torch.relu)
        with gm.graph.inserting_after(relu):
            node = gm.graph.call_function(operator.abs, (relu,))
        node.meta[CREATED_BY] = "by_itself"
        kept.append(node)
        return 3

    counters = run_passes(gm, (
        Pass("first", keep_neg),
        Pass("skipped", lambda s: ran.append("skipped") or 5, when=lambda s: False),
        Pass("second", stamped, counter="abs_nodes"),
        Pass("silent", lambda s: ran.append("silent")),
    ), state=None)
    assert ran == ["keep", "stamped", "silent"]
    assert counters == Counter({"negs": 1, "other": 2, "abs_nodes": 3})
    assert [n.meta[CREATED_BY] for n in kept] == ["first", "by_itself"]  # a pass's own stamp is kept
    assert all(CREATED_BY not in n.meta for n in gm.graph.nodes if n not in kept)  # captured nodes: none


def test_pass_order_is_the_declared_lists():
    from rasfx import compiler

    assert PASS_ORDER == tuple(p.name for p in (*compiler.CAPTURE_PASSES, *compiler.VARIANT_PASSES,
                                                 *compiler.LOWERING_PASSES))
    assert PASS_ORDER.index("plan_regions") < PASS_ORDER.index("insert_gathers") < PASS_ORDER.index("lower_cache_ops")


def test_explain_reads_the_stamp():
    gm = _graph()
    x, relu = list(gm.graph.nodes)[:2]
    assert created_by(x) == "variant inputs"
    assert created_by(relu) == "unknown pass"  # never guessed from the op
    relu.meta[CREATED_BY] = "insert_gathers"
    assert created_by(relu) == "insert_gathers"


def test_execution_target_is_decided_from_the_config():
    eager = ExecutionTarget.of(rasfx.TransformConfig(mode="eager"))
    compiled = ExecutionTarget.of(rasfx.TransformConfig(mode="compile+cuda_graph", fuse=True))
    assert (eager.mode, eager.fuse, eager.contiguous_attention) == ("eager", False, False)
    assert (compiled.mode, compiled.fuse, compiled.contiguous_attention) == ("compile+cuda_graph", True, True)
    assert compiled.fuses(torch.device("cpu")) and not eager.fuses(torch.device("cpu"))
    assert not ExecutionTarget(fuse="auto").fuses(torch.device("cpu"))  # no Triton kernels on the CPU
    ras = rasfx.transform(torch.nn.Linear(4, 4), rasfx.TransformConfig(mode="compile"))
    assert ras.target == ExecutionTarget("compile", False, True) and ras.runner.mode == "compile"


def test_graph_arguments_are_placed_by_name():
    x, index, cache = torch.zeros(2), torch.arange(2), torch.zeros(3)
    dense = GraphVariant("dense", None, [], Counter())
    shared = GraphVariant("shared", None, [], Counter())
    assert dense.call_args([x], active_index=None, caches=[cache]) == [x, cache]
    assert shared.call_args([x], active_index=index, caches=[cache]) == [x, index, cache]
    with pytest.raises(UsageError, match="dense graph takes no active index"):
        dense.call_args([x], active_index=index, caches=[cache])
    with pytest.raises(UsageError, match="shared graph takes an active index"):
        shared.call_args([x], active_index=None, caches=[cache])
    key = GraphKey(*("cond", "shared", "sig", (6,)))
    assert (key.slot, key.variant, key.signature, key.index_shape) == ("cond", "shared", "sig", (6,))


def test_token_info_readers():
    gm = _graph()
    x, relu, add = list(gm.graph.nodes)[:3]
    a, b = Axis(1), Axis(2, extra=7, offset=None)
    x.meta["rasfx_tokens"] = (a,)
    relu.meta["rasfx_tokens"] = [(a, b), None, ()]
    add.meta["rasfx_tokens"] = None
    assert token_info.token_axes(x) == (a,) and token_info.token_axes(relu) == () and token_info.token_axes(add) == ()
    assert token_info.per_output_axes(x) == [(a,)]
    assert token_info.per_output_axes(relu) == [(a, b), None, ()] and token_info.per_output_axes(add) is None
    assert token_info.first_output_axes(relu) == (a, b) and token_info.first_output_axes(add) == ()
    assert token_info.all_token_axes(relu) == [a, b]
    assert token_info.has_token_axes(relu) and not token_info.has_token_axes(add)
    assert token_info.offsets_known(x) and not token_info.offsets_known(relu)
