"""The GPU worker's atomic batched fetch: take what waits, hand it to the pool child at once.

A plain Celery worker pays its per-message machinery (a fetch, a decode, a pool hand-off,
a result write, an ack) for every request, about 2 ms of CPU: far more than a small
request's kernel. So the main process of a GPU worker, whenever its pool child is free,
takes up to ``GPU_TASKS_FETCH_MAX_REQUESTS`` requests (and ``GPU_TASKS_FETCH_MAX_SIZE``
bytes; a larger one alone) from the shard queues it consumes, in rotation, in one Lua
call that also records each as taken by this GPU (:func:`gpu_tasks.control.unacked.take`),
and hands them to the child as one job. The child runs them in queue order and stores
their results and acknowledgements in one transaction (:mod:`workers.child.batch`).
Nothing is ever off its queue without being recorded as taken: a lost reply, a dead
connection, a dead worker leave it where restart recovery and failover find it.

What the main process still does per request, it does from what the child reports in
shared memory (:mod:`workers.consumer.progress`):

- **hard time limits**: the request running past its own hard limit gets the child killed
  (billiard times one job, and one job is a whole batch); it is answered
  :class:`~gpu_tasks.errors.TaskTimeLimitExceeded`;
- **a child death**: only the request that was running counts toward
  ``GPU_TASKS_MAX_CHILD_DEATHS`` (and is dead-lettered there); those that ran and were not
  yet settled go back to the head of their queues marked redelivered (a second copy of a
  finished request is answered from its stored result, not run again); those after it go
  back untouched, in order;
- **eta/countdown**: the child hands back requests not due yet; they stay recorded as
  taken and join the first batch after they are due;
- **revoke**: the batch carries the worker's revoked ids; the child answers those revoked.

An idle worker waits on its :class:`~workers.consumer.doorbell.Doorbell`, and takes again
at least every ``GPU_TASKS_FETCH_IDLE_POLL_S``. The GPU's own queue (``gpu.<node>.<i>``:
stats, handoffs) is still consumed by Celery's consumer, one request at a time.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import redis
from billiard.exceptions import WorkerLostError
from celery.utils.collections import AttributeDict
from kombu.entity import Exchange, Queue

from gpu_tasks.control.deadletter import DeadLetterStore
from gpu_tasks.control.unacked import Take, Taken, forget, put_back, take
from gpu_tasks.errors import TaskTimeLimitExceeded
from gpu_tasks.settings import Settings
from workers.consumer.doorbell import Doorbell
from workers.consumer.progress import BatchProgress, Snapshot
from workers.consumer.request import hard_limit_exceeded

log = logging.getLogger(__name__)

_NEVER_S = 10.0 * 365 * 24 * 3600
"""billiard's own limits for a batch job: never (each request's are enforced here)."""
REARM_AFTER_S = 0.02
"""How long an idle worker woken for nothing waits before arming those queues again."""
WATCH_S = 0.05
"""How often the main process looks for a request past its hard time limit."""

RunBatch = Callable[[int, list[tuple[str, str, bytes]], frozenset[str], bool],
                   dict[str, Any]]
"""The pool child's entry point (:func:`workers.child.batch.run_batch`), given at boot."""


@dataclass
class Batch:
    """One job handed to the pool child."""

    number: int
    messages: list[Taken]


@dataclass
class FetchStats:
    """What ``inspect stats`` and the exporter show of the batched fetch."""

    batches: int = 0
    requests: int = 0
    largest: int = 0
    child_deaths: int = 0

    def add(self, size: int) -> None:
        self.batches += 1
        self.requests += size
        self.largest = max(self.largest, size)

    def as_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "requests": self.requests, "largest": self.largest,
                "child_deaths": self.child_deaths,
                "mean": round(self.requests / self.batches, 2) if self.batches else 0.0}


