"""``@gpu_task``: define a Celery task that runs on the GPU holding its entity's state.

::

    from gpu_tasks.tasks.declare import gpu_task

    @gpu_task(name="myapp.normalize")
    def normalize(gpu, name: str, eps: float = 1e-6) -> float:
        x = gpu.read(name)                    # numpy copy of the entity's buffer
        ...                                   # or PyCUDA on gpu.buffer(name).allocation
        return float(norm)

    normalize.apply_async(kwargs={"entity_id": "user-42", "name": "emb"})

The body's first parameter is the entity's context (``workers.child.runtime.EntityContext``:
its buffers, the device, the generation); callers pass everything else as keyword
arguments plus ``entity_id``. The router sends the task to the queue of the entity's
shard, which the GPU owning that shard consumes. The task's result is a JSON object
saying where it ran (``entity_id``, ``shard``, ``queue``, ``gpu``, ``worker``,
``device``, ``generation``) with the body's return value under ``result``.

Workers must import the module defining the task: ``gpu-tasks worker --import
myapp.tasks`` (or ``GPU_TASKS_IMPORTS``).

This module only declares. A task body runs through the executor that a GPU
worker's boot installs (:func:`install_executor`; the executor is
``workers.child.executor``); anywhere else a GPU task fails with a clear
:class:`~gpu_tasks.errors.DeviceError`, so producers never import GPU code.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, overload

from celery import Task

from gpu_tasks.celeryapp import app
from gpu_tasks.errors import BadArguments, DeviceError
from gpu_tasks.protocol.arguments import check_shapes
from gpu_tasks.protocol.routing import ENTITY_KWARG, QUEUE_ADDRESSED_TASK_NAMES, ROUTED_TASK_NAMES

F = TypeVar("F", bound=Callable[..., Any])


class Executor(Protocol):
    """Runs one GPU task body on this process's GPU: ``entity_id`` is None for a task
    addressed to the GPU's own queue."""

    def __call__(self, task: Any, body: Callable[..., Any], entity_id: object,
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any: ...


_executor: Executor | None = None
_after_task: Callable[[], None] | None = None


def install_executor(executor: Executor | None,
                     after_task: Callable[[], None] | None = None) -> None:
    """Make ``executor`` run every GPU task body in this process (a GPU worker's boot), and
    ``after_task`` run after each one's result is stored."""
    global _executor, _after_task
    _executor, _after_task = executor, after_task


class _AfterTask:
    """Mixed into the task bases: Celery calls ``after_return`` once the result is stored."""

    name: str

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        # Celery's own Task.__call__ (which the worker calls) names its first parameter
        # ``self``: a request with a keyword argument of that name would fail there with a
        # bare TypeError. No task body can take it, so it is refused here, as BadArguments.
        if "self" in kwargs:
            raise BadArguments(f"bad arguments: {self.name} takes no argument 'self'", "self")
        return super().__call__(*args, **kwargs)  # type: ignore[misc]

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        # Celery's own check unpacks kwargs before any of ours runs: a list there would be a
        # bare TypeError (and an HTTP 500 through Flower) instead of BadArguments.
        check_shapes(self.name, args, kwargs)
        return super().apply_async(args, kwargs, **options)  # type: ignore[misc]

    def after_return(self, *args: Any, **kwargs: Any) -> None:
        if _after_task is not None:
            _after_task()


def _execute(task: Any, body: Callable[..., Any], entity_id: object,
             args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if _executor is None:
        raise DeviceError(
            f"task {task.name} runs only in a GPU worker (`gpu-tasks worker --gpu N`); "
            "this process has no GPU"
        )
    return _executor(task, body, entity_id, args, kwargs)


RESULT_REPR_CHARS = 64
"""How much of a result Celery's log line and task event (Flower) show: the where-it-ran
fields come first. Celery's saferepr of the whole result would cost a trivial task
about 30 us; the full result is always in the result backend."""


class GpuTask(_AfterTask, Task):  # type: ignore[misc]
    """Base class of entity-routed tasks (the router names them in its refusals)."""

    entity_routed = True
    throws = (DeviceError,)  # answers, not worker faults: logged without a traceback
    resultrepr_maxsize = RESULT_REPR_CHARS
    flat_result = False
    """Built-ins merge their dict result with the where-it-ran fields instead of nesting it."""
    body: Callable[..., Any]


class GpuQueueTask(_AfterTask, Task):  # type: ignore[misc]
    """Base of tasks addressed to one GPU's queue (``queue=`` in apply_async), not by entity."""

    queue_addressed = True
    throws = (DeviceError,)
    resultrepr_maxsize = RESULT_REPR_CHARS
    flat_result = True
    body: Callable[..., Any]


def _celery_signature(fn: Callable[..., Any], entity: bool) -> inspect.Signature:
    """The body's parameters minus the context (plus ``entity_id`` for entity tasks):
    Celery checks calls against it at submit time, so a misspelled argument fails
    before it is enqueued."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    keyword = [p for p in params if p.kind == p.KEYWORD_ONLY]
    varkw = [p for p in params if p.kind == p.VAR_KEYWORD]
    extra = (
        [inspect.Parameter(ENTITY_KWARG, inspect.Parameter.KEYWORD_ONLY, default=None)]
        if entity
        else []
    )
    return inspect.Signature([self_param, *positional, *extra, *keyword, *varkw])


def _declare(body: F, name: str | None, base: type[Task], entity: bool,
             options: dict[str, Any]) -> Any:
    flat = options.pop("flat_result", base.flat_result)

    # ``self`` is positional-only, so that a keyword argument of that name reaches the
    # executor, which answers it with a BadRequest naming the field.
    if entity:
        def run(self: Task, /, *args: Any, entity_id: Any = None, **kwargs: Any) -> Any:
            return _execute(self, body, entity_id, args, kwargs)
    else:
        def run(self: Task, /, *args: Any, **kwargs: Any) -> Any:
            return _execute(self, body, None, args, kwargs)

    run.__name__ = body.__name__
    run.__qualname__ = body.__qualname__
    run.__module__ = body.__module__
    run.__doc__ = body.__doc__
    run.__signature__ = _celery_signature(body, entity)  # type: ignore[attr-defined]
    task = app.task(run, bind=True, base=base, name=name, body=staticmethod(body),
                    flat_result=flat, **options)
    (ROUTED_TASK_NAMES if entity else QUEUE_ADDRESSED_TASK_NAMES).add(task.name)
    return task


@overload
def gpu_task(fn: F, /) -> Any: ...
@overload
def gpu_task(*, name: str | None = None, **options: Any) -> Callable[[F], Any]: ...


def gpu_task(fn: F | None = None, /, *, name: str | None = None, **options: Any) -> Any:
    """Turn ``fn(gpu, ...)`` into an entity-routed Celery task (see the module docstring).

    ``options`` go to ``app.task`` (``time_limit``, ``max_retries``, ...).
    """

    def decorate(body: F) -> Any:
        return _declare(body, name, GpuTask, True, options)

    return decorate(fn) if fn is not None else decorate


def gpu_queue_task(*, name: str, **options: Any) -> Callable[[F], Any]:
    """Turn ``fn(gpu, ...)`` into a task for one GPU's own queue: callers send it with
    ``queue="gpu.<node>.<index>"``; the body gets that GPU's context."""

    def decorate(body: F) -> Any:
        return _declare(body, name, GpuQueueTask, False, options)

    return decorate
