"""The Redis broker transport producers use: kombu's own, without its per-publish waste.

kombu's Redis channel builds a new redis-py client object for every publish (about
60 us of client CPU, more than the LPUSH itself costs on a warm connection). Here a
channel keeps one client per connection pool: redis-py clients are thread-safe, each
command borrows a connection from the pool, so sharing one changes nothing else. The
messages themselves are byte for byte what kombu sends, so a worker cannot tell them
apart. GPU workers use their own transport (``workers.transport``), which also consumes.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis

from gpu_tasks import settings as _settings
from gpu_tasks.errors import BrokerUnavailable
from gpu_tasks.settings import redacted_url


class ProducerChannel(kombu_redis.Channel):  # type: ignore[misc]
    """kombu's Redis channel, reusing one client per connection pool for publishing."""

    _publish_client: Any = None

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


TRANSPORT = f"{ProducerTransport.__module__}:{ProducerTransport.__qualname__}"
"""``broker_transport`` of producers (``gpu_tasks.app``)."""


def broker_unavailable(what: str, url: str, exc: BaseException, *,
                       sending: bool = True) -> BrokerUnavailable:
    """The error a producer sees when Redis did not take or answer a call: what failed,
    where (without the password), why, and (``sending``) whether anything may have been
    enqueued."""
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    hung = any(isinstance(e, (TimeoutError, redis.TimeoutError)) or "timed out" in str(e)
               for e in chain)
    # The Redis or socket error says most; kombu's wrapper and retry internals less.
    cause = next((e for e in chain if isinstance(e, (redis.RedisError, OSError))), exc)
    shown = redacted_url(url)
    timeout = _settings.current().redis_timeout_s
    if hung:
        outcome = (f"Redis at {shown} did not answer within {timeout:g} s "
                   "(GPU_TASKS_REDIS_TIMEOUT_S)")
        if sending:
            outcome += "; if it resumes, what was sent may still run"
    else:
        outcome = f"Redis at {shown} is unavailable"
        if sending:
            outcome += "; nothing was enqueued"
    return BrokerUnavailable(f"{what}: {outcome} ({type(cause).__name__}: {cause})", shown)
