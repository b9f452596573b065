"""A web backend that sends GPU work and never hangs on it.

    uvicorn examples.web.app:api          # GPU_TASKS_REDIS_URL=redis://... in the environment

``POST /entities/{entity_id}/tasks/{task}`` with a JSON object of keyword arguments sends
``gpu_tasks.<task>`` with Celery's own ``apply_async`` (the router in the app's
configuration picks the entity's shard queue) and answers **202** at once, with the task's
id, its queue and where to ask for its result. ``GET /tasks/{task_id}`` reads the result
once, without waiting: **200** with it, **202** while it is not there yet, or the task's
typed error (``gpu_tasks.errors``) as an HTTP status and a JSON body
``{"error": {"type", "message", "args", "details"}}``. See ``STATUS_OF`` and README.md.

Why it cannot hang: both endpoints are plain ``def`` functions, which FastAPI runs in its
thread pool, so the event loop never waits on Redis; nothing ever calls ``.get()`` on a
result; and every Redis call (publishing, reading a result) is bounded by the timeouts
gpu-tasks configures in the Celery app from ``GPU_TASKS_REDIS_TIMEOUT_S``. A Redis that
refuses, is down or does not answer in time is answered with **503** and ``Retry-After``.

Configuration comes only from gpu-tasks' settings (``GPU_TASKS_*`` variables, read once by
``gpu_tasks.settings``); this module never reads the environment itself.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Annotated, Any

import redis
from celery import states
from celery.exceptions import BackendError, TaskRevokedError, TimeLimitExceeded
from celery.result import AsyncResult
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError

# The module, not its attributes: configure() re-binds gpu_tasks.app.router.
from gpu_tasks import app as gpu_app
from gpu_tasks import errors
from gpu_tasks import settings as gpu_settings
from gpu_tasks.protocol.routing import ENTITY_KWARG, ROUTED_TASK_NAMES

log = logging.getLogger(__name__)

TASK_PREFIX = "gpu_tasks."
"""``POST .../tasks/alloc`` sends ``gpu_tasks.alloc``."""

STATUS_OF: tuple[tuple[type[BaseException], int], ...] = (
    # First match wins, so subclasses come before their bases.
    (errors.BadRequest, 422),          # a wrong dtype, shape, size or kernel argument
    (errors.RoutingError, 422),        # an unusable entity id (refused at submit time)
    (errors.NoSuchBuffer, 404),        # the entity has no buffer of that name
    (errors.StaleHandle, 410),         # EntityStateLost too: allocate it again to go on
    (errors.OutOfMemory, 507),         # Insufficient Storage: the GPU or the quota is full
    (errors.ContextPoisoned, 500),     # the request broke the device context (rebuilt)
    (errors.TaskTimeLimitExceeded, 504),  # the task ran past its soft or hard time limit
    (errors.DeviceError, 500),         # any other device failure
    (errors.ShardMapError, 503),       # no shard map yet, or S could not be read
    (OperationalError, 503),           # Redis refused or timed out (BrokerUnavailable too)
    (BackendError, 503),               # the result backend could not be read
    (redis.RedisError, 503),
    (ConnectionError, 503),
    (TimeoutError, 503),
    (TimeLimitExceeded, 504),          # the task ran past GPU_TASKS_TASK_TIME_LIMIT_S
    (TaskRevokedError, 409),           # someone revoked it: it will never run
    (errors.ConfigError, 500),         # this server is misconfigured (no GPU_TASKS_REDIS_URL)
)
"""HTTP status of each error, a task's own failure or one raised while sending or reading;
anything else is 500."""

UNAVAILABLE = 503


def status_of(exc: BaseException) -> int:
    return next((status for cls, status in STATUS_OF if isinstance(exc, cls)), 500)


def retry_after_s() -> int:
    """What a 503 tells the client to wait before trying again: one Redis timeout."""
    return max(1, math.ceil(gpu_settings.current().redis_timeout_s))


def _jsonable(value: Any) -> Any:
    """``value`` as JSON can carry it: device errors keep JSON-safe args by design, but an
    error raised by Redis or Celery may carry anything."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def error_body(exc: BaseException) -> dict[str, Any]:
    """``{"type", "message", "args", "details"}``: ``details`` holds the error's named
    fields (``field`` of BadRequest, ``requested_bytes`` and ``free_bytes`` of OutOfMemory,
    ``entity_id``, ``buffer``, ``gpu``, ``lost_at``, ``why`` of EntityStateLost, ...)."""
    details: dict[str, Any] = {}
    if isinstance(exc, errors.GpuTasksError):
        for name, _ in inspect.getmembers(type(exc), lambda a: isinstance(a, property)):
            try:
                details[name] = _jsonable(getattr(exc, name))
            except Exception:  # a property that cannot be read is left out, not a 500
                continue
    return {"type": type(exc).__name__, "message": str(exc) or type(exc).__name__,
            "args": _jsonable(list(exc.args)), "details": details}


