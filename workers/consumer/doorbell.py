"""How an idle GPU worker hears that work arrived, without taking it.

The worker takes its requests with a Lua script (:func:`gpu_tasks.control.unacked.take`),
which pops and records them in one atomic step; a script cannot block, and Redis has no
blocking pop over many lists that also records what it popped (``BLMOVE`` takes one
source). So a worker whose queues are empty waits for a wake-up, then takes.

The wake-up is Redis client-side caching (``CLIENT TRACKING``, Redis 6+). When a take
found nothing, the worker reads its queues once more on a connection with tracking on
(:meth:`Doorbell.arm`: one ``EXISTS`` over all of them), so Redis remembers them for this
worker, and the next write to any of them (a producer's LPUSH) sends one invalidation
message to the worker's bell connection, subscribed to ``__redis__:invalidate``. A push
between the empty take and the ``EXISTS`` is seen by the ``EXISTS`` itself. Against
keyspace notifications this needs no server configuration (``notify-keyspace-events``),
and it is never a flood: a queue sends at most one invalidation each time the worker goes
idle (Redis forgets a key once it sent its invalidation, and a busy worker does not read
on the tracked connection), not one per request. (The
take itself does not run tracked: Redis 7.0 remembers every key of a script for each
read the script makes, which made a take over 1,024 queues cost 46 ms instead of 1.)
Pub/sub is at most once (a dropped connection loses what was in flight), so the worker
also takes every ``GPU_TASKS_FETCH_IDLE_POLL_S`` whatever it heard: a missed wake-up
costs at most that.

Each invalidation names the queue pushed to; since every queue was armed when the worker
went idle, the queues named since are the only ones with work, and the first take after
a wake-up looks at those alone (a take over 1,024 queues reads them all: about 1 ms of
Redis; over the few named, a few microseconds).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import redis

log = logging.getLogger(__name__)

CHANNEL = "__redis__:invalidate"


class Doorbell:
    """The tracked connection and the bell connection (see the module).

    The tracked connection is one connection, with tracking turned on again at each
    reconnect (redis-py's ``redis_connect_func``)."""

    def __init__(self, make_client: Callable[..., redis.Redis]) -> None:
        self._make_client = make_client
        self._bell: Any = None
        self._bell_id: int | None = None
        # One connection held for good (a client of its own would hand out any of its
        # pool's): redis-py reconnects it on use, and _on_connect turns tracking on again.
        self._tracked: Any = make_client(
            redis_connect_func=self._on_connect).connection_pool.get_connection()
        self.working = False
        """Tracking is on and the bell subscribed: an idle worker can wait for it."""

    def _on_connect(self, connection: Any) -> None:
        connection.on_connect()
        if self._bell_id is not None:
            connection.send_command(  # type: ignore[no-untyped-call]
                "CLIENT", "TRACKING", "ON", "REDIRECT", self._bell_id,
                                    "NOLOOP")
            connection.read_response()

    def connect(self) -> None:
        """(Re)open the bell and point the take connection's tracking at it; on a Redis that
        cannot (before 6, or an ACL without ``client|tracking`` and ``&__redis__:invalidate``)
        the worker polls instead, and says so once."""
        self.close_bell()
        try:
            bell = self._make_client().connection_pool.get_connection()
            bell.send_command("CLIENT", "ID")  # type: ignore[no-untyped-call]
            bell_id = int(bell.read_response())
            bell.send_command("SUBSCRIBE", CHANNEL)  # type: ignore[no-untyped-call]
            bell.read_response()
            self._bell, self._bell_id = bell, bell_id
            # Off first: a connection already tracking cannot be pointed elsewhere.
            for command in (("CLIENT", "TRACKING", "OFF"),
                            ("CLIENT", "TRACKING", "ON", "REDIRECT", bell_id, "NOLOOP")):
                self._tracked.send_command(*command)
                self._tracked.read_response()
        except redis.ResponseError as exc:
            if self.working or self._bell_id is None:
                log.warning("Redis refused client tracking (%s): an idle GPU worker polls its "
                            "queues instead of waiting for a push (needs Redis 6+, and ACL "
                            "+client|tracking &__redis__:invalidate)", exc)
            self.close_bell()
            self.working = False
            return
        self.working = True

    def arm(self, queues: Sequence[str]) -> bool:
        """Have the next push to any of ``queues`` ring the bell; True if one of them has
        work already (take again instead of waiting)."""
        if not queues:
            return False
        self._tracked.send_command("EXISTS", *queues)
        found = int(self._tracked.read_response())
        return found > 0

    def fileno(self) -> int | None:
        sock = getattr(self._bell, "_sock", None)
        return sock.fileno() if sock is not None else None

    def drain(self) -> set[str] | None:
        """Read whatever the bell got: the queues named (an empty set if Redis named none,
        as after a FLUSHDB: then any queue may have changed); None if its connection is
        gone (call :meth:`connect` again)."""
        bell = self._bell
        if bell is None:
            return None
        named: set[str] = set()
        try:
            while bell.can_read(timeout=0):
                message = bell.read_response()
                keys = message[2] if isinstance(message, list) and len(message) == 3 else None
                if not isinstance(keys, list):
                    return set()
                named.update(k.decode() if isinstance(k, bytes) else str(k) for k in keys)
        except (redis.RedisError, OSError):
            self.working = False
            return None
        return named

    def close_bell(self) -> None:
        bell, self._bell, self._bell_id = self._bell, None, None
        if bell is not None:
            with contextlib.suppress(Exception):
                bell.disconnect()

    def close(self) -> None:
        self.close_bell()
        with contextlib.suppress(Exception):
            self._tracked.disconnect()
