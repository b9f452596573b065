"""Drain rate: a GPU worker (sim backend, trivial task) against plain Celery workers.

Run from the repository root::

    .venv/bin/python -m benchmarks.drain [--json]

It starts its own ``redis-server`` on a free loopback port, creates a shard map over
one GPU queue ``gpu.bench.0``, and starts three workers, each in its own process group:

- GPU worker, as an operator starts it: ``python -m gpu_tasks.cli worker --gpu 0
  --backend sim --import benchmarks.trivial_tasks`` with ``GPU_TASKS_REDIS_URL`` and
  ``GPU_TASKS_NODE=bench`` (so: our Celery settings, signal handlers and runtime);
- plain worker: ``python -m celery -A benchmarks.trivial_tasks:plain_app worker -P
  prefork -c 1 -Q plain --without-gossip --without-mingle``, Celery's defaults otherwise
  (prefetch 4, early ack);
- plain worker with the same guarantees: the same command with ``plain_late_app`` and
  ``-Q plain_late``: ``task_acks_late``, ``task_reject_on_worker_lost`` and
  ``worker_prefetch_multiplier=1`` as every GPU worker has (DESIGN.md), Celery's
  defaults otherwise.

All run throughout (those not being measured sit idle). Once all answer a ``ping``
(and the GPU is alive in the fleet registry), each round, for each worker in an order
that rotates between rounds: enqueue N trivial tasks as fast as one process can, and
time from the first enqueue until every task's result is stored with a final state.
Rate = N / that time. Two ratios are taken per round: GPU / plain (Celery defaults),
whose median over rounds is compared with the target (>= 0.9), and GPU / plain with
the same guarantees, which leaves out what the delivery guarantees cost and so shows
what gpu-tasks' own machinery costs (reported, no target).

The publisher does not subscribe to each task's result channel (Celery's producer
would, for ``AsyncResult.get``): it subscribes to the last task's channel only, and
checks every result's state once that one is final.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.progress import Progress

from gpu_tasks.cluster import Process, spawn

TARGET_RATIO = 0.9
NODE = "bench"
GPU_QUEUE = f"gpu.{NODE}.0"
GPU_WORKER = f"gpu0@{NODE}"
PLAIN_WORKER = f"plain@{NODE}"
PLAIN_LATE_WORKER = f"plain_late@{NODE}"
WORKERS = ("gpu", "plain", "plain_late")
READY_STATES = {"SUCCESS", "FAILURE", "REVOKED"}
REPO_ROOT = Path(__file__).resolve().parent.parent

console = Console(stderr=True)


class BenchmarkError(RuntimeError):
    pass


def check_alive(child: Process) -> None:
    if not child.alive():
        raise BenchmarkError(
            f"{child.name} worker exited with {child.popen.returncode}:\n{child.log_tail()}"
        )


def stop_all(children: Sequence[Process], timeout_s: float = 10.0) -> None:
    """SIGTERM every group at once (warm shutdown), wait up to ``timeout_s`` in all, then
    SIGKILL whatever is left of each group (pool children the leader left), even if
    interrupted meanwhile."""
    try:
        for child in children:
            child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(max(0.0, deadline - time.monotonic()))
    finally:
        for child in children:
            child.signal_group(signal.SIGKILL)
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(5.0)
            child.log_file.close()


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def group_cpu_s(pgid: int) -> float | None:
    """utime + stime of every process in process group ``pgid``, from /proc."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    ticks = 0
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited meanwhile
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[2]) == pgid:  # fields: state ppid pgrp ...; utime, stime at 11, 12
            ticks += int(fields[11]) + int(fields[12])
    return ticks / _CLOCK_TICKS


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops everything


# -- one measured drain -----------------------------------------------------------------


@dataclass
class Target:
    """How to send one trivial task to one worker, and where its result lands."""

    name: str
    app: Any
    send: Callable[[str, int], None]
    child: Process

    def result_key(self, task_id: str) -> str:
        key = self.app.backend.get_key_for_task(task_id)
        return key.decode() if isinstance(key, bytes) else str(key)


@contextlib.contextmanager
def no_result_subscription(*apps: Any) -> Iterator[None]:
    """Keep the publisher from subscribing to every task's result channel (see module doc)."""
    backends = [app.backend for app in apps]
    for backend in backends:
        backend.on_task_call = lambda *_a, **_k: None
    try:
        yield
    finally:
        for backend in backends:
            with contextlib.suppress(AttributeError):
                del backend.on_task_call


