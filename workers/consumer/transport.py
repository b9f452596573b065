"""The Redis transport of a GPU worker: kombu's own, with what many shard queues need.

A GPU worker consumes one queue per shard it owns (1024 on a one-GPU host), so:

- **One BRPOP, packed once per change of the consumed set.** kombu rebuilds and
  packs ``BRPOP`` over every queue times every priority step on each fetch, so the
  cost of a fetch grows with the number of queues. Here the command's bytes are
  built when the set changes; each fetch only picks where the key list starts,
  just after the queue served last, so every shard with work gets its turn.
- **One priority step.** Every producer sends with one too (``gpu_tasks.app``): a
  shard's requests stay in one list, in order.
- **The source queue travels with the message.** Each delivery is stamped with the
  list it was popped from (``delivery_info["gpu_tasks_source"]``), so fencing,
  requeueing and recovery put it back exactly there, whatever its routing key says.
- **Put back at the head.** A requeued message (``reject(requeue=True)``, a restore
  at shutdown) goes back to the head of its queue, not the tail: a shard's order is
  its entities' order.
- **Poison is dead-lettered, never decoded.** Each popped message is checked as raw bytes
  (:func:`gpu_tasks.protocol.checks.check_message`) before kombu parses it: what would end
  the worker, loop it, or be unpickled / decompressed goes to the dead letters with the
  reason, and the worker goes on. So does a request whose execution ended the pool child
  ``max_child_deaths`` times. A good message costs a size check, its envelope parsed once
  (kombu's own parse, done here instead), a few dict lookups, its body's base64 decoded
  once more and its body parsed here instead of in the fence: no Redis call.
- **Unacknowledged messages per GPU.** Each GPU keeps its own unacked keys
  (:mod:`gpu_tasks.control.unacked`), so what a dead worker had taken is put back at once by its
  successor or by failover, instead of after the visibility timeout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from queue import Empty
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads as kombu_loads

from gpu_tasks import settings as _settings
from gpu_tasks.connection.broker import EverySentinel
from gpu_tasks.control.deadletter import DeadLetter, DeadLetterStore, HeldLetters
from gpu_tasks.control.unacked import SOURCE, mark_redelivered, source_queue
from gpu_tasks.errors import ConfigError
from gpu_tasks.protocol.checks import Checked, check_message
from gpu_tasks.redisurl import redacted_url
from gpu_tasks.settings import Settings

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Guard:
    """What a GPU worker accepts (its settings, and the tasks it has registered)."""

    max_bytes: int = 16 << 20
    max_nesting: int = 64
    max_child_deaths: int = 3
    visibility_timeout_s: float = 3600.0
    """Time limits and delays must stay under it (gpu_tasks.protocol.limits)."""
    tasks: Any = None
    """Registered task names (anything with ``in``); None accepts any name."""

    def check(self, raw: bytes) -> Checked:
        return check_message(raw, max_bytes=self.max_bytes, max_nesting=self.max_nesting,
                             tasks=self.tasks, loads=kombu_loads,
                             visibility_timeout_s=self.visibility_timeout_s)


_guard = Guard()

_orphans: list[tuple[str, str]] = []
"""``(queue, message)`` of each message this process popped from its queue and could not
record as taken, because Redis went away between the two (kombu takes a message with a
BRPOP and records it in the unacked keys with a second command): Redis holds it nowhere
now, only this process does. The next channel, once Redis answers, puts them back at the
head of their queues (:meth:`GpuChannel._put_back_orphans`)."""
_held = HeldLetters()
"""Dead letters refused while Redis failed, stored at the next fetch (one per process)."""


def install_guard(guard: Guard) -> None:
    """Set what this process's GPU transport accepts (the worker's boot, before Celery
    starts: kombu builds the transport from its name, so it cannot be handed one)."""
    global _guard
    _guard = guard


def installed_guard() -> Guard:
    """What this worker accepts (its pool child inherits it at fork)."""
    return _guard


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


class GpuQoS(kombu_redis.QoS):  # type: ignore[misc]
    """kombu's ack emulation, requeueing at the head of the message's source queue."""

    def append(self, message: Any, delivery_tag: str) -> None:
        try:
            super().append(message, delivery_tag)
        except self.channel.connection_errors:
            queue = source_queue(message._raw, message.delivery_info.get("routing_key"))
            if queue:
                # Marked redelivered: the unacked write may have happened all the same (its
                # reply lost), and the worker then puts that copy back too; the second copy
                # to come is answered from the first's result instead of running again.
                payload = json.loads(json.dumps(message._raw))
                mark_redelivered(payload)
                _orphans.append((queue, json.dumps(payload)))
                log.warning("Redis went away as %s was taken from %s: it goes back there "
                            "once Redis answers", delivery_tag, queue)
            raise

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        # Celery requeues a request when its pool child died running it
        # (task_reject_on_worker_lost): one that kills every child would otherwise come
        # back at the head forever, so past max_child_deaths it is dead-lettered.
        if requeue and not self._dead_letter_if_deadly(delivery_tag):
            self.restore_by_tag(delivery_tag, leftmost=False)  # RPUSH: the head
        elif not requeue:
            self._remove_from_indices(delivery_tag).execute()
        virtual.QoS.ack(self, delivery_tag)

    def _dead_letter_if_deadly(self, delivery_tag: str) -> bool:
        message = self._delivered.get(delivery_tag)
        task_id = (getattr(message, "headers", None) or {}).get("id")
        if message is None or not isinstance(task_id, str):
            return False
        raw = message._raw
        queue = source_queue(raw, message.delivery_info.get("routing_key")) or ""
        with self.channel.conn_or_acquire() as client:
            letter = DeadLetterStore(client).dead_letter_if_deadly(
                task_id, json.dumps(raw).encode(), queue, raw, _guard.max_child_deaths,
                lambda pipe: self._remove_from_indices(delivery_tag, pipe))
        if letter is None:
            return False
        log.error("%s %s dead-lettered: %s", letter.task, task_id, letter.reason)
        return True

    def settle(self, message: Any, queue: str | None, *, head: bool) -> None:
        """Put ``message`` on ``queue`` (at its head, or its tail as if newly sent) and
        forget its delivery, in one transaction: never lost, never in two places.
        ``queue`` None drops it (it was answered some other way)."""
        tag = message.delivery_tag
        with self.channel.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=True)
            if queue is not None:
                (pipe.rpush if head else pipe.lpush)(queue, json.dumps(message._raw))
            self._remove_from_indices(tag, pipe)
            pipe.execute()
        virtual.QoS.ack(self, tag)
        message._state = "ACK"


class _Rotation:
    """Stands in for kombu's queue cycle, of which only ``rotate`` is still called (by
    ``_brpop_read``): it remembers where the next BRPOP starts."""

    def __init__(self, channel: GpuChannel) -> None:
        self.channel = channel

    def rotate(self, last_used: str) -> None:
        position = self.channel._brpop_position.get(last_used)
        if position is not None:
            self.channel._brpop_next = position + 1


class GpuMessage(virtual.Message):  # type: ignore[misc]
    """kombu's message, taking the body its channel already parsed while checking it."""

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        super().__init__(payload, channel=channel, **kwargs)
        checked = getattr(channel, "_checked", None)
        if checked is not None and checked.payload is payload:
            self._decoded_cache = checked.body


