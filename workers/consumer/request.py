"""A request in a GPU worker's main process: Celery's own, with the worker's soft time
limit, answering a hard time limit with :class:`~gpu_tasks.errors.TaskTimeLimitExceeded`.

Celery arms a request's hard timer only when its soft one fires (``asynpool``), so a
soft limit at or past the hard one would hold the hard one back: a request sent with
``time_limit=60`` would run until the worker's soft limit of 240 s. Here a request's
soft limit is its own, else its task's, else ``GPU_TASKS_TASK_SOFT_TIME_LIMIT_S``, and
only where it is below the hard limit.

Past a request's hard time limit Celery kills the pool child running it and stores its
own ``TimeLimitExceeded("300.0")``, which says nothing of what a GPU worker loses with
the child: every entity's device buffers on that GPU. Here the answer is a
``gpu_tasks.errors`` class like every other failure, and says so. The soft limit is
answered in the pool child (:func:`workers.child.executor.execute`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from celery.exceptions import TimeLimitExceeded
from celery.worker import state
from celery.worker.request import Request

from gpu_tasks.celeryapp import GPU_WORKER_FLAG
from gpu_tasks.errors import TaskTimeLimitExceeded
from gpu_tasks.settings import Settings

log = logging.getLogger(__name__)


class GpuRequest(Request):  # type: ignore[misc]
    """Celery's worker-side request, with a GPU worker's time limits."""

    default_soft_time_limit_s: float | None = None
    """The worker's soft limit (set by :func:`install`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limits: tuple[float | None, float | None] = tuple(self.time_limits)  # type: ignore[has-type]
        self.time_limits = time_limits(limits, self.task, self.default_soft_time_limit_s)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        # Past a soft limit Celery only logs; past the hard one its answer would be the
        # bare TimeLimitExceeded, which on_failure (called next, with it) replaces.
        if soft or state.should_terminate:
            super().on_timeout(soft, timeout)
            return
        log.error("%s[%s] ran past its hard time limit (%gs): its pool child is killed",
                  self.name, self.id, timeout)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True,
                   return_ok: bool = False) -> Any:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, TimeLimitExceeded) and not state.should_terminate:
            exc_info = self._hard_limit_info(exc)
        return super().on_failure(exc_info, send_failed_event, return_ok)

    def _hard_limit_info(self, exc: TimeLimitExceeded) -> ExceptionInfo:
        timeout = float(exc.args[0]) if exc.args else 0.0
        gpu = self.task.app.conf.get(GPU_WORKER_FLAG) or "this GPU"
        try:
            raise hard_limit_exceeded(self.name, timeout, gpu) from None
        except TaskTimeLimitExceeded:
            return ExceptionInfo()


def time_limits(limits: Sequence[float | None] | None, task: Any,
                default_soft_s: float | None) -> tuple[float | None, float | None]:
    """A request's ``(hard, soft)`` limits: its own (``limits``, Celery's ``timelimit``
    header), else its task's, else (soft only) the worker's; a soft one only below the
    hard one (see the module)."""
    own = list(limits or ())
    hard = (own[0] if own else None) or task.time_limit
    soft = (own[1] if len(own) > 1 else None) or task.soft_time_limit or default_soft_s
    if hard and soft and soft >= hard:
        soft = None
    return hard, soft


def hard_limit_exceeded(name: str, timeout_s: float, gpu: str) -> TaskTimeLimitExceeded:
    """The answer of a request that ran past its hard time limit (its pool child killed)."""
    return TaskTimeLimitExceeded(
        f"{name} ran past its hard time limit ({timeout_s:g} s): its pool child was "
        f"killed, and every entity's buffers on {gpu} were lost with it (they answer "
        "EntityStateLost); give it more time with time_limit= or "
        "GPU_TASKS_TASK_TIME_LIMIT_S, or stop it at a soft limit (soft_time_limit=) "
        "below that", timeout_s, False)


def install(settings: Settings) -> None:
    """Make every GPU task use :class:`GpuRequest` (the worker's boot, before the consumer
    builds its strategies, which read ``Task.Request``; the task classes inherit it)."""
    from gpu_tasks.tasks.declare import GpuQueueTask, GpuTask

    GpuRequest.default_soft_time_limit_s = settings.task_soft_time_limit_s
    GpuTask.Request = GpuQueueTask.Request = f"{__name__}:GpuRequest"
