"""The package's import graph runs one way (DESIGN.md "Layout": config -> model -> parallel -> train | infer
-> serve; plan reads config): no cycle, and the layering rules hold.

The graph is read from the source with `ast`, nothing is imported: every `import` and `from ... import` of
a moekit module counts, also inside functions (a lazy import is still a dependency: `config.py` importing
`presets` lazily is a cycle all the same), except under `if TYPE_CHECKING:` (never run). `from moekit.infer
import speculative` is an edge to the submodule `moekit.infer.speculative`; `from moekit.infer import
Engine` one to the package `moekit.infer` (its `__init__.py`).
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "moekit"


# ---- reading the graph ------------------------------------------------------------------------------------
def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, except in the body of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the `else:` branch does run
        else:
            stack.extend(ast.iter_child_nodes(node))


def _known(name: str, modules: set[str]) -> str:
    """`name`, or its longest prefix that is a module (`moekit.plan.GPU` -> `moekit.plan`)."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(name: str, is_package: bool, source: str, modules: set[str]) -> set[str]:
    """The moekit modules (of `modules`) that module `name`'s source imports."""
    out = set()
    for node in _import_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from the package this module is in (or is), up level - 1 more
                package = name if is_package else name.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    package = package.rsplit(".", 1)[0]
                base = f"{package}.{base}" if base else package
            # `from pkg import sub` names the submodule when there is one, else something in pkg.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        out |= {_known(t, modules) for t in targets if t == "moekit" or t.startswith("moekit.")}
    out.discard(name)  # `from moekit.plan import x` inside moekit/plan/__init__.py is no dependency
    return out & modules


def package_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    graph = {m: imports_of(m, p.name == "__init__.py", p.read_text(), modules) for m, p in files.items()}
    # An empty package __init__.py is no node: it imports nothing and no one depends on its code.
    empty = {m for m, p in files.items() if p.name == "__init__.py" and not graph[m] and not _has_code(p)}
    return {m: deps - empty for m, deps in graph.items() if m not in empty}


def _has_code(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)) for s in body)  # beyond a docstring


# ---- cycles (Tarjan's strongly connected components) --------------------------------------------------------
def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one, as a path [a, b, ..., a]."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:  # v is the root of a component: pop it
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for component in components:
        start = min(component)
        if len(component) > 1 or start in graph.get(start, ()):
            cycles.append(_path(graph, start, start, set(component)))
    return sorted(cycles)


def _path(graph: dict[str, set[str]], src: str, dst: str, allowed: set[str] | None = None) -> list[str]:
    """A shortest path src -> ... -> dst of at least one edge (breadth first), or [] when there is none."""
    parent: dict[str, str] = {}
    queue = deque([src])
    while queue:
        v = queue.popleft()
        for w in sorted(graph.get(v, ())):
            if allowed is not None and w not in allowed:
                continue
            if w == dst:
                path = [w, v]
                while path[-1] != src:
                    path.append(parent[path[-1]])
                return path[::-1]
            if w not in parent and w != src:
                parent[w] = v
                queue.append(w)
    return []


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def violations(graph: dict[str, set[str]], sources: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    """For each module of `sources` that imports a module of `forbidden`, directly or through other modules,
    the shortest such import chain."""
    out = []
    targets = sorted(m for m in graph if _within(m, forbidden))
    for src in sorted(m for m in graph if _within(m, sources)):
        paths = [p for p in (_path(graph, src, dst) for dst in targets) if p]
        if paths:
            out.append(" -> ".join(min(paths, key=len)))
    return out


# ---- the self-checks -------------------------------------------------------------------------------------
def test_the_cycle_finder_finds_cycles_and_only_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"a"}, "b": set()}) == [["a", "a"]]
    two = find_cycles({"a": {"b"}, "b": {"a"}, "x": {"y"}, "y": {"z"}, "z": {"x", "a"}})
    assert two == [["a", "b", "a"], ["x", "y", "z", "x"]]


def test_imports_are_read_lazily_relatively_and_without_type_checking_blocks():
    modules = {"moekit", "moekit.config", "moekit.presets", "moekit.infer", "moekit.infer.speculative",
               "moekit.infer.engine", "moekit.infer.runner", "moekit.util"}
    source = """
from typing import TYPE_CHECKING
import torch
from moekit.infer import speculative, Engine
from . import runner
from ..util import atomic_write
if TYPE_CHECKING:
    from moekit.config import ModelConfig
def f():
    import moekit.presets
"""
    got = imports_of("moekit.infer.engine", False, source, modules)
    assert got == {"moekit.infer.speculative", "moekit.infer", "moekit.infer.runner", "moekit.util",
                   "moekit.presets"}
    assert imports_of("moekit.infer", True, "from . import runner\nfrom .engine import Engine\n",
                      modules) == {"moekit.infer.runner", "moekit.infer.engine"}


def test_violations_name_the_import_chain():
    graph = {"moekit.plan.serve": {"moekit.resolve"}, "moekit.resolve": {"moekit.infer.engine"},
             "moekit.infer.engine": set()}
    assert violations(graph, ("moekit.plan",), ("moekit.infer",)) == [
        "moekit.plan.serve -> moekit.resolve -> moekit.infer.engine"]


# ---- the package -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return package_graph()


def test_the_graph_reads_the_package(graph):
    assert {"moekit.config", "moekit.resolve", "moekit.infer.engine", "moekit.plan.serve"} <= set(graph)
    assert "moekit.infer.engine" in graph["moekit.infer.build"]  # a sanity check that edges are read


def test_no_import_cycle(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_config_is_a_leaf(graph):
    assert graph["moekit.config"] == set(), f"moekit.config imports {sorted(graph['moekit.config'])}"


def test_the_command_line_is_on_top(graph):
    # `moekit.cli` dispatches to the commands (by name, importlib); a command that imported it back for a
    # helper would make the top of the graph depend on itself (overrides live in moekit.resolve). Only
    # `python -m moekit` (moekit/__main__.py, what torchrun's workers run) sits above it, and nothing imports that.
    assert sorted(m for m, deps in graph.items() if "moekit.cli" in deps) == ["moekit.__main__"]
    assert not [m for m, deps in graph.items() if "moekit.__main__" in deps]


@pytest.mark.parametrize("sources, forbidden", [
    (("moekit.model",), ("moekit.parallel", "moekit.train", "moekit.infer", "moekit.serve", "moekit.plan",
                         "moekit.sim")),  # parallelism, training and serving are applied from outside
    (("moekit.parallel",), ("moekit.infer", "moekit.serve")),  # serving applies parallelism from above
    (("moekit.infer",), ("moekit.train",)),  # a run folder's files are the contract between them
    (("moekit.train",), ("moekit.infer",)),
    (("moekit.plan",), ("moekit.infer", "moekit.train", "moekit.serve")),  # pure functions over config + table
])
def test_layering(graph, sources, forbidden):
    bad = violations(graph, sources, forbidden)
    assert not bad, f"{'/'.join(sources)} must not import {'/'.join(forbidden)}:\n" + "\n".join(bad)
