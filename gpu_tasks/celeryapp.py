"""The Celery app object every producer and worker shares, configured from
:mod:`gpu_tasks.settings`. The built-in tasks are declared on it by :mod:`gpu_tasks.tasks`;
:mod:`gpu_tasks.app` is the public module that has both.

Producers import it (usually through ``gpu_tasks.tasks``) and call Celery's own
``apply_async``/``send_task``: the entity router sits in ``task_routes``. GPU workers
run it too, started by ``gpu-tasks worker --gpu N``, which pins the GPU, takes its
lease and installs the shard consumption; a plain ``celery -A gpu_tasks.app worker``
refuses to start, since it would take GPU requests off their queues and could not
run them.
"""

from __future__ import annotations

import datetime
import threading
import warnings
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery, signals
from celery.app.amqp import AMQP
from celery.exceptions import CPendingDeprecationWarning
from kombu import pools as kombu_pools
from kombu.exceptions import OperationalError

from gpu_tasks import errors as _errors  # noqa: F401  (results rebuild these exceptions)
from gpu_tasks import redisurl
from gpu_tasks import settings as _settings
from gpu_tasks.connection.broker import (
    PRODUCER_TRANSPORT,
    SENTINEL_PRODUCER_TRANSPORT,
    broker_unavailable,
)
from gpu_tasks.connection.results import ResultBackend, SentinelResultBackend
from gpu_tasks.control.shardmap import ShardMapStore
from gpu_tasks.errors import BrokerUnavailable, RoutingError, ShardMapError
from gpu_tasks.protocol.arguments import check_shapes, checked_arguments
from gpu_tasks.protocol.envelope import plain_kwargs
from gpu_tasks.protocol.limits import (
    LIMIT_NAMES,
    delay_problem,
    seconds_until,
    time_limit_problem,
)
from gpu_tasks.protocol.routing import EntityRouter
from gpu_tasks.settings import Settings

# Where Celery would otherwise fall back to amqp://localhost. The router refuses
# routed tasks with a clear ConfigError before anything is sent here.
_UNCONFIGURED_URL = "redis://gpu-tasks-redis-url-not-set.invalid/0"


class GpuAMQP(AMQP):  # type: ignore[misc]
    """Celery's message building, with a cheaper ``kwargsrepr``: saferepr of the arguments
    costs a call about 45 us where plain ``repr`` prints the same text (small arguments)."""

    def as_task_v2(self, task_id: str, name: str, args: Any = None, kwargs: Any = None,
                   *rest: Any, argsrepr: str | None = None, kwargsrepr: str | None = None,
                   **options: Any) -> Any:
        if argsrepr is None and not args:
            argsrepr = "()"
        if kwargsrepr is None and kwargs and plain_kwargs(kwargs):
            kwargsrepr = repr(kwargs)
        return super().as_task_v2(task_id, name, args, kwargs, *rest, argsrepr=argsrepr,
                                  kwargsrepr=kwargsrepr, **options)


class GpuCelery(Celery):  # type: ignore[misc]
    """Celery, with the producer-side transport, message building and result backend of this
    module, and one clear error when Redis cannot take a request."""

    amqp_cls = f"{__name__}:GpuAMQP"

    def _get_backend(self) -> Any:
        url = self.conf.result_backend
        if isinstance(url, str) and url.startswith("sentinel://"):
            return SentinelResultBackend(app=self, url=url)
        if isinstance(url, str) and url.startswith(_REDIS_SCHEMES):
            return ResultBackend(app=self, url=url)
        return super()._get_backend()

    def type_checker(self, fun: Any, bound: bool = False) -> Any:
        # Celery's check of apply_async's arguments raises a bare TypeError; a producer
        # gets the BadArguments (a BadRequest naming the field) the worker would answer.
        return staticmethod(checked_arguments(super().type_checker(fun, bound=bound).__func__))

    def send_task(self, name: str, args: Any = None, kwargs: Any = None,
                  **options: Any) -> Any:
        # Declaring the shard queue's kombu binding on every publish costs a call about
        # 60 us and nothing reads it: the message goes to the queue's list directly
        # (exchange ""), and workers declare what they consume.
        options.setdefault("declare", ())
        check_shapes(name, args, kwargs)
        _check_options(name, options)
        try:
            return super().send_task(name, args, kwargs, **options)
        except BrokerUnavailable:
            raise
        except OperationalError as exc:
            # The settings' URL: the broker's names only the first of several Sentinels.
            url = _settings.current().redis_url or self.conf.broker_url
            raise broker_unavailable(f"cannot send {name}", url, exc) from exc


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _check_options(name: str, options: dict[str, Any]) -> None:
    """Refuse time limits and delays a GPU worker could not honour (:mod:`gpu_tasks.protocol.
    limits`): nothing is enqueued."""
    countdown: Any = options.get("countdown")
    eta: Any = options.get("eta")
    if (eta is None and countdown is None and options.get("time_limit") is None
            and options.get("soft_time_limit") is None):
        return  # the usual send: nothing to check (every apply_async passes here)
    limit_s = _settings.current().visibility_timeout_s
    for option in LIMIT_NAMES:
        problem = time_limit_problem(option, options.get(option), limit_s)
        if problem:
            raise RoutingError(f"task {name}: {problem}; nothing was enqueued")
    if eta is None and countdown is None:
        return
    delay_s: float
    if eta is not None:
        when = datetime.datetime.fromisoformat(eta) if isinstance(eta, str) else eta
        if not isinstance(when, datetime.datetime):
            raise RoutingError(f"task {name}: eta must be a datetime or ISO 8601 text, got "
                               f"{eta!r}; nothing was enqueued")
        delay_s = seconds_until(when)
    else:
        try:
            delay_s = float(countdown)
        except (TypeError, ValueError):
            raise RoutingError(f"task {name}: countdown must be a number of seconds, got "
                               f"{countdown!r}; nothing was enqueued") from None
    problem = delay_problem(delay_s, limit_s)
    if problem:
        raise RoutingError(f"task {name}: {problem}; nothing was enqueued")


