"""Requests a GPU's worker has taken and not finished: its unacknowledged messages.

kombu's Redis transport keeps every delivered, unacknowledged message in an "unacked"
hash (and its delivery time in an index) until it is acknowledged; a GPU worker uses keys
of its own (:func:`unacked_keys`), and stamps each delivery with the queue it came from
(:data:`SOURCE`). So when a worker dies, whoever serves its GPU or its shards next puts
what it had taken back at the head of each source queue, in the order it was taken
(:func:`restore_unacked`): the worker itself when it restarts, or failover when the GPU
is given up. Nothing waits for Redis's visibility timeout, and nothing is lost.

kombu takes a message with ``BRPOP`` and records it with a second command, once the
reply has reached the worker: a reply lost on the wire loses the message. A GPU worker
takes its shard queues' messages with :func:`take` instead, which pops and records in
one Lua call (``lua/unacked_take.lua``), in the same format, so everything here reads
both. Its entries name their queue exactly (exchange :data:`TAKEN`, routing key the queue
popped); the worker settles them with :func:`forget` (in the pipeline that stores their
results) and :func:`put_back`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from gpu_tasks.control.scripts import register
from gpu_tasks.keys import UNACKED_INDEX_KEY, UNACKED_KEY, UNACKED_MUTEX_KEY

log = logging.getLogger(__name__)

SOURCE = "gpu_tasks_source"
"""Key in a delivered message's ``delivery_info``: the queue it was popped from."""


def unacked_keys(gpu: str) -> dict[str, str]:
    """Transport options that give ``gpu`` its own unacknowledged-message keys."""
    return {
        "unacked_key": UNACKED_KEY.format(gpu=gpu),
        "unacked_index_key": UNACKED_INDEX_KEY.format(gpu=gpu),
        "unacked_mutex_key": UNACKED_MUTEX_KEY.format(gpu=gpu),
    }


TAKEN = "gpu_tasks:taken"
"""Exchange of an entry :func:`take` recorded: its routing key is the queue it was popped
from, whatever the message says."""


def source_queue(payload: Any, routing_key: str | None = None) -> str | None:
    """The queue a raw message was popped from (or, never stamped, its routing key)."""
    try:
        source = payload["properties"]["delivery_info"].get(SOURCE)
    except (TypeError, KeyError, AttributeError):
        source = None
    return source if isinstance(source, str) else routing_key


def mark_redelivered(payload: Any) -> None:
    with contextlib.suppress(TypeError, KeyError):
        payload["headers"]["redelivered"] = True
        payload["properties"]["delivery_info"]["redelivered"] = True


def restore_unacked(client: redis.Redis, gpu: str,
                    keep: frozenset[str] | None = None) -> int:
    """Put every message ``gpu``'s last worker had taken and not acknowledged back at the
    head of its source queue, earliest taken first in line; returns how many.

    Only whoever speaks for ``gpu`` may call this: its worker at boot, holding its lease,
    or failover once its lease has expired for good; nobody else touches these keys. A
    worker that lost Redis for a while and holds its lease again puts back what it no
    longer holds, and passes what it still runs or holds as ``keep`` (delivery tags)."""
    keys = unacked_keys(gpu)
    order = client.zrange(keys["unacked_index_key"], 0, -1)
    held = client.hgetall(keys["unacked_key"])
    if keep is not None:
        kept = {tag.encode() for tag in keep}
        held = {tag: entry for tag, entry in held.items() if tag not in kept}
    tags = [t for t in order if t in held] + [t for t in held if t not in set(order)]
    if keep is not None and not tags:
        return 0
    pipe = client.pipeline(transaction=True)
    restored = 0
    for tag in reversed(tags):  # RPUSH each at the head, the latest first
        try:
            payload, _exchange, routing_key = json.loads(held[tag])
        except (ValueError, TypeError):
            log.error("%s: dropping an unreadable unacknowledged entry %r", gpu, held[tag][:200])
            continue
        queue = _queue_of(payload, _exchange, routing_key)
        if not queue:
            log.error("%s: an unacknowledged message names no queue: %r", gpu, payload)
            continue
        mark_redelivered(payload)
        pipe.rpush(queue, json.dumps(payload))
        restored += 1
    if keep is not None:
        # Only what was put back: a kept delivery's entry stays until it is acknowledged.
        pipe.hdel(keys["unacked_key"], *tags)
        pipe.zrem(keys["unacked_index_key"], *tags)
    else:
        pipe.delete(keys["unacked_key"], keys["unacked_index_key"])
    pipe.execute()
    return restored