def error_response(exc: BaseException, **extra: Any) -> JSONResponse:
    """The JSON answer for ``exc``; a 503 says when to come back."""
    status = status_of(exc)
    headers = {"Retry-After": str(retry_after_s())} if status == UNAVAILABLE else None
    if status == 500:
        log.error("%s: %s", type(exc).__name__, exc, exc_info=exc)
    return JSONResponse({**extra, "error": error_body(exc)}, status_code=status,
                        headers=headers)


def known_tasks() -> list[str]:
    """The short names this app sends: gpu-tasks' own entity-routed tasks (``alloc``,
    ``write``, ``read``, ``free``, ``run``). ``stats`` goes to one GPU, not to an entity."""
    return sorted(n[len(TASK_PREFIX):] for n in ROUTED_TASK_NAMES if n.startswith(TASK_PREFIX))


# What can go wrong while talking to Redis, whoever raises it.
_UNAVAILABLE_ERRORS = (OperationalError, BackendError, redis.RedisError, ConnectionError,
                       TimeoutError)

api = FastAPI(title="gpu-tasks web example",
              description="Send GPU work by entity; poll for its result. Never blocks.")


@api.exception_handler(RequestValidationError)
def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body that is not a JSON object: the same error shape as everything else."""
    problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}"
                         for e in exc.errors())
    bad = errors.BadRequest(f"the body must be a JSON object of keyword arguments ({problems})",
                            "body")
    return error_response(bad)


@api.post("/entities/{entity_id:path}/tasks/{task}", status_code=202, name="submit")
def submit(
    entity_id: str,
    task: str,
    request: Request,
    kwargs: Annotated[dict[str, Any] | None, Body()] = None,
) -> JSONResponse:
    """Send ``gpu_tasks.<task>`` for ``entity_id`` with the body as its keyword arguments.

    ``entity_id`` may contain ``/`` (``%2F``) and is taken as is: an empty one is refused by
    gpu-tasks' router (422), like any id it cannot route. Nothing is enqueued unless the
    answer is 202."""
    name = TASK_PREFIX + task
    if name not in ROUTED_TASK_NAMES:
        return JSONResponse(
            {"error": {"type": "UnknownTask", "message": f"no task {task!r}: this service "
                       f"sends {', '.join(known_tasks())}", "args": [task],
                       "details": {"known": known_tasks()}}},
            status_code=404)
    kwargs = dict(kwargs or {})
    if ENTITY_KWARG in kwargs:
        return error_response(errors.BadRequest(
            "entity_id comes from the URL (/entities/{entity_id}/...), not the body",
            ENTITY_KWARG))
    celery_task = gpu_app.app.tasks.get(name)
    try:
        if celery_task is not None:  # apply_async checks the arguments against the task's
            result = celery_task.apply_async(kwargs={**kwargs, ENTITY_KWARG: entity_id})
        else:
            result = gpu_app.app.send_task(name, kwargs={**kwargs, ENTITY_KWARG: entity_id})
    except TypeError as exc:  # a misspelled or missing argument: refused, nothing enqueued
        return error_response(errors.BadRequest(f"{name}: {exc}"))
    except (errors.GpuTasksError, *_UNAVAILABLE_ERRORS) as exc:
        return error_response(exc)
    # The router has S by now (it routed this very request): no Redis call here.
    queue = gpu_app.router.route(entity_id).queue
    status_url = str(request.url_for("task_status", task_id=result.id))
    return JSONResponse(
        {"task_id": result.id, "task": name, "entity_id": entity_id, "queue": queue,
         "status_url": status_url},
        status_code=202, headers={"Location": status_url})


@api.get("/tasks/{task_id}", name="task_status")
def task_status(task_id: str) -> JSONResponse:
    """The task's result (200), its typed error, or 202 while it has none yet.

    One read of the result backend, never a wait. Celery cannot tell a task that is queued
    from an id it never saw: both are PENDING."""
    result = AsyncResult(task_id, app=gpu_app.app)
    try:
        state = result.state
        value = result.result if state in states.READY_STATES else None
    except _UNAVAILABLE_ERRORS as exc:
        return error_response(exc, task_id=task_id)
    if state == states.SUCCESS:
        return JSONResponse({"task_id": task_id, "state": state, "result": _jsonable(value)})
    if state in states.READY_STATES:  # FAILURE, REVOKED
        failure = value if isinstance(value, BaseException) else RuntimeError(repr(value))
        return error_response(failure, task_id=task_id, state=state)
    return JSONResponse({"task_id": task_id, "state": state}, status_code=202,
                        headers={"Retry-After": "1"})


app = api
"""``uvicorn examples.web.app:app`` works too."""
