"""What gpu-tasks changes inside Flower's process (loaded by :mod:`gpu_tasks.monitor.flowerconfig`).

1. **Refusals are answers.** Flower's REST API publishes with ``apply_async`` or
   ``send_task`` on a worker thread and turns any exception there into a bare HTTP 500
   with an empty body. A request the router refuses (no ``entity_id``, a bad one, a
   ``queue=`` that is not a GPU queue) is the client's mistake, and nothing was
   enqueued: it gets a 400 with ``{"error": "RoutingError", "message": ...}``. Redis
   being down or the shard map missing gets a 503 with the reason.
2. **Revoke with terminate says whether it happened.** Flower broadcasts it without
   asking for replies and answers "Revoked"; a GPU worker refuses ``terminate`` (it would
   kill the pool child and every entity's buffers): the refusal comes back as a 403.
3. **Queue lengths work, and show queues with work but no consumer.** Flower chose its
   broker client by the scheme of the app's broker URI, which names gpu-tasks'
   transport class, and answered ``/api/queues/length`` and the Broker page with 404
   "'redis' broker is not supported"; they now read the deployment's Redis. Flower
   lists the queues its workers report consuming, so a shard queue whose GPU has no
   worker (exactly the one to worry about) would still be missing: every shard and GPU
   queue that holds requests is listed too.

:func:`install` swaps Flower's handler classes for these subclasses in its URL table
before Flower builds its application; everything else about them stays Flower's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import tornado.routing
import tornado.web
from flower import urls
from flower.api.control import TaskRevoke
from flower.api.tasks import GetQueueLengths, TaskApply, TaskAsyncApply, TaskSend
from flower.utils.broker import Broker
from flower.views.broker import BrokerView

from gpu_tasks import settings as _settings
from gpu_tasks.control.shardmap import ShardMapStore
from gpu_tasks.errors import (
    BadRequest,
    BrokerUnavailable,
    GpuTasksError,
    RoutingError,
    ShardMapError,
)
from gpu_tasks.protocol.routing import shard_name

log = logging.getLogger(__name__)

_QUEUE_TIMEOUT_S = 2.0
"""Longest the extra queue lookup may take; past it Flower's own list is shown."""


class Refused(tornado.web.HTTPError):
    """A request gpu-tasks refused, answered as JSON with the error's type and message."""

    def __init__(self, status_code: int, error: GpuTasksError) -> None:
        super().__init__(status_code, "%s: %s", type(error).__name__, str(error))
        self.error = error


def _status_of(error: GpuTasksError) -> int:
    if isinstance(error, (RoutingError, BadRequest)):
        return 400  # the request itself is wrong; nothing was enqueued
    if isinstance(error, (BrokerUnavailable, ShardMapError)):
        return 503  # Redis is away or the deployment has no shard map yet
    return 500


class _Outcome:
    """What a publish raised, carried back past Flower's runner (which would log it as a
    server fault with a traceback and answer 500)."""

    def __init__(self, error: GpuTasksError) -> None:
        self.error = error


