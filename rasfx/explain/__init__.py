"""Show what the rasfx compiler did to a model (``rasfx.explain``; ``rasfx inspect`` on the
command line).

``explain(model, inputs)`` captures the model for one input signature (the forward is not
run) and returns an :class:`Explanation` of one *stage* of the compiler:

- ``captured``: the ATen graph from ``torch.export`` (after ``strip_asserts``, and
  ``flatten_token_grids`` where the model puts its tokens back on their grid);
- ``analyzed``: the same graph with the token analysis (token axes of every tensor) and the
  region plan (``active``: runs on the active tokens only, ``full``: full length, ``-``: no
  token axis);
- ``transformed``: the runnable graph of one variant (``shared`` by default: one active set
  for the whole batch; ``rowwise``; ``dense``) with the nodes the passes added (gathers,
  caches, cache-aware attention, index arithmetic);
- ``fused``: the graph after the fusion passes, where this build of rasfx has them;
- ``lowered``: what ``torch.compile`` receives in the compile modes: the variant with its cache
  ops lowered to in-place ATen writes (``passes/lower_cache_ops.py``).

Views: :meth:`Explanation.summary` (counts, token region, token-mixing sites and caches,
conservative ops, pass counters, estimated FLOPs and cache memory, timings),
:meth:`~Explanation.text` (one line per node), :meth:`~Explanation.to_json`,
:meth:`~Explanation.to_dot` / :meth:`~Explanation.to_svg` (Graphviz: a whole graph by
module, repeated blocks once; ``all_nodes=True`` every node), :meth:`~Explanation.to_html`
(a standalone page; also ``_repr_html_`` for notebooks) and :meth:`~Explanation.diff`
between two stages, grouped by the pass that made each change.

FLOP estimates (:mod:`rasfx.flops`, the model ``rasfx.stats`` reports too) count matrix
products (``linear``, ``mm``, ``bmm``, ``matmul``, ``einsum``), attention (``QK^T`` and ``PV``)
and convolutions from the captured shapes; at a ratio ``r`` with ``n = round(r * N)`` active
tokens (at least 1), an active node's FLOPs scale with its output's token axis (``n + c`` of
``N + c`` rows); attention also scales with its keys when they are active rather than read
from a cache (``kv_cache=False``). Elementwise ops are not counted.

JSON schema (``to_json()``, ``rasfx inspect --format json``), ``"schema": "rasfx.explain/1"``::

    {
      "schema": "rasfx.explain/1", "rasfx_version": str,
      "model": {"name": str, "class": str, "source": str},
      "stage": "captured"|"analyzed"|"transformed"|"fused"|"lowered", "variant": "shared"|"rowwise"|"dense",
      "filters": {"module": str|null, "op": str|null},
      "inputs": [{"name": str, "shape": [int], "dtype": str} | {"name": str, "value": str}],
      "num_tokens": int, "batch": int, "ratio": float, "active_tokens": int,
      "nodes": [{
          "name": str, "op": str,            # op: "aten::linear", "rasfx::ras_attention", "input", "param", ...
          "target": str, "graph_op": "placeholder"|"call_function"|"get_attr"|"output",
          "category": str,                   # matmul, attention, conv, norm, reduction, view, elementwise, rasfx, input, ...
          "shapes": [[int]|null] | null,     # full (captured) shape of each tensor output
          "active_shapes": [[int|str]|null] | null,   # token dims as "n" / "n+c" for active nodes
          "dtypes": [str|null] | null,
          "mode": "A"|"F"|"-"|null,          # null at stage captured
          "token_axes": [[{"dim": int, "extra": int, "offset": int|null}]|null] | null,
          "module": str,                     # module path, "" = the model itself
          "created_by": str|null,            # pass that added the node (null: captured node)
          "inputs": [str], "note": str
      }],
      "sites": [{"producer", "consumer", "kind", "axis": {...}, "shape", "dtype", "bytes", "reason", "module"}],
      "caches": [{"name", "kind", "producer", "consumer", "shape", "dtype", "dim", "bytes"}],
      "conservative": [{"node", "target", "reason", "module"}],
      "counters": {"capture": {str: int}, "variant": {str: int}},
      "summary": {"nodes": {...}, "region": {...}|null, "conditioning": [...], "flops": {...},
                  "cache_bytes": int, "timings": {str: float}}
    }

The ``shared`` variant is what a RAS step runs; ``caches`` are per cache slot (each CFG
branch with its own ``cache_context`` holds one set).
"""

from __future__ import annotations

import torch

from ..errors import ArgumentTypeError, ExplainError, ToolMissingError, UnsupportedModelError
from ..flops import node_flops
from ..stages import FORMATS, STAGES, VARIANTS
from .diff import DiffEntry, StageDiff
from .explanation import Explanation
from .graph_dot import DOT_BINARY_HINT, render_svg
from .schema import DIFF_SCHEMA, JSON_SCHEMA, SCHEMA
from .views import _module_matches as _module_matches  # re-exported for tests
from .views import NodeView, describe_inputs, human_bytes, human_flops, op_name

