"""``gpu-tasks batch``: a file of entity requests, checked whole, then sent exactly once.

A batch is a JSONL file (one ``{"entity_id", "task", "kwargs"}`` per line) or a CSV file
with a header (``entity_id``, ``task``, and either a ``kwargs`` column holding a JSON
object or one column per argument, each cell read as JSON where it parses and as text
where it does not). Every line is checked before anything is sent; bad lines are
reported with their number and reason, and the others are sent.

**Exactly once.** A batch has an id (``--batch-id``, or by default one derived from the
file's content), and Redis keeps, per batch, a bitmap of the lines it has sent
(``gpu-tasks:batch:<id>:sent``, kept ``batch_record_ttl_s``). One Lua script sets a
line's bit and pushes its message in the same atomic step, so a run killed at any point
has sent exactly the lines its bitmap says, and a re-run sends only the others. Each
line's task id is derived from the batch id and the line number, so a re-run with
``--wait`` waits for the results of what an earlier run sent too.

**One run at a time.** A run holds ``gpu-tasks:batch:<id>:lock`` (a Redis key with an
expiry, renewed while it sends); another run of the same batch waits for it
(``--lock-wait``) or exits with code 2 naming the holder. The send script checks the
lock too, so a run that lost its lock (paused past the expiry) cannot send.

**Back-pressure.** Before each chunk the run sums each target GPU's queued requests over
the shard queues it owns; while one is above ``max_backlog`` it waits (or with
``fail_fast`` stops, exit 1), and gives up (exit 1) if the backlog has not shrunk for
``stall_timeout_s``.

Exit codes (:class:`ExitCode`): 0 every line accepted (and with ``--wait`` succeeded);
1 some lines rejected or failed, or sending stopped (back-pressure); 2 usage,
configuration or connection error, or the batch is being sent by another run; 3 with
``--wait``, some requests not finished in time.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import redis

from gpu_tasks.app import app as default_app
from gpu_tasks.control import scripts
from gpu_tasks.control.lock import ExpiringLock
from gpu_tasks.control.shardmap import ShardMapStore
from gpu_tasks.errors import BatchError, BrokerUnavailable, ConfigError, RoutingError
from gpu_tasks.keys import BATCH_KEY_PREFIX
from gpu_tasks.protocol.envelope import new_task_ids
from gpu_tasks.protocol.routing import shard_name
from gpu_tasks.settings import Settings
from gpu_tasks.submit.batchfile import read_lines
from gpu_tasks.submit.bulk import CHUNK_REQUESTS, Publisher

LOCK_TTL_S = 10.0
"""A run's lock lasts this long unless renewed (it is renewed at every chunk): a killed
run's batch can be re-run after at most this."""
BACKLOG_POLL_S = 0.25
RESULT_POLL_S = 0.2
BATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")

class ExitCode(enum.IntEnum):
    """What ``gpu-tasks batch`` exits with."""

    OK = 0
    """Every line accepted (and with ``--wait``, succeeded)."""
    SOME_FAILED = 1
    """Some lines rejected or failed, or sending stopped before the end (back-pressure)."""
    ERROR = 2
    """Usage, configuration or connection error, or another run is sending this batch."""
    UNFINISHED = 3
    """With ``--wait``: some requests had not finished when the timeout ran out."""


@dataclass(frozen=True)
class BatchOptions:
    batch_id: str | None = None
    """None: derived from the file's content (``sha256-<first 24 hex digits>``)."""
    file_format: str | None = None
    """``jsonl`` or ``csv``; None: from the file name (``.csv``), else jsonl."""
    default_task: str | None = None
    """The task of lines that name none."""
    wait: bool = False
    timeout_s: float = 600.0
    """With ``wait``: how long to wait for the results."""
    max_backlog: int | None = None
    """None: the setting ``max_backlog``."""
    fail_fast: bool = False
    lock_wait_s: float = 0.0
    stall_timeout_s: float = 300.0


@dataclass
class Rejection:
    line: int
    reason: str


@dataclass
class LineOutcome:
    """What became of one accepted line (``--results``)."""

    line: int
    entity_id: str
    task: str
    task_id: str
    outcome: str = "pending"
    """``sent``, ``skipped`` (an earlier run sent it), or ``pending`` (not sent: stopped)."""
    state: str | None = None
    """With ``--wait``: ``SUCCESS``, ``FAILURE``, or ``unfinished``."""
    result: Any = None
    error: dict[str, Any] | None = None
    where: str | None = None
    """For an unfinished request: ``queued`` (still in its shard queue) or ``taken``
    (a worker has it: running, or held by a worker that died)."""
    queue: str = ""


