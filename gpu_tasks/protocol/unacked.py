"""Requests a GPU's worker has taken and not finished: its unacknowledged messages.

kombu's Redis transport keeps every delivered, unacknowledged message in an "unacked"
hash (and its delivery time in an index) until it is acknowledged; a GPU worker uses keys
of its own (:func:`unacked_keys`), and stamps each delivery with the queue it came from
(:data:`SOURCE`). So when a worker dies, whoever serves its GPU or its shards next puts
what it had taken back at the head of each source queue, in the order it was taken
(:func:`restore_unacked`): the worker itself when it restarts, or failover when the GPU
is given up. Nothing waits for Redis's visibility timeout, and nothing is lost.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

import redis

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
        queue = source_queue(payload, routing_key)
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