class BatchFetch:
    """The main process's side of batched execution (see the module)."""

    def __init__(self, gpu: str, settings: Settings, progress: BatchProgress,
                 run_batch: RunBatch, app: Any, revoked: Callable[[], frozenset[str]]) -> None:
        self.gpu = gpu
        self.settings = settings
        self.progress = progress
        self.run_batch = run_batch
        self.app = app
        self.revoked = revoked
        self.queues: list[str] = []
        self.stats = FetchStats()
        self._start = 0
        self._number = 0
        self.batch: Batch | None = None
        """The batch the pool child has, or None."""
        self._deferred: dict[str, Taken] = {}
        """Requests taken that are not due yet (eta/countdown), by tag."""
        self._due: list[Taken] = []
        self._filling: list[Taken] = []
        """Taken and held for ``fetch_wait_s`` to fill the batch further."""
        self._doorbell: Doorbell | None = None
        self._client: redis.Redis | None = None
        self._pool: Any = None
        self._consumer: Any = None
        self._hub: Any = None
        self._timer: Any = None
        self._timers: list[Any] = []
        self._stopping = False
        self._poll_wanted = False
        self.reply_lost = False
        """A take failed (its reply may be lost): entries this worker does not hold are to
        be put back once Redis answers (read and reset by the lease's tick)."""
        self._idle: set[str] | None = None
        """Idle with the doorbell armed over every queue: the queues it named since (the
        only ones with work). None when not idle, or not told which."""
        self._failing_since: float | None = None
        self._waited = False
        self._unarmed: set[str] = set()
        """Queues that rang for nothing, to arm again after REARM_AFTER_S."""
        self._fill_timer: Any = None

    # -- what the main process consumes ------------------------------------------------

    def consume(self, queues: list[str]) -> None:
        """Take from exactly ``queues`` from now on (the shard map's, in shard order)."""
        if queues == self.queues:
            return
        self.queues = list(queues)
        self._start = self._start % len(queues) if queues else 0
        self._soon()  # a new queue is tracked only once a take has read it

    def held_tags(self) -> frozenset[str]:
        """Delivery tags this worker holds (in the child, or waiting here)."""
        tags = {m.tag for m in self._deferred.values()}
        tags.update(m.tag for m in (*self._due, *self._filling))
        if self.batch is not None:
            tags.update(m.tag for m in self.batch.messages)
        return frozenset(tags)

    # -- what inspect shows ----------------------------------------------------------

    def active(self, hostname: str, safe: bool = False) -> list[dict[str, Any]]:
        """``inspect active`` entries for the request the pool child runs now."""
        batch = self.batch
        snap = self.progress.read()
        if batch is None or snap.batch != batch.number or not (
                0 <= snap.running < len(batch.messages)):
            return []
        started = time.time() - (time.monotonic() - snap.started)
        message = batch.messages[snap.running]
        return [_info(message, hostname, safe, started=started, pid=snap.pid)]

    def reserved(self, hostname: str) -> list[dict[str, Any]]:
        """``inspect reserved`` entries: taken, not started (the rest of the batch in the
        pool child, and what waits here)."""
        waiting: list[Taken] = [*self._due, *self._filling, *self._deferred.values()]
        batch = self.batch
        if batch is not None:
            snap = self.progress.read()
            first = snap.done if snap.batch == batch.number else 0
            if snap.batch == batch.number and snap.running >= 0:
                first = snap.running + 1
            waiting = batch.messages[first:] + waiting
        return [_info(m, hostname, True) for m in waiting]

    def queue_infos(self) -> list[dict[str, Any]]:
        """``inspect active_queues`` entries for the shard queues taken in batches."""
        return [dict(Queue(q, Exchange(q, "direct"), q)  # type: ignore[no-untyped-call]
                     .as_dict(recurse=True)) for q in self.queues]

    # -- bootstep hooks ------------------------------------------------------------------

    def start(self, c: Any) -> None:
        self._stopping = False
        self._pool, self._hub, self._timer, self._consumer = c.pool, c.hub, c.timer, c
        if self._client is None:
            self._client = self.settings.redis_client()
        if self._doorbell is None:
            self._doorbell = Doorbell(partial(self.settings.redis_target().client,
                                              self.settings.redis_timeout_s, protocol=2))
        if self._hub is not None:
            self._hub.on_tick.add(self._tick)
        self._ring()
        self._timers = [
            c.timer.call_repeatedly(self.settings.fetch_idle_poll_s, self._idle_poll),
            c.timer.call_repeatedly(WATCH_S, self._watch),
        ]
        self._soon()

    def stop(self, c: Any) -> None:
        self._stopping = True
        for entry in self._timers:
            c.timer.cancel(entry)
        self._timers = []
        if self._hub is not None:
            self._hub.on_tick.discard(self._tick)
        self._unring()

    def shutdown(self, c: Any) -> None:
        self.stop(c)
        if self._doorbell is not None:
            self._doorbell.close()
            self._doorbell = None

    # -- waiting for work ----------------------------------------------------------------

    def _ring(self) -> None:
        """(Re)connect the doorbell and listen to it on the event loop."""
        bell = self._doorbell
        if bell is None:
            return
        self._unring()
        try:
            bell.connect()
        except redis.RedisError as exc:
            log.debug("%s: doorbell not connected yet: %s", self.gpu, exc)
            return
        fd = bell.fileno()
        if fd is not None and self._hub is not None:
            self._hub.add_reader(fd, self._rang)

    def _unring(self) -> None:
        bell = self._doorbell
        fd = bell.fileno() if bell is not None else None
        if fd is not None and self._hub is not None:
            with contextlib.suppress(Exception):
                self._hub.remove_reader(fd)

    def _rang(self, *_: Any) -> None:
        bell = self._doorbell
        named = bell.drain() if bell is not None else None
        if named is None:
            if bell is not None:
                self._unring()
                bell.close_bell()
        elif self._idle is not None:
            if named:
                self._idle.update(named)
            else:
                self._idle = None  # not told which: look at every queue
        if self.batch is None:
            self.poll()

    def _idle_poll(self) -> None:
        bell = self._doorbell
        if bell is not None and not bell.working:
            self._ring()
        if self.batch is None:
            self.poll()

    def _soon(self) -> None:
        """Poll before the event loop next waits (its tick: kombu's ``call_soon`` would run
        only after the wait, up to a timer's period later)."""
        if self._hub is not None:
            self._poll_wanted = True
        elif self._timer is not None:
            self._timer.call_after(0, self.poll)

    def _tick(self) -> None:
        if self._poll_wanted:
            self._poll_wanted = False
            self.poll()

    # -- taking and handing over -----------------------------------------------------------

    def poll(self) -> None:
        """If the pool child is free: take what waits (and what came due) and hand it over."""
        if self.batch is not None or self._stopping or self._pool is None:
            return
        ready = self._due + self._filling
        self._due, self._filling = [], []
        most = self.settings.fetch_max_requests - len(ready)
        if self.queues and most > 0 and self._client is not None:
            try:
                woken, self._idle = self._idle, None
                got = self._take(most, woken=woken)
                if not got.messages and not ready:
                    if woken:
                        self._false_wake(woken)
                    elif self._armed(self.queues):
                        got = self._take(most)
            except redis.RedisError as exc:
                self._idle = None
                self._failing(exc)
            else:
                if self._failing_since is not None:
                    log.warning("%s: taking requests again after %.1fs", self.gpu,
                                time.monotonic() - self._failing_since)
                    self._failing_since = None
                self._start = got.next_start
                ready.extend(got.messages)
                waited, self._waited = self._waited, False
                if got.messages and len(ready) < self.settings.fetch_max_requests and (
                        self.settings.fetch_wait_s > 0 and self._fill_timer is None
                        and not waited):
                    self._filling = ready
                    self._fill_timer = self._timer.call_after(self.settings.fetch_wait_s,
                                                              self._filled)
                    return
        if ready:
            self._hand(ready)

    def _filled(self) -> None:
        self._fill_timer = None
        self._waited = True  # waited once already: hand over what the next take adds
        filling, self._filling = self._filling, []
        self._due = filling + self._due
        self.poll()

    def _take(self, most: int, woken: set[str] | None = None) -> Take:
        """Take from every queue; or, woken from idle, from those the bell named."""
        queues, client = self.queues, self._client
        assert client is not None  # poll() takes only once started
        if woken:
            named = [q for q in queues if q in woken]
            got = take(client, self.gpu, named, start=0, most=most,
                       most_bytes=self.settings.fetch_max_bytes)
            return Take(got.messages, self._start, False)
        got = take(client, self.gpu, queues, start=self._start, most=most,
                   most_bytes=self.settings.fetch_max_bytes)
        return got

    def _false_wake(self, named: set[str]) -> None:
        """Woken by ``named`` queues that held nothing: a push to a queue of the same name
        in another database of the same Redis (Redis tracks keys by name, whatever the
        database), or work another take got first. Only those queues need arming again
        (the others still are), and they are, after ``REARM_AFTER_S``: a busy neighbour
        would otherwise wake this idle worker at every one of its pops."""
        self._idle = set()  # idle, the other queues armed
        first = not self._unarmed
        self._unarmed.update(named)
        if first and self._timer is not None:
            self._timer.call_after(REARM_AFTER_S, self._rearm)

    def _rearm(self) -> None:
        queues = [q for q in self.queues if q in self._unarmed]
        self._unarmed = set()
        if self._idle is not None and self.batch is None and queues:
            try:
                if self._armed(queues):
                    self._idle = None
                    self.poll()
            except redis.RedisError as exc:
                self._failing(exc)

    def _armed(self, queues: list[str]) -> bool:
        """Going idle: arm the doorbell over ``queues``; True if work arrived meanwhile
        (take again)."""
        bell = self._doorbell
        if bell is None or not bell.working:
            return False
        try:
            armed = bell.arm(queues)
            if not armed:
                self._idle = set()
            return armed
        except redis.RedisError as exc:
            log.warning("%s: doorbell lost (%s); polling every %gs until it is back",
                        self.gpu, exc, self.settings.fetch_idle_poll_s)
            self._unring()
            bell.close_bell()
            bell.working = False
            return False

    def _failing(self, exc: Exception) -> None:
        # The take may have been applied with its reply lost: what it took is recorded as
        # taken by this GPU and held by nobody. The next lease renewal that reaches Redis
        # puts such entries back (Consumption.put_back_abandoned).
        self.reply_lost = True
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning("%s: cannot take requests (%s); trying again every %gs", self.gpu,
                        exc, self.settings.fetch_idle_poll_s)

    def _hand(self, messages: list[Taken]) -> None:
        self._number += 1
        batch = self.batch = Batch(self._number, messages)
        self.stats.add(len(messages))
        self.progress.handed(batch.number)
        items = [(m.tag, m.queue, m.raw) for m in messages]
        self._pool.apply_async(
            self.run_batch, (batch.number, items, self.revoked(), self._task_events()),
            callback=partial(self._done, batch),
            error_callback=partial(self._failed, batch),
            timeout=_NEVER_S, soft_timeout=_NEVER_S,
            correlation_id=f"{self.gpu}:batch:{batch.number}",
        )

    def _task_events(self) -> bool:
        """Whether the worker sends task events now (``-E``, or Flower turned them on)."""
        dispatcher = getattr(self._consumer, "event_dispatcher", None)
        if dispatcher is None or not dispatcher.enabled:
            return False
        return not dispatcher.groups or "task" in dispatcher.groups

    def _done(self, batch: Batch, result: Any) -> None:
        if self.batch is batch:
            self.batch = None
        deferred = result.get("deferred", []) if isinstance(result, dict) else []
        by_tag = {m.tag: m for m in batch.messages}
        for tag, due_in_s in deferred:
            message = by_tag.get(tag)
            if message is not None:
                self._defer(message, float(due_in_s))
        if isinstance(result, dict) and result.get("interrupted"):
            waiting = {tag for tag, _due in deferred}
            tags = [m.tag for m in batch.messages if m.tag not in waiting]
            try:
                restored = put_back(self.settings.redis_client(), self.gpu, tags, set(tags))
            except redis.RedisError as exc:
                self.reply_lost = True  # the next lease tick puts them back
                log.warning("%s: cannot check batch %d after Redis failed (%s)", self.gpu,
                            batch.number, exc)
            else:
                if restored:
                    log.warning("%s: Redis failed under batch %d and came back with %d of "
                                "its requests still recorded as taken: put back, marked "
                                "redelivered", self.gpu, batch.number, restored)
        self._soon()

    def _defer(self, message: Taken, due_in_s: float) -> None:
        self._deferred[message.tag] = message

        def due() -> None:
            taken = self._deferred.pop(message.tag, None)
            if taken is not None:
                self._due.append(taken)
                self.poll()

        self._timer.call_after(max(0.0, due_in_s), due)

    # -- a request past its hard limit, a child that died ------------------------------

    def _watch(self) -> None:
        batch = self.batch
        if batch is None:
            return
        snap = self.progress.read()
        if snap.batch != batch.number or not snap.past_hard_limit(time.monotonic()):
            return
        if snap.killed == snap.running:
            return  # killed already; its death is on its way
        log.error("%s: request %d of batch %d ran past its hard time limit (%gs): its pool "
                  "child is killed", self.gpu, snap.running, batch.number, snap.hard_limit_s)
        self.progress.killing(snap.running)
        with contextlib.suppress(ProcessLookupError):
            os.kill(snap.pid, signal.SIGKILL)

    def _failed(self, batch: Batch, exc_info: Any) -> None:
        if self.batch is batch:
            self.batch = None
        exc = getattr(exc_info, "exception", exc_info)
        exc = getattr(exc, "exc", exc)  # billiard's ExceptionWithTraceback
        died = isinstance(exc, WorkerLostError)
        if died:
            self.stats.child_deaths += 1
        else:
            log.error("%s: batch %d failed in the pool child: %r", self.gpu, batch.number, exc)
        try:
            self.recover(batch, self.progress.read(), died=died)
        except redis.RedisError as exc_r:
            # Everything is still recorded as taken: put back once Redis answers, by
            # Consumption.put_back_abandoned or at the worker's next start.
            log.error("%s: cannot put back batch %d yet (%s); it stays recorded as taken",
                      self.gpu, batch.number, exc_r)
        self._soon()

    def recover(self, batch: Batch, snap: Snapshot, *, died: bool) -> None:
        """After the child died (or its job failed) in mid-batch: answer or count the request
        that was running, put every other request of the batch not yet settled back at the
        head of its queue, in order (see the module)."""
        if snap.batch != batch.number:
            snap = Snapshot(batch.number, 0, -1, 0.0, 0.0, 0, -1)  # it never started
        running = snap.running
        client = self.settings.redis_client()
        answered: set[str] = set()
        if running >= 0 and running < len(batch.messages):
            message = batch.messages[running]
            if snap.killed == running:
                self._answer_hard_limit(client, message, snap.hard_limit_s)
                answered.add(message.tag)
            elif died and self._dead_letter_if_deadly(client, message):
                answered.add(message.tag)
        ran = {m.tag for m in batch.messages[:snap.done]}
        if running >= 0 and running < len(batch.messages):
            ran.add(batch.messages[running].tag)
        tags = [m.tag for m in batch.messages if m.tag not in answered]
        restored = put_back(client, self.gpu, tags, ran)
        if restored:
            log.warning("%s: put back %d requests of batch %d (%d had run and are marked "
                        "redelivered)", self.gpu, restored, batch.number,
                        len([t for t in tags if t in ran]))

    def _dead_letter_if_deadly(self, client: redis.Redis, message: Taken) -> bool:
        task_id, name, payload = _identify(message.raw)
        if task_id is None:
            return False
        log.error("%s: the pool child died running %s %s", self.gpu, name, task_id)
        letter = DeadLetterStore(client).dead_letter_if_deadly(
            task_id, message.raw, message.queue, payload, self.settings.max_child_deaths,
            lambda pipe: forget(pipe, self.gpu, [message.tag]))
        if letter is None:
            return False
        log.error("%s %s dead-lettered: %s", letter.task, task_id, letter.reason)
        return True

    def _answer_hard_limit(self, client: redis.Redis, message: Taken, limit_s: float) -> None:
        task_id, name, payload = _identify(message.raw)
        if task_id is not None:
            try:
                raise hard_limit_exceeded(str(name), limit_s, self.gpu)
            except TaskTimeLimitExceeded as exc:
                headers = payload.get("headers") or {}
                properties = payload.get("properties") or {}
                request = AttributeDict(
                    id=task_id, task=name, name=name, chord=headers.get("chord"),
                    errbacks=headers.get("errbacks"), root_id=headers.get("root_id"),
                    group=headers.get("group"),
                    correlation_id=properties.get("correlation_id"),
                    reply_to=properties.get("reply_to"))
                self.app.backend.mark_as_failure(task_id, exc, request=request)
        pipe = client.pipeline(transaction=True)
        forget(pipe, self.gpu, [message.tag])
        pipe.execute()


