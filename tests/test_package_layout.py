"""The layout of the package itself: no import cycle between rasfx's modules, no oversized file.

The import graph is read from the source (``ast``), not from ``sys.modules``: every
``import`` / ``from ... import`` of a rasfx module counts, also those inside functions (a lazy
import hides a cycle from the interpreter, not from a reader); imports under
``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "rasfx"
MAX_LINES = 620  # house style: files of about 600 lines at most


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: set) -> list[str]:
    """The rasfx modules an import statement of ``module`` loads (the innermost known module
    of each imported name: ``from . import render`` is ``rasfx.explain.render``)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = module.split(".") if is_package else module.split(".")[:-1]
        if node.level:
            base = base[: len(base) - node.level + 1]
            prefix = ".".join([*base, node.module] if node.module else base)
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix for alias in node.names]
    out = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.append(name)
    return out


def import_graph(package: Path = PACKAGE) -> nx.DiGraph:
    files = {_module_name(p): p for p in package.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(files)

    def visit(module: str, is_package: bool, node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # typing only, never imported at run time (the else branch is)
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                graph.add_edges_from((module, target) for target in _imported(module, is_package, child, set(files)))
            visit(module, is_package, child)

    for module, path in files.items():
        visit(module, path.name == "__init__.py", ast.parse(path.read_text(), str(path)))
    return graph


def test_the_import_graph_is_read():
    """The graph has the edges the sources plainly have (a reader that found no import would
    find no cycle either), lazy ones included."""
    graph = import_graph()
    assert graph.has_edge("rasfx.module", "rasfx.planned_capture")
    assert graph.has_edge("rasfx.explain.explanation", "rasfx.explain.render")  # from . import render
    assert graph.has_edge("rasfx.explain.explanation", "rasfx.compiler")  # inside a method
    assert not graph.has_edge("rasfx.pipeline.contract", "rasfx.module")  # under TYPE_CHECKING only


def test_no_import_cycle():
    cycles = sorted(nx.simple_cycles(import_graph()), key=len)
    assert not cycles, (
        f"import cycles between rasfx modules: {cycles[:5]}; move what both sides need into a module below "
        "both of them"
    )


def test_no_oversized_file():
    sizes = {str(p.relative_to(PACKAGE.parent)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    big = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not big, f"files over {MAX_LINES} lines: {big}; split them by what they do"
