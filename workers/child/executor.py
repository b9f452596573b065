"""The per-request path of a GPU worker's pool child: what every GPU task runs through.

A worker's boot installs :func:`execute` and :func:`after_task` with
:func:`gpu_tasks.tasks.declare.install_executor`, so the declared tasks (the light side
declares, this side implements) run here: a built-in's implementation from
:mod:`workers.child.handlers`, a user's body as declared, on this process's runtime
(:mod:`workers.child.runtime`), which checks that this GPU still serves the entity's
shard, hands the body an :class:`~workers.child.runtime.EntityContext` and wraps the
result with where it ran.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

from celery.exceptions import CeleryError, SoftTimeLimitExceeded

from gpu_tasks.errors import (
    BadRequest,
    DeviceError,
    GpuTasksError,
    RoutingError,
    TaskTimeLimitExceeded,
)
from gpu_tasks.protocol.arguments import bad_arguments
from gpu_tasks.protocol.routing import validate_entity_id
from gpu_tasks.settings import Settings
from workers.child import handlers, runtime
from workers.child.completed import MISSING
from workers.child.runtime import DeviceRuntime, EntityContext, GpuContext
from workers.device.base import DevicePoisoned

log = logging.getLogger(__name__)

_signatures: dict[Callable[..., Any], inspect.Signature] = {}


def execute(
    task: Any,
    body: Callable[..., Any],
    entity_id: object,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Run one GPU task on this GPU (the executor ``gpu_tasks.tasks.declare`` calls): an
    entity request on its entity's context, a GPU-queue request on the GPU's.

    A second copy of a request this pool child completed (redelivered, or sent twice by a
    producer whose publish timed out and was retried) is answered with the result it
    completed with (:mod:`workers.child.completed`), not run again: one dict lookup per
    request. A request past its soft time limit is answered :class:`TaskTimeLimitExceeded`."""
    rt = runtime.current()
    request = task.request
    done = rt.completed.result(request.id)
    if done is not MISSING:
        log.warning("%s %s was delivered again after it completed here: answered with the "
                    "same result, not run again", task.name, request.id)
        return done
    redelivered = bool((request.delivery_info or {}).get("redelivered"))
    body = handlers.IMPLEMENTATIONS.get(task.name, body)
    try:
        value = _execute(rt, task, body, entity_id, args, kwargs, redelivered)
    except SoftTimeLimitExceeded:
        limit_s = _soft_limit_s(task, rt.settings)
        raise TaskTimeLimitExceeded(
            f"{task.name} ran past its soft time limit ({limit_s:g} s) and was interrupted; "
            f"{rt.identity.queue} kept its buffers, with what the task had written so "
            "far (raise the limit with soft_time_limit=, or GPU_TASKS_TASK_SOFT_TIME_LIMIT_S)",
            limit_s, True) from None
    rt.completed.remember(request.id, value)
    return value


def after_task() -> None:
    """After each task, once its result is stored: let the runtime collect garbage, or end
    a child whose context was poisoned (:meth:`DeviceRuntime.after_task`)."""
    rt = runtime.installed()
    if rt is not None:
        rt.after_task()


def _soft_limit_s(task: Any, settings: Settings) -> float:
    """The soft limit a request ran under: its own, its task's, or the worker's."""
    limits = task.request.timelimit or (None, None)
    soft = limits[1] if len(limits) > 1 else None
    return float(soft or task.soft_time_limit or settings.task_soft_time_limit_s)


def _bind(
    body: Callable[..., Any], ctx: object, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> None:
    """Reject arguments the body does not take, naming the field (send_task skips Celery's
    own submit-time check)."""
    sig = _signatures.get(body)
    if sig is None:
        sig = _signatures[body] = inspect.signature(body)
    try:
        sig.bind(ctx, *args, **kwargs)
    except TypeError as exc:
        raise bad_arguments(exc) from None


def _execute(
    rt: DeviceRuntime,
    task: Any,
    body: Callable[..., Any],
    entity_id: object,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    redelivered: bool,
) -> Any:
    rt.sync_ownership()
    ctx: EntityContext | GpuContext
    eid: str | None = None
    shard: int | None = None
    if getattr(task, "queue_addressed", False):
        ctx = GpuContext(rt)
    else:
        try:
            eid = validate_entity_id(entity_id, rt.settings.max_entity_id_chars)
        except RoutingError as exc:
            raise BadRequest(str(exc), "entity_id") from None
        shard = rt.served_shard(eid, task.name)
        rt.store.touch(eid)
        ctx = EntityContext(rt, eid, shard, redelivered)
    _bind(body, ctx, args, kwargs)
    with rt.guard():
        try:
            value = body(ctx, *args, **kwargs)
        except (GpuTasksError, CeleryError, SoftTimeLimitExceeded, DevicePoisoned):
            raise  # answers, Celery's own control flow (Reject), and the poisoned context
        except Exception as exc:
            if getattr(body, "__module__", None) != handlers.__name__:
                raise  # a user's task: its exceptions are its own contract
            # Every failure of a built-in is a gpu_tasks.errors class; one that is not is a
            # bug here, so it is logged with its traceback, never swallowed.
            log.exception("%s failed with an untyped error", task.name)
            raise DeviceError(f"{task.name} failed inside the GPU worker: "
                              f"{type(exc).__name__}: {exc}") from None
    where = rt.where(eid, shard)
    if getattr(task, "flat_result", False):
        return {**where, **value}
    return {**where, "result": value}
