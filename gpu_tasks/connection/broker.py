"""The Redis broker transport producers use: kombu's own, without its per-publish waste.

kombu's Redis channel builds a new redis-py client object for every publish (more
client CPU than the LPUSH itself on a warm connection; BENCHMARKS.md). Here a
channel keeps one client per connection pool: redis-py clients are thread-safe, each
command borrows a connection from the pool, so sharing one changes nothing else. The
messages themselves are byte for byte what kombu sends, so a worker cannot tell them
apart. GPU workers use their own transport (``workers.consumer.transport``), which also consumes.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.sentinel
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps as kombu_dumps

from gpu_tasks import settings as _settings
from gpu_tasks.connection.failures import describe
from gpu_tasks.errors import BrokerUnavailable, RoutingError
from gpu_tasks.redisurl import one_attempt, redacted_url, sentinel_login


class ProducerChannel(kombu_redis.Channel):  # type: ignore[misc]
    """kombu's Redis channel, reusing one client per connection pool for publishing, and
    refusing a message no GPU worker would take."""

    _publish_client: Any = None

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        # Every send goes through here (apply_async, send_task, Flower, beat), and here the
        # message's final bytes exist: kombu would make the same ones. One over
        # GPU_TASKS_MAX_MESSAGE would be dead-lettered by the worker; refuse it now, so
        # that its producer hears at once and nothing is enqueued.
        raw = kombu_dumps(message).encode("utf-8")
        limit = _settings.current().max_message_bytes
        if len(raw) > limit:
            headers = message.get("headers") or {}
            raise RoutingError(
                f"task {headers.get('task')}: the message is {len(raw)} bytes, over the "
                f"{limit}-byte limit (GPU_TASKS_MAX_MESSAGE) GPU workers take; send large "
                "data in parts (write with offset) or raise the limit; nothing was enqueued")
        if kwargs.get("_publish_batch") is not None or (self._expires and queue in
                                                         self._expires):
            super()._put(queue, message, **kwargs)  # kombu's rarer paths, as they are
            return
        with self.conn_or_acquire() as client:
            client.lpush(self._q_for_pri(queue, self._get_message_priority(
                message, reverse=False)), raw)

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        client = self._publish_client
        # kombu replaces the pool after a fork or a disconnect: follow it.
        if client is None or client.connection_pool is not pool:
            client = self._publish_client = super()._create_client()
        return client


class ProducerTransport(kombu_redis.Transport):  # type: ignore[misc]
    """kombu's Redis transport with :class:`ProducerChannel`."""

    Channel = ProducerChannel


class EverySentinel:
    """Mixin for kombu's Sentinel channel: the master's pool asks every Sentinel of the
    ``sentinels`` transport option (``[[host, port], ...]``), not only the one address of
    the broker URL.

    kombu reads the Sentinels from the connection's alternate URLs (``sentinel://a;
    sentinel://b``), but on a connection error it also switches the connection over to
    the next of them, and that switch replaces the connection's transport with the stock
    one of the URL's scheme: a GPU worker would lose its own transport at the first
    failover. So the broker URL names one Sentinel
    (:attr:`gpu_tasks.redisurl.RedisTarget.broker_url`) and every Sentinel
    travels here. The Sentinels' own login comes from the settings, not the options:
    workers show their transport options in ``inspect stats``."""

    sentinels: list[list[Any]] | None = None
    from_transport_options = (*kombu_redis.SentinelChannel.from_transport_options,
                              "sentinels")

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        if not self.sentinels:
            return super()._sentinel_managed_pool(asynchronous)  # type: ignore[misc]
        # As kombu's own, with the Sentinels from the option.
        params = self._connparams(asynchronous)  # type: ignore[attr-defined]
        params.pop("host", None)
        params.pop("port", None)
        manager = redis.sentinel.Sentinel(
            [(str(host), int(port)) for host, port in self.sentinels],
            min_other_sentinels=getattr(self, "min_other_sentinels", 0) or 0,
            sentinel_kwargs={**(getattr(self, "sentinel_kwargs", None) or {}),
                             **sentinel_login(_settings.current().redis_url),
                             **one_attempt()}, **params)
        # kept so that kombu closes the connections to the Sentinels with the channel
        if asynchronous:
            self._async_sentinel_manager = manager
        else:
            self._sentinel_manager = manager
        master_name = getattr(self, "master_name", None)
        if master_name is None:
            raise ValueError("'master_name' transport option must be specified.")
        login = {k: params[k] for k in ("username", "password") if k in params}
        return manager.master_for(master_name, redis.Redis, **login).connection_pool


class SentinelProducerChannel(EverySentinel, ProducerChannel,  # type: ignore[misc]
                              kombu_redis.SentinelChannel):
    """:class:`ProducerChannel` of a master found through Redis Sentinel."""


class SentinelProducerTransport(ProducerTransport):
    """:class:`ProducerTransport` through Redis Sentinel (``sentinel://``)."""

    Channel = SentinelProducerChannel
    default_port = kombu_redis.SentinelTransport.default_port  # type: ignore[assignment]


PRODUCER_TRANSPORT = f"{ProducerTransport.__module__}:{ProducerTransport.__qualname__}"
"""``broker_transport`` of producers (``gpu_tasks.app``)."""
SENTINEL_PRODUCER_TRANSPORT = (f"{SentinelProducerTransport.__module__}:"
                               f"{SentinelProducerTransport.__qualname__}")
"""``broker_transport`` of producers where the URL names Sentinels."""


def broker_unavailable(what: str, url: str, exc: BaseException, *,
                       sending: bool = True) -> BrokerUnavailable:
    """The error a producer sees when Redis did not take or answer a call: what failed,
    where (without the password), why, and (``sending``) whether anything may have been
    enqueued."""
    failure = describe(exc)
    shown = redacted_url(url)
    outcome = failure.what(shown, _settings.current().redis_timeout_s)
    if sending:
        outcome += ("; if it resumes, what was sent may still run" if failure.kind == "timeout"
                    else "; nothing was enqueued")
    cause = failure.cause
    return BrokerUnavailable(f"{what}: {outcome} ({type(cause).__name__}: {cause})", shown)
