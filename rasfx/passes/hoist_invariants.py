"""Hoist the computation that does not change between denoising steps out of the step graph.

A diffusers pipeline calls the transformer once per step with the same prompt tensors
(``encoder_hidden_states``, pooled projections, masks, position ids): only the latent and
the timestep change. Everything the graph computes from those inputs and the weights alone
is the same on every step: PixArt's and Wan's cross-attention keys and values of the text
(two projections per block), the caption/context embedders, Flux's rotary tables, mask
conversions. The original model recomputes it at every step; rasfx computes it once.

``hoist_invariants(gm, invariant_inputs, user_inputs)`` splits ``gm`` in two:

* a *prologue* ``GraphModule`` that reads only the graph inputs at ``invariant_inputs``
  (weights, constants and the user inputs expected to stay the same between steps) and
  returns the hoisted values;
* ``gm`` itself, rewritten to read those values from new placeholders (appended after the
  existing ones, named ``ras_hoisted_<i>``) instead of computing them.

What is hoisted: a call node whose inputs are all invariant, that depends on at least one
invariant *user* input (weight-only arithmetic such as ``t(weight)`` stays: it is free or
constant-folded by Inductor), that is pure (no mutation, no random numbers), an ATen op
or a getitem, and that reads no tensor an in-place op of the graph writes (nor a view of
one: ``x[i, :L] = v`` writes ``x`` after its creation). The values handed over (the *boundary*) are fresh tensors computed by the
prologue, never views of a graph input or of another value: the runtime refreshes them in
place when an input changes, which must not write through into the user's tensors, and the
views stay in the step graph, where they cost nothing.

Invariants: ``gm`` computes exactly what it computed before, given the prologue's outputs
for the same inputs (the values are the same tensors the removed nodes produced); the
prologue has no side effects; the original placeholders keep their order and position.
Returns a ``Hoisted`` (``None`` when nothing is hoisted, ``gm`` then unchanged); counters
``hoisted_nodes`` (nodes moved to the prologue) and ``hoisted_values`` (its outputs).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.fx as fx

from .op_rules import mutated_storages, storage_root

__all__ = ["Hoisted", "hoist_invariants"]


@dataclass
class Hoisted:
    prologue: fx.GraphModule  # prologue(*[graph inputs at `inputs`]) -> list of hoisted values
    inputs: list[int]  # positions, among gm's original placeholders, of the prologue's inputs
    user_inputs: list[int]  # the subset of `inputs` that are user inputs (checked for changes at run time)
    user_names: list[str] = field(default_factory=list)  # their placeholder names (the forward's argument names)
    counters: Counter = field(default_factory=Counter)


def _aliases(node: fx.Node) -> bool:
    """Whether the op returns a view of one of its inputs (view, permute, expand, split...)."""
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def _pure_aten(node: fx.Node) -> bool:
    target = node.target
    if target is operator.getitem:
        return True
    if not isinstance(target, torch._ops.OpOverload) or target.namespace not in ("aten", "prims"):
        return False
    if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return True


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def hoist_invariants(gm: fx.GraphModule, invariant_inputs: set[int], user_inputs: set[int]) -> Hoisted | None:
    """Move what ``gm`` computes from the inputs at ``invariant_inputs`` alone into a prologue.

    ``invariant_inputs``: positions of the placeholders that keep their values between steps
    (weights, constants, prompt tensors); ``user_inputs``: which of them are user inputs (a
    hoisted node must depend on one of these).
    """
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    inv: set[fx.Node] = {placeholders[i] for i in invariant_inputs}
    from_user: set[fx.Node] = {placeholders[i] for i in user_inputs if i in invariant_inputs}
    hoist: set[fx.Node] = set()
    mutated = mutated_storages(graph)
    inv -= set(mutated)
    for node in graph.nodes:
        if node.op != "call_function" or not _pure_aten(node) or storage_root(node) in mutated:
            continue
        if all(a in inv for a in node.all_input_nodes):
            inv.add(node)
            if any(a in from_user for a in node.all_input_nodes):
                from_user.add(node)
                hoist.add(node)

    # Boundary values must be fresh tensors: a view (or getitem of a view op, or a tuple)
    # stays in the step graph, computed there from its hoisted input, until a fixpoint.
    def boundary() -> list[fx.Node]:
        return [n for n in graph.nodes if n in hoist and any(u not in hoist for u in n.users)]

    changed = True
    while changed:
        changed = False
        for node in boundary():
            # getitem's first argument is the node it indexes
            src = cast(fx.Node, node.args[0]) if node.target is operator.getitem else node
            if not _is_tensor(node) or _aliases(src) or (src is not node and src not in hoist):
                hoist.discard(node)
                changed = True
    # Nothing left but views, or arithmetic on nothing but constants: not worth a prologue.
    if not any(not _aliases(n) and n.target is not operator.getitem for n in hoist):
        return None

    outs = boundary()
    needed: set[fx.Node] = set()
    stack = list(outs)
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)

    # The prologue: the needed nodes in graph order, placeholders first.
    pro = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs = [i for i, p in enumerate(placeholders) if p in needed]
    for i in inputs:
        env[placeholders[i]] = pro.placeholder(placeholders[i].name)
        env[placeholders[i]].meta = dict(placeholders[i].meta)
    for node in graph.nodes:
        if node in needed and node.op != "placeholder":
            env[node] = pro.node_copy(node, lambda a: env[a])
    pro.output([env[n] for n in outs])
    prologue = fx.GraphModule(gm, pro)

    # The step graph reads the boundary values from new placeholders.
    last = placeholders[-1]
    for i, node in enumerate(outs):
        with graph.inserting_after(last):
            ph = graph.placeholder(f"ras_hoisted_{i}")
        ph.meta = dict(node.meta)
        ph.meta["rasfx_created_by"] = "hoist_invariants"
        node.replace_all_uses_with(ph, delete_user_cb=lambda u: u not in hoist)
        last = ph
    removed = 0
    for node in reversed(list(graph.nodes)):
        if node in hoist and not node.users:
            graph.erase_node(node)
            removed += 1
        elif node in inv and node.op == "call_function" and not node.users:
            graph.erase_node(node)  # weight/constant arithmetic that only hoisted nodes read
    graph.lint()
    gm.recompile()
    counters = Counter(hoisted_nodes=removed, hoisted_values=len(outs))
    users = [i for i in inputs if i in user_inputs]
    return Hoisted(prologue, inputs, users, [placeholders[i].name for i in users], counters)