def _queue_of(payload: Any, exchange: Any, routing_key: Any) -> str | None:
    """The queue an unacked entry's message goes back to."""
    if exchange == TAKEN and isinstance(routing_key, str):
        return routing_key
    return source_queue(payload, routing_key)


@dataclass(frozen=True)
class Taken:
    """One message :func:`take` took: its delivery tag, its queue and its bytes."""

    tag: str
    queue: str
    raw: bytes


@dataclass(frozen=True)
class Take:
    """What one :func:`take` call took, in the order it is to run, and where the next
    call starts."""

    messages: list[Taken]
    next_start: int
    looked_at_all: bool
    """Every queue was read: with nothing taken, a client tracking them hears of the next
    push (Redis client-side caching), so the worker may wait for that."""


def take(client: redis.Redis, gpu: str, queues: Sequence[str], *, start: int, most: int,
         most_bytes: int) -> Take:
    """Pop up to ``most`` messages (and ``most_bytes``, though always one) from ``queues``,
    in rotation from ``queues[start]``, recording each as taken by ``gpu`` in the same
    atomic step (``lua/unacked_take.lua`` says how)."""
    keys = unacked_keys(gpu)
    reply = register(client, "unacked_take")(
        keys=[keys["unacked_key"], keys["unacked_index_key"], *queues],
        args=[start, most, most_bytes, f"{uuid.uuid4().hex[:12]}.", repr(time.time()), TAKEN],
        client=client)
    messages = [Taken(_text(reply[i + 1]), queues[int(reply[i]) - 1], reply[i + 2])
                for i in range(2, len(reply), 3)]
    return Take(messages, int(reply[0]), bool(reply[1]))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def forget(pipe: Any, gpu: str, tags: Collection[str]) -> None:
    """Acknowledge ``tags`` on ``pipe``: they are no longer taken (their results are
    stored, or they were put somewhere else, in the same transaction)."""
    if tags:
        keys = unacked_keys(gpu)
        pipe.hdel(keys["unacked_key"], *tags)
        pipe.zrem(keys["unacked_index_key"], *tags)


def put_back(client: redis.Redis, gpu: str, tags: Sequence[str],
             ran: Collection[str] = ()) -> int:
    """Put the messages ``gpu`` took as ``tags`` (in the order they were taken) back at the
    head of their queues, each queue's in the same order, and forget them, in one
    transaction; those in ``ran`` were run (or started) and are marked redelivered, the
    others go back untouched, byte for byte. Returns how many went back."""
    if not tags:
        return 0
    keys = unacked_keys(gpu)
    entries = client.hmget(keys["unacked_key"], list(tags))
    pipe = client.pipeline(transaction=True)
    restored = 0
    for tag, entry in reversed(list(zip(tags, entries, strict=True))):  # RPUSH: latest first
        if entry is None:
            continue  # settled already
        raw = entry.decode() if isinstance(entry, bytes) else entry
        try:
            payload, exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            log.error("%s: dropping an unreadable unacknowledged entry %r", gpu, raw[:200])
            continue
        queue = _queue_of(payload, exchange, routing_key)
        if not queue:
            log.error("%s: an unacknowledged message names no queue: %r", gpu, raw[:200])
            continue
        if tag in ran:
            mark_redelivered(payload)
            pipe.rpush(queue, json.dumps(payload))
        else:
            pipe.rpush(queue, _message_text(raw))
        restored += 1
    forget(pipe, gpu, tags)
    pipe.execute()
    return restored


def _message_text(entry: str) -> str:
    """The message of an entry ``[<message>, <exchange>, <queue>]``, as it was pushed (an
    entry :func:`take` wrote holds the message's own bytes, kept as they are)."""
    decoder = json.JSONDecoder()
    _payload, end = decoder.raw_decode(entry, 1)
    return entry[1:end]
