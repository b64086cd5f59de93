"""The import rules of the house (STYLE.md "Layers"), checked on the source.

Every ``import`` of every module of ``chronicle`` and ``agent_runtime`` is read
with :mod:`ast` — module-level and function-level alike, so a function-level
import cannot hide a cycle; only imports under ``if TYPE_CHECKING:`` are left
out (they never run). Then:

- there is no import cycle among the project's modules;
- ``chronicle.store`` never imports pyfuse3, trio, aiohttp, ``chronicle.fs``,
  the CLI or ``agent_runtime`` (it is plain synchronous code);
- the bottom of the chunk room (ids, codec, chunker, tree, backends) never imports
  the metadata, namespace, history or fsck rooms;
- ``chronicle.fs`` never imports ``agent_runtime``; ``agent_runtime`` never
  imports ``chronicle.fs``;
- the web timeline (``chronicle.ui``) never imports ``chronicle.fs``, pyfuse3,
  trio or the CLI, and neither the store, the adapter nor the runtime imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("chronicle", "agent_runtime")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Absolute names of every module ``module`` imports (outside TYPE_CHECKING)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            for alias in node.names:           # ``from pkg import module`` imports pkg.module
                found.add(f"{prefix}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    sources = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            sources[_module_name(path)] = path
    graph = {}
    for module, path in sources.items():
        imported = _imports(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py")
        graph[module] = imported
    return graph


GRAPH = _graph()
OURS = set(GRAPH)


def _first_party(names: set[str]) -> set[str]:
    return {name for name in names if name in OURS}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_graph_sees_the_project():
    assert "chronicle.store.store" in GRAPH and "agent_runtime.runtime" in GRAPH
    assert "chronicle.store.namespace.workspace" in GRAPH["chronicle.store.store"]


def test_no_import_cycles():
    # ``import a.b`` or ``from a import b`` is an edge to ``a.b`` (and ``from a import x`` to ``a``,
    # the package's __init__), so loops through re-exports in an __init__ count too.
    graph = {module: _first_party(names) - {module} for module, names in GRAPH.items()}
    assert _cycles(graph) == []


def _violations(importer_prefix: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for module, names in sorted(GRAPH.items()):
        if module != importer_prefix and not module.startswith(importer_prefix + "."):
            continue
        for name in sorted(names):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{module} imports {name}")
    return bad


@pytest.mark.parametrize("importer, forbidden", [
    ("chronicle.store", ("pyfuse3", "trio", "aiohttp", "chronicle.fs", "chronicle.cli", "chronicle.agent_cli",
                         "chronicle.mounting", "agent_runtime", "chronicle.ui", "chronicle.actions")),
    ("chronicle.store.chunks.ids", ("chronicle.store.meta", "chronicle.store.namespace",
                                    "chronicle.store.history", "chronicle.store.fsck", "lmdb")),
    ("chronicle.store.chunks.codec", ("chronicle.store.meta", "chronicle.store.namespace",
                                      "chronicle.store.history", "chronicle.store.fsck", "lmdb")),
    ("chronicle.store.chunks.chunker", ("chronicle.store.meta", "chronicle.store.namespace",
                                        "chronicle.store.history", "chronicle.store.fsck", "lmdb")),
    # tools/receipt.py and ``chronicle hash`` import the tree hash alone: no metadata, no LMDB.
    ("chronicle.store.chunks.tree", ("chronicle.store.meta", "chronicle.store.namespace",
                                     "chronicle.store.history", "chronicle.store.fsck", "lmdb")),
    ("chronicle.store.chunks.backends", ("chronicle.store.meta", "chronicle.store.namespace",
                                         "chronicle.store.history", "chronicle.store.fsck", "lmdb")),
    ("chronicle.store.model", ("lmdb", "chronicle.store.meta", "chronicle.store.namespace")),
    ("chronicle.fs", ("agent_runtime", "chronicle.ui")),
    ("agent_runtime", ("chronicle.fs", "chronicle.ui", "chronicle.actions")),
    # The web timeline reads the store, never a mount: no FUSE adapter, no pyfuse3 or trio, no CLI.
    ("chronicle.ui", ("chronicle.fs", "pyfuse3", "trio", "chronicle.cli", "chronicle.agent_cli", "chronicle.mounting")),
])
def test_layer_rule(importer, forbidden):
    assert _violations(importer, forbidden) == []


def test_rules_would_catch_a_violation():
    """The checker itself: a store module importing the FUSE adapter (or a module of the CLI package) is caught,
    and a two-module loop is a cycle."""
    GRAPH["chronicle.store.fake"] = {"chronicle.fs.operations", "chronicle.cli.app"}
    try:
        assert _violations("chronicle.store", ("chronicle.fs", "chronicle.cli")) == [
            "chronicle.store.fake imports chronicle.cli.app", "chronicle.store.fake imports chronicle.fs.operations"]
    finally:
        del GRAPH["chronicle.store.fake"]
    # the CLI is a package: its modules are read, and a rule on ``chronicle.cli`` covers them
    assert {"chronicle.cli", "chronicle.cli.app", "chronicle.cli.history"} <= set(GRAPH)
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