app = GpuCelery("gpu_tasks")
router: EntityRouter

GPU_WORKER_FLAG = "gpu_tasks_gpu_worker"
"""Set in ``app.conf`` by ``gpu-tasks worker`` (to the GPU it serves) before Celery starts."""


def celery_config(settings: Settings, entity_router: EntityRouter) -> dict[str, Any]:
    """Celery settings that follow from ours; one place, so every process agrees."""
    target = redisurl.parse(settings.redis_url or _UNCONFIGURED_URL)
    # The visibility timeout must be the same everywhere Celery reads it and longer
    # than any task, or Redis hands a running task to a second worker.
    transport: dict[str, Any] = {"visibility_timeout": int(settings.visibility_timeout_s)}
    # A call gets at most two tries (the second reconnects after a dropped connection, e.g.
    # a restarted Redis). Against a hung Redis that is three waits: the first try's
    # command, then the second's connect and its command (a hung server still accepts TCP
    # connections). Each gets a third of the timeout, so a web request handler waits at
    # most redis_timeout_s for a down or hung Redis, never Celery's minutes.
    attempt_s = settings.redis_timeout_s / 3
    retry = {"max_retries": 1, "interval_start": 0, "interval_step": 0, "interval_max": 0}
    # One priority step: a shard's requests stay in one list, in order, and a worker
    # polls one key per shard queue instead of four.
    broker_transport = {**transport, "priority_steps": [0], "socket_timeout": attempt_s,
                        "socket_connect_timeout": attempt_s}
    # Sentinel's master name and Sentinels, and TLS, the same for broker and backend; the
    # URLs themselves without the parameters only gpu-tasks reads (redisurl).
    found_by = target.transport_options(attempt_s)
    tls = target.ssl_options()
    return {
        "broker_url": target.broker_url,
        "result_backend": target.backend_url,
        "broker_transport": (SENTINEL_PRODUCER_TRANSPORT if target.sentinel
                             else PRODUCER_TRANSPORT),
        "broker_transport_options": {**broker_transport, **found_by},
        "broker_use_ssl": tls or False,
        "redis_backend_use_ssl": tls,
        "broker_connection_timeout": attempt_s,
        "task_publish_retry_policy": retry,
        "result_backend_transport_options": {**transport, "retry_policy": retry, **found_by},
        "redis_socket_timeout": attempt_s,
        "redis_socket_connect_timeout": attempt_s,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_routes": (entity_router,),
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # A lost broker connection must not end the task that is running: cancelling it
        # terminates the pool child, and with it every entity's device buffers on this GPU.
        # The task finishes and its result is stored once Redis answers again; a copy
        # redelivered meanwhile is answered from the pool child's memory of what it
        # completed (workers.child.completed), not run twice.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # The soft limit (task_soft_time_limit_s) is applied by GPU workers per request
        # (workers.consumer.request), not here: Celery arms a request's hard timer only when its
        # soft one fires, so a default soft limit would hold back every shorter hard one.
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
    router = EntityRouter(shard_count_reader(settings), settings.max_entity_id_chars)
    app.conf.update(celery_config(settings, router))
    _drop_connections()


def shard_count_reader(settings: Settings) -> Callable[[], int]:
    """How a producer learns S: one read from Redis, the first time it routes."""

    def read() -> int:
        client = settings.redis_client()
        try:
            return ShardMapStore(client).shard_count()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise broker_unavailable("cannot read the shard count", settings.redis_url or "",
                                     exc) from exc
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


@signals.worker_ready.connect(weak=False)
def _quiet_the_cancel_warning(**_: Any) -> None:
    # At every lost broker connection Celery warns that it will cancel running tasks then
    # by default in 6.0; this app sets worker_cancel_long_running_tasks_on_connection_loss
    # explicitly (celery_config), so the warning tells an operator nothing. Installed once
    # the worker is ready: its logging setup puts an "always" filter before any earlier one.
    warnings.filterwarnings("ignore", message=r"\s*In Celery 5\.1 we introduced an optional",
                            category=CPendingDeprecationWarning)


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
