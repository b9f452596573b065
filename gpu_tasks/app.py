"""The Celery app with the built-in tasks declared on it: what producers import and what
``celery -A gpu_tasks.app`` (Flower, beat) names.

The app object itself lives in :mod:`gpu_tasks.celeryapp`, which the task declarations
import; this module only adds the built-ins, so that sending one by name
(``app.send_task("gpu_tasks.alloc", ...)``) routes it by entity.
"""

from __future__ import annotations

from typing import Any

from gpu_tasks import celeryapp
from gpu_tasks.celeryapp import (
    GPU_WORKER_FLAG,
    GpuCelery,
    app,
    celery_config,
    configure,
    shard_count_reader,
)
from gpu_tasks.tasks import builtin as _builtin  # noqa: F401  (declares the built-ins)

__all__ = ["GPU_WORKER_FLAG", "GpuCelery", "app", "celery_config", "configure",
           "shard_count_reader"]


def __getattr__(name: str) -> Any:
    # ``router`` is replaced by every configure(): read it where it lives.
    if name == "router":
        return celeryapp.router
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
