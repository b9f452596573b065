"""End to end: four sim GPU workers against four plain Celery workers, as a producer sees them.

Run from the repository root::

    .venv/bin/python -m benchmarks.e2e [--json] [--check]

It starts its own ``redis-server`` on a free loopback port, creates a shard map of
S = 1024 shards balanced over four GPUs ``gpu.bench.0..3`` and starts, each in its own
process group:

- **gpu**: four GPU workers, ``python -m gpu_tasks.cli worker --gpu I --backend sim
  --import benchmarks.trivial_tasks`` (I = 0..3, ``GPU_TASKS_NODE=bench``), each consuming
  the queues of its 256 shards plus its own GPU queue;
- **plain**: four ``celery -A benchmarks.trivial_tasks:plain_late_app worker -P prefork
  -c 1 -Q plain_late.I``, each on its own queue, with the GPU workers' delivery settings
  (``task_acks_late``, ``task_reject_on_worker_lost``, ``worker_prefetch_multiplier=1``),
  Celery's defaults otherwise.

All eight run throughout; the side not being measured sits idle in BRPOP.

**Requests.** The trivial task on each side, sent with the same call, ``app.send_task``:
``benchmarks.noop`` with a new, distinct ``entity_id`` per request on the gpu side (the
router sends it to its shard's queue, so requests spread over the four GPUs as their ids
hash), ``benchmarks.plain_late_noop`` with ``queue=plain_late.<i>`` round-robin over the
four plain workers.

**Method.** One producer process, a closed loop: it keeps ``--outstanding`` requests in
flight (32: eight per worker), sending a new one as soon as a result arrives, until
``--requests`` have completed. Throughput is measured at saturation, every worker of
either side with work waiting, so that it compares the two sides' machinery. With few
requests in flight it would mostly measure where the hash puts them: each request goes
to the GPU owning its entity's shard, so with 8 in flight over 4 GPUs one GPU has none
about (3/4)^8 = 10% of the time while the round-robin side never idles; that is the
price of keeping an entity on one GPU at low concurrency, and ``--outstanding 8`` shows
it (measured: throughput ratio about 0.89 against about 0.92 at 32).

Results arrive over Redis pub/sub: the Redis result backend of Celery stores each
result and publishes it on a channel named after its key (``celery-task-meta-<task
id>``) in one pipeline, and the producer holds one pattern
subscription ``celery-task-meta-*`` for the whole run, made before anything is sent (so
it subscribes nothing per request, and no result can be missed). Round-trip latency of a
request = (when its result message was read) - (just before ``send_task`` was called),
both ``time.perf_counter`` in the producer: it includes publishing, queueing, fetching,
the fence, execution, storing the result and the notification. Throughput = requests /
(time of the last result - time of the first send). Every result's state must be
``SUCCESS``. A second, **unloaded** run with one request in flight (``--serial``
requests) measures the round trip without queueing. Before the first round each side
is warmed up; the gpu side with one request per shard, so that every shard queue has
been published to once (kombu declares a queue on a connection's first publish to it,
a one-time cost a long-running producer has paid).

Each round runs both sides (loaded run, then unloaded run), the side that goes first
alternating between rounds; ratios gpu/plain are taken per round, and their medians over
rounds are compared with the targets: throughput >= 0.9, loaded p50 latency <= 1.1 and
unloaded p50 latency <= 1.1. Worker CPU per request (/proc, the four workers' process
groups, main processes and pool children) and redis-server CPU per request are reported
too, and how many requests each GPU served (the hash spreads them unevenly; round-robin
does not).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.common import (
    NODE,
    RESULT_PREFIX,
    BenchmarkError,
    CpuMeter,
    add_common_args,
    check_alive,
    entities_for_shards,
    fmt_spread,
    gpu_worker_argv,
    machine,
    now_utc,
    percentile,
    plain_worker_argv,
    progress_bar,
    run_main,
    spinner,
    spread,
    stop_all,
    verdict,
    versions,
    wait_ready,
)
from gpu_tasks.local.cluster import Process, spawn

THROUGHPUT_TARGET = 0.9
LATENCY_TARGET = 1.1
SHARD_COUNT = 1024
WORKERS_PER_SIDE = 4
GPUS = [f"gpu.{NODE}.{i}" for i in range(WORKERS_PER_SIDE)]
PLAIN_QUEUES = [f"plain_late.{i}" for i in range(WORKERS_PER_SIDE)]
SIDES = ("gpu", "plain")


@dataclass
class Side:
    """How to send request ``i`` of a run with a given task id, and who serves it."""

    name: str
    send: Callable[[str, str, int], None]
    """``send(task_id, run_tag, i)`` sends request ``i`` of the run tagged ``run_tag``."""
    children: list[Process]
    redis_pid: int | None = None


def closed_loop(side: Side, pubsub: Any, tag: str, count: int, outstanding: int,
                timeout_s: float) -> dict[str, Any]:
    """``count`` requests, ``outstanding`` in flight; latencies, throughput, CPU."""
    prefix = RESULT_PREFIX.encode()
    sent_at: dict[bytes, float] = {}
    latencies: list[float] = []
    served_by: Counter[str] = Counter()
    meter = CpuMeter(side.children, side.redis_pid)
    deadline = time.monotonic() + timeout_s
    next_i = 0

    def send_next() -> None:
        nonlocal next_i
        task_id = str(uuid.uuid4())
        sent_at[prefix + task_id.encode()] = time.perf_counter()
        side.send(task_id, tag, next_i)
        next_i += 1

    meter.start()
    t0 = time.perf_counter()
    t_last = t0
    while next_i < min(outstanding, count):
        send_next()
    while len(latencies) < count:
        message = pubsub.get_message(timeout=0.5)
        if message is None or message["type"] != "pmessage":
            if time.monotonic() > deadline:
                raise BenchmarkError(f"{side.name}: {count - len(latencies)} of {count} "
                                     f"requests not answered in {timeout_s}s")
            if message is None:
                for child in side.children:
                    check_alive(child)
            continue
        now = time.perf_counter()
        started = sent_at.pop(message["channel"], None)
        if started is None:
            continue  # not this run's (cannot happen: every run waits for all its results)
        meta = json.loads(message["data"])
        if meta.get("status") != "SUCCESS":
            raise BenchmarkError(f"{side.name}: a request failed: {meta!r}")
        result = meta.get("result")
        served_by[result["gpu"] if isinstance(result, dict) else "plain"] += 1
        latencies.append(now - started)
        t_last = now
        if next_i < count:
            send_next()
    cpu = meter.stop(count)
    latencies.sort()
    elapsed = t_last - t0
    return {
        "requests": count,
        "outstanding": outstanding,
        "elapsed_s": round(elapsed, 4),
        "requests_per_s": round(count / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1e3, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1e3, 3),
        "mean_ms": round(sum(latencies) / count * 1e3, 3),
        "worker_cpu_us_per_request": cpu["total"],
        "worker_main_cpu_us_per_request": cpu["main"],
        "worker_child_cpu_us_per_request": cpu["child"],
        "redis_cpu_us_per_request": cpu["redis"],
        "served_by": dict(sorted(served_by.items())),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import redis

    from gpu_tasks.control.shardmap import ShardMap, ShardMapStore
    from gpu_tasks.local.redis_server import RedisServer
    from gpu_tasks.settings import Settings

    children: list[Process] = []
    server: RedisServer | None = None
    with tempfile.TemporaryDirectory(prefix="gpu-tasks-bench-e2e-") as tmp:
        try:
            server = RedisServer(Path(tmp) / "redis").start()
            client = redis.Redis.from_url(server.url)
            settings = Settings(redis_url=server.url, node=NODE, backend="sim")
            ShardMapStore(client).create(ShardMap.balanced(GPUS, SHARD_COUNT))

            from gpu_tasks import app as app_module

            app_module.configure(settings)
            from benchmarks import trivial_tasks

            gpu_app, plain_app = app_module.app, trivial_tasks.plain_late_app
            log_dir = Path(tmp) / "logs"
            log_dir.mkdir()
            env = settings.child_env()
            gpu_children = [spawn(f"gpu{i}", gpu_worker_argv(i, args.gpu_loglevel), env,
                                  log_dir) for i in range(WORKERS_PER_SIDE)]
            children.extend(gpu_children)
            plain_children = [
                spawn(f"plain_late{i}", plain_worker_argv(
                    "plain_late_app", queue, f"plain_late{i}@{NODE}", args.plain_loglevel),
                    env, log_dir)
                for i, queue in enumerate(PLAIN_QUEUES)
            ]
            children.extend(plain_children)
            with spinner("starting workers"):
                wait_ready(children,
                           [(client, gpu, child)
                            for gpu, child in zip(GPUS, gpu_children, strict=True)],
                           [(plain_app, f"plain_late{i}@{NODE}")
                            for i in range(WORKERS_PER_SIDE)],
                           120.0)

            # The producer subscribes to nothing per request (one pattern subscription).
            for app in (gpu_app, plain_app):
                app.backend.on_task_call = lambda *_a, **_k: None

            def send_gpu(task_id: str, tag: str, i: int) -> None:
                gpu_app.send_task("benchmarks.noop", kwargs={"entity_id": f"e2e-{tag}-{i}"},
                                  task_id=task_id)

            def send_plain(task_id: str, _tag: str, i: int) -> None:
                plain_app.send_task("benchmarks.plain_late_noop", task_id=task_id,
                                    queue=PLAIN_QUEUES[i % WORKERS_PER_SIDE])

            # Warm-up covers every shard queue once: kombu declares a queue on a
            # connection's first publish to it, a cost a long-running producer has paid.
            every_shard = entities_for_shards(range(SHARD_COUNT), SHARD_COUNT, 1, "e2e-warm-")

            def send_gpu_warm(task_id: str, _tag: str, i: int) -> None:
                gpu_app.send_task("benchmarks.noop",
                                  kwargs={"entity_id": every_shard[i % SHARD_COUNT]},
                                  task_id=task_id)

            redis_pid = server.process.pid if server.process else None
            sides = {"gpu": Side("gpu", send_gpu, gpu_children, redis_pid),
                     "plain": Side("plain", send_plain, plain_children, redis_pid)}
            warm_sides = {"gpu": (Side("gpu", send_gpu_warm, gpu_children, redis_pid),
                                  max(args.warmup, SHARD_COUNT)),
                          "plain": (sides["plain"], args.warmup)}
            pubsub = client.pubsub()  # type: ignore[no-untyped-call]
            pubsub.psubscribe(f"{RESULT_PREFIX}*")
            confirmed = pubsub.get_message(timeout=5.0)
            if confirmed is None or confirmed["type"] != "psubscribe":
                raise BenchmarkError(f"Redis did not confirm the subscription: {confirmed!r}")

            rounds: list[dict[str, Any]] = []
            with progress_bar() as bar:
                warm = bar.add_task("warming up", total=len(SIDES))
                warmup: dict[str, Any] = {}
                for name in SIDES:  # first-task imports, connections, queue declarations
                    side, count = warm_sides[name]
                    warmup[name] = closed_loop(side, pubsub, f"warm-{name}", count,
                                               args.outstanding, args.timeout)
                    bar.advance(warm)
                bar.remove_task(warm)
                if len(warmup["gpu"]["served_by"]) != WORKERS_PER_SIDE:
                    raise BenchmarkError(f"warm-up reached only {warmup['gpu']['served_by']}")
                step = bar.add_task("rounds", total=len(SIDES) * args.rounds)
                for r in range(args.rounds):
                    order = SIDES if r % 2 == 0 else SIDES[::-1]
                    row: dict[str, Any] = {"order": list(order)}
                    for name in order:
                        bar.update(step, description=f"round {r + 1}: {name}")
                        loaded = closed_loop(sides[name], pubsub, f"{r}-loaded", args.requests,
                                             args.outstanding, args.timeout)
                        unloaded = closed_loop(sides[name], pubsub, f"{r}-serial", args.serial,
                                               1, args.timeout)
                        row[name] = {"loaded": loaded, "unloaded": unloaded}
                        bar.advance(step)
                    g, p = row["gpu"], row["plain"]
                    row["ratios"] = {
                        "throughput": round(g["loaded"]["requests_per_s"]
                                            / p["loaded"]["requests_per_s"], 4),
                        "p50": round(g["loaded"]["p50_ms"] / p["loaded"]["p50_ms"], 4),
                        "p99": round(g["loaded"]["p99_ms"] / p["loaded"]["p99_ms"], 4),
                        "unloaded_p50": round(g["unloaded"]["p50_ms"]
                                              / p["unloaded"]["p50_ms"], 4),
                        "unloaded_p99": round(g["unloaded"]["p99_ms"]
                                              / p["unloaded"]["p99_ms"], 4),
                    }
                    rounds.append(row)
            pubsub.close()
            vers = versions(client)
        finally:
            try:
                stop_all(children)
            finally:
                if server is not None:
                    server.stop()

    def side_spread(name: str, phase: str, key: str, digits: int) -> dict[str, Any]:
        return spread((r[name][phase][key] for r in rounds), digits)

    per_side = {
        name: {
            phase: {
                "requests_per_s": side_spread(name, phase, "requests_per_s", 1),
                "p50_ms": side_spread(name, phase, "p50_ms", 3),
                "p99_ms": side_spread(name, phase, "p99_ms", 3),
                "worker_cpu_us_per_request": side_spread(
                    name, phase, "worker_cpu_us_per_request", 0),
                "worker_main_cpu_us_per_request": side_spread(
                    name, phase, "worker_main_cpu_us_per_request", 0),
                "worker_child_cpu_us_per_request": side_spread(
                    name, phase, "worker_child_cpu_us_per_request", 0),
                "redis_cpu_us_per_request": side_spread(
                    name, phase, "redis_cpu_us_per_request", 0),
            }
            for phase in ("loaded", "unloaded")
        }
        for name in SIDES
    }
    ratios = {key: spread(r["ratios"][key] for r in rounds) for key in rounds[0]["ratios"]}
    targets = {
        "throughput gpu/plain": {"ratio": ratios["throughput"],
                                 "target": f">= {THROUGHPUT_TARGET}",
                                 "pass": ratios["throughput"]["median"] >= THROUGHPUT_TARGET},
        "p50 latency gpu/plain (loaded)": {"ratio": ratios["p50"],
                                           "target": f"<= {LATENCY_TARGET}",
                                           "pass": ratios["p50"]["median"] <= LATENCY_TARGET},
        "p50 latency gpu/plain (unloaded)": {
            "ratio": ratios["unloaded_p50"], "target": f"<= {LATENCY_TARGET}",
            "pass": ratios["unloaded_p50"]["median"] <= LATENCY_TARGET},
    }
    return {
        "benchmark": "e2e",
        "date": now_utc(),
        "machine": machine(),
        "versions": vers,
        "shard_count": SHARD_COUNT,
        "workers_per_side": WORKERS_PER_SIDE,
        "requests_per_run": args.requests,
        "outstanding": args.outstanding,
        "serial_requests_per_run": args.serial,
        "rounds_count": args.rounds,
        "plain_late_settings": dict(trivial_tasks.SAME_GUARANTEES),
        "rounds": rounds,
        "per_side": per_side,
        "ratios": ratios,
        "targets": targets,
        "pass": all(t["pass"] for t in targets.values()),
    }


def report(result: dict[str, Any]) -> None:
    out = Console(soft_wrap=True)
    for i, row in enumerate(result["rounds"]):
        out.print(f"round {i + 1} (order: {', '.join(row['order'])}):")
        for name in SIDES:
            lo, un = row[name]["loaded"], row[name]["unloaded"]
            out.print(
                f"  {name:<5} {lo['requests_per_s']:7.1f}/s p50 {lo['p50_ms']:6.2f} ms "
                f"p99 {lo['p99_ms']:6.2f} ms, worker CPU {lo['worker_cpu_us_per_request']} "
                f"us/req (main {lo['worker_main_cpu_us_per_request']}, child "
                f"{lo['worker_child_cpu_us_per_request']}), redis-server "
                f"{lo['redis_cpu_us_per_request']} us/req; "
                f"unloaded p50 {un['p50_ms']:.2f} ms p99 {un['p99_ms']:.2f} ms; "
                f"served by {lo['served_by']}"
            )
        out.print("  " + ", ".join(f"{k} {v:.3f}" for k, v in row["ratios"].items()))
    out.print(
        f"end to end, {result['workers_per_side']} workers per side, "
        f"{result['requests_per_run']} requests with {result['outstanding']} in flight, then "
        f"{result['serial_requests_per_run']} one at a time, {len(result['rounds'])} rounds; "
        "median (min-max):"
    )
    for name in SIDES:
        lo, un = result["per_side"][name]["loaded"], result["per_side"][name]["unloaded"]
        out.print(
            f"  {name:<5} {fmt_spread(lo['requests_per_s'], '.1f', '/s')}, p50 "
            f"{fmt_spread(lo['p50_ms'], '.2f', ' ms')}, "
            f"p99 {fmt_spread(lo['p99_ms'], '.2f', ' ms')}, "
            f"worker CPU {lo['worker_cpu_us_per_request']['median']} us/req; unloaded p50 "
            f"{fmt_spread(un['p50_ms'], '.2f', ' ms')}, "
            f"p99 {fmt_spread(un['p99_ms'], '.2f', ' ms')}"
        )
    for key, t in result["targets"].items():
        out.print(f"  {key}: {fmt_spread(t['ratio'])}, target {t['target']}: {verdict(t['pass'])}")
    out.print(f"  p99 latency gpu/plain (loaded): {fmt_spread(result['ratios']['p99'])}, "
              f"(unloaded): {fmt_spread(result['ratios']['unloaded_p99'])} (no target)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_common_args(parser)
    parser.add_argument("--requests", type=int, default=3000, help="requests per loaded run")
    parser.add_argument("--outstanding", type=int, default=32,
                        help="requests in flight in a loaded run (enough to keep every worker "
                        "busy: see the module docstring)")
    parser.add_argument("--serial", type=int, default=300,
                        help="requests per unloaded run (one in flight)")
    parser.add_argument("--rounds", type=int, default=8,
                        help="rounds (both sides; which goes first alternates)")
    parser.add_argument("--warmup", type=int, default=200, help="requests per side before timing")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per run")
    parser.add_argument("--gpu-loglevel", help="GPU workers' --loglevel (default: the CLI's)")
    parser.add_argument("--plain-loglevel", help="plain workers' --loglevel (default: Celery's)")
    args = parser.parse_args(argv)
    if min(args.requests, args.outstanding, args.serial, args.rounds, args.warmup) < 1:
        parser.error("counts must be positive")
    return run_main("benchmarks.e2e", args, run, report)


if __name__ == "__main__":
    sys.exit(main())