@dataclass
class BatchReport:
    """What a run did; :meth:`as_dict` is ``--json``'s one line."""

    batch_id: str
    source: str
    lines: int = 0
    accepted: int = 0
    sent: int = 0
    skipped: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    outcomes: list[LineOutcome] = field(default_factory=list)
    waited: bool = False
    stopped: str | None = None
    """Why sending stopped before the end (back-pressure), if it did."""
    seconds: float = 0.0

    @property
    def rejected(self) -> int:
        return len(self.rejections)

    def count(self, state: str) -> int:
        return sum(1 for o in self.outcomes if o.state == state)

    @property
    def exit_code(self) -> ExitCode:
        if self.waited and self.count("unfinished"):
            return ExitCode.UNFINISHED
        if self.rejections or self.stopped or (self.waited and self.count("FAILURE")):
            return ExitCode.SOME_FAILED
        return ExitCode.OK

    def as_dict(self, max_listed: int = 100) -> dict[str, Any]:
        out: dict[str, Any] = {
            "batch_id": self.batch_id, "source": self.source, "lines": self.lines,
            "accepted": self.accepted, "sent": self.sent, "skipped": self.skipped,
            "rejected": self.rejected, "stopped": self.stopped,
            "seconds": round(self.seconds, 3), "exit_code": int(self.exit_code),
            "rejections": [{"line": r.line, "reason": r.reason}
                           for r in self.rejections[:max_listed]],
        }
        if self.waited:
            unfinished = [o for o in self.outcomes if o.state == "unfinished"]
            out.update(succeeded=self.count("SUCCESS"), failed=self.count("FAILURE"),
                       unfinished=len(unfinished),
                       unfinished_queued=sum(1 for o in unfinished if o.where == "queued"),
                       unfinished_taken=sum(1 for o in unfinished if o.where == "taken"),
                       unfinished_lines=[{"line": o.line, "task_id": o.task_id,
                                          "where": o.where} for o in unfinished[:max_listed]])
        return out

    def write_results(self, out: IO[str]) -> None:
        """One JSON line per input line, in line order: rejected ones with their reason."""
        rows: list[tuple[int, dict[str, Any]]] = [
            (r.line, {"line": r.line, "outcome": "rejected", "error": r.reason})
            for r in self.rejections]
        for o in self.outcomes:
            row: dict[str, Any] = {"line": o.line, "outcome": o.outcome, "task_id": o.task_id,
                                   "entity_id": o.entity_id, "task": o.task, "queue": o.queue}
            if o.state is not None:
                row["state"] = o.state
                if o.state == "SUCCESS":
                    row["result"] = o.result
                elif o.state == "FAILURE":
                    row["error"] = o.error
                else:
                    row["where"] = o.where
            rows.append((o.line, row))
        rows.sort(key=lambda r: r[0])
        for _, row in rows:
            out.write(json.dumps(row) + "\n")


