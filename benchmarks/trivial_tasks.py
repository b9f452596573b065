"""Trivial tasks for ``benchmarks/drain.py`` and ``benchmarks/e2e.py``: the same empty work
on every kind of worker.

- ``benchmarks.noop``: a ``@gpu_task`` routed by ``entity_id``; the GPU worker imports
  this module with ``--import benchmarks.trivial_tasks``. Its result is the where-it-ran
  object every entity task answers with (``entity_id``, ``shard``, ``queue``, ``gpu``,
  ``worker``, ``device``, ``generation``, and ``result``: None).
- ``benchmarks.plain_noop`` on :data:`plain_app`: a plain Celery app with Celery's
  defaults (JSON is already the default serializer), for
  ``celery -A benchmarks.trivial_tasks:plain_app worker``.
- ``benchmarks.plain_late_noop`` on :data:`plain_late_app`: the same, but with the
  delivery guarantees every GPU worker has (DESIGN.md): ``task_acks_late``,
  ``task_reject_on_worker_lost`` and ``worker_prefetch_multiplier=1``; Celery's defaults
  otherwise. For ``celery -A benchmarks.trivial_tasks:plain_late_app worker``.

Neither plain app is made Celery's current app: the GPU worker imports this module
too, and must keep ``gpu_tasks.app`` as its app. A plain worker makes its app current
itself. Their Redis URL comes from the process's settings (``GPU_TASKS_REDIS_URL``).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from gpu_tasks import settings as _settings
from gpu_tasks.tasks.declare import gpu_task

PLAIN_QUEUE = "plain"
PLAIN_LATE_QUEUE = "plain_late"

# What gpu_tasks.app sets for delivery; nothing else of its configuration.
SAME_GUARANTEES: dict[str, Any] = {
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
}


@gpu_task(name="benchmarks.noop")
def noop(gpu: Any) -> None:
    """Does nothing on the GPU worker (the result still says where it ran)."""
    return None


def make_plain_app(
    redis_url: str | None, name: str = "benchmarks_plain", **overrides: Any
) -> Celery:
    """A Celery app left at Celery's defaults, but for broker, result backend and
    ``overrides``."""
    plain = Celery(name, broker=redis_url, backend=redis_url, set_as_current=False)
    plain.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        **overrides,
    )
    return plain


plain_app = make_plain_app(_settings.current().redis_url)
plain_late_app = make_plain_app(
    _settings.current().redis_url, "benchmarks_plain_late", **SAME_GUARANTEES
)


@plain_app.task(name="benchmarks.plain_noop")
def plain_noop() -> None:
    """Does nothing on the plain worker."""
    return None


@plain_late_app.task(name="benchmarks.plain_late_noop")
def plain_late_noop() -> None:
    """Does nothing on the plain worker with the GPU worker's delivery guarantees."""
    return None