__all__ = [
    "DIFF_SCHEMA",
    "DOT_BINARY_HINT",
    "FORMATS",
    "JSON_SCHEMA",
    "SCHEMA",
    "STAGES",
    "VARIANTS",
    "DiffEntry",
    "ExplainError",
    "Explanation",
    "NodeView",
    "StageDiff",
    "ToolMissingError",
    "describe_inputs",
    "explain",
    "human_bytes",
    "human_flops",
    "node_flops",
    "op_name",
    "render_svg",
]


def explain(model, inputs: dict | None = None, *, ratio: float = 0.25, stage: str = "transformed",
            variant: str = "shared", module: str | None = None, op: str | None = None,
            image_input: str | None = None, name: str | None = None, kv_cache: bool = True,
            **load_options) -> Explanation:
    """Capture ``model`` for ``inputs`` (its forward's keyword arguments) and explain one
    stage of the compiler.

    ``model`` may be a ``torch.nn.Module`` (with ``inputs``), a ``RASModule`` (``inputs``
    optional: its most recent capture is used), a ``PlannedCapture``, or a string as
    ``rasfx inspect`` takes it: a preset name (``"sd3-tiny"``), a diffusers model folder or
    ``config.json``, or ``"package.module:factory"`` (``load_options``: ``height``,
    ``width``, ``batch``, ``seed``, ``meta``, ``frames``, ``text_tokens``). The forward is not run.

    ``ratio`` (in (0, 1]) sets the active count of the estimates; ``stage`` is one of
    ``captured``, ``analyzed``, ``transformed``, ``fused``; ``variant`` (``shared``,
    ``rowwise``, ``dense``) the graph variant of the ``transformed`` stage; ``module`` and
    ``op`` filter the nodes shown (module path prefix, op substring); ``kv_cache=False``
    plans attention over the active tokens only (``TransformConfig.kv_cache``; a
    ``RASModule`` uses its own config).
    """
    from ..capture import bind_inputs
    from ..planned_capture import PlannedCapture
    from ..module import RASModule

    if stage not in STAGES:
        raise ExplainError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    if variant not in VARIANTS:
        raise ExplainError(f"unknown variant {variant!r}; variants are {', '.join(VARIANTS)}")
    source = "module"
    notes: tuple = ()
    if isinstance(model, str):
        if inputs is not None:
            raise ArgumentTypeError("explain(MODEL string) builds its own inputs; pass height/width/batch/seed instead")
        from ..loading import capture_model

        loaded, cc = capture_model(model, image_input=image_input, kv_cache=kv_cache, **load_options)
        return Explanation(cc, stage=stage, variant=variant, ratio=ratio, module=module, op=op,
                           model_name=name or loaded.name, model_class=type(loaded.model).__name__,
                           source=loaded.source, inputs=describe_inputs(loaded.inputs), notes=loaded.notes)
    if load_options:
        raise ArgumentTypeError(f"explain() got options {sorted(load_options)} that only apply to a MODEL string")

    if isinstance(model, PlannedCapture):
        cc = model
        model_class = name or "model"
        return Explanation(cc, stage=stage, variant=variant, ratio=ratio, module=module, op=op, model_name=name,
                           model_class=model_class, source="capture")
    if isinstance(model, RASModule):
        ras = model
        if inputs is None:
            cc = ras._current_capture()
            if cc is None:
                raise ExplainError("this RASModule has not captured anything yet: pass the forward's inputs "
                                   "(explain(ras, inputs)) or call it once")
        else:
            kwargs = bind_inputs(ras.model, (), dict(inputs))
            cc = ras._get_capture(ras._signature(kwargs), kwargs)
        inner = ras.model
        desc = describe_inputs(inputs) if inputs is not None else []
        return Explanation(cc, stage=stage, variant=variant, ratio=ratio, module=module, op=op,
                           model_name=name or type(inner).__name__, model_class=type(inner).__name__,
                           source="RASModule", inputs=desc, notes=notes)
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(f"explain needs a torch.nn.Module, a RASModule or a MODEL string, "
                                    f"got {type(model).__name__}")
    if inputs is None or not isinstance(inputs, dict):
        raise ExplainError("explain(model, inputs): inputs must be the dict of keyword arguments of one forward")
    from ..loading import plan_model

    cc = plan_model(model, inputs, image_input=image_input, kv_cache=kv_cache)
    return Explanation(cc, stage=stage, variant=variant, ratio=ratio, module=module, op=op,
                       model_name=name or type(model).__name__, model_class=type(model).__name__, source=source,
                       inputs=describe_inputs(dict(inputs)), notes=notes)
