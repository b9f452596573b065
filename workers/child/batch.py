"""A batch in the pool child: each request checked, fenced and run in queue order, and
the batch's results and acknowledgements stored in one transaction.

The main process hands the child a whole batch as one job (:mod:`workers.consumer.fetch`).
For each request, in the order it was taken (so each entity's requests run in the order
they were sent, within and across batches), the child:

1. checks the message's bytes as the transport would (:mod:`gpu_tasks.protocol.checks`):
   poison is dead-lettered, never decoded further;
2. fences it at the moment it starts, not when the batch was taken
   (:func:`workers.consumer.fence.judge`): if this worker no longer holds its lease or no
   longer serves the request's shard, the request goes back to the head of its queue
   untouched, and so does every later request of that queue in the batch, so the shard's
   order holds for whoever serves it next; a request on the wrong queue moves to its
   shard's; one that cannot be routed is answered with the reason;
3. answers without running a request that is revoked or expired (``REVOKED``), or that
   was redelivered after its result was stored; hands back to the main process one whose
   eta is still ahead;
4. runs it through Celery's own tracer (the same ``task.__trace__`` Celery's pool child
   calls), so results, retries, ``Reject``, signals and the task's error contract are
   Celery's, byte for byte, with its soft time limit armed (``SIGALRM``) and its start and
   end reported for the main process, which enforces its hard limit
   (:mod:`workers.consumer.progress`).

Results are queued (:meth:`gpu_tasks.connection.results.ResultBackend.writing_to`) and
written with the acknowledgements of their requests in one transaction: a request's
result is stored if and only if its message is acknowledged. The transaction is sent at
the end of the batch; sooner once ``FLUSH_AFTER_S`` passed since the last one; and, by a
thread of the child, while a request runs longer than ``FLUSH_AFTER_S``, so the requests
before a long one keep their results whatever becomes of it. So a child death makes run
again only requests that finished within ``FLUSH_AFTER_S`` before it (they go back marked
redelivered; a copy whose result was stored meanwhile is answered, not run), and only
once: before a redelivered request runs (it may be the one that ended the child), what
ran before it is written. Requests
sent back to their queue's head are written only with the batch's last transaction, in
order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from types import FrameType
from typing import Any

import redis
from celery import states
from celery.app.task import Context
from celery.app.trace import build_tracer
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.time import maybe_iso8601

from gpu_tasks.celeryapp import GPU_WORKER_FLAG
from gpu_tasks.celeryapp import app as gpu_app
from gpu_tasks.control.deadletter import DeadLetter, DeadLetterStore
from gpu_tasks.control.unacked import forget, unacked_keys
from gpu_tasks.protocol.checks import ids_in_raw
from gpu_tasks.protocol.routing import ENTITY_KWARG
from workers.child import runtime
from workers.child.taskevents import BatchEvents
from workers.consumer import ownership, progress
from workers.consumer.fence import NO_ENTITY, judge, readdress
from workers.consumer.request import time_limits
from workers.consumer.transport import installed_guard

log = logging.getLogger(__name__)

FLUSH_AFTER_S = 0.05
"""Results are written at the end of the batch, or once this long passed since the last
write: a child death makes at most this much finished work run again."""
_RETRY_SLEEP_S = (0.1, 2.0)
"""A failed write is tried again after the first, doubling to the second, for as long as
it takes (the results are computed; they are stored, not dropped)."""


def run_batch(number: int, items: list[tuple[str, str, bytes]], revoked: frozenset[str],
              events: bool = False) -> dict[str, Any]:
    """Run batch ``number`` (``(tag, queue, message)`` triples, in the order taken);
    ``revoked``: the task ids the worker has been told to revoke; ``events``: send task
    events. Returns what the main process needs: ``{"deferred": [(tag, seconds until
    due), ...]}``."""
    return _BatchRun(number, items, revoked, events).run()


_events: BatchEvents | None = None


def _events_of(hostname: str) -> BatchEvents:
    global _events
    if _events is None:
        _events = BatchEvents(gpu_app, hostname)
    return _events


class _Writes:
    """Redis writes a batch owes, queued until they are sent in one transaction: results
    (the backend writes them here, as on a pipeline), dead letters, moves, and the
    acknowledgement of every request they settle."""

    def __init__(self) -> None:
        self.ops: list[tuple[Any, ...]] = []
        self.letters: list[DeadLetter] = []
        self.settled: list[str] = []

    # What ResultBackend._set calls on its pipeline.
    def set(self, key: str, value: Any) -> None:
        self.ops.append(("set", key, value))

    def setex(self, key: str, ttl: Any, value: Any) -> None:
        self.ops.append(("setex", key, ttl, value))

    def publish(self, key: str, value: Any) -> None:
        self.ops.append(("publish", key, value))

    def move(self, queue: str, message: str) -> None:
        self.ops.append(("lpush", queue, message))

    def __bool__(self) -> bool:
        return bool(self.ops or self.letters or self.settled)

    def take(self) -> _Writes:
        """What is queued, leaving this empty."""
        taken = _Writes()
        taken.ops, taken.letters, taken.settled = self.ops, self.letters, self.settled
        self.ops, self.letters, self.settled = [], [], []
        return taken

    def put_back(self, earlier: _Writes) -> None:
        """Queue ``earlier`` (not sent after all) ahead of what is queued now."""
        self.ops = earlier.ops + self.ops
        self.letters = earlier.letters + self.letters
        self.settled = earlier.settled + self.settled

    def send(self, client: redis.Redis, gpu: str, batch: int,
             heads: Sequence[tuple[str, str, bytes]] = ()) -> bool:
        """Write it all, with ``heads`` pushed back at the head of their queues, in one
        transaction; tried again until Redis answers (see :data:`_RETRY_SLEEP_S`). False
        if Redis failed meanwhile (a restarted Redis may have lost what it had written)."""
        settled = self.settled + [tag for tag, _q, _r in heads]
        pipe = client.pipeline(transaction=True)
        for op, *args in self.ops:
            getattr(pipe, op)(*args)
        store = DeadLetterStore(client)
        for letter in self.letters:
            store.add(letter, pipe)
        for _tag, queue, raw in reversed(heads):  # RPUSH: the latest first
            pipe.rpush(queue, raw)
        if settled and gpu:
            forget(pipe, gpu, settled)
        if not len(pipe):
            return True
        wait, longest = _RETRY_SLEEP_S
        failing_since: float | None = None
        while True:
            try:
                pipe.execute()
                break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # Redis away: the transaction may or may not have been applied (a lost
                # reply). It forgets the tags it settles, so Redis says which: never twice.
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("%s: cannot store the results of batch %d yet (%s); trying "
                                "again until Redis answers", gpu, batch, exc)
                time.sleep(wait)
                wait = min(longest, wait * 2)
                with contextlib.suppress(redis.RedisError):
                    if settled and gpu and not client.hexists(
                            unacked_keys(gpu)["unacked_key"], settled[0]):
                        break
        if failing_since is not None:
            log.warning("%s: stored the results of batch %d after %.1fs", gpu, batch,
                        time.monotonic() - failing_since)
        return failing_since is None


class _Writer:
    """Sends what a batch owes while a long request runs (a daemon thread of the pool
    child): the requests before it keep their results if the child dies in it, and the
    main thread pays nothing for requests shorter than :data:`FLUSH_AFTER_S`.

    Before each request the main thread seals what is queued (:meth:`seal`); after it, it
    takes back what the thread has not sent (:meth:`unseal`). Both only set an attribute
    under a lock: the thread is never woken per request (each wake-up costs the main
    thread a GIL hand-off, up to ``sys.getswitchinterval()``). It looks twice per
    ``FLUSH_AFTER_S`` and sends the sealed writes once the request has run that long,
    holding the lock, so the two never send the same writes, nor out of order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sealed: tuple[_Writes, redis.Redis, str, int] | None = None
        self._since = 0.0
        self.interrupted = False
        """A write of this thread met a Redis failure (read and reset by the batch)."""
        self._thread = threading.Thread(target=self._run, name="gpu-tasks-batch-writer",
                                        daemon=True)
        self._thread.start()

    def seal(self, writes: _Writes, client: redis.Redis, gpu: str, batch: int) -> None:
        with self._lock:
            self._sealed = (writes, client, gpu, batch)
            self._since = time.monotonic()

    def unseal(self) -> _Writes | None:
        """The sealed writes if the thread did not send them (None if it did)."""
        with self._lock:
            sealed, self._sealed = self._sealed, None
        return sealed[0] if sealed is not None else None

    def _run(self) -> None:
        while True:
            time.sleep(FLUSH_AFTER_S / 2)
            with self._lock:
                sealed = self._sealed
                if sealed is None or time.monotonic() - self._since < FLUSH_AFTER_S:
                    continue
                writes, client, gpu, batch = sealed
                try:
                    if not writes.send(client, gpu, batch):
                        self.interrupted = True
                except Exception:
                    log.exception("%s: batch %d: could not write while a request ran; the "
                                  "batch writes it", gpu, batch)
                    continue  # left sealed: the main thread takes it back
                self._sealed = None


