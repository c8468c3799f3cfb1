"""Shared state of the rewrite passes over one graph variant.

A variant is one of ``dense`` (every token computed; caches filled), ``shared`` (one
index set ``[n]`` for all batch rows) or ``rowwise`` (``[B, n]``). The context owns the
extra graph inputs that the rewrite adds after the captured ones: the active index
(not in ``dense``) and one full-length cache per site.
"""

from __future__ import annotations

import operator
from typing import Optional
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .. import ops
from .batch_rows import ROW_GROUPS, ROWS
from .plan_regions import RegionPlan
from .token_analysis import Axis


@dataclass
class CacheSpec:
    name: str
    shape: tuple
    dtype: torch.dtype
    device: torch.device
    kind: str
    producer: str
    consumer: str
    dim: int
    stride: tuple | None = None

    def allocate(self, contiguous_attention: bool = False) -> torch.Tensor:
        """An uninitialised cache in the producer's layout (a dense step's fill is a plain
        copy); ``contiguous_attention``: attention caches contiguous instead (the execution
        target decides, see ``target.ExecutionTarget``)."""
        if self.stride is not None and not (contiguous_attention and self.kind == "attention"):
            return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)


@dataclass
class RewriteContext:
    gm: fx.GraphModule
    plan: RegionPlan
    num_tokens: int
    variant: str  # "dense" | "shared" | "rowwise"
    contiguous_attention: bool = False  # attention caches are allocated contiguous (CacheSpec.allocate)
    caches: list = field(default_factory=list)  # [CacheSpec], in graph-input order
    index: fx.Node | None = None
    _after_inputs: fx.Node = field(init=False)  # set by __post_init__
    _seq_index: dict = field(default_factory=dict)
    _sizes: dict = field(default_factory=dict)
    _count: fx.Node | None = None

    def __post_init__(self):
        self.nodes = {n.name: n for n in self.gm.graph.nodes}
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        self._last_input = placeholders[-1]
        if self.variant != "dense":
            with self.gm.graph.inserting_after(self._last_input):
                self.index = self.gm.graph.placeholder("ras_index")
            self._last_input = self.index
        self._after_inputs = self._last_input

    @property
    def dense(self) -> bool:
        return self.variant == "dense"

    def add_cache(self, kind: str, producer: str, consumer: str, shape, dtype, device, dim, stride=None) -> fx.Node:
        name = f"ras_cache_{len(self.caches)}"
        with self.gm.graph.inserting_after(self._last_input):
            node = self.gm.graph.placeholder(name)
        self._last_input = node
        node.meta["rasfx_created_by"] = "insert_cache_sites"
        self.caches.append(CacheSpec(name, tuple(shape), dtype, device, kind, producer, consumer, dim, stride))
        node.meta["rasfx_cache"] = self.caches[-1]
        return node

    def _insert_top(self, target, args, by: Optional[str] = None) -> fx.Node:
        # Index arithmetic lives right after the graph inputs, computed once per forward and
        # shared by the passes that ask for it: stamped with ``by``, else by compiler.run_passes
        # with the pass that asked first.
        anchor = self._top_anchor()
        with self.gm.graph.inserting_after(anchor):
            node = self.gm.graph.call_function(target, args)
        if by is not None:
            node.meta["rasfx_created_by"] = by
        self._top = node
        return node

    def _top_anchor(self) -> fx.Node:
        top = getattr(self, "_top", None)
        return top if top is not None else self._last_input_for_top()

    def _last_input_for_top(self) -> fx.Node:
        # caches are appended later as placeholders; fx requires placeholders first, so
        # computed nodes go after the *last* placeholder at lint time (see finalize()).
        return self._after_inputs

    def token_index(self, axis: Axis, node: fx.Node | None = None) -> fx.Node:
        """Index of the active positions along a token axis (image-only, concatenated or
        folded) of ``node``'s value, for the batch rows it holds (``batch_rows.ROWS``: some rows
        only; ``batch_rows.ROW_GROUPS``: several consecutive rows per sample)."""
        assert self.index is not None
        index = self.index
        rows = node.meta.get(ROWS) if node is not None else None
        groups = node.meta.get(ROW_GROUPS, 1) if node is not None and self.variant == "rowwise" else 1
        if rows is not None and self.variant == "rowwise":
            if ("rows", rows) not in self._seq_index:
                self._seq_index[("rows", rows)] = self._insert_top(ops.index_rows, (self.index, *rows))
            index = self._seq_index[("rows", rows)]
        else:
            rows = None
        if axis.outer > 1:
            if ("fold", axis.outer, rows) not in self._seq_index:
                self._seq_index[("fold", axis.outer, rows)] = self._insert_top(
                    ops.fold_index, (index, axis.outer, self.num_tokens))
            return self._seq_index[("fold", axis.outer, rows)]
        if groups > 1:
            if ("groups", groups, rows) not in self._seq_index:
                self._seq_index[("groups", groups, rows)] = self._insert_top(ops.index_groups, (index, groups))
            index = self._seq_index[("groups", groups, rows)]
        if axis.extra == 0:
            return index
        key = (axis.offset, axis.extra, rows, groups)
        if key not in self._seq_index:
            self._seq_index[key] = self._insert_top(
                ops.sequence_index, (index, axis.offset, self.num_tokens, self.num_tokens + axis.extra)
            )
        return self._seq_index[key]

    def active_size(self, a: int, b: int) -> fx.Node:
        """A graph value for ``a * n + b`` (n = active count, read from the index shape)."""
        if self._count is None:
            self._count = self._insert_top(ops.active_count, (self.index,), "resize_token_shapes")
        key = (a, b)
        if key not in self._sizes:
            node = self._count
            if a != 1:
                node = self._insert_top(operator.mul, (node, a), "resize_token_shapes")
            if b != 0:
                node = self._insert_top(operator.add, (node, b), "resize_token_shapes")
            self._sizes[key] = node
        return self._sizes[key]

    def finalize(self) -> fx.GraphModule:
        # Placeholders must precede every computation: move the added ones up.
        graph = self.gm.graph
        first_compute = next(n for n in graph.nodes if n.op != "placeholder")
        for node in list(graph.nodes):
            if node.op == "placeholder":
                first_compute.prepend(node)
        graph.eliminate_dead_code(is_impure_node=_keep)
        graph.lint()
        self.gm.recompile()
        return self.gm


def _keep(node: fx.Node) -> bool:
    return node.op in ("placeholder", "output") or node.is_impure()
