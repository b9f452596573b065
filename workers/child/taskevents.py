"""Task events of batched requests: what Flower needs to see requests, not batches.

Celery's worker sends ``task-received`` and ``task-started`` from its main process and
``task-succeeded`` / ``task-failed`` once the pool returns; a batch is one pool job, so
here the pool child sends each request's events itself, with the fields Celery's worker
sends (``celery.worker.strategy``, ``celery.worker.request``), from the worker's
hostname. They are buffered (Celery's ``buffer_group``) and published as one
``task.multi`` message per write of the batch's results, which Celery's event receiver,
and so Flower, splits into the single events: one ``PUBLISH`` per batch write, not four
per request. Sent only while the worker's task events are on (``-E``, Flower's
``enable_events``, ``GPU_TASKS_TASK_EVENTS``), as the main process says with each batch.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery.utils.saferepr import saferepr

log = logging.getLogger(__name__)


class BatchEvents:
    """One pool child's task-event dispatcher (made on first use, after fork)."""

    def __init__(self, app: Any, hostname: str) -> None:
        self.app = app
        self.hostname = hostname
        self._dispatcher: Any = None
        self._pid = 0

    def _get(self) -> Any:
        if self._dispatcher is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._dispatcher = self.app.events.Dispatcher(
                self.app.connection_for_write(), hostname=self.hostname, enabled=True,
                buffer_group={"task"}, buffer_limit=1 << 30)
        return self._dispatcher

    def send(self, type_: str, **fields: Any) -> None:
        try:
            self._get().send(type_, **fields)
        except Exception as exc:  # events are for watching: never fail a request over one
            log.warning("could not send %s: %s", type_, exc)

    def received(self, request: dict[str, Any]) -> None:
        self.send("task-received", uuid=request["id"], name=request.get("task"),
                  args=request.get("argsrepr"), kwargs=request.get("kwargsrepr"),
                  root_id=request.get("root_id"), parent_id=request.get("parent_id"),
                  retries=request.get("retries", 0), eta=request.get("eta"),
                  expires=request.get("expires"))

    def started(self, task_id: str) -> None:
        self.send("task-started", uuid=task_id, pid=os.getpid())

    def finished(self, task_id: str, state: str | None, retval: Any, runtime: float,
                 retstr: Any) -> None:
        """After Celery's tracer: ``state`` None (success) or the tracer's info state."""
        if state is None:
            self.send("task-succeeded", uuid=task_id, result=retstr, runtime=runtime)
        elif state == "RETRY":
            self.send("task-retried", uuid=task_id, exception=saferepr(
                getattr(retval, "exception", retval)), traceback=getattr(retval, "traceback", ""))
        elif state == "FAILURE":
            self.send("task-failed", uuid=task_id, exception=saferepr(
                getattr(retval, "exception", retval)), traceback=getattr(retval, "traceback", ""))

    def revoked(self, task_id: str, expired: bool) -> None:
        self.send("task-revoked", uuid=task_id, terminated=False, signum=None,
                  expired=expired)

    def flush(self) -> None:
        if self._dispatcher is None:
            return
        started = time.monotonic()
        try:
            self._dispatcher.flush()
        except Exception as exc:
            log.warning("could not send task events (%s); they are dropped", exc)
            self._dispatcher = None
        log.debug("task events flushed in %.1f ms", (time.monotonic() - started) * 1e3)
