"""Live handoff: a shard moves from GPU A to GPU B with its queued work and its state.

The steps, each recorded in the shard map by a compare-and-set transition:

1. ``owned`` by A -> ``releasing`` (target B, handoff id H). A stops consuming the shard's
   queue, within a poll of the map, and finishes the requests of it that it had taken;
   requests that arrive meanwhile wait in the queue, in order.
2. A exports the shard's state (``gpu_tasks.export_shard`` on A's own queue, so it runs
   after what A had taken): every buffer, device -> Redis, with its SHA-256.
3. ``releasing`` -> ``importing``: B keeps what it imports, without consuming yet.
4. B imports it (``gpu_tasks.import_shard`` on B's queue), checking every checksum. If it
   cannot (out of memory, say), ``importing`` -> ``owned`` by A again: A never let go of
   its copy, and the error says why the shard stayed.
5. ``importing`` -> ``owned`` by B: B consumes the queue from where A stopped. A frees its
   copy (``gpu_tasks.release_shard``) and the exported state leaves Redis.

Only one driver can move a shard at a time (each step is a compare-and-set on the
shard's entry), and one interrupted anywhere (by the death of A, of B or of the driver)
is finished or rolled back by running it again (:meth:`Handoff.resume`): a shard is never
consumed by two GPUs, and one that nobody consumes is in a handoff that a re-run ends.

Drivers are :class:`Handoff` objects stepped without blocking (:meth:`Handoff.poll`), so
:func:`run` can drive several at once from one thread.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import redis
from celery import states

from gpu_tasks.control.lease import LeaseStore, process_gone, process_start
from gpu_tasks.control.shardmap import Shard, ShardMapStore, check_gpu
from gpu_tasks.errors import GpuTasksError, HandoffError, ShardMapError
from gpu_tasks.keys import DRIVER_KEY, HANDOFF_KEYS
from gpu_tasks.protocol.routing import shard_name

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 20
STATE_TTL_S = 24 * 3600
"""Exported state expires by itself, should its driver vanish for good."""

DRIVER_TTL_MS = 5000

STEPS = ("releasing", "exported", "importing", "imported", "owned")
"""Where a handoff can be paused for a drill (``GPU_TASKS_HANDOFF_PAUSE=<step>:<s>``)."""


@dataclass
class Outcome:
    """How a handoff ended."""

    shard: int
    source: str
    target: str
    handoff: str
    status: str = "running"
    """``moved``, ``rolled back`` (the shard stayed with its source), ``failed`` (left in
    its recorded state for a re-run) or ``nothing to do``."""
    message: str = ""
    entities: int = 0
    buffers: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"shard": shard_name(self.shard), "source": self.source, "target": self.target,
                "handoff": self.handoff, "status": self.status, "message": self.message,
                "entities": self.entities, "buffers": self.buffers, "bytes": self.bytes,
                "seconds": round(self.seconds, 3)}


@dataclass
class _Task:
    id: str
    gpu: str
    name: str
    deadline: float


@dataclass
class Handoff:
    """One shard's handoff, stepped by :meth:`poll` until it has an outcome."""

    index: int
    target: str | None
    client: redis.Redis
    app: Any
    """The Celery app that sends the steps' tasks and reads their results."""
    follow_timeout_s: float = 15.0
    """How long a worker may take to follow the map before the handoff gives up."""
    task_timeout_s: float = 600.0
    pause: tuple[str, float] | None = None
    outcome: Outcome | None = None
    _store: ShardMapStore = field(init=False)
    _leases: LeaseStore = field(init=False)
    _entry: Shard | None = field(default=None, init=False)
    _epoch: int = field(default=0, init=False)
    _task: _Task | None = field(default=None, init=False)
    _waiting_since: float = field(default=0.0, init=False)
    _started: float = field(default_factory=time.monotonic, init=False)
    _moved: tuple[int, int, int] = field(default=(0, 0, 0), init=False)
    """Entities, buffers and bytes the export reported."""

    def __post_init__(self) -> None:
        self._store = ShardMapStore(self.client)
        self._leases = LeaseStore(self.client)
        if self.target is not None:
            check_gpu(self.target)

    # -- starting --------------------------------------------------------------------

    def start(self) -> Handoff:
        """Begin the move, or resume the handoff recorded for this shard (once)."""
        if self._entry is not None or self.outcome is not None:
            return self
        entry = self._store.load().shards[self.index]
        if entry.state != "owned":
            return self.resume(entry)
        if entry.owner == self.target or self.target is None:
            self._finish(entry.owner or "", entry.owner or "", "", "nothing to do",
                         f"{shard_name(self.index)} is already on {entry.owner}")
            return self
        for gpu, role in ((entry.owner, "its owner"), (self.target, "the target")):
            if gpu is None or not self._leases.alive(gpu):
                raise HandoffError(
                    f"cannot move {shard_name(self.index)}: {role} {gpu} has no live worker "
                    "(no lease)" + (" (a dead owner's shards are failed over, not moved)"
                                    if role == "its owner" else ""))
        if self.target in self._store.drained():
            raise HandoffError(f"cannot move {shard_name(self.index)} to {self.target}: it is "
                               "drained (gpu-tasks undrain first)")
        releasing = Shard(entry.owner, "releasing", self.target, uuid.uuid4().hex[:16],
                          entry.version)
        self._transition(entry, releasing, "releasing")
        return self

    def resume(self, entry: Shard | None = None) -> Handoff:
        """Finish or roll back the handoff recorded for this shard (a re-run)."""
        entry = entry or self._store.load().shards[self.index]
        if entry.state == "owned":
            self._finish(entry.owner or "", entry.owner or "", "", "nothing to do",
                         f"{shard_name(self.index)} is not being handed off")
            return self
        if driven(self.client, entry.handoff):
            ttl = self.client.pttl(DRIVER_KEY.format(handoff=entry.handoff))
            raise HandoffError(
                f"{shard_name(self.index)}'s handoff {entry.handoff} is being driven by another "
                f"process (its heartbeat expires in {max(ttl, 0) / 1000:.1f}s): let it finish, "
                "or run this again once it is gone")
        self._entry, self._epoch = entry, self._store.epoch() or 0
        self.target = entry.target
        log.warning("%s: resuming handoff %s (%s, %s -> %s)", shard_name(self.index),
                    entry.handoff, entry.state, entry.owner, entry.target)
        self._waiting_since = time.monotonic()
        return self

    # -- stepping ----------------------------------------------------------------------

    def poll(self) -> bool:
        """Advance as far as possible without waiting; True once there is an outcome."""
        while self.outcome is None:
            try:
                self._heartbeat()
                if not self._step():
                    return False
            except GpuTasksError as exc:
                self._fail(str(exc))
            except redis.RedisError as exc:
                self._fail(f"Redis: {exc}")
        return True

    def _step(self) -> bool:
        """One step; False when it has to wait."""
        entry = self._entry
        assert entry is not None and entry.owner is not None and entry.target is not None
        source, target = entry.owner, entry.target
        if entry.state == "releasing":
            if self._task is None:
                if not self._leases.alive(source):
                    return self._roll_back(f"{source} has no live worker: its state cannot "
                                           "be exported")
                if not self._followed(source):
                    return False
                self._send("gpu_tasks.export_shard", source)
            done, value = self._result()
            if not done:
                return False
            if isinstance(value, BaseException):
                return self._roll_back(f"exporting from {source} failed: {value}")
            self._count(value)
            self._paused("exported")
            self._transition(entry, replace(entry, state="importing"), "importing")
            return True
        if entry.state == "importing":
            if self._task is None:
                if not self._leases.alive(target):
                    return self._roll_back(f"{target} has no live worker to import into")
                if not self._followed(target):
                    return False
                self._send("gpu_tasks.import_shard", target)
            done, value = self._result()
            if not done:
                return False
            if isinstance(value, BaseException):
                return self._roll_back(f"{target} could not import it: "
                                       f"{type(value).__name__}: {value}")
            self._paused("imported")
            self._transition(entry, Shard(target, "owned", version=entry.version + 1), "owned")
            self._release_source(source, entry.handoff or "")
            self._finish(source, target, entry.handoff or "", "moved", "")
            return True
        raise HandoffError(f"{shard_name(self.index)} is in state {entry.state!r}, which "
                           "this driver does not know")

    # -- helpers -----------------------------------------------------------------------

    def _heartbeat(self) -> None:
        """Say this handoff has a live driver (a re-run or the coordinator leaves it alone)."""
        entry = self._entry
        if entry is not None and entry.handoff:
            self.client.set(DRIVER_KEY.format(handoff=entry.handoff), _ME, px=DRIVER_TTL_MS)

    def _transition(self, entry: Shard, new: Shard, step: str) -> None:
        self._epoch = self._store.transition(self.index, entry, new)
        self._entry = new
        self._task = None
        self._waiting_since = time.monotonic()
        log.info("%s: %s (epoch %d)", shard_name(self.index), step, self._epoch)
        self._paused(step)

    def _paused(self, step: str) -> None:
        if self.pause is not None and self.pause[0] == step:
            log.warning("%s: pausing %.1fs after step %s (a drill)", shard_name(self.index),
                        self.pause[1], step)
            time.sleep(self.pause[1])

    def _followed(self, gpu: str) -> bool:
        """Whether ``gpu``'s worker consumes by the map epoch of this handoff's last step."""
        lease = self._leases.get(gpu)
        if lease is not None and lease.epoch >= self._epoch:
            return True
        if time.monotonic() - self._waiting_since > self.follow_timeout_s:
            raise HandoffError(f"{gpu} did not follow shard map epoch {self._epoch} within "
                               f"{self.follow_timeout_s:.0f}s")
        return False

    def _send(self, task: str, gpu: str) -> None:
        entry = self._entry
        assert entry is not None
        kwargs: dict[str, Any] = {"shard": self.index, "handoff": entry.handoff}
        if task == "gpu_tasks.import_shard":
            kwargs["version"] = entry.version + 1  # what the state is once the move commits
        result = self.app.send_task(task, kwargs=kwargs, queue=gpu)
        self._task = _Task(result.id, gpu, task, time.monotonic() + self.task_timeout_s)

    def _result(self) -> tuple[bool, Any]:
        """Whether the step's task has finished, and its result (or exception)."""
        task = self._task
        assert task is not None
        meta = self.app.backend.get_task_meta(task.id, cache=False)
        if meta["status"] in states.READY_STATES:
            return True, meta["result"]
        if time.monotonic() > task.deadline:
            return True, HandoffError(f"{task.name} on {task.gpu} did not finish in "
                                      f"{self.task_timeout_s:.0f}s")
        return False, None

    def _count(self, summary: Any) -> None:
        if isinstance(summary, dict):
            self._moved = (int(summary.get("entities", 0)), int(summary.get("buffers", 0)),
                           int(summary.get("bytes", 0)))

    def _roll_back(self, why: str) -> bool:
        """Give the shard back to its source, which kept its state."""
        entry = self._entry
        assert entry is not None and entry.owner is not None
        try:
            # A target that holds part of an import drops it once it follows the map.
            self._transition(entry, Shard(entry.owner, "owned", version=entry.version),
                             "rolled back")
        except ShardMapError as exc:
            self._fail(f"{why}; rolling back failed too: {exc}")
            return True
        self._discard(entry.handoff or "")
        self._finish(entry.owner, entry.target or "", entry.handoff or "", "rolled back",
                     f"{why}; {shard_name(self.index)} stays on {entry.owner}")
        return True

    def _release_source(self, source: str, handoff: str) -> None:
        """Let the source free its copy now (it would at its next request anyway)."""
        if self._leases.alive(source):
            self.app.send_task("gpu_tasks.release_shard",
                               kwargs={"shard": self.index, "handoff": handoff}, queue=source)
        self._discard(handoff)

    def _discard(self, handoff: str) -> None:
        if handoff:
            discard(self.client, handoff)

    def _fail(self, why: str) -> None:
        entry = self._entry
        self._finish(entry.owner or "" if entry else "", entry.target or "" if entry else "",
                     entry.handoff or "" if entry else "", "failed",
                     f"{why}; {shard_name(self.index)} is left "
                     f"{entry.state if entry else 'as it was'}: run the command again")

    def _finish(self, source: str, target: str, handoff: str, status: str,
                message: str) -> None:
        entities, buffers, nbytes = self._moved
        self.outcome = Outcome(self.index, source, target, handoff, status, message, entities,
                               buffers, nbytes, time.monotonic() - self._started)