_writer: tuple[int, _Writer] | None = None


def _this_process_writer() -> _Writer:
    """The writer thread of this process (threads do not survive fork: one per child)."""
    global _writer
    if _writer is None or _writer[0] != os.getpid():
        _writer = (os.getpid(), _Writer())
    return _writer[1]


class _BatchRun:
    def __init__(self, number: int, items: list[tuple[str, str, bytes]],
                 revoked: frozenset[str], events: bool = False) -> None:
        self.number = number
        self.items = items
        self.revoked = revoked
        self.app = gpu_app
        self.backend = gpu_app.backend
        self.client: redis.Redis = self.backend.client
        rt = runtime.installed()
        self.gpu: str = gpu_app.conf.get(GPU_WORKER_FLAG) or ""
        self.hostname = rt.identity.worker if rt is not None else socket.gethostname()
        self.guard = installed_guard()
        self.progress = progress.progress
        self.pid = os.getpid()
        self.writes = _Writes()
        self.writer = _this_process_writer()
        self.heads: list[tuple[str, str, bytes]] = []
        """``(tag, queue, message)`` going back to the head of their queue, in batch order;
        written with the batch's last transaction."""
        self.returned: set[str] = set()
        """Queues whose requests go back from here on (the first one did)."""
        self.deferred: list[tuple[str, float]] = []
        self.flushed_at = time.monotonic()
        self.events = _events_of(self.hostname) if events else None
        self.interrupted = False
        """Redis failed under one of the batch's writes (see :meth:`run`'s answer)."""

    # -- the batch -------------------------------------------------------------------

    def _known_results(self) -> dict[str, Any]:
        """The stored results of the batch's task ids, in one MGET (see
        :meth:`gpu_tasks.connection.results.ResultBackend.writing_to`)."""
        ids = [task_id for _t, _q, raw in self.items
               if isinstance(task_id := ids_in_raw(raw)[0], str)]
        if not ids:
            return {}
        prefix = self.backend.task_keyprefix
        prefix = prefix.decode() if isinstance(prefix, bytes) else str(prefix)
        raws = self.client.mget([prefix + task_id for task_id in ids])
        return dict(zip(ids, raws, strict=True))

    def run(self) -> dict[str, Any]:
        with _soft_limit_signal(), self.backend.writing_to(self.writes, self._known_results()):
            for index, (tag, queue, raw) in enumerate(self.items):
                try:
                    self._one(index, tag, queue, raw)
                except BaseException:
                    # The child is ending (a poisoned context: SystemExit after the answer
                    # was queued) or a bug: what ran is written; what did not run goes back.
                    self.heads.extend(self.items[index + 1:])
                    self._flush(final=True)
                    raise
                finally:
                    if self.progress is not None:
                        self.progress.finished(index)
                if time.monotonic() - self.flushed_at >= FLUSH_AFTER_S:
                    self._flush(final=False)
            self._flush(final=True)
        interrupted = self.interrupted or self.writer.interrupted
        self.writer.interrupted = False
        # interrupted: a Redis that failed under the batch's writes may have come back
        # without some of them (a restart loses what its AOF had not synced yet): the main
        # process puts back whatever of the batch it still finds recorded as taken.
        return {"deferred": self.deferred, "interrupted": interrupted}

    def _one(self, index: int, tag: str, queue: str, raw: bytes) -> None:
        if queue in self.returned:
            self.heads.append((tag, queue, raw))
            return
        checked = self.guard.check(raw)
        if checked.reason:
            letter = DeadLetter.of(raw, queue, checked.reason, checked.payload)
            log.error("dead-lettered a message from %s (%d bytes, task %s %s): %s", queue,
                      len(raw), letter.task, letter.task_id, checked.reason)
            self.writes.letters.append(letter)
            self.writes.settled.append(tag)
            return
        payload, (args, kwargs, embed) = checked.payload, checked.body
        headers, properties = payload["headers"], payload.get("properties") or {}
        entity = kwargs.get(ENTITY_KWARG, NO_ENTITY) if isinstance(kwargs, dict) else NO_ENTITY
        table = ownership.table
        if table is not None:
            verdict = judge(queue, entity, table)
            if verdict.action == "return":
                log.info("%s: %s %s put back on %s: %s", self.gpu, headers.get("task"),
                         headers.get("id"), queue, verdict.reason)
                self.returned.add(queue)
                self.heads.append((tag, queue, raw))
                return
            if verdict.action == "move":
                log.warning("%s: %s %s moved to its shard's queue: %s", self.gpu,
                            headers.get("task"), headers.get("id"), verdict.reason)
                readdress(payload, str(verdict.queue))
                self.writes.move(str(verdict.queue), json.dumps(payload))
                self.writes.settled.append(tag)
                return
            if verdict.action == "fail":
                log.warning("%s: %s %s refused: %s", self.gpu, headers.get("task"),
                            headers.get("id"), verdict.error)
                self.backend.mark_as_failure(headers["id"], verdict.error,
                                             request=self._context(headers, properties, queue))
                self.writes.settled.append(tag)
                return
        request = self._request(headers, properties, queue, args, kwargs, embed)
        task_id, name = headers["id"], headers["task"]
        if self._answered_without_running(tag, task_id, headers, request):
            return
        if request["delivery_info"]["redelivered"] and self.writes:
            # Its last run may have ended a pool child: what ran before it is written
            # first, so another death costs only this request.
            self._flush(final=False)
        if self.events is not None:
            self.events.received(request)
            self.events.started(task_id)
        task = self.app.tasks[name]
        rt = runtime.installed()
        hard, soft = time_limits(headers.get("timelimit"), task,
                                 rt.settings.task_soft_time_limit_s if rt is not None else None)
        hard = hard or self.app.conf.task_time_limit  # the pool's own default
        if self.progress is not None:
            self.progress.starting(self.number, self.pid, index, hard)
        tracer = task.__trace__ or build_tracer(name, task, app=self.app,
                                                hostname=self.hostname)
        if soft:
            signal.setitimer(signal.ITIMER_REAL, soft)
        retval: Any = None
        ran_s, retstr = 0.0, None
        try:
            retval, info, ran_s, retstr = self._running(
                lambda: tracer(task_id, args, kwargs, request))
        except SoftTimeLimitExceeded:
            info = None  # fired after the body returned, while its result was stored
        finally:
            if soft:
                signal.setitimer(signal.ITIMER_REAL, 0)
        if self.events is not None:
            self.events.finished(task_id, info.state if info is not None else None,
                                 retval, ran_s, retstr)
        if info is not None and info.state == states.REJECTED and getattr(
                info.retval, "requeue", False):
            # The pool child's own fence (workers.child.runtime.served_shard) said no.
            self.returned.add(queue)
            self.heads.append((tag, queue, raw))
            return
        self.writes.settled.append(tag)

    def _answered_without_running(self, tag: str, task_id: str, headers: dict[str, Any],
                                  request: dict[str, Any]) -> bool:
        now = datetime.now(timezone.utc)
        expires = _when(headers.get("expires"))
        if task_id in self.revoked or (expires is not None and now >= expires):
            reason = "revoked" if task_id in self.revoked else "expired"
            log.info("%s %s %s: not run", headers.get("task"), task_id, reason)
            self.backend.mark_as_revoked(task_id, reason, request=Context(request))
            if self.events is not None:
                self.events.revoked(task_id, expired=reason == "expired")
            self.writes.settled.append(tag)
            return True
        eta = _when(headers.get("eta"))
        if eta is not None and eta > now:
            self.deferred.append((tag, (eta - now).total_seconds()))
            return True
        if request["delivery_info"]["redelivered"]:
            status = self.backend.get_task_meta(task_id).get("status")
            if status in states.READY_STATES:
                log.warning("%s: %s %s was redelivered but had already finished (%s): not "
                            "run again", self.gpu, headers.get("task"), task_id, status)
                self.writes.settled.append(tag)
                return True
        return False

    def _request(self, headers: dict[str, Any], properties: dict[str, Any], queue: str,
                 args: Any, kwargs: Any, embed: Any) -> dict[str, Any]:
        """The request dict Celery's worker builds (``celery.worker.request.Request``)."""
        request = dict(headers)
        info = properties.get("delivery_info") or {}
        request.update({
            "properties": properties,
            "reply_to": properties.get("reply_to"),
            "correlation_id": properties.get("correlation_id"),
            "hostname": self.hostname,
            "delivery_info": {
                "exchange": info.get("exchange"), "routing_key": queue,
                "priority": properties.get("priority"),
                "redelivered": bool(info.get("redelivered") or headers.get("redelivered")),
            },
            "args": args, "kwargs": kwargs, "is_eager": False,
        })
        request.update(embed or {})
        return request

    def _context(self, headers: dict[str, Any], properties: dict[str, Any],
                 queue: str) -> Context:
        return Context(self._request(headers, properties, queue, [], {}, {}))

    # -- writing -----------------------------------------------------------------------

    def _running(self, call: Any) -> Any:
        """Run ``call`` (a request) with what is queued so far sealed for the writer thread."""
        sealed = self.writes.take()
        if sealed:
            self.writer.seal(sealed, self.client, self.gpu, self.number)
        try:
            return call()
        finally:
            if sealed:
                back = self.writer.unseal()
                if back is not None:
                    self.writes.put_back(back)
                else:
                    self.flushed_at = time.monotonic()

    def _flush(self, *, final: bool) -> None:
        """Send what is queued (with ``final``, the requests going back to their heads too)
        in one transaction."""
        writes = self.writes.take()
        if not writes.send(self.client, self.gpu, self.number, self.heads if final else []):
            self.interrupted = True
        if self.events is not None:
            self.events.flush()  # after the results: a watcher never sees news first
        if final:
            self.heads = []
        self.flushed_at = time.monotonic()


def _when(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        when = maybe_iso8601(value)
    except (TypeError, ValueError):
        return None
    if not isinstance(when, datetime):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


@contextlib.contextmanager
def _soft_limit_signal() -> Iterator[None]:
    """``SIGALRM`` raises :class:`SoftTimeLimitExceeded` in the request it interrupts, as
    billiard's ``SIGUSR1`` does (the executor answers it as ``TaskTimeLimitExceeded``)."""

    def soft_limit(_signum: int, _frame: FrameType | None) -> None:
        raise SoftTimeLimitExceeded()

    previous = signal.signal(signal.SIGALRM, soft_limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