def _states(client: Any, keys: Sequence[str]) -> list[str | None]:
    states: list[str | None] = []
    for raw in client.mget(keys):
        states.append(None if raw is None else json.loads(raw).get("status"))
    return states


def drain(target: Target, client: Any, count: int, timeout_s: float) -> dict[str, Any]:
    """Enqueue ``count`` tasks, wait until all have a final state; timings and counts."""
    task_ids = [str(uuid.uuid4()) for _ in range(count)]
    keys = [target.result_key(t) for t in task_ids]
    pubsub = client.pubsub()
    pubsub.subscribe(keys[-1])
    deadline = time.monotonic() + timeout_s
    confirmed = None  # the subscription must be live before anything is sent
    while confirmed is None or confirmed["type"] != "subscribe":
        if time.monotonic() > deadline:
            raise BenchmarkError("Redis did not confirm the result-channel subscription")
        confirmed = pubsub.get_message(timeout=1.0)

    cpu0 = group_cpu_s(target.child.popen.pid)
    own_cpu0 = time.process_time()
    t0 = time.perf_counter()
    for i, task_id in enumerate(task_ids):
        target.send(task_id, i)
    enqueued_s = time.perf_counter() - t0

    last_state = None
    while last_state not in READY_STATES:
        message = pubsub.get_message(timeout=0.5)
        if message is not None and message["type"] == "message":
            last_state = json.loads(message["data"]).get("status")
        elif time.monotonic() > deadline:
            check_alive(target.child)
            raise BenchmarkError(f"{target.name}: last task not done after {timeout_s}s")
        elif message is None:
            check_alive(target.child)
    pending = [k for k, s in zip(keys, _states(client, keys), strict=True) if s not in READY_STATES]
    while pending:  # only if tasks finished out of order
        if time.monotonic() > deadline:
            raise BenchmarkError(f"{target.name}: {len(pending)} tasks not done in {timeout_s}s")
        time.sleep(0.001)
        pending = [
            k
            for k, s in zip(pending, _states(client, pending), strict=True)
            if s not in READY_STATES
        ]
    total_s = time.perf_counter() - t0
    own_cpu_s = time.process_time() - own_cpu0
    cpu1 = group_cpu_s(target.child.popen.pid)
    pubsub.close()

    states = _states(client, keys)
    succeeded = sum(1 for s in states if s == "SUCCESS")
    if succeeded != count:
        bad = next(raw for raw in client.mget(keys) if json.loads(raw)["status"] != "SUCCESS")
        raise BenchmarkError(
            f"{target.name}: {count - succeeded} of {count} tasks did not succeed, e.g. {bad!r}"
        )
    client.delete(*keys)
    return {
        "tasks": count,
        "enqueue_s": round(enqueued_s, 4),
        "total_s": round(total_s, 4),
        "tasks_per_s": round(count / total_s, 1),
        # CPU per task is steadier than wall time on a busy machine: it shows where cost is.
        "worker_cpu_us_per_task": (
            None if cpu0 is None or cpu1 is None else round((cpu1 - cpu0) / count * 1e6)
        ),
        "publisher_cpu_us_per_task": round(own_cpu_s / count * 1e6),
    }


# -- setup ------------------------------------------------------------------------------