def _guarded(func: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except GpuTasksError as exc:
            return _Outcome(exc)

    return call


class _AnswersRefusals:
    """Mixin for Flower's task-submitting handlers."""

    async def run_blocking(self, operation: str, target: Any, func: Callable[..., Any],
                           *args: Any, **kwargs: Any) -> Any:
        if operation == "task.publish":
            func = _guarded(func)
        result = await super().run_blocking(  # type: ignore[misc]
            operation, target, func, *args, **kwargs)
        if isinstance(result, _Outcome):
            raise Refused(_status_of(result.error), result.error)
        return result

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc_info = kwargs.get("exc_info")
        exc = exc_info[1] if exc_info else None
        if isinstance(exc, Refused):
            self.finish({"error": type(exc.error).__name__,  # type: ignore[attr-defined]
                         "message": str(exc.error)})
            return
        super().write_error(status_code, **kwargs)  # type: ignore[misc]


class GpuTaskApply(_AnswersRefusals, TaskApply):  # type: ignore[misc]
    pass


class GpuTaskAsyncApply(_AnswersRefusals, TaskAsyncApply):  # type: ignore[misc]
    pass


class GpuTaskSend(_AnswersRefusals, TaskSend):  # type: ignore[misc]
    pass


def queues_with_work() -> list[str]:
    """Every shard queue and every map owner's GPU queue that holds a request now (one
    pipelined LLEN per queue: about a millisecond for 1024 shards)."""
    settings = _settings.current()
    client = settings.replace(redis_timeout_s=_QUEUE_TIMEOUT_S).redis_client()
    try:
        shard_map = ShardMapStore(client).load()
        # Owners are named by their GPU queues (gpu.<node>.<i>), which carry stats,
        # control and handoff requests addressed to one GPU.
        owners = {s.owner for s in shard_map.shards if s.owner}
        names = [shard_name(i) for i in range(shard_map.shard_count)] + sorted(owners)
        with client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.llen(name)
            lengths = pipe.execute()
        return [name for name, n in zip(names, lengths, strict=True) if n]
    finally:
        client.close()


class _ListsQueuesWithWork:
    """Mixin: Flower's queue list plus the queues that hold work nobody consumes, read
    from the deployment's Redis.

    Flower picks its broker client by the scheme of the app's broker URI, which names
    gpu-tasks' transport class rather than ``redis``, so on its own it answers 404
    "'redis' broker is not supported"; the URL in the settings, as kombu gets it, is the
    plain one (with the Sentinels' master name in the transport options)."""

    def get_broker(self) -> Any:
        capp = self.capp  # type: ignore[attr-defined]
        target = _settings.current().redis_target()
        options = dict(capp.conf.broker_transport_options)
        if target.sentinel:  # the Sentinels' login is not among the options (redisurl)
            options["sentinel_kwargs"] = {**options.get("sentinel_kwargs", {}),
                                          **target.sentinel_login()}
        return Broker(target.broker_url, http_api=None, broker_options=options,
                      broker_use_ssl=capp.conf.broker_use_ssl)

    def get_active_queue_names(self) -> list[str]:
        names = set(super().get_active_queue_names())  # type: ignore[misc]
        try:
            names.update(queues_with_work())
        except Exception as exc:  # Redis away or no map: Flower's own list still helps
            log.warning("cannot list the queues that hold work: %s", exc)
        return sorted(names)


class GpuQueueLengths(_ListsQueuesWithWork, GetQueueLengths):  # type: ignore[misc]
    pass


class GpuBrokerView(_ListsQueuesWithWork, BrokerView):  # type: ignore[misc]
    pass


class GpuTaskRevoke(TaskRevoke):  # type: ignore[misc]
    """Revoke, saying so when GPU workers refuse ``terminate=true``: Flower broadcasts it
    without asking for replies and answers "Revoked" either way, while a GPU worker
    refuses to kill its pool child (and revokes nothing)."""

    @tornado.web.authenticated  # type: ignore[misc]
    async def post(self, taskid: str) -> None:
        if not self.get_argument("terminate", default=False, type=bool):
            await super().post(taskid)
            return
        self.check_writable()
        replies = await self.run_blocking(
            "task.revoke", taskid, self.capp.control.revoke, taskid, terminate=True,
            signal=self.get_argument("signal", default="SIGTERM", type=str), reply=True,
            timeout=self.application.options.inspect_timeout / 1000.0)
        refusals = [answer["error"] for reply in replies or [] for answer in reply.values()
                    if isinstance(answer, dict) and "error" in answer]
        if refusals:
            self.set_status(403)
            self.finish({"error": "Refused", "message": refusals[0]})
            return
        self.write({"message": f"Revoked '{taskid}'"})

    def check_writable(self) -> None:
        if self.application.options.read_only:
            raise tornado.web.HTTPError(403, "Read only mode is enabled")


REPLACEMENTS: dict[type, type] = {
    TaskRevoke: GpuTaskRevoke,
    TaskApply: GpuTaskApply,
    TaskAsyncApply: GpuTaskAsyncApply,
    TaskSend: GpuTaskSend,
    GetQueueLengths: GpuQueueLengths,
    BrokerView: GpuBrokerView,
}


def install() -> None:
    """Swap Flower's handlers for ours in its URL table (in place: ``flower.app`` holds
    the same list)."""
    table = urls.handlers
    for i, entry in enumerate(table):
        if isinstance(entry, tornado.routing.URLSpec):
            replacement = REPLACEMENTS.get(entry.handler_class)
            if replacement is not None:
                table[i] = tornado.web.url(entry.regex.pattern, replacement, entry.kwargs,
                                           entry.name)
        elif isinstance(entry, tuple) and entry[1] in REPLACEMENTS:
            table[i] = (entry[0], REPLACEMENTS[entry[1]], *entry[2:])
