"""Reliability report: fuzzing and faults against real components (``make chaos``).

Run from the repository root::

    .venv/bin/python -m benchmarks.chaos [--json] [--output BENCHMARKS.md]
        [--fuzz-cases 10000] [--only fuzz,poison,...] [--outage-s 60] [--no-long-outage]

Everything runs against components it starts itself and stops at the end (on an error,
Ctrl-C, SIGTERM or SIGHUP too): a ``redis-server`` on a free loopback port with the
append-only file on (``appendfsync everysec``, as ``ops/redis.conf``), and a
:class:`~gpu_tasks.local.cluster.LocalCluster` of sim GPU workers, one fresh deployment per part.

1. **Fuzzing** (:mod:`benchmarks.fuzz`): at least ``--fuzz-cases`` cases (requests over
   every built-in task's arguments, valid and not, and raw queue bytes), in hypothesis
   examples of a few cases each. Counted: cases, examples, worker deaths, untyped errors,
   hangs; every distinct failure once, with how often and a reproducer. A GPU worker whose
   main process dies is started again (as systemd would); if it dies again at once (the
   message that killed it is put back at the head of its queue when it restarts), the
   GPU's unacknowledged messages are cleared so the run can go on, and the report says so.
2. **Faults**, each while a producer sends counted requests (``chaos.count``: one line per
   execution in a file outside Redis, so executions are counted even where Redis loses
   data) at a steady rate over entities of every GPU, one in ten holding its GPU for
   0.3 s, so that some are always running when the fault hits:

   - ``poison``: malformed messages of every kind pushed onto shard queues and GPU queues;
   - ``worker-kill``: SIGKILL of a GPU worker's whole process group, then started again;
   - ``child-kill``: SIGKILL of a worker's pool child (its parent forks a new one);
   - ``redis-blip``: SIGSTOP of redis-server for 3 s, then SIGCONT;
   - ``redis-crash``: SIGKILL of redis-server, started again on the same data directory;
   - ``redis-outage``: redis-server stopped for ``--outage-s`` (60) seconds
     (``--no-long-outage`` leaves it out).

   For each: requests sent; acknowledged (``apply_async`` returned: Redis took the
   message); executed; completed (a SUCCESS result stored); lost (acknowledged, never
   executed); duplicated (executed more than once); executed although ``apply_async``
   failed (``BrokerUnavailable`` for a hung Redis says the request may still be
   enqueued); failures answered with a typed error; untyped errors (at submit or as the
   answer); worker deaths (main processes that exited and pool children replaced, beyond
   the fault's own); recovery time, from the fault's end to the first request (sent after
   it) answered successfully by every GPU the fault touched.

With ``--output`` it writes the "Reliability" section of that Markdown file (between the
markers ``<!-- reliability:begin -->`` and ``<!-- reliability:end -->``, added at the end
if absent), leaving the rest of the file as it is; ``benchmarks.report`` (``make bench``)
keeps the section when it rewrites the file. A progress line per part goes to stderr.
Figures are reported, not asserted: the exit status is 0 unless the run itself failed
(``--check``: 1 if anything was lost, duplicated, untyped, hung or killed a worker).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gzip
import json
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu_tasks.tasks.declare import gpu_task

RESULT_PREFIX = "celery-task-meta-"
BEGIN = "<!-- reliability:begin -->"
END = "<!-- reliability:end -->"
NODE = "chaos"
SCENARIOS = ("poison", "worker-kill", "child-kill", "redis-blip", "redis-crash",
             "redis-outage")


# -- the counting task (imported by the chaos cluster's workers) ------------------------


@gpu_task(name="chaos.count")
def count(gpu: Any, log: str, token: str, seconds: float = 0.0) -> dict[str, Any]:
    """Hold the GPU ``seconds``, then append ``token`` to the file ``log``: one line per
    execution, outside Redis (which a fault may make lose data)."""
    if seconds:
        time.sleep(seconds)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{token}\n".encode())
    finally:
        os.close(fd)
    return {"token": token}


# -- a deployment ---------------------------------------------------------------------


class Deployment:
    """A redis-server we can stop, kill and restart, and a LocalCluster of sim GPU workers
    with the shared app configured for it."""

    def __init__(self, root: Path, gpus: int, **changes: Any) -> None:
        from gpu_tasks.local.redis_server import RedisServer
        from gpu_tasks.settings import Settings

        self.root = root
        self.redis = RedisServer(root / "redis")
        self.settings = Settings(node=NODE, sim_memory_bytes=128 << 20,
                                 imports=("benchmarks.chaos",), data_dir=str(root / "data"),
                                 max_message_bytes=1 << 20, **changes)
        self.gpus = gpus
        self.cluster: Any = None
        self.restarts: list[str] = []

    def __enter__(self) -> Deployment:
        from gpu_tasks.app import configure
        from gpu_tasks.local.cluster import LocalCluster

        self.redis.start()
        self.settings = self.settings.replace(redis_url=self.redis.url)
        self.cluster = LocalCluster(self.settings, gpus=self.gpus, backend="sim", flower=False,
                                    log_dir=self.root / "logs")
        configure(self.settings)
        try:
            self.cluster.start(timeout_s=120)
        except BaseException:
            self.redis.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        try:
            if self.cluster is not None:
                self.cluster.stop()
        finally:
            self.redis.stop()

    @property
    def queues(self) -> list[str]:
        return list(self.cluster.queues)

    def client(self, timeout_s: float = 2.0) -> Any:
        import redis

        return redis.Redis.from_url(self.redis.url, socket_timeout=timeout_s,
                                    socket_connect_timeout=timeout_s)

    def worker_pid(self, gpu: int) -> int:
        return int(self.cluster.workers[gpu].popen.pid)

    def restart_worker(self, gpu: int, why: str, timeout_s: float = 60.0) -> int:
        """Start GPU ``gpu``'s worker again (its old process group killed first); wait until
        it serves; returns its pid."""
        old = self.cluster.workers[gpu]
        old.signal_group(signal.SIGKILL)
        with contextlib.suppress(Exception):
            old.popen.wait(10)
        old.log_file.close()
        self.cluster.workers[gpu] = self.cluster.start_worker(gpu)
        self.restarts.append(f"{self.queues[gpu]}: {why}")
        with contextlib.suppress(Exception):
            self.cluster.wait_ready(timeout_s)
        return self.worker_pid(gpu)

    def entities(self, per_gpu: int, prefix: str) -> dict[str, list[str]]:
        """``per_gpu`` entity ids whose shards each GPU owns."""
        from benchmarks.fuzz import owners_of
        from gpu_tasks.protocol.routing import shard_index

        shard_count, owners = owners_of(self.client())
        found: dict[str, list[str]] = {q: [] for q in self.queues}
        i = 0
        while any(len(v) < per_gpu for v in found.values()):
            entity = f"{prefix}-{i}"
            i += 1
            owner = owners.get(shard_index(entity, shard_count))
            if owner in found and len(found[owner]) < per_gpu:
                found[owner].append(entity)
        return found


def progress(text: str) -> None:
    print(f"chaos: {text}", file=sys.stderr, flush=True)


# -- fuzzing --------------------------------------------------------------------------


def run_fuzz(root: Path, cases: int, gpus: int, examples_per_round: int = 25
             ) -> dict[str, Any]:
    """At least ``cases`` fuzz cases: about four in five requests, one in five raw."""
    from hypothesis import given
    from hypothesis import settings as hsettings
    from hypothesis import strategies as st

    from benchmarks import fuzz

    with Deployment(root / "fuzz", gpus) as dep:
        client = dep.client(timeout_s=30.0)
        shard_count, owners = fuzz.owners_of(client)
        last = [time.monotonic()]
        crash_loops: list[str] = []

        def restart(i: int) -> int:
            pid = dep.restart_worker(i, "its main process died during fuzzing")
            time.sleep(3.0)
            from benchmarks.fuzz import alive

            if not alive(pid):  # something that killed it is still there: clear the GPU
                from gpu_tasks.control.unacked import unacked_keys
                from gpu_tasks.protocol.routing import shard_name

                keys = unacked_keys(dep.queues[i])
                mine = [shard_name(s) for s, owner in owners.items() if owner == dep.queues[i]]
                queued = sum(int(client.llen(q)) for q in [*mine, dep.queues[i]])
                held = client.hlen(keys["unacked_key"])
                client.delete(keys["unacked_key"], keys["unacked_index_key"], dep.queues[i],
                              *mine)
                crash_loops.append(f"{dep.queues[i]}: died again within 3 s of its restart; "
                                   f"its {held} unacknowledged and {queued} queued messages "
                                   "were cleared")
                pid = dep.restart_worker(i, "crash loop: restarted after clearing its queues "
                                            "and unacknowledged messages")
            return pid

        def report(t: fuzz.Tally) -> None:
            if time.monotonic() - last[0] > 15:
                last[0] = time.monotonic()
                progress(f"fuzz: {t.cases} cases ({t.examples} examples) in {t.seconds:.0f} s: "
                         f"{t.untyped} untyped, {t.hangs} hangs, {t.worker_deaths} worker "
                         "deaths")

        fuzzer = fuzz.Fuzzer(client, [fuzz.Worker(q, dep.worker_pid(i))
                                      for i, q in enumerate(dep.queues)],
                             shard_count, owners, restart=restart, progress=report)
        profile = hsettings(hsettings.get_profile("chaos"), max_examples=examples_per_round)

        @profile
        @given(fuzz.request_batches())
        def requests(batch: tuple[int, list[fuzz.Request]]) -> None:
            fuzzer.run_batch(*batch)

        @profile
        @given(st.lists(fuzz.raw_cases(), min_size=1, max_size=4), st.integers(0, gpus - 1))
        def raw(drawn: list[Any], gpu: int) -> None:
            fuzzer.run_raw(drawn, gpu)

        tally = fuzzer.tally
        while tally.cases < cases:
            if tally.requests <= 4 * tally.raw_messages:
                requests()
            else:
                raw()
        summary = tally.summary()
        summary["crash_loops"] = crash_loops
        summary["restarts"] = dep.restarts
        summary["gpus"] = gpus
        progress(f"fuzz: done, {tally.cases} cases ({tally.requests} requests, "
                 f"{tally.raw_messages} raw messages) in {tally.examples} examples, "
                 f"{tally.seconds:.0f} s: {tally.untyped} untyped errors, {tally.hangs} hangs, "
                 f"{tally.worker_deaths} worker deaths")
        return summary


# -- fault scenarios ------------------------------------------------------------------


@dataclass
class Sent:
    token: str
    gpu: str
    sent_at: float
    long: bool
    task_id: str | None = None
    acked: bool = False
    error: str | None = None
    typed: bool = True


@dataclass
class Producer:
    """Sends ``chaos.count`` requests at ``rate_per_s`` over the given entities until
    stopped, from its own thread; records each one."""

    entities: dict[str, list[str]]
    log: str
    rate_per_s: float = 25.0
    sent: list[Sent] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Producer:
        self._thread = threading.Thread(target=self._loop, name="chaos-producer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _loop(self) -> None:
        pairs = [(gpu, e) for gpu, es in self.entities.items() for e in es]
        n = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            gpu, entity = pairs[n % len(pairs)]
            self.sent.append(self.send(gpu, entity, long=n % 10 == 9))
            n += 1
            next_at += 1.0 / self.rate_per_s
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = time.monotonic()

    def send(self, gpu: str, entity: str, long: bool = False) -> Sent:
        from gpu_tasks.app import app
        from gpu_tasks.errors import GpuTasksError

        item = Sent(uuid.uuid4().hex, gpu, time.monotonic(), long)
        try:
            result = app.send_task("chaos.count", kwargs={
                "entity_id": entity, "log": self.log, "token": item.token,
                "seconds": 0.3 if long else 0.0})
            item.task_id, item.acked = result.id, True
        except Exception as exc:
            item.error = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"[:300]
            item.typed = isinstance(exc, GpuTasksError)
        return item


class WorkerWatch:
    """Samples every GPU worker's main process and pool child every 0.1 s: which ended.
    A main process that dies is started again after 5 s (``RestartSec=5`` of the systemd
    unit), and counted."""

    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        self.main_deaths: list[str] = []
        self.child_ends: list[str] = []
        self.expected_main: set[int] = set()
        self.expected_child: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="chaos-watch", daemon=True)

    def start(self) -> WorkerWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def _loop(self) -> None:
        from benchmarks.fuzz import alive, children_of

        children = {i: children_of(self.dep.worker_pid(i)) for i in range(self.dep.gpus)}
        while not self._stop.wait(0.1):
            for i in range(self.dep.gpus):
                pid = self.dep.worker_pid(i)
                if not alive(pid):
                    if pid in self.expected_main:
                        continue  # the fault's own; the scenario starts it again
                    self.main_deaths.append(f"{self.dep.queues[i]}: main process {pid} exited")
                    if self._stop.wait(5.0):
                        return
                    self.dep.restart_worker(i, "its main process died (restarted after 5 s)")
                    children[i] = children_of(self.dep.worker_pid(i))
                    continue
                now = children_of(pid)
                for gone in children.get(i, set()) - now:
                    if gone not in self.expected_child:
                        self.child_ends.append(f"{self.dep.queues[i]}: pool child {gone} ended")
                children[i] = now


@dataclass
class Outcome:
    """What one scenario measured."""

    name: str
    fault: str
    sent: int = 0
    acknowledged: int = 0
    executed: int = 0
    completed: int = 0
    lost: int = 0
    duplicated: int = 0
    still_queued: int = 0
    """Acknowledged, not executed, but still in a queue or held by a worker at the end (its
    GPU never came back): not lost, not served either."""
    executed_unacknowledged: int = 0
    unacknowledged: int = 0
    failed_typed: int = 0
    untyped_errors: int = 0
    untyped_examples: list[str] = field(default_factory=list)
    typed_errors: dict[str, int] = field(default_factory=dict)
    worker_deaths: int = 0
    worker_death_details: list[str] = field(default_factory=list)
    fault_worker_deaths: int = 0
    recovery_s: float | None = None
    unfinished: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def probe(producer: Producer, gpus: Sequence[str], since: float, timeout_s: float
          ) -> float | None:
    """Seconds from ``since`` until a request sent after it was answered successfully by
    every GPU in ``gpus`` (None if not within ``timeout_s``)."""
    from gpu_tasks.app import app

    done: dict[str, float] = {}
    deadline = since + timeout_s
    while len(done) < len(gpus) and time.monotonic() < deadline:
        for gpu in gpus:
            if gpu in done:
                continue
            item = producer.send(gpu, producer.entities[gpu][0])
            producer.sent.append(item)
            if not item.acked:
                time.sleep(0.1)
                continue
            try:
                app.AsyncResult(item.task_id).get(
                    timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                done[gpu] = time.monotonic()
            except Exception:
                time.sleep(0.1)
    return round(max(done.values()) - since, 2) if len(done) == len(gpus) else None


def executions(log: Path) -> Counter[str]:
    try:
        return Counter(log.read_text().split())
    except OSError:
        return Counter()


def settle(dep: Deployment, producer: Producer, log: Path, timeout_s: float) -> None:
    """Until every acknowledged request has run (or ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ran = executions(log)
        if all(s.token in ran for s in producer.sent if s.acked):
            time.sleep(1.0)  # a redelivery that would duplicate one comes soon after
            return
        time.sleep(0.5)


def tally(outcome: Outcome, dep: Deployment, producer: Producer, log: Path,
          watch: WorkerWatch) -> Outcome:
    ran = executions(log)
    sent = producer.sent
    outcome.sent = len(sent)
    outcome.acknowledged = sum(s.acked for s in sent)
    outcome.unacknowledged = outcome.sent - outcome.acknowledged
    outcome.executed = sum(1 for s in sent if ran[s.token])
    waiting = [s for s in sent if s.acked and not ran[s.token]]
    queued = still_queued(dep, [s.task_id for s in waiting if s.task_id])
    outcome.still_queued = sum(1 for s in waiting if s.task_id in queued)
    outcome.lost = len(waiting) - outcome.still_queued
    outcome.duplicated = sum(1 for s in sent if ran[s.token] > 1)
    outcome.executed_unacknowledged = sum(1 for s in sent if not s.acked and ran[s.token])
    typed: Counter[str] = Counter()
    for s in sent:
        if s.error is not None:
            if s.typed:
                typed[s.error.split(":")[0].rsplit(".", 1)[-1] + " (at submit)"] += 1
            else:
                outcome.untyped_errors += 1
                outcome.untyped_examples.append(f"at submit: {s.error}")
    client = dep.client(timeout_s=10.0)
    ids = [s.task_id for s in sent if s.task_id]
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        for raw in client.mget([RESULT_PREFIX + t for t in chunk]):
            if raw is None:
                outcome.unfinished += 1
                continue
            meta = json.loads(raw)
            if meta.get("status") == "SUCCESS":
                outcome.completed += 1
                continue
            result = meta.get("result") if isinstance(meta.get("result"), dict) else {}
            module, name = result.get("exc_module"), result.get("exc_type")
            if meta.get("status") == "FAILURE" and module == "gpu_tasks.errors":
                outcome.failed_typed += 1
                typed[str(name)] += 1
            else:
                outcome.untyped_errors += 1
                if len(outcome.untyped_examples) < 5:
                    outcome.untyped_examples.append(
                        f"answer: {meta.get('status')} {module}.{name}: "
                        f"{str(result.get('exc_message'))[:200]}")
    outcome.typed_errors = dict(typed)
    outcome.worker_deaths = len(watch.main_deaths) + len(watch.child_ends)
    outcome.worker_death_details = watch.main_deaths + watch.child_ends
    if dep.restarts:
        outcome.notes += [f"restarted {r}" for r in dep.restarts]
    lost = [s for s in waiting if s.task_id not in queued]
    if lost:
        outcome.notes.append(f"lost, e.g. token {lost[0].token} on {lost[0].gpu}")
    return outcome


def still_queued(dep: Deployment, task_ids: Sequence[str]) -> set[str]:
    """Which of ``task_ids`` are in a queue or held unacknowledged by a GPU's worker."""
    if not task_ids:
        return set()
    client = dep.client(timeout_s=30.0)
    found: set[str] = set()
    needles = {t.encode(): t for t in task_ids}
    blobs: list[bytes] = []
    for key in client.scan_iter(match="shard-*", count=1000):
        blobs += client.lrange(key, 0, -1)
    for queue in dep.queues:
        blobs += client.lrange(queue, 0, -1)
        blobs += client.hvals(f"gpu-tasks:unacked:{queue}")
    for blob in blobs:
        for needle, task_id in needles.items():
            if needle in blob:
                found.add(task_id)
    return found


@contextlib.contextmanager
def scenario(root: Path, name: str, fault: str, gpus: int, **changes: Any
             ) -> Iterator[tuple[Deployment, Producer, WorkerWatch, Outcome]]:
    """A fresh deployment with a producer and a watch running; afterwards every
    acknowledged request gets time to run, then everything is counted."""
    started = time.monotonic()
    progress(f"{name}: starting ({fault})")
    with Deployment(root / name, gpus, **changes) as dep:
        log = root / name / "executions.log"
        producer = Producer(dep.entities(4, name), str(log))
        watch = WorkerWatch(dep).start()
        outcome = Outcome(name, fault)
        producer.start()
        try:
            time.sleep(3.0)  # steady traffic before the fault
            yield dep, producer, watch, outcome
            time.sleep(5.0)  # and after it
        finally:
            producer.stop()
        settle(dep, producer, log, timeout_s=45.0)
        watch.stop()
        tally(outcome, dep, producer, log, watch)
    outcome.seconds = round(time.monotonic() - started, 1)
    progress(f"{name}: sent {outcome.sent}, acknowledged {outcome.acknowledged}, completed "
             f"{outcome.completed}, lost {outcome.lost}, duplicated {outcome.duplicated}, "
             f"worker deaths {outcome.worker_deaths}, untyped {outcome.untyped_errors}, "
             f"recovery {outcome.recovery_s} s")


def poison_messages(queue: str, entity: str) -> list[tuple[str, bytes]]:
    """``(kind, raw bytes)``: the malformed messages
    ``tests/integration/workers/consumer/test_poison.py`` checks one by one, and what fuzzing
    found, for ``queue`` (``entity``'s shard queue, or a GPU's)."""
    task_id = str(uuid.uuid4())

    def envelope(**changes: Any) -> bytes:
        body = [[], {"entity_id": entity, "name": "p", "shape": [1]},
                {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
        payload: dict[str, Any] = {
            "body": base64.b64encode(json.dumps(body).encode()).decode(),
            "content-encoding": "utf-8", "content-type": "application/json",
            "headers": {"lang": "py", "task": "gpu_tasks.alloc", "id": str(uuid.uuid4()),
                        "eta": None, "expires": None, "retries": 0,
                        "timelimit": [None, None], "root_id": task_id, "parent_id": None},
            "properties": {"correlation_id": task_id, "delivery_mode": 2, "priority": 0,
                           "delivery_info": {"exchange": "", "routing_key": queue},
                           "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
        }
        for path, value in changes.items():
            target = payload
            *parents, last = path.split("__")
            for p in parents:
                target = target[p]
            target[last] = value
        return json.dumps(payload).encode()

    deep: Any = 0
    for _ in range(600):
        deep = [deep]
    return [
        ("garbage", b"garbage \xff\x00"),
        ("empty", b""),
        ("JSON, not an envelope", b"[1, 2, 3]"),
        ("truncated envelope", envelope()[:100]),
        ("body not base64", envelope(body="!!!")),
        ("unknown task", envelope(headers__task="gpu_tasks.nope")),
        ("pickle", envelope(body=base64.b64encode(pickle.dumps({"x": 1})).decode(),
                            **{"content-type": "application/x-python-serialize"})),
        ("gzip body", envelope(body=base64.b64encode(gzip.compress(b"x" * 10_000)).decode(),
                               headers__compression="application/x-gzip")),
        ("nesting bomb", envelope(body=base64.b64encode(json.dumps(
            [[], {"entity_id": entity, "x": deep}, {}]).encode()).decode())),
        ("over the size limit", b"x" * ((1 << 20) + 1)),
        ("bad timelimit", envelope(headers__timelimit="soon")),
        ("bad eta type", envelope(headers__eta=[1, 2])),
        ("empty eta (found by fuzzing)", envelope(headers__eta="")),
    ]


def run_poison(root: Path, gpus: int) -> Outcome:
    with scenario(root, "poison", "malformed messages on shard and GPU queues",
                  gpus) as (dep, producer, _watch, outcome):
        client = dep.client()
        pushed = 0
        kinds: list[str] = []
        for gpu in dep.queues:
            entity = producer.entities[gpu][1]
            from gpu_tasks.protocol.routing import shard_index, shard_name

            shard = shard_name(shard_index(entity, dep.settings.shard_count))
            for queue in (shard, gpu):
                for kind, raw in poison_messages(queue, entity):
                    client.lpush(queue, raw)
                    pushed += 1
                    if kind not in kinds:
                        kinds.append(kind)
        end = time.monotonic()
        outcome.recovery_s = probe(producer, dep.queues, end, 60.0)
        outcome.notes.append(f"{pushed} poison messages pushed ({', '.join(kinds)})")
        time.sleep(2.0)
        from gpu_tasks.keys import DLQ_KEY

        outcome.notes.append(f"{client.xlen(DLQ_KEY)} dead letters")
    return outcome


def run_worker_kill(root: Path, gpus: int) -> Outcome:
    with scenario(root, "worker-kill", "SIGKILL of GPU 0's worker (main process and pool "
                  "child), started again at once", gpus) as (dep, producer, watch, outcome):
        pid = dep.worker_pid(0)
        watch.expected_main.add(pid)
        from benchmarks.fuzz import children_of

        watch.expected_child.update(children_of(pid))
        dep.cluster.workers[0].signal_group(signal.SIGKILL)
        dep.cluster.workers[0].popen.wait(10)
        outcome.fault_worker_deaths = 1
        dep.restarts.clear()
        end = time.monotonic()
        dep.cluster.workers[0].log_file.close()
        dep.cluster.workers[0] = dep.cluster.start_worker(0)
        outcome.recovery_s = probe(producer, [dep.queues[0]], end, 120.0)
        outcome.notes.append("recovery includes the new worker's start")
    return outcome


def run_child_kill(root: Path, gpus: int) -> Outcome:
    from benchmarks.fuzz import children_of

    with scenario(root, "child-kill", "SIGKILL of GPU 0's pool child", gpus) as (
            dep, producer, watch, outcome):
        children = children_of(dep.worker_pid(0))
        watch.expected_child.update(children)
        for child in children:
            os.kill(child, signal.SIGKILL)
        outcome.fault_worker_deaths = len(children)
        end = time.monotonic()
        outcome.recovery_s = probe(producer, [dep.queues[0]], end, 120.0)
    return outcome


def run_redis_blip(root: Path, gpus: int, stop_s: float = 3.0) -> Outcome:
    with scenario(root, "redis-blip", f"SIGSTOP of redis-server for {stop_s:g} s, then "
                  "SIGCONT", gpus) as (dep, producer, _watch, outcome):
        process = dep.redis.process
        assert process is not None
        os.kill(process.pid, signal.SIGSTOP)
        try:
            time.sleep(stop_s)
        finally:
            os.kill(process.pid, signal.SIGCONT)
        end = time.monotonic()
        outcome.recovery_s = probe(producer, dep.queues, end, 120.0)
    return outcome


def run_redis_crash(root: Path, gpus: int) -> Outcome:
    with scenario(root, "redis-crash", "SIGKILL of redis-server, started again on the same "
                  "data directory (append-only file, fsync every second)", gpus) as (
            dep, producer, _watch, outcome):
        process = dep.redis.process
        assert process is not None
        process.kill()
        process.wait(10)
        dep.redis.start(timeout_s=60)
        end = time.monotonic()
        outcome.recovery_s = probe(producer, dep.queues, end, 180.0)
    return outcome


def run_redis_outage(root: Path, gpus: int, outage_s: float) -> Outcome:
    with scenario(root, "redis-outage", f"redis-server stopped (SIGTERM) for {outage_s:g} s, "
                  "then started on the same data directory", gpus) as (
            dep, producer, _watch, outcome):
        dep.redis.stop()
        time.sleep(outage_s)
        dep.redis.start(timeout_s=60)
        end = time.monotonic()
        outcome.recovery_s = probe(producer, dep.queues, end, 180.0)
    return outcome


# -- report ---------------------------------------------------------------------------


def _cell(value: Any) -> str:
    return "n/a" if value is None else str(value)


def markdown(result: dict[str, Any]) -> str:
    """The "Reliability" section, markers included."""
    lines = [BEGIN, "## Reliability (`benchmarks/chaos.py`)", "",
             f"Written by `make chaos` (`{result['command']}`) on {result['date']}, on "
             f"{result['machine']['cpus']} cores ({result['machine']['cpu_model']}); "
             "redis-server " + _cell(result["versions"].get("redis_server")) + ", Celery "
             f"{result['versions']['celery']}, kombu {result['versions']['kombu']}. "
             "Every part starts its own redis-server (append-only file, fsync every second) "
             f"and {result['gpus']} sim GPU workers (`LocalCluster`); how each figure is "
             "counted: the module docstring.", ""]
    fz = result.get("fuzz")
    if fz:
        outcomes = fz["outcomes"]
        lines += [
            "### Fuzzing (`benchmarks/fuzz.py`)", "",
            f"{fz['cases']:,} cases in {fz['examples']:,} hypothesis examples "
            f"({fz['seconds']:.0f} s): {fz['requests']:,} requests over every built-in task's "
            f"arguments (sent with `apply_async` or `send_task`) and {fz['raw_messages']:,} raw "
            "messages `LPUSH`-ed onto shard and GPU queues, each followed by a good request.",
            "",
            "| figure | value | target |",
            "|---|---|---|",
            f"| cases | {fz['cases']:,} | ≥ 10,000 |",
            f"| requests answered with a result | {outcomes.get('ok', 0):,} | |",
            f"| requests answered with a `gpu_tasks.errors` class | {outcomes.get('typed', 0):,} "
            "| |",
            f"| raw messages dead-lettered / answered | {outcomes.get('dead-lettered', 0):,} / "
            f"{outcomes.get('answered', 0):,} | |",
            f"| untyped errors (at submit, as the answer, or wrapped by the worker as "
            f"\"failed inside the GPU worker\") | {fz['untyped_errors']:,} | 0 |",
            f"| hangs (no answer in time; raw messages held, still queued or vanished) | "
            f"{fz['hangs']:,} | 0 |",
            f"| worker deaths (main processes and pool children) | {fz['worker_deaths']:,} | 0 |",
            f"| good requests after raw messages that failed | {fz['follow_up_failures']:,} | 0 |",
            "",
            "Typed errors: " + (", ".join(f"{k} {v:,}" for k, v in fz["typed_errors"].items())
                                or "none") + ".",
            "",
        ]
        for note in fz.get("crash_loops", []):
            lines.append(f"- crash loop: {note}")
        if fz["failures"]:
            lines += ["Distinct failures, most frequent first (each with the shortest "
                      "reproducer seen):", ""]
            for f in fz["failures"]:
                repro = f["reproducer"]
                if len(repro) > 700:
                    repro = repro[:700] + " ..."
                lines += [f"- **{f['kind']}** x{f['count']}: `{f['error'][:300]}`", "",
                          "  ```python", *("  " + r for r in repro.splitlines()), "  ```", ""]
        else:
            lines += ["No failure.", ""]
    scenarios = result.get("scenarios", {})
    if scenarios:
        lines += [
            "### Faults", "",
            "A producer sends counted requests (`chaos.count`, one line per execution in a "
            "file outside Redis) at a steady rate over entities of every GPU throughout; "
            "lost = acknowledged by Redis (`apply_async` returned) and never executed; "
            "recovery = from the fault's end to the first request sent after it answered "
            "successfully on every GPU it touched.", "",
            "| fault | sent | acknowledged | completed | lost | still queued at the end | "
            "duplicated | executed though `apply_async` failed | worker deaths (beyond the "
            "fault's own) | untyped errors | recovery |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in scenarios.values():
            recovery = "n/a" if s["recovery_s"] is None else f"{s['recovery_s']:.2f} s"
            lines.append(
                f"| {s['name']}: {s['fault']} | {s['sent']} | {s['acknowledged']} | "
                f"{s['completed']} | {s['lost']} | {s['still_queued']} | {s['duplicated']} | "
                f"{s['executed_unacknowledged']} | {s['worker_deaths']} | "
                f"{s['untyped_errors']} | {recovery} |")
        lines.append("")
        for s in scenarios.values():
            details = []
            if s["typed_errors"]:
                details.append("typed errors: " + ", ".join(
                    f"{k} {v}" for k, v in s["typed_errors"].items()))
            if s["unfinished"]:
                details.append(f"{s['unfinished']} acknowledged requests had no result "
                               "stored at the end")
            details += s["worker_death_details"][:5] + s["untyped_examples"][:3] + s["notes"]
            if details:
                lines.append(f"- {s['name']}: " + "; ".join(details) + ".")
        lines.append("")
    for part, error in result.get("errors", {}).items():
        lines += [f"- {part} could not measure:", "", "  ```", *("  " + x for x in
                                                          error.strip().splitlines()[-6:]),
                  "  ```", ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Put ``section`` in place of the file's reliability section, or at its end."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        before, rest = text.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        text = before + section.rstrip("\n") + after
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    path.write_text(text)


def section_of(text: str) -> str | None:
    """The reliability section of a Markdown text (markers included), if it has one."""
    if BEGIN not in text or END not in text:
        return None
    return BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END + "\n"


# -- main -----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.common import command_line, machine, now_utc, versions

    parts = args.only or ["fuzz", *SCENARIOS]
    if args.no_long_outage and "redis-outage" in parts:
        parts = [p for p in parts if p != "redis-outage"]
    result: dict[str, Any] = {"date": now_utc(), "machine": machine(), "gpus": args.gpus,
                              "command": command_line("benchmarks.chaos", sys.argv[1:]),
                              "scenarios": {}}
    runners: dict[str, Callable[[Path, int], Outcome]] = {
        "poison": run_poison, "worker-kill": run_worker_kill, "child-kill": run_child_kill,
        "redis-blip": run_redis_blip, "redis-crash": run_redis_crash,
        "redis-outage": lambda root, gpus: run_redis_outage(root, gpus, args.outage_s),
    }
    with tempfile.TemporaryDirectory(prefix="gpu-tasks-chaos-") as tmp:
        root = Path(tmp)
        from gpu_tasks.local.redis_server import RedisServer

        with RedisServer(root / "version") as server:
            import redis

            result["versions"] = versions(redis.Redis.from_url(server.url))
        for part in parts:
            try:
                if part == "fuzz":
                    result["fuzz"] = run_fuzz(root, args.fuzz_cases, args.gpus)
                else:
                    result["scenarios"][part] = runners[part](root, args.gpus).__dict__
            except Exception as exc:  # one part that could not measure; the others go on
                import traceback

                progress(f"{part}: could not measure: {exc!r}")
                result.setdefault("errors", {})[part] = traceback.format_exc()[-2000:]
    return result


def passed(result: dict[str, Any]) -> bool:
    fz = result.get("fuzz") or {}
    bad: int = fz.get("untyped_errors", 0) + fz.get("hangs", 0) + fz.get("worker_deaths", 0)
    for s in result["scenarios"].values():
        bad += s["lost"] + s["duplicated"] + s["untyped_errors"] + s["worker_deaths"]
    return not bad and not result.get("errors")


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.common import REPO_ROOT, install_signal_handlers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON "
                        "object")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if anything was lost, duplicated, untyped, hung or "
                             "killed a worker")
    parser.add_argument("--output", help="Markdown file whose Reliability section to write")
    parser.add_argument("--fuzz-cases", type=int, default=10_000,
                        help="fuzz at least this many cases (default 10000)")
    parser.add_argument("--gpus", type=int, default=2, help="sim GPU workers per deployment")
    parser.add_argument("--only", action="append", choices=("fuzz", *SCENARIOS),
                        help="run only this part (repeatable)")
    parser.add_argument("--outage-s", type=float, default=60.0,
                        help="how long redis-outage keeps Redis down (default 60)")
    parser.add_argument("--no-long-outage", action="store_true",
                        help="leave out redis-outage")
    args = parser.parse_args(argv)
    install_signal_handlers()
    try:
        result = run(args)
    except KeyboardInterrupt:
        progress("interrupted; everything this run started was stopped")
        return 130
    if args.output:
        output = Path(args.output)
        if not output.is_absolute():
            output = REPO_ROOT / output
        write_section(output, markdown(result))
        progress(f"wrote the Reliability section of {output}")
    if args.json:
        print(json.dumps(result))
    else:
        print(markdown(result))
    if result.get("errors"):
        return 2
    return 1 if args.check and not passed(result) else 0


if __name__ == "__main__":
    sys.exit(main())
