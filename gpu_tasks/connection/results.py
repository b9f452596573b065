"""The Redis result backend producers use: Celery's own, subscribing only when asked.

Celery's Redis backend sends ``SUBSCRIBE celery-task-meta-<id>`` for every
``apply_async`` (so that a later ``get()`` hears the result at once) and
``UNSUBSCRIBE`` when the ``AsyncResult`` is garbage collected: two commands on the
pub/sub connection per call, even for the many callers that never wait (a web
backend that answers 202 with the task id, a cron batch). Here the subscription is
made by ``get()`` itself, which then reads the stored result once before it waits
(Celery's ``on_wait_for_pending``), so a result stored before the subscription is
not missed. ``AsyncResult`` behaves exactly as before for every caller.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import redis
import redis.sentinel
from celery.backends.redis import RedisBackend, SentinelBackend
from celery.backends.redis import ResultConsumer as CeleryResultConsumer

from gpu_tasks import settings as _settings
from gpu_tasks.connection.broker import broker_unavailable
from gpu_tasks.errors import BrokerUnavailable
from gpu_tasks.redisurl import one_attempt, sentinel_login

_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError)


class ResultConsumer(CeleryResultConsumer):  # type: ignore[misc]
    """Unsubscribes only from what it subscribed to: a result nobody waited for costs
    nothing when it is collected. A pub/sub connection that cannot be re-established
    (Redis down or hung) raises :class:`BrokerUnavailable` for the ``get()`` that needed
    it, where Celery raises ``RuntimeError("... The Celery application must be
    restarted")``: it need not be, the next ``get()`` connects afresh."""

    def _reconnect(self) -> None:
        try:
            super()._reconnect()
        except _UNAVAILABLE as exc:
            self._pubsub = None  # the next consume_from() starts a new connection
            raise broker_unavailable("cannot wait for a result", self.backend.url or "", exc,
                                     sending=False) from exc

    def cancel_for(self, task_id: str) -> None:
        key = self._get_key_for_task(task_id)
        if key not in self.subscribed_to and key not in self._pending_unsubscribe:
            return
        try:
            super().cancel_for(task_id)
        except (BrokerUnavailable, *_UNAVAILABLE):
            # Redis is away: the subscription went with the connection, and the next get()
            # subscribes afresh. This runs from AsyncResult.__del__, where raising would
            # only print a traceback from the garbage collector.
            pass


class ResultBackend(RedisBackend):  # type: ignore[misc]
    """Celery's Redis result backend, subscribing to a task's result only in ``get()``; its
    writes can be queued on a pipeline (:meth:`writing_to`)."""

    _pipe: Any = None
    _known: dict[str, Any] | None = None

    @contextmanager
    def writing_to(self, pipe: Any, known: Mapping[str, Any] | None = None) -> Iterator[None]:
        """Results stored meanwhile (in this thread's use of the backend) are queued on
        ``pipe`` as Celery writes them (``SET``/``SETEX`` and ``PUBLISH``), not each sent in
        a round trip of its own: the caller executes ``pipe`` (a GPU worker's batch, with
        the requests' acknowledgements in the same transaction).

        ``known``: the stored results of the task ids about to be stored (task id -> raw
        meta, None for none), read by the caller in one ``MGET``. Celery reads a task's
        result before storing one (so that a duplicate never overwrites a success): with
        ``known``, that read is answered from it, and from what was queued since."""
        self._pipe = pipe
        self._known = dict(known) if known is not None else None
        try:
            yield
        finally:
            self._pipe = None
            self._known = None

    def _get_task_meta_for(self, task_id: Any) -> Any:
        known = self._known
        if known is not None and task_id in known:
            raw = known[task_id]
            return self.decode_result(raw) if raw else {"status": "PENDING", "result": None}
        return super()._get_task_meta_for(task_id)

    def _set(self, key: str, value: Any, expires: Any = None) -> None:
        pipe = self._pipe
        if pipe is None:
            super()._set(key, value, expires)
            return
        if self._known is not None:
            text = key.decode() if isinstance(key, bytes) else str(key)
            prefix = self.task_keyprefix
            prefix = prefix.decode() if isinstance(prefix, bytes) else str(prefix)
            if text.startswith(prefix):
                self._known[text[len(prefix):]] = value
        if expires is None:
            expires = self.expires
        if expires:
            pipe.setex(key, expires, value)
        else:
            pipe.set(key, value)
        pipe.publish(key, value)

    ResultConsumer = ResultConsumer

    def exception_safe_to_retry(self, exc: Exception) -> bool:
        # What this class raises for a down or hung Redis (get() wraps redis's errors) is as
        # safe to retry as those errors (result_backend_always_retry, set by GPU workers).
        return isinstance(exc, BrokerUnavailable) or super().exception_safe_to_retry(exc)

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Nothing to do at submit: ``get()`` subscribes (``add_pending_result``)."""

    # Reading a result from a down or hung Redis raises the producer's one error for it.

    def get(self, key: str) -> Any:
        try:
            return super().get(key)
        except _UNAVAILABLE as exc:
            raise broker_unavailable("cannot read a result", self.url or "", exc,
                                     sending=False) from exc

    def mget(self, keys: list[str]) -> Any:
        try:
            return super().mget(keys)
        except _UNAVAILABLE as exc:
            raise broker_unavailable("cannot read results", self.url or "", exc,
                                     sending=False) from exc


class SentinelResultBackend(ResultBackend, SentinelBackend):  # type: ignore[misc]
    """:class:`ResultBackend` of a master found through Redis Sentinel (``sentinel://``):
    Celery's ``SentinelBackend`` finds the master, this class's methods do the rest."""

    def _get_sentinel_instance(self, **params: Any) -> Any:
        # One attempt per Sentinel (redisurl.one_attempt): redis-py would retry a Sentinel
        # that is down for seconds before asking the next one. Their login comes from the
        # settings, as the broker's does (gpu_tasks.connection.broker.EverySentinel).
        options = self._transport_options
        hosts = params.pop("hosts")
        return redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            [(cp["host"], cp["port"]) for cp in hosts],
            min_other_sentinels=options.get("min_other_sentinels", 0),
            sentinel_kwargs={**(options.get("sentinel_kwargs") or {}),
                             **sentinel_login(_settings.current().redis_url), **one_attempt()},
            **params)
