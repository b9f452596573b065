"""Fencing: a GPU worker runs an entity request only where the contract says it may.

Every message the worker's main process fetches passes :meth:`Fence.admit` before
Celery sees it. An entity request runs only if this worker holds its GPU's lease,
its GPU consumes the request's shard at the current epoch, and the request came
from that shard's queue. Otherwise nothing runs and nothing is lost:

- ``return``: put back at the head of the queue it came from, untouched, for the
  shard's rightful consumer (this GPU does not serve that shard, or has lost its lease);
- ``move``: it arrived on a queue that is not its shard's (``queue=gpu.<node>.<i>`` by
  hand, a raw push, a producer with a wrong hash), so it goes to the tail of its
  shard's queue, as if just sent there;
- ``fail``: it cannot be routed at all (an unusable ``entity_id``, an entity-less
  request on a shard queue); its result is that error, so the caller learns why;
- ``skip``: a redelivered request that had already finished (its worker died between
  storing the result and acknowledging the message): it is not run twice (the other
  mechanisms that keep a request from running twice are listed in :mod:`workers`).

A request without ``entity_id`` runs only when it came from this GPU's own queue.
What this worker owns is read from its :class:`~workers.consumer.ownership.OwnershipTable`,
the one record of it (the pool child reads the same). :func:`judge` decides from that
table and plain values, so it can be tested without Celery.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from celery import states
from celery.utils.collections import AttributeDict

from gpu_tasks.control.shardmap import NO_MAP
from gpu_tasks.control.unacked import SOURCE, source_queue
from gpu_tasks.errors import GpuTasksError, RoutingError, ShardMapError
from gpu_tasks.protocol.routing import (
    ENTITY_KWARG,
    parse_shard_queue,
    shard_index,
    shard_name,
    validate_entity_id,
)
from workers.consumer.ownership import OwnershipTable

log = logging.getLogger(__name__)

NO_ENTITY = object()
"""``entity_id`` of a request that carries none."""


@dataclass(frozen=True)
class Verdict:
    action: str
    """``run``, ``return``, ``move`` or ``fail`` (``skip`` comes from :class:`Fence`)."""
    queue: str | None = None
    """Where ``return`` and ``move`` put the message."""
    reason: str = ""
    error: GpuTasksError | None = None


RUN = Verdict("run")


def judge(source: str | None, entity_id: object, owned: OwnershipTable) -> Verdict:
    """What to do with a request that came from ``source`` for ``entity_id``, given what
    this worker ``owned`` at this moment."""
    if source is None:
        return Verdict("fail", error=RoutingError("the message names no queue"))
    if not owned.lease_held():
        return Verdict("return", source, f"{owned.gpu} does not hold its lease")
    arrived_on_shard = parse_shard_queue(source)
    if entity_id is NO_ENTITY:
        if source == owned.gpu:
            return RUN
        if arrived_on_shard is not None:
            return Verdict("fail", error=RoutingError(
                f"a request without entity_id arrived on shard queue {source}; shard queues "
                "carry entity requests only (send GPU requests with queue='gpu.<node>.<i>')"))
        return Verdict("return", source, f"{owned.gpu} does not consume {source}")
    try:
        eid = validate_entity_id(entity_id)
    except RoutingError as exc:
        return Verdict("fail", error=exc)
    shard_count = owned.shard_count
    if not shard_count:
        return Verdict("fail", error=ShardMapError(NO_MAP))
    index = shard_index(eid, shard_count)
    if arrived_on_shard != index:
        target = shard_name(index)
        return Verdict("move", target, f"entity {eid!r} arrived on {source}, not on {target}")
    if owned.serves(index):  # source is shard_name(index): it arrived on its own queue
        return RUN
    return Verdict("return", source, f"{owned.gpu} does not consume {source} now")


def _entity_id(message: Any) -> object:
    """``entity_id`` of a Celery message (protocol 2 or 1), or :data:`NO_ENTITY`."""
    try:
        body = message.decode()
    except Exception:
        return NO_ENTITY  # Celery itself reports a body it cannot read
    kwargs = body[1] if isinstance(body, list) and len(body) == 3 else (
        body.get("kwargs") if isinstance(body, dict) else None)
    if isinstance(kwargs, dict) and ENTITY_KWARG in kwargs:
        return kwargs[ENTITY_KWARG]
    return NO_ENTITY


def readdress(payload: Any, queue: str) -> None:
    """Make a moved message (its parsed envelope) look as if it had been sent to ``queue``
    directly."""
    info = payload["properties"].setdefault("delivery_info", {})
    info["exchange"], info["routing_key"] = queue, queue
    info.pop(SOURCE, None)


class Fence:
    """Applies :func:`judge` to each fetched message, before Celery sees it."""

    def __init__(self, owned: OwnershipTable, app: Any) -> None:
        self.owned = owned
        self.app = app

    def admit(self, message: Any) -> bool:
        """True: hand the message to Celery. False: it has been put back, moved, answered
        or skipped here."""
        source = source_queue(message._raw, message.delivery_info.get("routing_key"))
        verdict = judge(source, _entity_id(message), self.owned)
        if verdict.action == "run":
            if self._finished_before(message):
                message.channel.qos.settle(message, None, head=False)
                return False
            return True
        task_id, name = message.headers.get("id"), message.headers.get("task")
        if verdict.action == "return":
            log.info("%s: %s %s put back on %s: %s", self.owned.gpu, name, task_id,
                     verdict.queue, verdict.reason)
            message.channel.qos.settle(message, verdict.queue, head=True)
        elif verdict.action == "move":
            log.warning("%s: %s %s moved to its shard's queue: %s", self.owned.gpu, name,
                        task_id, verdict.reason)
            readdress(message._raw, str(verdict.queue))
            message.channel.qos.settle(message, verdict.queue, head=False)
        else:
            log.warning("%s: %s %s refused: %s", self.owned.gpu, name, task_id, verdict.error)
            self._fail(message, task_id, name, verdict.error)
        return False

    def _finished_before(self, message: Any) -> bool:
        """A redelivered request whose result is already stored ran before: not again."""
        if not (message.delivery_info.get("redelivered")
                or (message.headers or {}).get("redelivered")):
            return False
        task_id = message.headers.get("id")
        if not task_id:
            return False
        state = self.app.backend.get_task_meta(task_id).get("status")
        if state in states.READY_STATES:
            log.warning("%s: %s %s was redelivered but had already finished (%s): not run "
                        "again", self.owned.gpu, message.headers.get("task"), task_id, state)
            return True
        return False

    def _fail(self, message: Any, task_id: str | None, name: str | None,
              error: GpuTasksError | None) -> None:
        if task_id:
            request = AttributeDict(
                id=task_id, task=name, name=name, chord=None, errbacks=None,
                root_id=message.headers.get("root_id"), group=message.headers.get("group"),
                correlation_id=message.properties.get("correlation_id"),
                reply_to=message.properties.get("reply_to"),
            )
            self.app.backend.mark_as_failure(task_id, error, request=request)
        message.channel.qos.settle(message, None, head=False)
