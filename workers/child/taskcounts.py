"""How many tasks of each name succeeded, failed or were retried on this GPU.

Celery's ``task_success``, ``task_failure`` and ``task_retry`` signals fire in the
process that ran the task (the pool child; the worker itself with ``--pool solo``).
Each one only adds one to a dict in memory: a Redis call per task would cost a trivial
task a round trip. The pool child's heartbeat (:meth:`workers.child.runtime.DeviceRuntime.
heartbeat`) adds what gathered to ``gpu-tasks:taskcounts:<gpu>`` in the round trip it
makes anyway, so the counts reach Redis within ``heartbeat_s``, and the last ones when the
child stops (also when it ends after a poisoned context: billiard runs the shutdown hook
on ``SystemExit``). Where no heartbeat runs, each count is written at once: in a child
whose device failed to open (every task there fails fast anyway), and in the worker's
main process, where Celery itself fails a task whose child hit the hard time limit or
rejected it, and retries one whose child was lost (rare, so a round trip each is fine;
a thread there to batch them would be forked into every pool child).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from celery import signals

from gpu_tasks.control.fleet import FleetRegistry

log = logging.getLogger(__name__)


class TaskCounts:
    """``<task>:<outcome>`` -> how many since the last :meth:`take`, for one GPU."""

    def __init__(self, gpu: str) -> None:
        self.gpu = gpu
        self._counts: dict[str, int] = {}
        # The task thread adds, the heartbeat thread takes: without the lock an increment
        # made while the heartbeat swaps the dict could land in the dict it took away.
        self._lock = threading.Lock()
        self.write_through: Callable[[dict[str, int]], None] | None = None
        """Set where no heartbeat runs: writes the counts to Redis after each task."""

    def add(self, task: str, outcome: str) -> None:
        field = f"{task}:{outcome}"
        with self._lock:
            self._counts[field] = self._counts.get(field, 0) + 1
        if self.write_through is not None:
            counts = self.take()
            try:
                self.write_through(counts)
            except Exception as exc:  # Redis away: keep them for the next task
                self.put_back(counts)
                log.warning("could not record task counts: %s", exc)

    def take(self) -> dict[str, int]:
        """What gathered since the last take, and start again from nothing."""
        with self._lock:
            counts, self._counts = self._counts, {}
        return counts

    def put_back(self, counts: dict[str, int]) -> None:
        """Return counts that could not be written, for the next attempt."""
        with self._lock:
            for field, n in counts.items():
                self._counts[field] = self._counts.get(field, 0) + n

    def reset(self) -> None:
        """Start afresh in a new pool child: no counts and no write-through inherited from
        the parent, and a new lock (one held by another thread at fork stays held)."""
        self._lock = threading.Lock()
        self._counts = {}
        self.write_through = None

    def write_to(self, registry: FleetRegistry) -> None:
        """Write each count at once (no heartbeat will)."""
        self.write_through = lambda counts: registry.add_task_counts(self.gpu, counts)


    # Celery's signal receivers: ``sender`` is the task.

    def succeeded(self, sender: Any = None, **_: Any) -> None:
        self.add(_name(sender), "succeeded")

    def failed(self, sender: Any = None, **_: Any) -> None:
        self.add(_name(sender), "failed")

    def retried(self, sender: Any = None, **_: Any) -> None:
        self.add(_name(sender), "retried")


def _name(sender: Any) -> str:
    return str(getattr(sender, "name", None) or "unknown")


def install(gpu: str) -> TaskCounts:
    """Count this worker's task outcomes from Celery's signals. Call in the worker's main
    process before the pool forks: Celery's tracer looks its receivers up when built."""
    counts = TaskCounts(gpu)
    signals.task_success.connect(counts.succeeded, weak=False)
    signals.task_failure.connect(counts.failed, weak=False)
    signals.task_retry.connect(counts.retried, weak=False)
    return counts


def uninstall(counts: TaskCounts) -> None:
    """Stop counting into ``counts`` (tests)."""
    signals.task_success.disconnect(counts.succeeded)
    signals.task_failure.disconnect(counts.failed)
    signals.task_retry.disconnect(counts.retried)