def discard(client: redis.Redis, handoff: str) -> None:
    """Delete a handoff's exported state from Redis."""
    keys = list(client.scan_iter(match=HANDOFF_KEYS.format(handoff=handoff), count=1000))
    if keys:
        client.delete(*keys)


def parse_pause(text: str) -> tuple[str, float] | None:
    """``<step>:<seconds>`` of a drill pause, or None."""
    if not text:
        return None
    step, _, seconds = text.partition(":")
    if step not in STEPS:
        raise HandoffError(f"handoff pause step must be one of {', '.join(STEPS)}, not "
                           f"{step!r}")
    try:
        return step, float(seconds or "0")
    except ValueError:
        raise HandoffError(f"handoff pause {text!r}: seconds must be a number") from None


_ME = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                  "pid_start": process_start(os.getpid())})


def driven(client: redis.Redis, handoff: str | None) -> bool:
    """Whether a live process drives ``handoff``: its heartbeat has not expired, and its
    process is not known to be gone (a driver killed on this host is known at once)."""
    if not handoff:
        return False
    raw = client.get(DRIVER_KEY.format(handoff=handoff))
    if raw is None:
        return False
    try:
        me = json.loads(raw)
        gone = process_gone(me["host"], int(me["pid"]), me.get("pid_start", ""))
    except (ValueError, KeyError, TypeError):
        gone = None
    return not gone


def drive_all(handoffs: Iterable[Handoff], parallel: int = 4, poll_s: float = 0.05,
        on_done: Callable[[Outcome], None] | None = None,
        on_poll: Callable[[], None] | None = None) -> list[Outcome]:
    """Drive ``handoffs``, ``parallel`` at a time, from this thread; their outcomes.
    ``on_poll`` runs between rounds (the coordinator renews its lease there)."""
    pending = iter(handoffs)
    active: list[Handoff] = []
    outcomes: list[Outcome] = []
    exhausted = False
    while active or not exhausted:
        while not exhausted and len(active) < parallel:
            try:
                handoff = next(pending)
            except StopIteration:
                exhausted = True
                break
            try:
                handoff.start()
            except GpuTasksError as exc:
                handoff.outcome = Outcome(handoff.index, "", handoff.target or "", "",
                                          "failed", str(exc))
            active.append(handoff)
        still = []
        for handoff in active:
            if handoff.poll():
                assert handoff.outcome is not None
                outcomes.append(handoff.outcome)
                if on_done is not None:
                    on_done(handoff.outcome)
            else:
                still.append(handoff)
        active = still
        if on_poll is not None:
            on_poll()
        if active:
            time.sleep(poll_s)
    return outcomes
