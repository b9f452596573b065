"""Arrows point one way: the light side (gpu_tasks) never imports the GPU side (workers), and
the GPU side implements exactly what the light side declares."""

from __future__ import annotations

from typing import Any

from tests.conftest import REPO


def test_the_light_side_never_imports_the_gpu_side() -> None:
    import ast

    offenders = []
    for path in sorted((REPO / "gpu_tasks").glob("*.py")):
        if path.name == "cli.py":  # the one entry point that starts GPU workers
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "workers"]
    assert offenders == []


def test_built_in_implementations_take_exactly_the_declared_arguments() -> None:
    import inspect

    from gpu_tasks import tasks
    from workers.handlers import IMPLEMENTATIONS

    for name in tasks.__all__:
        task: Any = getattr(tasks, name)
        declared = inspect.signature(task.body)
        implemented = inspect.signature(IMPLEMENTATIONS[task.name])
        assert list(declared.parameters)[1:] == list(implemented.parameters)[1:], name
        assert [p.default for p in declared.parameters.values()] == [
            p.default for p in implemented.parameters.values()], name
