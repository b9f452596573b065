"""Drain rate: a GPU worker consuming 256 or 1024 shard queues against plain Celery workers.

Run from the repository root::

    .venv/bin/python -m benchmarks.drain [--json] [--check]

It starts its own ``redis-server`` on a free loopback port, with two deployments in two
databases of it, and four workers, each in its own process group:

- ``gpu256`` (database 0): a shard map of S = 1024 shards over four GPUs
  ``gpu.bench.0..3``, of which only ``gpu.bench.0`` runs, so its worker consumes the
  queues of its **256** shards (``shard-0``, ``shard-4``, ...) plus its own GPU queue;
- ``gpu1024`` (database 1): S = 1024 over one GPU ``gpu.bench.0``: **1024** shard queues;
- ``plain_late`` (database 0): ``celery -A benchmarks.trivial_tasks:plain_late_app worker
  -P prefork -c 1 -Q plain_late``: a plain Celery worker on one queue with the GPU
  worker's delivery settings (``task_acks_late``, ``task_reject_on_worker_lost``,
  ``worker_prefetch_multiplier=1``), Celery's defaults otherwise (no events, WARNING);
- ``plain`` (database 0, extra column, ``--no-defaults`` drops it): the same on
  ``plain_app``, Celery's defaults (prefetch 4, early ack).

The GPU workers are started as an operator starts one: ``python -m gpu_tasks.cli worker
--gpu 0 --backend sim --import benchmarks.trivial_tasks`` with ``GPU_TASKS_REDIS_URL``
and ``GPU_TASKS_NODE=bench``: our Celery settings, transport (one prepacked rotating
BRPOP over all the queues), fence, lease and runtime. They are ready when their lease
says they consume by the map's epoch and their device is in the fleet registry; the
plain workers when they answer a ping.

All run throughout (those not being measured sit idle in BRPOP). Each round, for each
worker in an order that rotates between rounds (each worker first, second, ... in turn):
enqueue N trivial tasks as fast as one process can, with the same call for every worker
(``app.send_task``: by ``entity_id`` for the GPU workers, ``queue=`` for the plain ones),
and time from the first enqueue until every task's result is stored with a final state.
Rate = N / that time. The GPU tasks' entity ids cover every shard the worker consumes
(each of its 256 or 1024 shards gets a share of every drain), in a shuffled order. The
warm-up before the first round sends one task per entity id, so every shard queue has
been published to once: kombu declares a queue on a connection's first publish to it,
a one-time cost a long-running producer has paid, which would otherwise fall on the
first rounds of the GPU workers only.

The publisher does not subscribe to each task's result channel (Celery's producer would,
for ``AsyncResult.get``): it subscribes to the last task's channel only, then checks
every result's state (without decoding the results, whose sizes differ) once that one
is final. Reported too, per task: worker CPU (utime + stime from /proc of the worker's
process group, split into main process and pool child), redis-server CPU, and the
publisher's own CPU. CPU stays steadier than wall time when the machine is busy and
shows where the cost is.

Targets, on the median over rounds of the per-round ratios: gpu256 / plain_late >= 0.9
and gpu1024 / plain_late >= 0.9. GPU / plain (Celery defaults) is reported, no target.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.common import (
    NODE,
    READY_STATES,
    BenchmarkError,
    CpuMeter,
    add_common_args,
    check_alive,
    entities_for_shards,
    fmt_spread,
    gpu_worker_argv,
    machine,
    now_utc,
    plain_worker_argv,
    progress_bar,
    result_key,
    run_main,
    spinner,
    spread,
    states,
    stop_all,
    verdict,
    versions,
    wait_ready,
)
from gpu_tasks.local.cluster import Process, spawn

TARGET_RATIO = 0.9
SHARD_COUNT = 1024
GPU = f"gpu.{NODE}.0"
GPU_WORKERS = ("gpu256", "gpu1024")
BASELINE = "plain_late"
EXTRA = "plain"
RESULT_FIELDS = ("entity_id", "shard", "queue", "gpu", "worker", "device", "generation")


# -- one measured drain -------------------------------------------------------------------


@dataclass
class Target:
    """How to send one trivial task to one worker, and where its result lands."""

    name: str
    app: Any
    client: Any
    send: Callable[[str, int], None]
    child: Process
    redis_pid: int | None = None


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


_FINAL = tuple(f'"status": "{state}"'.encode() for state in READY_STATES)


def unfinished(client: Any, task_ids: Sequence[str]) -> list[str]:
    """The tasks without a final state yet. Inside the timed window, so it does not decode
    the results (larger ones would cost more): Celery's JSON meta carries ``"status":
    "<STATE>"`` verbatim. The states are checked properly once the clock has stopped."""
    raws = client.mget([result_key(t) for t in task_ids])
    return [t for t, raw in zip(task_ids, raws, strict=True)
            if raw is None or not any(final in raw for final in _FINAL)]


def drain(target: Target, count: int, timeout_s: float, prefilled: bool = False) -> dict[str, Any]:
    """Enqueue ``count`` tasks, wait until all have a final state; timings and counts.
    ``prefilled``: the worker's main process is stopped (SIGSTOP) while they are sent, so
    the drain starts from full queues, and its rate is read from the results' ``date_done``
    (first to last completion)."""
    client = target.client
    task_ids = [str(uuid.uuid4()) for _ in range(count)]
    pubsub = client.pubsub()
    pubsub.subscribe(result_key(task_ids[-1]))
    deadline = time.monotonic() + timeout_s
    confirmed = None  # the subscription must be live before anything is sent
    while confirmed is None or confirmed["type"] != "subscribe":
        if time.monotonic() > deadline:
            raise BenchmarkError("Redis did not confirm the result-channel subscription")
        confirmed = pubsub.get_message(timeout=1.0)

    meter = CpuMeter([target.child], target.redis_pid)
    meter.start()
    main_pid = target.child.popen.pid
    if prefilled:
        os.kill(main_pid, signal.SIGSTOP)
    try:
        own_cpu0 = time.process_time()
        t0 = time.perf_counter()
        for i, task_id in enumerate(task_ids):
            target.send(task_id, i)
        enqueued_s = time.perf_counter() - t0
        send_cpu_s = time.process_time() - own_cpu0
    finally:
        if prefilled:
            os.kill(main_pid, signal.SIGCONT)

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
    pending = unfinished(client, task_ids)
    while pending:  # only if tasks finished out of order
        if time.monotonic() > deadline:
            raise BenchmarkError(f"{target.name}: {len(pending)} tasks not done in {timeout_s}s")
        time.sleep(0.001)
        pending = unfinished(client, pending)
    total_s = time.perf_counter() - t0
    own_cpu_s = time.process_time() - own_cpu0
    cpu = meter.stop(count)
    pubsub.close()

    final = states(client, task_ids)
    done_rate = completion_rate(client, task_ids)
    succeeded = sum(1 for s in final if s == "SUCCESS")
    if succeeded != count:
        bad = next(raw for raw in client.mget([result_key(t) for t in task_ids])
                   if json.loads(raw)["status"] != "SUCCESS")
        raise BenchmarkError(
            f"{target.name}: {count - succeeded} of {count} tasks did not succeed, e.g. {bad!r}"
        )
    client.delete(*(result_key(t) for t in task_ids))
    return {
        "tasks": count,
        "enqueue_s": round(enqueued_s, 4),
        "total_s": round(total_s, 4),
        "tasks_per_s": round(count / total_s, 1),
        "completed_per_s": done_rate,
        "worker_cpu_us_per_task": cpu["total"],
        "worker_main_cpu_us_per_task": cpu["main"],
        "worker_child_cpu_us_per_task": cpu["child"],
        "redis_cpu_us_per_task": cpu["redis"],
        "publisher_cpu_us_per_task": round(own_cpu_s / count * 1e6),
        "publisher_send_cpu_us_per_task": round(send_cpu_s / count * 1e6),
    }


def completion_rate(client: Any, task_ids: Sequence[str]) -> float:
    """Tasks per second from the first completion to the last (the results' ``date_done``)."""
    from datetime import datetime

    times = []
    for raw in client.mget([result_key(t) for t in task_ids]):
        done = json.loads(raw).get("date_done") if raw else None
        if isinstance(done, str):
            times.append(datetime.fromisoformat(done).timestamp())
    if len(times) < 2 or max(times) <= min(times):
        return 0.0
    return round((len(times) - 1) / (max(times) - min(times)), 1)


def check_gpu_result(target: Target, entity_id: str, timeout_s: float) -> dict[str, Any]:
    """Send one task and check its result says where it ran (the entity-task contract)."""
    task_id = str(uuid.uuid4())
    target.app.send_task("benchmarks.noop", kwargs={"entity_id": entity_id}, task_id=task_id)
    deadline = time.monotonic() + timeout_s
    while True:
        raw = target.client.get(result_key(task_id))
        if raw is not None and json.loads(raw)["status"] in READY_STATES:
            break
        if time.monotonic() > deadline:
            raise BenchmarkError(f"{target.name}: check task not done after {timeout_s}s")
        check_alive(target.child)
        time.sleep(0.01)
    meta = json.loads(raw)
    result = meta.get("result")
    if meta["status"] != "SUCCESS" or not isinstance(result, dict):
        raise BenchmarkError(f"{target.name}: check task answered {meta!r}")
    missing = [f for f in RESULT_FIELDS if f not in result]
    if missing or result["queue"] != result["shard"] or result["entity_id"] != entity_id:
        raise BenchmarkError(f"{target.name}: result lacks {missing} or disagrees: {result!r}")
    target.client.delete(result_key(task_id))
    return {k: result[k] for k in RESULT_FIELDS}


# -- setup and rounds ---------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    import redis
    from celery import Celery

    from gpu_tasks.control.lease import LeaseStore
    from gpu_tasks.control.shardmap import ShardMap, ShardMapStore
    from gpu_tasks.local.redis_server import RedisServer
    from gpu_tasks.protocol.routing import EntityRouter, shard_index
    from gpu_tasks.settings import Settings

    workers = (*GPU_WORKERS, BASELINE, *(() if args.no_defaults else (EXTRA,)))
    rate = "completed_per_s" if args.prefilled else "tasks_per_s"
    """What the ratios compare: with --prefilled, first to last completion."""
    children: list[Process] = []
    server: RedisServer | None = None
    with tempfile.TemporaryDirectory(prefix="gpu-tasks-bench-drain-") as tmp:
        try:
            server = RedisServer(Path(tmp) / "redis").start()
            url0 = server.url  # database 0
            url1 = url0.rsplit("/", 1)[0] + "/1"
            client0, client1 = redis.Redis.from_url(url0), redis.Redis.from_url(url1)
            settings0 = Settings(redis_url=url0, node=NODE, backend="sim")
            settings1 = settings0.replace(redis_url=url1)
            owners4 = [f"gpu.{NODE}.{i}" for i in range(4)]
            map256 = ShardMap.balanced(owners4, SHARD_COUNT)
            map1024 = ShardMap.balanced([GPU], SHARD_COUNT)
            ShardMapStore(client0).create(map256)
            ShardMapStore(client1).create(map1024)

            from gpu_tasks import app as app_module

            app_module.configure(settings0)
            from benchmarks import trivial_tasks

            gpu_app0 = app_module.app
            # A second producer app like gpu_tasks.app, for the deployment in database 1.
            gpu_app1 = Celery("gpu_tasks_db1", set_as_current=False)
            gpu_app1.conf.update(app_module.celery_config(
                settings1, EntityRouter(app_module.shard_count_reader(settings1))))
            plain_app, plain_late_app = trivial_tasks.plain_app, trivial_tasks.plain_late_app

            log_dir = Path(tmp) / "logs"
            log_dir.mkdir()
            env0, env1 = settings0.child_env(), settings1.child_env()
            started = {
                "gpu256": spawn("gpu256", gpu_worker_argv(0, args.gpu_loglevel), env0, log_dir),
                "gpu1024": spawn("gpu1024", gpu_worker_argv(0, args.gpu_loglevel), env1,
                                 log_dir),
                BASELINE: spawn(BASELINE, plain_worker_argv(
                    "plain_late_app", trivial_tasks.PLAIN_LATE_QUEUE, f"plain_late@{NODE}",
                    args.plain_loglevel), env0, log_dir),
            }
            if EXTRA in workers:
                started[EXTRA] = spawn(EXTRA, plain_worker_argv(
                    "plain_app", trivial_tasks.PLAIN_QUEUE, f"plain@{NODE}",
                    args.plain_loglevel), env0, log_dir)
            children.extend(started.values())
            pings = [(plain_late_app, f"plain_late@{NODE}")]
            if EXTRA in workers:
                pings.append((plain_app, f"plain@{NODE}"))
            with spinner("starting workers"):
                wait_ready(children, [(client0, GPU, started["gpu256"]),
                                      (client1, GPU, started["gpu1024"])], pings, 90.0)

            # Entity ids covering every shard each GPU worker consumes, shuffled.
            rng = random.Random(20261126)
            sequences: dict[str, list[str]] = {}
            pools: dict[str, list[str]] = {}
            for name, shard_map in (("gpu256", map256), ("gpu1024", map1024)):
                owned = shard_map.consumed_by(GPU)
                per_shard = max(1, args.tasks // len(owned))
                pool = pools[name] = entities_for_shards(owned, SHARD_COUNT, per_shard,
                                                         f"{name}-")
                sequence = [pool[i % len(pool)] for i in range(args.tasks)]
                rng.shuffle(sequence)
                sequences[name] = sequence
            shards_hit = {name: len({shard_index(e, SHARD_COUNT) for e in seq})
                          for name, seq in sequences.items()}

            def gpu_sender(app: Any, sequence: list[str]) -> Callable[[str, int], None]:
                def send(task_id: str, i: int) -> None:
                    app.send_task("benchmarks.noop",
                                  kwargs={"entity_id": sequence[i % len(sequence)]},
                                  task_id=task_id)
                return send

            def plain_sender(app: Any, name: str, queue: str) -> Callable[[str, int], None]:
                def send(task_id: str, _i: int) -> None:
                    app.send_task(name, task_id=task_id, queue=queue)
                return send

            targets = {
                "gpu256": Target("gpu256", gpu_app0, client0,
                                 gpu_sender(gpu_app0, sequences["gpu256"]), started["gpu256"]),
                "gpu1024": Target("gpu1024", gpu_app1, client1,
                                  gpu_sender(gpu_app1, sequences["gpu1024"]),
                                  started["gpu1024"]),
                BASELINE: Target(BASELINE, plain_late_app, client0, plain_sender(
                    plain_late_app, "benchmarks.plain_late_noop", trivial_tasks.PLAIN_LATE_QUEUE),
                    started[BASELINE]),
            }
            if EXTRA in workers:
                targets[EXTRA] = Target(EXTRA, plain_app, client0, plain_sender(
                    plain_app, "benchmarks.plain_noop", trivial_tasks.PLAIN_QUEUE),
                    started[EXTRA])
            for target in targets.values():
                target.redis_pid = server.process.pid if server.process else None
            leases = {"gpu256": LeaseStore(client0).get(GPU),
                      "gpu1024": LeaseStore(client1).get(GPU)}
            consumed = {name: lease.consuming if lease else None
                        for name, lease in leases.items()}

            # Warm-up: first-task imports, connections, and every shard queue the drains
            # use, once (kombu declares a queue on a connection's first publish to it).
            warmups = {name: (targets[name], args.warmup) for name in workers}
            for name, pool in pools.items():
                warmups[name] = (dataclasses.replace(targets[name],
                                                     send=gpu_sender(targets[name].app, pool)),
                                 max(args.warmup, len(pool)))
            rounds: list[dict[str, Any]] = []
            apps = [t.app for t in targets.values()]
            with no_result_subscription(*apps), progress_bar() as bar:
                result_checks = {name: check_gpu_result(targets[name], sequences[name][0], 30.0)
                                 for name in GPU_WORKERS}
                warm = bar.add_task("warming up", total=len(workers))
                for name in workers:
                    drain(*warmups[name], args.timeout)
                    bar.advance(warm)
                bar.remove_task(warm)
                step = bar.add_task("draining", total=len(workers) * args.rounds)
                for r in range(args.rounds):
                    k = r % len(workers)  # rotate: each worker first, second, ... in turn
                    order = workers[k:] + workers[:k]
                    row: dict[str, Any] = {"order": list(order)}
                    for name in order:
                        bar.update(step, description=f"round {r + 1}: {name}")
                        row[name] = drain(targets[name], args.tasks, args.timeout,
                                          prefilled=args.prefilled)
                        bar.advance(step)
                    base = row[BASELINE][rate]
                    row["ratios"] = {g: round(row[g][rate] / base, 4) for g in GPU_WORKERS}
                    if EXTRA in workers:
                        row["ratios_vs_defaults"] = {
                            g: round(row[g][rate] / row[EXTRA][rate], 4) for g in GPU_WORKERS}
                    rounds.append(row)
            vers = versions(client0)
        finally:
            try:
                stop_all(children)
            finally:
                if server is not None:
                    server.stop()

    per_worker = {
        name: {
            "tasks_per_s": spread((r[name]["tasks_per_s"] for r in rounds), 1),
            "completed_per_s": spread((r[name]["completed_per_s"] for r in rounds), 1),
            "worker_cpu_us_per_task": spread(
                (r[name]["worker_cpu_us_per_task"] for r in rounds), 0),
            "worker_main_cpu_us_per_task": spread(
                (r[name]["worker_main_cpu_us_per_task"] for r in rounds), 0),
            "worker_child_cpu_us_per_task": spread(
                (r[name]["worker_child_cpu_us_per_task"] for r in rounds), 0),
            "redis_cpu_us_per_task": spread(
                (r[name]["redis_cpu_us_per_task"] for r in rounds), 0),
            "publisher_cpu_us_per_task": spread(
                (r[name]["publisher_cpu_us_per_task"] for r in rounds), 0),
        }
        for name in workers
    }
    ratios = {g: spread(r["ratios"][g] for r in rounds) for g in GPU_WORKERS}
    targets_out = {
        f"{g}/{BASELINE}": {
            "ratio": ratios[g],
            "target": f">= {TARGET_RATIO}",
            "pass": ratios[g]["median"] >= TARGET_RATIO,
        }
        for g in GPU_WORKERS
    }
    out: dict[str, Any] = {
        "benchmark": "drain",
        "date": now_utc(),
        "machine": machine(),
        "versions": vers,
        "tasks_per_round": args.tasks,
        "rounds_count": args.rounds,
        "workers": list(workers),
        "shard_count": SHARD_COUNT,
        "shards_consumed": consumed,
        "shards_hit_per_drain": shards_hit,
        "result_check": result_checks,
        "gpu_loglevel": args.gpu_loglevel or "WARNING (GPU_TASKS_LOG_LEVEL default)",
        "plain_loglevel": args.plain_loglevel or "WARNING (Celery default)",
        "plain_late_settings": dict(trivial_tasks.SAME_GUARANTEES),
        "rounds": rounds,
        "per_worker": per_worker,
        "ratios": ratios,
        "targets": targets_out,
        "pass": all(t["pass"] for t in targets_out.values()),
    }
    if EXTRA in workers:
        out["ratios_vs_defaults"] = {
            g: spread(r["ratios_vs_defaults"][g] for r in rounds) for g in GPU_WORKERS}
    return out


def report(result: dict[str, Any]) -> None:
    out = Console(soft_wrap=True)
    workers = result["workers"]
    for i, row in enumerate(result["rounds"]):
        out.print(f"round {i + 1} (order: {', '.join(row['order'])}):")
        for name in workers:
            d = row[name]
            out.print(
                f"  {name:<10} {d['tasks_per_s']:7.1f}/s, completions "
                f"{d['completed_per_s']:7.1f}/s (enqueue {d['enqueue_s']:.2f}s, "
                f"total {d['total_s']:.2f}s, worker CPU {d['worker_cpu_us_per_task']} us/task: "
                f"main {d['worker_main_cpu_us_per_task']}, "
                f"child {d['worker_child_cpu_us_per_task']}; redis-server "
                f"{d['redis_cpu_us_per_task']} us/task)"
            )
        out.print("  " + ", ".join(f"{g}/{BASELINE} {v:.3f}" for g, v in row["ratios"].items()))
    out.print(
        f"drain, {result['tasks_per_round']} tasks per run, {len(result['rounds'])} rounds, "
        f"median (min-max):"
    )
    for name in workers:
        w = result["per_worker"][name]
        out.print(
            f"  {name:<10} {fmt_spread(w['tasks_per_s'], '.1f', '/s')}, completions "
            f"{fmt_spread(w['completed_per_s'], '.1f', '/s')}; worker CPU "
            f"{fmt_spread(w['worker_cpu_us_per_task'], '.0f', ' us/task')} "
            f"(main {w['worker_main_cpu_us_per_task']['median']}, "
            f"child {w['worker_child_cpu_us_per_task']['median']}); redis-server "
            f"{w['redis_cpu_us_per_task']['median']} us/task"
        )
    for key, t in result["targets"].items():
        out.print(f"  {key}: {fmt_spread(t['ratio'])}, target {t['target']}: "
                  f"{verdict(t['pass'])}")
    for g, s in result.get("ratios_vs_defaults", {}).items():
        out.print(f"  {g}/plain (Celery defaults): {fmt_spread(s)} (no target)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_common_args(parser)
    parser.add_argument("--tasks", type=int, default=1500, help="tasks per measured drain")
    parser.add_argument("--rounds", type=int, default=8,
                        help="rounds (one drain per worker; the order rotates)")
    parser.add_argument("--warmup", type=int, default=200, help="tasks per worker before timing")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per drain")
    parser.add_argument("--prefilled", action="store_true",
                        help="fill the queues while the worker's main process is stopped, and "
                             "compare the rates from first to last completion")
    parser.add_argument("--no-defaults", action="store_true",
                        help="leave out the plain worker at Celery's defaults")
    parser.add_argument("--gpu-loglevel", help="GPU workers' --loglevel (default: the CLI's)")
    parser.add_argument("--plain-loglevel", help="plain workers' --loglevel (default: Celery's)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.tasks < 1:
        parser.error("--rounds and --tasks must be positive")
    return run_main("benchmarks.drain", args, run, report)


if __name__ == "__main__":
    sys.exit(main())
