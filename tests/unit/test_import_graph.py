"""The layout's rules, checked on the source: arrows between modules point one way (no
import cycle in ``gpu_tasks/`` or ``workers/``, counting imports inside functions),
``gpu_tasks/`` never imports ``workers/`` except in the CLI commands that start GPU
workers, and no module grows past 600 lines without saying why at its top."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("gpu_tasks", "workers")
STARTS_GPU_WORKERS = {"gpu_tasks.cli.worker", "gpu_tasks.cli.up"}
"""The only light-side modules that may import ``workers`` (inside their commands)."""
MAX_LINES = 600
LONG_REASON = "Longer than 600 lines because"


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported(tree: ast.AST, known: dict[str, Path]) -> Iterator[str]:
    """Every module of ``known`` that ``tree`` imports, wherever the import statement is."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `from pkg import name`: name or pkg
                name = name.rpartition(".")[0]
            if name:
                yield name


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: set(imported(ast.parse(path.read_text()), known)) - {name}
            for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checker_sees_a_cycle_closed_inside_a_function() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from gpu_tasks.app import app\n")
    assert list(imported(tree, {"gpu_tasks.app": Path()})) == ["gpu_tasks.app"]


def test_no_import_cycle_in_gpu_tasks_or_workers() -> None:
    graph = import_graph()
    assert len(graph) > 50  # the walk found the packages
    assert cycles(graph) == []


def concern(module: str) -> str:
    """The subpackage a module belongs to (``gpu_tasks.control``), or the module itself
    where it sits at a package's top (``gpu_tasks.settings``, ``workers.boot``)."""
    return ".".join(module.split(".")[:2])


def test_subpackages_depend_on_each_other_one_way() -> None:
    graph: dict[str, set[str]] = {}
    for name, targets in import_graph().items():
        graph.setdefault(concern(name), set()).update(
            concern(t) for t in targets if concern(t) != concern(name))
    for targets in list(graph.values()):
        for target in targets:
            graph.setdefault(target, set())
    assert "gpu_tasks.control" in graph["gpu_tasks.celeryapp"]  # edges are seen
    assert cycles(graph) == []


def test_gpu_tasks_imports_workers_only_where_it_starts_gpu_workers() -> None:
    graph = import_graph()
    reaching = {name for name, targets in graph.items()
                if name.startswith("gpu_tasks") and any(t.startswith("workers") for t in targets)}
    assert reaching <= STARTS_GPU_WORKERS
    assert reaching  # the commands that start workers do import them: the check sees it


@pytest.mark.parametrize("name", sorted(modules()))
def test_a_module_over_600_lines_says_why_at_its_top(name: str) -> None:
    source = modules()[name].read_text()
    if source.count("\n") > MAX_LINES:
        docstring = ast.get_docstring(ast.parse(source)) or ""
        assert LONG_REASON in docstring, f"{name}: {source.count(chr(10))} lines"
