"""The GPU side implements exactly what the light side declares (that arrows point one way
is tests/unit/test_import_graph.py's)."""

from __future__ import annotations

from typing import Any


def test_built_in_implementations_take_exactly_the_declared_arguments() -> None:
    import inspect

    from gpu_tasks import tasks
    from workers.child.handlers import IMPLEMENTATIONS

    for name in tasks.__all__:
        task: Any = getattr(tasks, name)
        declared = inspect.signature(task.body)
        implemented = inspect.signature(IMPLEMENTATIONS[task.name])
        assert list(declared.parameters)[1:] == list(implemented.parameters)[1:], name
        assert [p.default for p in declared.parameters.values()] == [
            p.default for p in implemented.parameters.values()], name