def wait_ready(
    children: Sequence[Process],
    gpu_child: Process,
    workers: Sequence[tuple[Any, str]],
    client: Any,
    timeout_s: float,
) -> None:
    """Until the GPU is alive in the fleet registry and every ``(app, worker name)``
    answers a ping."""
    from gpu_tasks.fleet import FleetRegistry

    fleet = FleetRegistry(client)
    deadline = time.monotonic() + timeout_s
    pending = {"fleet", *(worker for _app, worker in workers)}
    while pending:
        for child in children:
            check_alive(child)
        if "fleet" in pending:
            record = fleet.get(GPU_QUEUE)
            if record is not None and record.alive() and record.started_at >= gpu_child.started_at:
                pending.discard("fleet")
        for app, worker in workers:
            if worker in pending and app.control.ping(destination=[worker], timeout=0.5):
                pending.discard(worker)
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {c.name}:\n{c.log_tail(1500)}" for c in children)
            raise BenchmarkError(f"not ready after {timeout_s}s: {sorted(pending)}\n{tails}")
        if pending:
            time.sleep(0.1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import redis

    from gpu_tasks.redis_server import RedisServer
    from gpu_tasks.settings import Settings
    from gpu_tasks.shardmap import ShardMap, ShardMapStore

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    children: list[Process] = []
    server: RedisServer | None = None
    with tempfile.TemporaryDirectory(prefix="gpu-tasks-bench-drain-") as tmp:
        try:
            server = RedisServer(Path(tmp) / "redis").start()
            client = redis.Redis.from_url(server.url)
            settings = Settings(redis_url=server.url, node=NODE, backend="sim")
            ShardMapStore(client).create(ShardMap.balanced([GPU_QUEUE], settings.shard_count))

            from gpu_tasks import app as app_module
            from gpu_tasks import settings as settings_module

            settings_module.use(settings)
            app_module.configure(settings)
            from benchmarks import trivial_tasks

            gpu_app = app_module.app
            plain_app = trivial_tasks.plain_app
            plain_late_app = trivial_tasks.plain_late_app
            for app in (plain_app, plain_late_app):
                app.conf.update(broker_url=server.url, result_backend=server.url)

            env = settings.child_env()
            log_dir = Path(tmp)
            gpu_argv = [
                sys.executable,
                "-m",
                "gpu_tasks.cli",
                "worker",
                "--gpu",
                "0",
                "--backend",
                "sim",
                "--import",
                "benchmarks.trivial_tasks",
            ]

            def plain_argv(app_name: str, queue: str, worker: str) -> list[str]:
                argv = [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    f"benchmarks.trivial_tasks:{app_name}",
                    "worker",
                    "-P",
                    "prefork",
                    "-c",
                    "1",
                    "-Q",
                    queue,
                    "--without-gossip",
                    "--without-mingle",
                    "-n",
                    worker,
                ]
                if args.plain_loglevel:
                    argv += ["--loglevel", args.plain_loglevel]
                return argv

            if args.gpu_loglevel:
                gpu_argv += ["--loglevel", args.gpu_loglevel]
            gpu_child = spawn("gpu", gpu_argv, env, log_dir)
            children.append(gpu_child)
            plain_child = spawn(
                "plain",
                plain_argv("plain_app", trivial_tasks.PLAIN_QUEUE, PLAIN_WORKER),
                env,
                log_dir,
            )
            children.append(plain_child)
            plain_late_child = spawn(
                "plain_late",
                plain_argv("plain_late_app", trivial_tasks.PLAIN_LATE_QUEUE, PLAIN_LATE_WORKER),
                env,
                log_dir,
            )
            children.append(plain_late_child)

            with (
                console.status("starting workers", spinner="dots")
                if (console.is_terminal)
                else contextlib.nullcontext()
            ):
                wait_ready(
                    children,
                    gpu_child,
                    [
                        (gpu_app, GPU_WORKER),
                        (plain_app, PLAIN_WORKER),
                        (plain_late_app, PLAIN_LATE_WORKER),
                    ],
                    client,
                    timeout_s=90.0,
                )

            entities = [f"user-{i:04d}" for i in range(args.entities)]
            gpu_kwargs = [{"entity_id": entities[i % len(entities)]} for i in range(args.tasks)]

            def send_gpu(task_id: str, i: int) -> None:
                trivial_tasks.noop.apply_async(kwargs=gpu_kwargs[i], task_id=task_id)

            def send_plain(task_id: str, _i: int) -> None:
                trivial_tasks.plain_noop.apply_async(
                    task_id=task_id, queue=trivial_tasks.PLAIN_QUEUE
                )

            def send_plain_late(task_id: str, _i: int) -> None:
                trivial_tasks.plain_late_noop.apply_async(
                    task_id=task_id, queue=trivial_tasks.PLAIN_LATE_QUEUE
                )

            targets = {
                "gpu": Target("gpu", gpu_app, send_gpu, gpu_child),
                "plain": Target("plain", plain_app, send_plain, plain_child),
                "plain_late": Target(
                    "plain_late", plain_late_app, send_plain_late, plain_late_child
                ),
            }
            rounds: list[dict[str, Any]] = []
            with (
                no_result_subscription(gpu_app, plain_app, plain_late_app),
                Progress(console=console, transient=True, disable=not console.is_terminal) as bar,
            ):
                for target in targets.values():  # warm: first-task imports, connections
                    drain(target, client, args.warmup, args.timeout)
                step = bar.add_task("draining", total=len(WORKERS) * args.rounds)
                for r in range(args.rounds):
                    k = r % len(WORKERS)  # rotate: each worker first, middle, last in turn
                    order = WORKERS[k:] + WORKERS[:k]
                    row: dict[str, Any] = {"order": list(order)}
                    for name in order:
                        bar.update(step, description=f"round {r + 1}: {name}")
                        row[name] = drain(targets[name], client, args.tasks, args.timeout)
                        bar.advance(step)
                    gpu_rate = row["gpu"]["tasks_per_s"]
                    row["ratio"] = round(gpu_rate / row["plain"]["tasks_per_s"], 4)
                    row["ratio_same_guarantees"] = round(
                        gpu_rate / row["plain_late"]["tasks_per_s"], 4
                    )
                    rounds.append(row)
        finally:
            try:
                stop_all(children)
            finally:
                if server is not None:
                    server.stop()

    ratio = statistics.median(r["ratio"] for r in rounds)
    ratio_same = statistics.median(r["ratio_same_guarantees"] for r in rounds)
    import celery

    def median_of(worker: str, key: str) -> Any:
        values = [r[worker][key] for r in rounds if r[worker][key] is not None]
        return statistics.median(values) if values else None

    return {
        "benchmark": "drain",
        "python": sys.version.split()[0],
        "celery": celery.__version__,
        "cpus": os.cpu_count(),
        "tasks_per_round": args.tasks,
        "gpu_loglevel": args.gpu_loglevel or f"{settings.log_level} (GPU_TASKS_LOG_LEVEL default)",
        "plain_loglevel": args.plain_loglevel or "WARNING (celery default)",
        "plain_late_settings": dict(trivial_tasks.SAME_GUARANTEES),
        "rounds": rounds,
        "gpu_per_s_median": median_of("gpu", "tasks_per_s"),
        "plain_per_s_median": median_of("plain", "tasks_per_s"),
        "plain_late_per_s_median": median_of("plain_late", "tasks_per_s"),
        "worker_cpu_us_per_task_median": {
            w: median_of(w, "worker_cpu_us_per_task") for w in WORKERS
        },
        "ratio_median": round(ratio, 4),
        "ratio_same_guarantees_median": round(ratio_same, 4),
        "target_ratio": TARGET_RATIO,
        "pass": ratio >= TARGET_RATIO,
    }


def report(result: dict[str, Any]) -> None:
    out = Console(soft_wrap=True)
    for i, row in enumerate(result["rounds"]):
        out.print(f"round {i + 1} (order: {', '.join(row['order'])}):")
        for name in WORKERS:
            d = row[name]
            out.print(
                f"  {name:<10} {d['tasks_per_s']:7.1f}/s (enqueue {d['enqueue_s']:.2f}s, "
                f"total {d['total_s']:.2f}s, worker CPU {d['worker_cpu_us_per_task']} us/task)"
            )
        out.print(
            f"  GPU/plain {row['ratio']:.3f}, "
            f"GPU/plain same guarantees {row['ratio_same_guarantees']:.3f}"
        )
    ok = result["pass"]
    out.print(
        f"drain, {result['tasks_per_round']} tasks per run, medians: GPU worker "
        f"{result['gpu_per_s_median']:.1f}/s, plain prefork -c 1 "
        f"{result['plain_per_s_median']:.1f}/s, plain prefork -c 1 with acks_late + prefetch 1 "
        f"{result['plain_late_per_s_median']:.1f}/s"
    )
    out.print(
        f"  GPU / plain (Celery defaults): {result['ratio_median']:.3f}, "
        f"target >= {result['target_ratio']}: "
        + ("[bold green]PASS[/]" if ok else "[bold red]FAIL[/]")
    )
    out.print(
        "  GPU / plain with the same guarantees (acks_late, prefetch 1): "
        f"{result['ratio_same_guarantees_median']:.3f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--tasks", type=int, default=1500, help="tasks per measured drain")
    parser.add_argument(
        "--rounds", type=int, default=6, help="rounds (one drain per worker); 6 = each order twice"
    )
    parser.add_argument("--warmup", type=int, default=50, help="tasks per worker before timing")
    parser.add_argument("--entities", type=int, default=100, help="distinct entity ids")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per drain")
    parser.add_argument("--gpu-loglevel", help="GPU worker --loglevel (default: the CLI's)")
    parser.add_argument("--plain-loglevel", help="plain workers' --loglevel (default: Celery's)")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the GPU/plain target is missed"
    )
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except KeyboardInterrupt:
        console.print("interrupted; everything this benchmark started was stopped")
        return 130
    if args.json:
        print(json.dumps(result))
    else:
        report(result)
    return 1 if args.check and not result["pass"] else 0


if __name__ == "__main__":
    sys.exit(main())
