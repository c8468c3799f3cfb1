"""Remove export's runtime metadata asserts.

``torch.export`` inserts ``aten._assert_tensor_metadata`` (and scalar asserts) that check
dtypes/devices/sizes of the captured run. They compute nothing, and size asserts would be
wrong once the token axis shrinks to the active count.

Invariants: only assert nodes (no users, no outputs) are removed. Counter: ``asserts``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten

ASSERT_OPS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default}


def strip_asserts(gm: fx.GraphModule) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in ASSERT_OPS and not node.users:
            gm.graph.erase_node(node)
            count += 1
    gm.recompile()
    return count