class GpuChannel(kombu_redis.Channel):  # type: ignore[misc]
    """kombu's Redis channel with a prepacked, rotating BRPOP (see the module docstring)."""

    QoS = GpuQoS
    Message = GpuMessage
    _checked: Checked | None = None
    """The message being delivered, as :meth:`_brpop_read` checked it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._brpop_dirty = True
        self._brpop_queues: list[str] = []
        self._brpop_position: dict[str, int] = {}
        self._brpop_keys = b""
        self._brpop_offsets: list[int] = [0]
        self._brpop_next = 0
        try:
            super().__init__(*args, **kwargs)  # connects (kombu PINGs)
        except redis.AuthenticationError as exc:
            # kombu and Celery count a refused login as a lost connection and retry it for
            # about an hour (100 attempts, backing off to 30 s), serving nothing. It stays
            # refused until someone changes the password or the ACL: exit non-zero instead
            # (Celery's "Unrecoverable error"), so that systemd restarts the worker, with
            # the new password if there is one, and the reason is in its log.
            shown = redacted_url(_settings.current().redis_url or "")
            raise ConfigError(f"Redis at {shown} refused the GPU worker's login (the user or "
                              f"password in GPU_TASKS_REDIS_URL): {exc}") from exc
        if self.global_keyprefix:
            raise ConfigError("GPU workers do not support kombu's global_keyprefix")
        self.priority_steps = [0]
        self._queue_cycle = _Rotation(self)
        self._put_back_orphans()

    def _put_back_orphans(self) -> None:
        """Put what an earlier channel of this process took and could not record (see
        :data:`_orphans`) back at the head of its queues, the earliest taken first in
        line; raises (Celery retries the connection) while Redis does not take them."""
        if not _orphans:
            return
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=True)
            for queue, raw in reversed(_orphans):  # RPUSH: the head, the latest first
                pipe.rpush(queue, raw)
            pipe.execute()
        log.warning("put back %d requests taken as Redis went away", len(_orphans))
        _orphans.clear()

    def _update_queue_cycle(self) -> None:
        self._brpop_dirty = True

    @property
    def active_queues(self) -> list[str]:
        """Queues being consumed from (no fanout ones), in the order they were added."""
        if self._brpop_dirty:
            self._repack()
        return self._brpop_queues

    def _repack(self) -> None:
        queues = list(dict.fromkeys(
            q for q in self._active_queues if q not in self.active_fanout_queues))
        segments = [_bulk(q.encode("utf-8")) for q in queues]
        offsets = [0]
        for segment in segments:
            offsets.append(offsets[-1] + len(segment))
        self._brpop_queues = queues
        self._brpop_position = {q: i for i, q in enumerate(queues)}
        self._brpop_keys = b"".join(segments)
        self._brpop_offsets = offsets
        self._brpop_dirty = False

    def brpop_command(self, timeout: float) -> bytes:
        """The packed ``BRPOP`` for the next fetch: every consumed queue, starting just
        after the one served last."""
        queues = self.active_queues
        start = self._brpop_next % len(queues)
        cut = self._brpop_offsets[start]
        keys = self._brpop_keys
        return b"".join((
            b"*%d\r\n$5\r\nBRPOP\r\n" % (len(queues) + 2),
            keys[cut:], keys[:cut],
            _bulk(str(timeout or 0).encode()),
        ))

    def _brpop_start(self, timeout: float | None = None) -> None:
        if timeout is None:
            timeout = self.brpop_timeout
        if not self.active_queues:
            return
        if _held:
            self._store_held()
        command = self.brpop_command(timeout)
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]
        self.client.connection.send_packed_command([command])

    def _brpop_read(self, **options: Any) -> bool:
        """kombu's, with the popped bytes checked before anything parses them (see the
        module docstring)."""
        try:
            try:
                dest_item = self.client.parse_response(self.client.connection, "BRPOP",
                                                       **options)
            except self.connection_errors:
                # As kombu: disconnect, so that the next poll reconnects.
                self.client.connection.disconnect()
                raise
            if not dest_item:
                raise Empty()
            dest, item = dest_item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            raw = item if isinstance(item, bytes) else str(item).encode("utf-8")
            checked = _guard.check(raw)
            if checked.reason:
                self._dead_letter(raw, dest, checked.reason, checked.payload)
                return True
            # The body was decoded and parsed to check it: the message kombu builds from
            # this envelope (at once, in _deliver) takes both, so neither is done twice.
            self._checked = checked
            self.connection._deliver(checked.payload, dest)
            return True
        finally:
            self._checked = None
            self._in_poll = None  # type: ignore[assignment]
            flush = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.7
            if flush is not None:
                flush()

    def decode_body(self, body: Any, encoding: str | None = None) -> Any:
        checked = self._checked
        if checked is not None and body is checked.payload.get("body"):
            return checked.body_bytes  # base64-decoded already, while checking it
        return super().decode_body(body, encoding)

    def _dead_letter(self, raw: bytes, queue: str, reason: str, payload: Any) -> None:
        letter = DeadLetter.of(raw, queue, reason, payload)
        log.error("dead-lettered a message from %s (%d bytes, task %s %s): %s", queue,
                  len(raw), letter.task, letter.task_id, reason)
        try:
            with self.conn_or_acquire() as client:
                DeadLetterStore(client).add(letter)
        except Exception as exc:
            # Never end the worker over a message it refused. It is off its queue already
            # and Redis is failing: hold the letter and store it once Redis answers.
            log.error("could not store the dead letter yet (%s); holding it until Redis "
                      "answers", exc)
            dropped = _held.hold(letter)
            if dropped is not None:
                log.error("too many dead letters held: dropped the oldest, from %s (task "
                          "%s %s: %s); its first bytes: %r", dropped.queue, dropped.task,
                          dropped.task_id, dropped.reason, dropped.raw[:2048])

    def _store_held(self) -> None:
        try:
            with self.conn_or_acquire() as client:
                stored = _held.store(client)
        except Exception as exc:  # Redis still fails: try again at the next fetch
            log.debug("held dead letters not stored yet: %s", exc)
            return
        log.warning("stored %d dead letters held while Redis failed", stored)

    def _do_restore_message(self, payload: Any, exchange: str, routing_key: str,
                            pipe: Any, leftmost: bool = False) -> None:
        source = source_queue(payload)
        if source is None:
            super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
            return
        mark_redelivered(payload)
        (pipe.lpush if leftmost else pipe.rpush)(source, json.dumps(payload))


class GpuTransport(kombu_redis.Transport):  # type: ignore[misc]
    """kombu's Redis transport with :class:`GpuChannel`; stamps each delivery's source."""

    Channel = GpuChannel
    # kombu declares an int; Redis takes fractions of a second.
    brpop_timeout = 0.25  # type: ignore[assignment]
    """A BRPOP's key set is fixed until it returns: a short one makes a change of the
    consumed queues (a shard gained or given up) apply within a quarter second. An idle
    worker pays four BRPOPs a second for it, a few hundred microseconds of Redis each."""

    def _deliver(self, message: Any, queue: str) -> None:
        with contextlib.suppress(TypeError, KeyError):  # not a kombu message: Celery says so
            message["properties"]["delivery_info"][SOURCE] = queue
        super()._deliver(message, queue)


class SentinelGpuChannel(EverySentinel, GpuChannel,  # type: ignore[misc]
                         kombu_redis.SentinelChannel):
    """:class:`GpuChannel` of a master found through Redis Sentinel: the same BRPOP, checks,
    source stamps and requeueing; only where its connections go differs."""


class SentinelGpuTransport(GpuTransport):
    """:class:`GpuTransport` through Redis Sentinel (``sentinel://``)."""

    Channel = SentinelGpuChannel
    default_port = kombu_redis.SentinelTransport.default_port  # type: ignore[assignment]


GPU_TRANSPORT = f"{GpuTransport.__module__}:{GpuTransport.__qualname__}"
"""``broker_transport`` of a GPU worker."""
SENTINEL_GPU_TRANSPORT = f"{SentinelGpuTransport.__module__}:{SentinelGpuTransport.__qualname__}"
"""``broker_transport`` of a GPU worker whose Redis URL names Sentinels."""


def transport_for(settings: Settings) -> str:
    """The GPU worker's ``broker_transport`` for the deployment's Redis URL."""
    return SENTINEL_GPU_TRANSPORT if settings.redis_target().sentinel else GPU_TRANSPORT
