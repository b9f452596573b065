"""The Celery app every producer and worker shares, configured from :mod:`gpu_tasks.settings`.

Producers import it (usually through ``gpu_tasks.tasks``) and call Celery's own
``apply_async``/``send_task``: the entity router sits in ``task_routes``. Workers
start from it too (``celery -A gpu_tasks.app worker`` also works, though
``gpu-tasks worker`` pins the GPU first).
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery
from kombu import pools as kombu_pools

from gpu_tasks import errors as _errors  # noqa: F401  (results rebuild these exceptions)
from gpu_tasks import settings as _settings
from gpu_tasks.routing import EntityRouter
from gpu_tasks.settings import Settings
from gpu_tasks.shardmap import ShardMapCache

# Where Celery would otherwise fall back to amqp://localhost. The router refuses
# routed tasks with a clear ConfigError before anything is sent here.
_UNCONFIGURED_URL = "redis://gpu-tasks-redis-url-not-set.invalid/0"

app = Celery("gpu_tasks")
router: EntityRouter


def celery_config(settings: Settings, entity_router: EntityRouter) -> dict[str, Any]:
    """Celery settings that follow from ours; one place, so every process agrees."""
    url = settings.redis_url or _UNCONFIGURED_URL
    # The visibility timeout must be the same everywhere Celery reads it and longer
    # than any task, or Redis hands a running task to a second worker.
    transport = {"visibility_timeout": int(settings.visibility_timeout_s)}
    return {
        "broker_url": url,
        "result_backend": url,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_routes": (entity_router,),
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_time_limit": settings.task_time_limit_s,
        # Task events cost a worker about as much as a trivial task itself; Flower switches
        # them on (enable_events) while it watches, so they are off by default.
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "result_extended": True,
        "result_expires": 24 * 3600,
        "imports": ("gpu_tasks.tasks", *settings.imports),
    }


def configure(settings: Settings) -> None:
    """(Re)configure the shared app and router from ``settings``; the CLI calls this after
    applying its flags. Safe before the app is first used."""
    global router
    _settings.use(settings)
    router = EntityRouter(ShardMapCache(settings.redis_url, settings.map_refresh_s))
    app.conf.update(celery_config(settings, router))
    _drop_connections()


def _drop_connections() -> None:
    """Forget broker and backend connections made with the previous configuration
    (what Celery itself does after a fork)."""
    # kombu keeps pools in a process-wide registry keyed by URL: reset it, or a later
    # configure() back to an earlier URL would get that URL's closed pool.
    kombu_pools.reset()  # type: ignore[no-untyped-call]
    app._after_fork()
    app._backend_cache = None
    app._local = threading.local()


configure(_settings.current())

from gpu_tasks import tasks as _builtin_tasks  # noqa: E402, F401  (registers the built-ins)
