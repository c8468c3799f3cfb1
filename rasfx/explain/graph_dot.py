"""Graphviz drawings of an :class:`Explanation` (``--format dot``, ``svg``, and the graph of the
HTML page), coloured by the region plan's mode (active green, full blue, no token axis grey;
what the passes added outlined in orange).

A whole graph is drawn by module: each module of a transformer block (``attn``, ``ff``,
``norm1``...) and each top-level module (``pos_embed``, ``proj_out``...) is one box that
lists its ops; the ops of a block's own forward (residuals, gates) are drawn one by one
inside the block's cluster; a run of blocks with the same structure as the block before it is
one box. A part of the graph (``--module``, ``--op``) is drawn node by node, shape-only ops
(views, ``getitem``) folded into the edges. ``all_nodes=True`` (``rasfx inspect --all-nodes``)
draws every node.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import RasfxError, ToolMissingError
from .views import NodeView, _block_of

if TYPE_CHECKING:
    from .explanation import Explanation

DOT_BINARY_HINT = (
    "install Graphviz (apt-get install graphviz, brew install graphviz or conda install graphviz); "
    "--format dot writes the graph source without it"
)
#: node categories left out of the drawing (weights and constants)
HIDDEN = ("parameter", "buffer", "constant")


MODE_FILL = {"A": "#c8e6c9", "F": "#bbdefb", "-": "#eeeeee", None: "#ffffff"}


def _dot_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\\\\n", "\\n")


def _dot_id(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dot_node_attrs(v: NodeView) -> str:
    label = f"{v.name}\\n{v.op}"
    if v.shapes is not None:
        label += f"\\n{v.shape_str()}"
    attrs = [f'label="{_dot_escape(label)}"', f'fillcolor="{MODE_FILL.get(v.mode, "#ffffff")}"']
    tip = " | ".join(x for x in (v.module, v.tokens_str() if v.tokens is not None else "", v.note) if x and x != "-")
    if tip:
        attrs.append(f'tooltip="{_dot_escape(tip)}"')
    if v.created_by:
        attrs.append('color="#e65100", penwidth=2')
    if v.category in ("input", "rasfx input", "output"):
        attrs.append('shape=oval')
    return ", ".join(attrs)


def render_svg(dot_source: str, timeout: float = 300.0) -> str:
    exe = shutil.which("dot")
    if exe is None:
        raise ToolMissingError(f"the svg format needs Graphviz's `dot` program, which is not on PATH: {DOT_BINARY_HINT}")
    try:
        proc = subprocess.run([exe, "-Tsvg"], input=dot_source.encode(), capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ToolMissingError(f"`dot` did not finish within {timeout:.0f} s; use --module/--op to draw a part "
                               "of the graph, or --format dot") from None
    if proc.returncode != 0:
        raise RasfxError(f"`dot -Tsvg` failed: {proc.stderr.decode(errors='replace').strip()[:500]}")
    return proc.stdout.decode("utf-8", errors="replace")


def svg_body(svg: str) -> str:
    i = svg.find("<svg")
    return svg[i:] if i >= 0 else svg


def _structure(block: str, members: list[NodeView]) -> tuple:
    """What two blocks must share to be drawn once: ops, modes, passes, module paths below
    the block, shapes, and the wiring inside the block."""
    index = {v.name: i for i, v in enumerate(members)}
    return tuple((v.op, v.mode, v.created_by, v.module[len(block):], v.shape_str(),
                  tuple(index.get(i, -1) for i in v.inputs)) for v in members)


@dataclass
class _Box:
    """A run of blocks drawn as one box: ``blocks`` have the structure of ``like``."""

    ident: str
    like: str
    blocks: list[str] = field(default_factory=list)
    nodes: int = 0

    def label(self) -> str:
        span = self.blocks[0] + (f"..{self.blocks[-1].rpartition('.')[2]}" if len(self.blocks) > 1 else "")
        count = f"{len(self.blocks)} block{'s' if len(self.blocks) > 1 else ''}"
        return f"{span}\\n{count} like {self.like} ({self.nodes} nodes each)"


def repeated_blocks(views: list[NodeView]) -> dict[str, _Box]:
    """Blocks drawn as a box (block path -> its box): a run of consecutive blocks of one list
    (``transformer_blocks.1`` .. ``.6``) with the structure of the block drawn before them."""
    blocks: OrderedDict[str, list[NodeView]] = OrderedDict()
    for v in views:
        block = _block_of(v.module)
        if block is not None:
            blocks.setdefault(block, []).append(v)
    boxed: dict[str, _Box] = {}
    drawn: tuple[str, tuple] | None = None  # (list path, structure) of the last block drawn
    box: _Box | None = None
    last = ""
    for block, members in blocks.items():
        key = (block.rpartition(".")[0], _structure(block, members))
        if key != drawn:
            drawn, box, last = key, None, block
            continue
        if box is None:
            box = _Box(f"repeated_{len(set(map(id, boxed.values())))}", last, nodes=len(members))
        box.blocks.append(block)
        boxed[block] = box
    return boxed


def _unit_of(module: str) -> str | None:
    """The box a node is drawn in on a whole-graph drawing: its block's child module
    (``transformer_blocks.0.attn``) or its top-level module (``pos_embed``); None for the ops
    of a block's own forward and of the model's (drawn one by one)."""
    block = _block_of(module)
    if block is not None:
        rest = module[len(block) + 1:]
        return f"{block}.{rest.split('.')[0]}" if rest else None
    return module.split(".")[0] if module else None


def _unit_attrs(unit: str, members: list[NodeView]) -> str:
    """A module box: its name, what it computes (views left out), its modes."""
    ops = Counter(v.op.removeprefix("aten::").removeprefix("rasfx::") for v in members
                  if v.category not in ("view",) + HIDDEN and v.graph_op == "call_function")
    shown = ", ".join(f"{op}" + (f" x{k}" if k > 1 else "") for op, k in ops.most_common(4))
    shown += ", ..." if len(ops) > 4 else ""
    modes = Counter(v.mode for v in members if v.mode in ("A", "F"))
    mode = ", ".join(f"{'active' if m == 'A' else 'full'} {k}" for m, k in sorted(modes.items()))
    added = sorted({v.op.removeprefix("rasfx::") for v in members if v.created_by and v.graph_op == "call_function"})
    label = "\\n".join(x for x in (unit.rpartition(".")[2] if _block_of(unit) else unit, shown, mode,
                                    "added: " + ", ".join(added) if added else "") if x)
    fill = MODE_FILL[modes.most_common(1)[0][0] if modes else "-"]  # the mode of most of its nodes
    attrs = [f'label="{_dot_escape(label)}"', f'fillcolor="{fill}"', f'tooltip="{_dot_escape(unit)}"']
    if any(v.created_by for v in members):
        attrs.append('color="#e65100", penwidth=2')
    return ", ".join(attrs)


def dot_source(exp: Explanation, *, all_nodes: bool = False) -> str:
    """Graphviz source of ``exp``'s (filtered) nodes; see the module doc."""
    every = exp.nodes()
    views = [v for v in every if v.category not in HIDDEN]
    whole = not all_nodes and not exp.filters_str()
    boxed = repeated_blocks(views) if whole else {}
    rep: dict[str, str] = {}  # node -> the drawn node, module box or block box that stands for it
    units: OrderedDict[str, list[NodeView]] = OrderedDict()
    folded = 0
    for v in views:
        block = _block_of(v.module)
        unit = _unit_of(v.module) if whole else None
        ins = list(OrderedDict.fromkeys(rep[i] for i in v.inputs if i in rep))
        if block is not None and block in boxed:
            rep[v.name] = boxed[block].ident
        elif unit is not None:
            rep[v.name] = "module:" + unit
            units.setdefault(unit, []).append(v)
        elif not all_nodes and v.category == "view" and len(ins) == 1 and not v.created_by:
            rep[v.name] = ins[0]
            folded += 1
        else:
            rep[v.name] = v.name
    lines = ["digraph rasfx {"]
    title = f"rasfx: {exp.header()}" + (f" (filter: {exp.filters_str()})" if exp.filters_str() else "")
    title += f"\\nN = {exp.num_tokens} image tokens; {len(every) - len(views)} parameter/buffer inputs not drawn"
    if whole:
        title += "\\none box per module, blocks like the one before as one box (rasfx inspect --all-nodes draws every node)"
    elif folded:
        title += f"\\n{folded} shape-only nodes folded into edges (rasfx inspect --all-nodes draws them)"
    lines.append(f'  graph [label="{_dot_escape(title)}", labelloc=t, fontname="Helvetica", fontsize=12, '
                 'rankdir=TB, nodesep=0.15, ranksep=0.25];')
    lines.append('  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=9, '
                 'fillcolor="#ffffff", color="#777777", margin="0.08,0.03", height=0.3];')
    lines.append('  edge [color="#888888", arrowsize=0.5];')
    # what is drawn, by cluster (a transformer block, or a module in a part of the graph)
    clusters: OrderedDict[str | None, list[str]] = OrderedDict()
    for v in views:
        ident = rep[v.name]
        if ident == v.name:
            key = _block_of(v.module) if whole else (_block_of(v.module) or v.module.split(".")[0] or None)
            clusters.setdefault(key, []).append(f"{_dot_id(v.name)} [{_dot_node_attrs(v)}];")
        elif ident.startswith("module:") and units[ident[7:]][0] is v:
            unit = ident[7:]
            attrs = _dot_node_attrs(v) if len(units[unit]) == 1 else _unit_attrs(unit, units[unit])
            clusters.setdefault(_block_of(unit), []).append(f"{_dot_id(ident)} [{attrs}];")
    for box in OrderedDict((id(b), b) for b in boxed.values()).values():
        clusters.setdefault(None, []).append(f'{_dot_id(box.ident)} [label="{box.label()}", shape=box3d, '
                                             'style="filled", fillcolor="#f0f0f0"];')
    for k, (key, members) in enumerate(clusters.items()):
        if key is None:
            lines.extend("  " + m for m in members)
            continue
        lines.append(f'  subgraph "cluster_{k}" {{')
        lines.append(f'    label="{_dot_escape(key)}"; style="rounded,filled"; fillcolor="#fafafa"; '
                     'color="#bbbbbb"; fontsize=10;')
        lines.extend("    " + m for m in members)
        lines.append("  }")
    edges = OrderedDict.fromkeys((rep[i], rep[v.name]) for v in views for i in v.inputs
                                 if i in rep and rep[i] != rep[v.name])
    lines.extend(f"  {_dot_id(a)} -> {_dot_id(b)};" for a, b in edges)
    lines.append('  subgraph "cluster_legend" {')
    lines.append('    label="legend"; fontsize=10; style="rounded"; color="#bbbbbb";')
    for key, ident, text in (("A", "a", "active (n tokens)"), ("F", "f", "full length (N)"),
                             ("-", "x", "no token axis")):
        lines.append(f'    "legend_{ident}" [label="{text}", fillcolor="{MODE_FILL[key]}"];')
    lines.append('    "legend_p" [label="added by a pass", fillcolor="#ffffff", color="#e65100", penwidth=2];')
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"
