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

from kombu.transport import redis as kombu_redis


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