def _info(message: Taken, hostname: str, safe: bool, started: float | None = None,
          pid: int | None = None) -> dict[str, Any]:
    """A request's entry as Celery's ``Request.info`` writes it."""
    task_id, name, payload = _identify(message.raw)
    headers = payload.get("headers") or {}
    args: Any = headers.get("argsrepr")
    kwargs: Any = headers.get("kwargsrepr")
    if not safe:
        with contextlib.suppress(Exception):
            args, kwargs, _embed = json.loads(base64.b64decode(payload["body"]))
    return {"id": task_id, "name": name, "args": args, "kwargs": kwargs, "type": name,
            "hostname": hostname, "time_start": started, "acknowledged": False,
            "delivery_info": {"exchange": "", "routing_key": message.queue, "priority": 0,
                              "redelivered": bool(headers.get("redelivered"))},
            "worker_pid": pid}


def _identify(raw: bytes) -> tuple[str | None, str | None, dict[str, Any]]:
    """``(task id, task name, envelope)`` of a message, as far as it can be read."""
    try:
        payload = json.loads(raw)
        headers = payload.get("headers") or {}
    except (ValueError, AttributeError):
        return None, None, {}
    task_id, name = headers.get("id"), headers.get("task")
    return (task_id if isinstance(task_id, str) else None,
            name if isinstance(name, str) else None, payload)