class Progress(Protocol):
    """What a run tells the terminal (the CLI draws a progress bar)."""

    def start(self, phase: str, total: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def note(self, text: str) -> None: ...
    def stop(self) -> None: ...


class Silent:
    """A :class:`Progress` that shows nothing."""

    def start(self, phase: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def stop(self) -> None:
        pass


# -- the record in Redis --------------------------------------------------------------------


def batch_keys(batch_id: str) -> tuple[str, str, str]:
    """``(meta hash, sent bitmap, lock)`` of a batch."""
    base = BATCH_KEY_PREFIX + batch_id
    return base, base + ":sent", base + ":lock"


def task_id_for(batch_id: str, line: int) -> str:
    """The task id of a batch's line: the same in every run, shaped like a UUID whose last
    group is the line number in hex."""
    h = hashlib.sha256(batch_id.encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{line:012x}"


def _acquire(client: redis.Redis, key: str, batch_id: str, wait_s: float,
             progress: Progress) -> ExpiringLock:
    # The token says who holds the lock, for the message a run that waits for it prints.
    token = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                        "since": time.time(), "token": uuid.uuid4().hex})
    lock = ExpiringLock(client, key, token, LOCK_TTL_S)
    deadline = time.monotonic() + wait_s
    noted = False
    while True:
        if lock.claim():
            return lock
        holder_raw = client.get(key)
        if time.monotonic() >= deadline:
            try:
                holder = json.loads(holder_raw or b"{}")
                who = (f"pid {holder['pid']} on {holder['host']}, since "
                       f"{time.strftime('%H:%M:%S', time.localtime(holder['since']))}")
            except (ValueError, KeyError, TypeError):
                who = "another run"
            raise BatchError(
                f"batch {batch_id} is being sent by another run ({who}); nothing was sent. "
                f"Wait for it, or pass --lock-wait SECONDS (a killed run's lock expires "
                f"after {LOCK_TTL_S:g} s)")
        if not noted:
            progress.note(f"waiting for another run of batch {batch_id} to finish")
            noted = True
        time.sleep(0.1)


# -- the run --------------------------------------------------------------------------------


def spool(stream: IO[bytes]) -> Path:
    """Standard input copied to a temporary file (a batch is read twice)."""
    fd, name = tempfile.mkstemp(prefix="gpu-tasks-batch-", suffix=".in")
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(stream, out, 1 << 20)
    return Path(name)


def content_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_batch(path: Path, source: str, settings: Settings, options: BatchOptions,
              progress: Progress | None = None, app: Any = None) -> BatchReport:
    """Check, send (exactly once) and optionally wait for the batch in ``path``."""
    progress = progress or Silent()
    started = time.monotonic()
    if app is None:
        app = default_app
    file_format = options.file_format or ("csv" if source.lower().endswith(".csv")
                                          else "jsonl")
    if file_format not in ("jsonl", "csv"):
        raise ConfigError(f"unknown batch format {file_format!r} (jsonl or csv)")
    digest = content_digest(path)
    batch_id = options.batch_id or f"sha256-{digest[:24]}"
    if not BATCH_ID.match(batch_id):
        raise ConfigError(f"batch id {batch_id!r} must be 1-128 letters, digits or . _ : - "
                          "(starting with a letter or digit)")
    report = BatchReport(batch_id=batch_id, source=source)
    client = settings.redis_client()
    try:
        publisher = Publisher(app, settings.max_message_bytes)
        _check(path, file_format, options, publisher, report, progress)
        if report.accepted:
            _send_all(client, path, file_format, options, publisher, settings, report,
                      digest, progress)
        if options.wait and report.accepted:
            report.waited = True
            _wait(client, report, options.timeout_s, progress)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise BrokerUnavailable(
            f"batch {batch_id}: Redis at {settings.redis_url_shown} did not answer "
            f"({type(exc).__name__}: {exc}); {report.sent} lines were sent by this run. "
            "Re-run the same batch to send the rest: sent lines are skipped",
            settings.redis_url_shown) from exc
    finally:
        progress.stop()
        client.close()
    report.seconds = time.monotonic() - started
    return report


def _request_of(item: Any, default_task: str | None) -> Any:
    if isinstance(item, dict) and "task" not in item and default_task:
        return {**item, "task": default_task}
    return item


def _check(path: Path, file_format: str, options: BatchOptions, publisher: Publisher,
           report: BatchReport, progress: Progress) -> None:
    """First pass: every line checked, nothing sent."""
    progress.start("checking", 0)
    for number, item in read_lines(path, file_format):
        report.lines += 1
        if isinstance(item, Exception):
            report.rejections.append(Rejection(number, str(item)))
            continue
        try:
            entity_id, index, spec, _kwargs, _json = publisher.parse(
                _request_of(item, options.default_task))
        except RoutingError as exc:
            report.rejections.append(Rejection(number, str(exc)))
            continue
        report.accepted += 1
        report.outcomes.append(LineOutcome(
            number, entity_id, spec.template.name, task_id_for(report.batch_id, number),
            queue=shard_name(index)))
        if report.lines % 10_000 == 0:
            progress.advance(10_000)


def _send_all(client: redis.Redis, path: Path, file_format: str, options: BatchOptions,
              publisher: Publisher, settings: Settings, report: BatchReport, digest: str,
              progress: Progress) -> None:
    meta_key, sent_key, lock_key = batch_keys(report.batch_id)
    lock = _acquire(client, lock_key, report.batch_id, options.lock_wait_s, progress)
    try:
        known = _text(client.hget(meta_key, "sha256"))
        if known is not None and known != digest:
            raise BatchError(
                f"batch id {report.batch_id} was sent before from a different file "
                f"(sha256 {known[:16]}..., this one {digest[:16]}...): lines are "
                "matched by number, so this run would skip or repeat the wrong ones. Use "
                "another --batch-id")
        ttl_ms = int(settings.batch_record_ttl_s * 1000)
        pipe = client.pipeline(transaction=True)
        pipe.hset(meta_key, mapping={"sha256": digest, "source": report.source,
                                     "lines": report.lines, "accepted": report.accepted})
        pipe.hsetnx(meta_key, "created_at", time.time())
        pipe.pexpire(meta_key, ttl_ms)
        pipe.execute()
        already = client.get(sent_key) or b""
        assert isinstance(already, bytes)
        gate = _Backpressure(client, options, settings, report, publisher.shard_count,
                             progress)
        send = scripts.register(client, "batch_send")
        by_line = {o.line: o for o in report.outcomes}
        progress.start("sending", report.accepted)
        chunk: list[tuple[int, Any]] = []
        for number, item in read_lines(path, file_format):
            outcome = by_line.get(number)
            if outcome is None:
                continue  # rejected
            if _bit(already, number):
                outcome.outcome = "skipped"
                report.skipped += 1
                progress.advance(1)
                continue
            chunk.append((number, _request_of(item, options.default_task)))
            if len(chunk) == gate.chunk_size:
                if not _send_chunk(chunk, by_line, publisher, send, lock, sent_key, ttl_ms,
                                   gate, report, progress):
                    return
                chunk = []
        if chunk:
            _send_chunk(chunk, by_line, publisher, send, lock, sent_key, ttl_ms, gate,
                        report, progress)
    finally:
        with contextlib.suppress(redis.RedisError):  # else it expires by itself
            lock.release()


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _bit(bitmap: bytes, line: int) -> bool:
    byte = line >> 3
    return byte < len(bitmap) and bool(bitmap[byte] & (0x80 >> (line & 7)))


def _send_chunk(chunk: list[tuple[int, Any]], by_line: dict[int, LineOutcome],
                publisher: Publisher, send: Any, lock: ExpiringLock, sent_key: str, ttl_ms: int,
                gate: _Backpressure, report: BatchReport, progress: Progress) -> bool:
    """Send one chunk exactly once; False if back-pressure stopped the batch."""
    if not gate.admit([by_line[n].queue for n, _ in chunk], lock):
        return False
    tags = new_task_ids(len(chunk))
    queues: dict[bytes, int] = {}
    args: list[Any] = [lock.token, ttl_ms]
    for (number, request), tag in zip(chunk, tags, strict=True):
        prepared = publisher.prepare(request, by_line[number].task_id, tag)
        index = queues.setdefault(prepared.queue, len(queues) + 3)
        args += (number, index, prepared.payload)
    try:
        newly = int(send(keys=[sent_key, lock.key, *queues], args=args))
    except redis.ResponseError as exc:
        if "LOCKLOST" in str(exc):
            raise BatchError(
                f"batch {report.batch_id}: this run lost its lock (paused longer than "
                f"{LOCK_TTL_S:g} s?) and stopped; {report.sent} lines were sent. Re-run to "
                "send the rest") from None
        raise
    for number, _ in chunk:
        by_line[number].outcome = "sent"
    # A line whose bit an overlapping run had set meanwhile was not pushed again.
    report.sent += newly
    report.skipped += len(chunk) - newly
    progress.advance(len(chunk))
    lock.renew()
    return True


class _Backpressure:
    """Holds a batch back while a GPU it sends to has too much queued."""

    def __init__(self, client: redis.Redis, options: BatchOptions, settings: Settings,
                 report: BatchReport, shard_count: int, progress: Progress) -> None:
        self.client = client
        self.limit = options.max_backlog or settings.max_backlog
        # A chunk at most half the limit: a GPU's backlog never passes the limit by more
        # than a chunk, and an empty GPU always admits one.
        self.chunk_size = max(1, min(CHUNK_REQUESTS, self.limit // 2))
        self.fail_fast = options.fail_fast
        self.stall_timeout_s = options.stall_timeout_s
        self.report = report
        self.progress = progress
        owners = ShardMapStore(client).load().shards
        self.owner_of = {shard_name(i): s.owner or "(no owner)" for i, s in enumerate(owners)}
        self.shards_of: dict[str, list[str]] = {}
        for queue, owner in self.owner_of.items():
            self.shards_of.setdefault(owner, []).append(queue)

    def backlogs(self, gpus: set[str]) -> dict[str, int]:
        """Requests queued per GPU, summed over the shard queues it owns (one pipeline)."""
        pipe = self.client.pipeline(transaction=False)
        order = [(gpu, q) for gpu in sorted(gpus) for q in self.shards_of.get(gpu, [])]
        for _, queue in order:
            pipe.llen(queue)
        totals = dict.fromkeys(gpus, 0)
        for (gpu, _), n in zip(order, pipe.execute(), strict=True):
            totals[gpu] += int(n)
        return totals

    def admit(self, queues: list[str], lock: ExpiringLock) -> bool:
        coming: dict[str, int] = {}
        for q in queues:
            owner = self.owner_of.get(q, "(no owner)")
            coming[owner] = coming.get(owner, 0) + 1
        best = None
        since = time.monotonic()
        noted = False
        while True:
            over = {gpu: n for gpu, n in self.backlogs(set(coming)).items()
                    if n + coming[gpu] > self.limit}
            if not over:
                if noted:
                    self.progress.note("backlog below the limit again: sending")
                return True
            gpu, depth = max(over.items(), key=lambda kv: kv[1])
            why = (f"GPU {gpu} has {depth} requests queued, over the limit of {self.limit} "
                   "(--max-backlog / GPU_TASKS_MAX_BACKLOG)")
            if self.fail_fast:
                self.report.stopped = f"{why}: stopped with --fail-fast"
                return False
            total = sum(over.values())
            if best is None or total < best:
                best, since = total, time.monotonic()
            elif time.monotonic() - since > self.stall_timeout_s:
                self.report.stopped = (f"{why}, and it has not shrunk for "
                                       f"{self.stall_timeout_s:g} s (is the GPU consuming?)")
                return False
            if not noted:
                self.progress.note(f"waiting: {why}")
                noted = True
            lock.renew()
            time.sleep(BACKLOG_POLL_S)


def _wait(client: redis.Redis, report: BatchReport, timeout_s: float,
          progress: Progress) -> None:
    """Poll the result keys of every accepted line until all are stored or time is up."""
    pending = {o.task_id: o for o in report.outcomes if o.outcome in ("sent", "skipped")}
    for o in report.outcomes:
        if o.task_id not in pending:
            o.state = "unfinished"
            o.where = "unsent"
    progress.start("waiting for results", len(pending))
    deadline = time.monotonic() + timeout_s
    while pending:
        ids = list(pending)
        for start in range(0, len(ids), 5000):
            part = ids[start:start + 5000]
            metas = client.mget([f"celery-task-meta-{t}" for t in part])
            done = 0
            for task_id, raw in zip(part, metas, strict=True):
                if raw is None:
                    continue
                meta = json.loads(raw)
                state = meta.get("status")
                if state not in ("SUCCESS", "FAILURE", "REVOKED"):
                    continue
                o = pending.pop(task_id)
                o.state = "SUCCESS" if state == "SUCCESS" else "FAILURE"
                if state == "SUCCESS":
                    o.result = meta.get("result")
                else:
                    err = meta.get("result") or {}
                    o.error = {"type": err.get("exc_type", state),
                               "message": _message(err.get("exc_message"))}
                done += 1
            progress.advance(done)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(RESULT_POLL_S)
    if pending:
        _locate(client, list(pending.values()))


def _message(exc_message: Any) -> str:
    if isinstance(exc_message, (list, tuple)):
        return str(exc_message[0]) if exc_message else ""
    return str(exc_message)


def _locate(client: redis.Redis, unfinished: list[LineOutcome]) -> None:
    """Say of each unfinished request whether it still waits in its shard queue."""
    by_queue: dict[str, list[LineOutcome]] = {}
    for o in unfinished:
        o.state = "unfinished"
        by_queue.setdefault(o.queue, []).append(o)
    for queue, outcomes in by_queue.items():
        waiting = b"\n".join(m for m in client.lrange(queue, 0, -1) if isinstance(m, bytes))
        for o in outcomes:
            o.where = "queued" if o.task_id.encode() in waiting else "taken"

