"""The Celery app every producer and worker shares, configured from :mod:`gpu_tasks.settings`.

Producers import it (usually through ``gpu_tasks.tasks``) and call Celery's own
``apply_async``/``send_task``: the entity router sits in ``task_routes``. GPU workers
run it too, started by ``gpu-tasks worker --gpu N``, which pins the GPU, takes its
lease and installs the shard consumption; a plain ``celery -A gpu_tasks.app worker``
refuses to start, since it would take GPU requests off their queues and could not
run them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery, signals
from kombu import pools as kombu_pools

from gpu_tasks import errors as _errors  # noqa: F401  (results rebuild these exceptions)
from gpu_tasks import settings as _settings
from gpu_tasks.errors import ShardMapError
from gpu_tasks.routing import EntityRouter
from gpu_tasks.settings import Settings
from gpu_tasks.shardmap import ShardMapStore

# Where Celery would otherwise fall back to amqp://localhost. The router refuses
# routed tasks with a clear ConfigError before anything is sent here.
_UNCONFIGURED_URL = "redis://gpu-tasks-redis-url-not-set.invalid/0"

app = Celery("gpu_tasks")
router: EntityRouter

GPU_WORKER_FLAG = "gpu_tasks_gpu_worker"
"""Set in ``app.conf`` by ``gpu-tasks worker`` (to the GPU it serves) before Celery starts."""


def celery_config(settings: Settings, entity_router: EntityRouter) -> dict[str, Any]:
    """Celery settings that follow from ours; one place, so every process agrees."""
    url = settings.redis_url or _UNCONFIGURED_URL
    # The visibility timeout must be the same everywhere Celery reads it and longer
    # than any task, or Redis hands a running task to a second worker.
    transport: dict[str, Any] = {"visibility_timeout": int(settings.visibility_timeout_s)}
    # One priority step: a shard's requests stay in one list, in order, and a worker
    # polls one key per shard queue instead of four.
    broker_transport = {**transport, "priority_steps": [0]}
    return {
        "broker_url": url,
        "result_backend": url,
        "broker_transport_options": broker_transport,
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
        # Results say where they ran themselves; storing each request's arguments again
        # beside its result (a write's payload, say) would double what Redis holds, and
        # costs a trivial task about 13 us.
        "result_extended": False,
        "result_expires": 24 * 3600,
        "imports": ("gpu_tasks.tasks", *settings.imports),
    }


def configure(settings: Settings) -> None:
    """(Re)configure the shared app and router from ``settings``; the CLI calls this after
    applying its flags. Safe before the app is first used."""
    global router
    _settings.use(settings)
    router = EntityRouter(shard_count_reader(settings))
    app.conf.update(celery_config(settings, router))
    _drop_connections()


def shard_count_reader(settings: Settings) -> Callable[[], int]:
    """How a producer learns S: one read from Redis, the first time it routes."""

    def read() -> int:
        client = settings.redis_client()
        try:
            return ShardMapStore(client).shard_count()
        except redis.RedisError as exc:
            raise ShardMapError(f"cannot read the shard count from Redis: {exc}") from exc
        finally:
            client.close()

    return read


@signals.celeryd_init.connect(weak=False)
def _refuse_plain_workers(instance: Any = None, **_: Any) -> None:
    if instance is None or instance.app is not app:
        return  # another app's worker
    if not app.conf.get(GPU_WORKER_FLAG):
        raise SystemExit(
            "gpu_tasks.app runs only in GPU workers: start one with `gpu-tasks worker --gpu N`. "
            "A plain `celery worker` would take GPU requests off their queues and could not "
            "run them."
        )


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
