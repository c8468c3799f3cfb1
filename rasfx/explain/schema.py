"""JSON Schema of ``Explanation.to_json()`` (``rasfx inspect --format json``)."""

from __future__ import annotations

from ..stages import STAGES, VARIANTS

SCHEMA = "rasfx.explain/1"
DIFF_SCHEMA = "rasfx.diff/1"

_AXIS = {"type": "object", "required": ["dim", "extra", "offset"],
         "properties": {"dim": {"type": "integer"}, "extra": {"type": "integer"},
                        "offset": {"type": ["integer", "null"]}}}

#: JSON Schema (draft 2020-12) of ``Explanation.to_json()``.
JSON_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "rasfx.explain/1",
    "type": "object",
    "required": ["schema", "rasfx_version", "model", "stage", "variant", "filters", "inputs", "num_tokens", "batch",
                 "ratio", "active_tokens", "nodes", "sites", "caches", "conservative", "counters", "summary"],
    "properties": {
        "schema": {"const": SCHEMA},
        "rasfx_version": {"type": "string"},
        "model": {"type": "object", "required": ["name", "class", "source"]},
        "stage": {"enum": list(STAGES)},
        "variant": {"enum": list(VARIANTS)},
        "filters": {"type": "object", "required": ["module", "op"]},
        "inputs": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "num_tokens": {"type": "integer"}, "batch": {"type": "integer"},
        "ratio": {"type": "number"}, "active_tokens": {"type": "integer"},
        "nodes": {"type": "array", "items": {
            "type": "object",
            "required": ["name", "op", "target", "graph_op", "category", "shapes", "active_shapes", "dtypes", "mode",
                         "token_axes", "module", "created_by", "inputs", "note"],
            "properties": {
                "name": {"type": "string"}, "op": {"type": "string"}, "target": {"type": "string"},
                "graph_op": {"enum": ["placeholder", "call_function", "call_method", "call_module", "get_attr", "output"]},
                "category": {"type": "string"},
                "shapes": {"type": ["array", "null"], "items": {"type": ["array", "null"], "items": {"type": "integer"}}},
                "active_shapes": {"type": ["array", "null"]},
                "dtypes": {"type": ["array", "null"]},
                "mode": {"enum": ["A", "F", "-", None]},
                "token_axes": {"type": ["array", "null"], "items": {"type": ["array", "null"], "items": _AXIS}},
                "module": {"type": "string"}, "created_by": {"type": ["string", "null"]},
                "inputs": {"type": "array", "items": {"type": "string"}}, "note": {"type": "string"},
            }}},
        "sites": {"type": "array", "items": {"type": "object", "required": [
            "producer", "consumer", "kind", "axis", "shape", "dtype", "bytes", "reason", "module"],
            "properties": {"kind": {"enum": ["attention", "mixing", "opaque", "output"]}, "axis": _AXIS,
                           "bytes": {"type": "integer"}}}},
        "caches": {"type": "array", "items": {"type": "object", "required": [
            "name", "kind", "producer", "consumer", "shape", "dtype", "dim", "bytes"]}},
        "conservative": {"type": "array", "items": {"type": "object", "required": ["node", "target", "reason"]}},
        "tokenwise_modules": {"type": "array",
                              "items": {"type": "object", "required": ["module", "class", "reason"]}},
        "counters": {"type": "object", "required": ["capture", "variant"]},
        "summary": {"type": "object", "required": ["nodes", "region", "conditioning", "flops", "cache_bytes"],
                    "properties": {"flops": {"type": "object", "required": ["dense", "at_ratio", "ratio", "n", "N"]}}},
    },
}
