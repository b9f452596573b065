"""``@gpu_task``: define a Celery task that runs on the GPU holding its entity's state.

::

    from gpu_tasks.task import gpu_task

    @gpu_task(name="myapp.normalize")
    def normalize(gpu, name: str, eps: float = 1e-6) -> float:
        x = gpu.read(name)                    # numpy copy of the entity's buffer
        ...                                   # or PyCUDA on gpu.buffer(name).allocation
        return float(norm)

    normalize.apply_async(kwargs={"entity_id": "user-42", "name": "emb"})

The body's first parameter is the entity's :class:`workers.runtime.EntityContext`
(its buffers, the device, the generation); callers pass everything else as
keyword arguments plus ``entity_id``. The router sends the task to the queue of
the GPU owning the entity's shard. The task's result is a JSON object saying
where it ran (``entity_id``, ``shard``, ``queue``, ``worker``, ``device``,
``generation``) with the body's return value under ``result``.

Workers must import the module defining the task: ``gpu-tasks worker --import
myapp.tasks`` (or ``GPU_TASKS_IMPORTS``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar, overload

from celery import Task

from gpu_tasks.errors import DeviceError
from gpu_tasks.routing import ENTITY_KWARG, ROUTED_TASK_NAMES

F = TypeVar("F", bound=Callable[..., Any])


class GpuTask(Task):  # type: ignore[misc]
    """Base class of entity-routed tasks; the router looks for ``entity_routed``."""

    entity_routed = True
    throws = (DeviceError,)  # answers, not worker faults: logged without a traceback
    flat_result = False
    """Built-ins merge their dict result with the where-it-ran fields instead of nesting it."""
    body: Callable[..., Any]


class GpuQueueTask(Task):  # type: ignore[misc]
    """Base of tasks addressed to one GPU's queue (``queue=`` in apply_async), not by entity."""

    queue_addressed = True
    throws = (DeviceError,)


def _celery_signature(fn: Callable[..., Any]) -> inspect.Signature:
    """The body's parameters minus the context, plus ``entity_id``: Celery checks calls
    against it at submit time, so a misspelled argument fails before it is enqueued."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    entity = inspect.Parameter(ENTITY_KWARG, inspect.Parameter.KEYWORD_ONLY, default=None)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    keyword = [p for p in params if p.kind == p.KEYWORD_ONLY]
    varkw = [p for p in params if p.kind == p.VAR_KEYWORD]
    return inspect.Signature([self_param, *positional, entity, *keyword, *varkw])


@overload
def gpu_task(fn: F, /) -> Any: ...
@overload
def gpu_task(*, name: str | None = None, **options: Any) -> Callable[[F], Any]: ...


def gpu_task(fn: F | None = None, /, *, name: str | None = None, **options: Any) -> Any:
    """Turn ``fn(gpu, ...)`` into an entity-routed Celery task (see the module docstring).

    ``options`` go to ``app.task`` (``time_limit``, ``max_retries``, ...).
    """

    def decorate(body: F) -> Any:
        # Imported here, not at the top: gpu_tasks.app imports the built-in tasks, which
        # use this decorator, so a module-level import would be circular.
        from gpu_tasks.app import app

        flat = options.pop("flat_result", False)

        def run(self: GpuTask, *args: Any, entity_id: Any = None, **kwargs: Any) -> Any:
            from workers.runtime import execute  # GPU side only; producers never import it

            return execute(self, body, entity_id, args, kwargs)

        run.__name__ = body.__name__
        run.__qualname__ = body.__qualname__
        run.__module__ = body.__module__
        run.__doc__ = body.__doc__
        run.__signature__ = _celery_signature(body)  # type: ignore[attr-defined]
        task = app.task(
            run,
            bind=True,
            base=GpuTask,
            name=name,
            body=staticmethod(body),
            flat_result=flat,
            **options,
        )
        ROUTED_TASK_NAMES.add(task.name)
        return task

    return decorate(fn) if fn is not None else decorate
