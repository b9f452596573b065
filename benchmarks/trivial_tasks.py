"""Trivial tasks for ``benchmarks/drain.py``: the same empty work on both kinds of worker.

- ``benchmarks.noop``: a ``@gpu_task`` routed by ``entity_id``; the GPU worker imports
  this module with ``--import benchmarks.trivial_tasks``.
- ``benchmarks.plain_noop`` on :data:`plain_app`: a plain Celery app with Celery's
  defaults (JSON is already the default serializer), for
  ``celery -A benchmarks.trivial_tasks:plain_app worker``.

:data:`plain_app` is not made Celery's current app: the GPU worker imports this module
too, and must keep ``gpu_tasks.app`` as its app. The plain worker makes ``plain_app``
current itself. Its Redis URL comes from the process's settings (``GPU_TASKS_REDIS_URL``).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from gpu_tasks import settings as _settings
from gpu_tasks.task import gpu_task

PLAIN_QUEUE = "plain"


@gpu_task(name="benchmarks.noop")
def noop(gpu: Any) -> None:
    """Does nothing on the GPU worker (the result still says where it ran)."""
    return None


def make_plain_app(redis_url: str | None) -> Celery:
    """A Celery app left at Celery's defaults, but for broker and result backend."""
    plain = Celery("benchmarks_plain", broker=redis_url, backend=redis_url, set_as_current=False)
    plain.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
    )
    return plain


plain_app = make_plain_app(_settings.current().redis_url)


@plain_app.task(name="benchmarks.plain_noop")
def plain_noop() -> None:
    """Does nothing on the plain worker."""
    return None
