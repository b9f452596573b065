"""Fleet changes: what a rebalance moves, what a live handoff costs, how soon failover serves.

Run from the repository root::

    .venv/bin/python -m benchmarks.fleet [--json] [--check]

1. **Rebalance plan** (:func:`gpu_tasks.control.rebalance.plan`, computed, no processes): S = 1024
   shards balanced over N GPUs, then an (N+1)th joins; the fraction of shards the plan
   moves (target: at most 1.02 x 1/(N+1)) and the spread of shards per GPU after it
   (target: max - min <= 1), for N = 4 and 8.
2. **Live handoff**: its own ``redis-server`` and two sim GPU workers (S = 1024). One shard
   holds 100 entities x 1 MiB (plus a 16-byte probe buffer each). The shard is handed off
   back and forth ``--handoffs`` times (:mod:`gpu_tasks.control.handoff`, in this process) while a
   producer thread keeps ``--outstanding`` probe writes to those entities in flight. Per
   handoff: its duration; per request: its round trip (send to result, from the result
   backend's pub/sub). Reported: handoff seconds, and the p99 round trip of the shard's
   requests sent during handoffs against those sent outside them (the extra p99 is what
   producers of that shard see while it moves; other shards are not affected).
3. **Failover**: two sim GPU workers and a coordinator (``gpu-tasks coordinator
   --failover-after X``). GPU a's whole worker is SIGKILLed, a request for an entity of one
   of its shards is sent at once, and the time from the kill to that request's result is
   measured. Then GPU a's worker is started again (it rejoins empty) and the next run kills
   the other GPU. With the default settings (lease TTL 10 s, failover after 30 s) and with
   ``--failover-after 5``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    NODE,
    RESULT_PREFIX,
    BenchmarkError,
    entities_for_shards,
    fmt_spread,
    gpu_worker_argv,
    machine,
    now_utc,
    percentile,
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

SHARD_COUNT = 1024
GPUS = [f"gpu.{NODE}.0", f"gpu.{NODE}.1"]
MOVED_TARGET = 1.02
ENTITIES = 100
BUFFER_BYTES = 1 << 20


def rebalance_figures() -> dict[str, Any]:
    from gpu_tasks.control.rebalance import plan
    from gpu_tasks.control.shardmap import ShardMap

    rows = {}
    for n in (4, 8):
        gpus = [f"gpu.plan.{i}" for i in range(n)]
        result = plan(ShardMap.balanced(gpus, SHARD_COUNT), {*gpus, f"gpu.plan.{n}"}, set())
        fraction = len(result.moves) / SHARD_COUNT
        spread_after = max(result.after.values()) - min(result.after.values())
        rows[str(n)] = {"gpus_before": n, "moves": len(result.moves), "fraction": fraction,
                        "limit": MOVED_TARGET / (n + 1), "max_minus_min_after": spread_after,
                        "pass": fraction <= MOVED_TARGET / (n + 1) and spread_after <= 1}
    return rows


class Probe:
    """A producer thread keeping ``outstanding`` probe writes to ``entities`` in flight,
    timing each round trip through the result backend's pub/sub."""

    def __init__(self, app: Any, client: Any, entities: list[str], outstanding: int) -> None:
        self.app, self.client, self.entities = app, client, entities
        self.outstanding = outstanding
        self.samples: list[tuple[float, float]] = []
        """(sent at, round trip s) of every request answered."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> Probe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        try:
            pubsub = self.client.pubsub()
            pubsub.psubscribe(f"{RESULT_PREFIX}*")
            pubsub.get_message(timeout=5.0)
            sent: dict[bytes, float] = {}
            i = 0

            def send() -> None:
                nonlocal i
                task_id = str(uuid.uuid4())
                sent[(RESULT_PREFIX + task_id).encode()] = time.perf_counter()
                self.app.send_task("gpu_tasks.write", task_id=task_id, kwargs={
                    "entity_id": self.entities[i % len(self.entities)], "name": "probe",
                    "values": [i % 1000]})
                i += 1

            for _ in range(self.outstanding):
                send()
            while sent:  # after stop(), only the requests still in flight
                message = pubsub.get_message(timeout=0.5)
                if message is None or message["type"] != "pmessage":
                    continue
                started = sent.pop(message["channel"], None)
                if started is None:
                    continue
                meta = json.loads(message["data"])
                if meta.get("status") != "SUCCESS":
                    raise BenchmarkError(f"a probe failed: {meta}")
                self.samples.append((started, time.perf_counter() - started))
                if not self._stop.is_set():
                    send()
            pubsub.close()
        except BaseException as exc:  # reported by the main thread
            self.error = exc


def handoff_figures(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import redis

    from gpu_tasks.control import handoff
    from gpu_tasks.control.shardmap import ShardMap, ShardMapStore
    from gpu_tasks.local.redis_server import RedisServer
    from gpu_tasks.protocol.routing import shard_index
    from gpu_tasks.settings import Settings

    children: list[Process] = []
    server = RedisServer(tmp / "redis-handoff").start()
    try:
        client = redis.Redis.from_url(server.url)
        settings = Settings(redis_url=server.url, node=NODE, backend="sim",
                            sim_memory_bytes=1 << 30)
        ShardMapStore(client).create(ShardMap.balanced(GPUS, SHARD_COUNT))
        from gpu_tasks import app as app_module

        app_module.configure(settings)
        app = app_module.app
        app.backend.on_task_call = lambda *_a, **_k: None
        env = settings.child_env()
        children = [spawn(f"gpu{i}", gpu_worker_argv(i), env, tmp) for i in range(2)]
        with spinner("starting two GPU workers"):
            wait_ready(children, [(client, g, c) for g, c in zip(GPUS, children, strict=True)],
                       [], 120.0)
        index = 7
        entities = entities_for_shards([index], SHARD_COUNT, ENTITIES, "moved-")
        assert all(shard_index(e, SHARD_COUNT) == index for e in entities)
        pending = []
        with spinner(f"loading {ENTITIES} entities x {BUFFER_BYTES >> 20} MiB"):
            for e in entities:
                pending.append(app.send_task("gpu_tasks.alloc", kwargs={
                    "entity_id": e, "name": "state", "shape": [BUFFER_BYTES], "dtype": "uint8"}))
                pending.append(app.send_task("gpu_tasks.run", kwargs={
                    "entity_id": e, "kernel": "fill", "out": "state", "value": 7}))
                pending.append(app.send_task("gpu_tasks.alloc", kwargs={
                    "entity_id": e, "name": "probe", "shape": [4], "dtype": "int32"}))
            for result in pending:
                result.get(timeout=120)
        probe = Probe(app, client, entities, args.outstanding).start()
        time.sleep(args.quiet_s)  # requests before the first handoff
        windows: list[tuple[float, float]] = []
        rows = []
        with progress_bar() as bar:
            step = bar.add_task("handoffs", total=args.handoffs)
            for _ in range(args.handoffs):
                owner = ShardMapStore(client).load().shards[index].owner
                target = GPUS[1] if owner == GPUS[0] else GPUS[0]
                began = time.perf_counter()
                (outcome,) = handoff.drive_all([handoff.Handoff(index, target, client, app)])
                ended = time.perf_counter()
                if outcome.status != "moved":
                    raise BenchmarkError(f"handoff {outcome.status}: {outcome.message}")
                windows.append((began, ended))
                rows.append({"seconds": round(ended - began, 4), "bytes": outcome.bytes,
                             "buffers": outcome.buffers, "entities": outcome.entities})
                time.sleep(args.quiet_s)
                bar.advance(step)
        probe.stop()
        if probe.error is not None:
            raise BenchmarkError(f"probe: {probe.error}")
        during = sorted(rt for sent, rt in probe.samples
                        if any(a <= sent <= b for a, b in windows))
        outside = sorted(rt for sent, rt in probe.samples
                         if not any(a <= sent <= b for a, b in windows))
        if not during or not outside:
            raise BenchmarkError("not enough probe requests to compare")
        p99_during, p99_outside = percentile(during, 0.99), percentile(outside, 0.99)
        return {
            "entities": ENTITIES, "buffer_bytes": BUFFER_BYTES, "handoffs": rows,
            "seconds": spread(r["seconds"] for r in rows),
            "requests_during": len(during), "requests_outside": len(outside),
            "p50_ms_outside": round(percentile(outside, 0.5) * 1e3, 2),
            "p99_ms_outside": round(p99_outside * 1e3, 2),
            "p50_ms_during": round(percentile(during, 0.5) * 1e3, 2),
            "p99_ms_during": round(p99_during * 1e3, 2),
            "extra_p99_ms": round((p99_during - p99_outside) * 1e3, 2),
            "max_ms_during": round(during[-1] * 1e3, 2),
        }
    finally:
        stop_all(children)
        server.stop()


def failover_figures(args: argparse.Namespace, tmp: Path, failover_after: float | None
                     ) -> dict[str, Any]:
    import redis

    from gpu_tasks.control.shardmap import ShardMap, ShardMapStore
    from gpu_tasks.local.redis_server import RedisServer
    from gpu_tasks.protocol.routing import shard_index
    from gpu_tasks.settings import Settings

    label = "default" if failover_after is None else f"{failover_after:g}s"
    children: list[Process] = []
    server = RedisServer(tmp / f"redis-failover-{label}").start()
    try:
        client = redis.Redis.from_url(server.url)
        settings = Settings(redis_url=server.url, node=NODE, backend="sim")
        store = ShardMapStore(client)
        store.create(ShardMap.balanced(GPUS, 64))
        from gpu_tasks import app as app_module

        app_module.configure(settings)
        app = app_module.app
        env = settings.child_env()
        workers = [spawn(f"gpu{i}-{label}", gpu_worker_argv(i), env, tmp) for i in range(2)]
        children.extend(workers)
        with spinner(f"starting two GPU workers (failover after {label})"):
            wait_ready(workers, [(client, g, c) for g, c in zip(GPUS, workers, strict=True)],
                       [], 120.0)
        argv = [sys.executable, "-m", "gpu_tasks.cli", "coordinator", "--interval", "0.2"]
        if failover_after is not None:
            argv += ["--failover-after", str(failover_after)]
        coordinator = spawn(f"coordinator-{label}", argv, env, tmp)
        children.append(coordinator)
        seconds = []
        with progress_bar() as bar:
            step = bar.add_task(f"failovers ({label})", total=args.failover_runs)
            for run in range(args.failover_runs):
                dead = run % 2
                owned = store.load().consumed_by(GPUS[dead])
                entity = next(f"fo-{run}-{i}" for i in range(100_000)
                              if shard_index(f"fo-{run}-{i}", 64) in owned)
                workers[dead].signal_group(signal.SIGKILL)
                killed = time.perf_counter()
                workers[dead].popen.wait(10)
                result = app.send_task("gpu_tasks.alloc", kwargs={
                    "entity_id": entity, "name": "x", "shape": [1]})
                served = result.get(timeout=300)
                took = time.perf_counter() - killed
                if served["gpu"] != GPUS[1 - dead]:
                    raise BenchmarkError(f"served by {served['gpu']}, not the live GPU")
                seconds.append(round(took, 3))
                workers[dead] = spawn(f"gpu{dead}-{label}-{run}", gpu_worker_argv(dead), env,
                                      tmp)
                children.append(workers[dead])
                wait_ready([workers[dead]], [(client, GPUS[dead], workers[dead])], [], 120.0)
                bar.advance(step)
        return {"failover_after_s": failover_after if failover_after is not None
                else settings.failover_after_s, "lease_ttl_s": settings.lease_ttl_s,
                "runs": seconds, "seconds": spread(seconds, 3)}
    finally:
        stop_all(children)
        server.stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = rebalance_figures()
    with tempfile.TemporaryDirectory(prefix="gpu-tasks-bench-fleet-") as name:
        tmp = Path(name)
        moving = handoff_figures(args, tmp)
        failover = {"default": failover_figures(args, tmp, None),
                    "5s": failover_figures(args, tmp, 5.0)}
        vers = versions()
    targets = {
        f"rebalance moves, {n} -> {n}+1 GPUs": {
            "value": {"median": row["fraction"], "min": row["fraction"],
                      "max": row["fraction"]},
            "target": f"<= {row['limit']:.4f} (1.02/{int(n) + 1}), spread <= 1",
            "fmt": ".4f", "unit": " of shards", "pass": row["pass"]}
        for n, row in plan.items()
    }
    return {
        "benchmark": "fleet",
        "date": now_utc(),
        "machine": machine(),
        "versions": vers,
        "shard_count": SHARD_COUNT,
        "rebalance": plan,
        "handoff": moving,
        "failover": failover,
        "targets": targets,
        "pass": all(t["pass"] for t in targets.values()),
    }


def report(result: dict[str, Any]) -> None:
    from rich.console import Console

    out = Console(soft_wrap=True)
    for n, row in result["rebalance"].items():
        out.print(f"rebalance {n} -> {int(n) + 1} GPUs (S = {result['shard_count']}): "
                  f"{row['moves']} moves = {row['fraction']:.4f} of shards (limit "
                  f"{row['limit']:.4f}), max-min after {row['max_minus_min_after']}: "
                  f"{verdict(row['pass'])}")
    h = result["handoff"]
    out.print(f"handoff of a shard with {h['entities']} entities x "
              f"{h['buffer_bytes'] >> 20} MiB: {fmt_spread(h['seconds'], '.2f', ' s')}; "
              f"its requests' p99 {h['p99_ms_during']} ms during handoffs vs "
              f"{h['p99_ms_outside']} ms outside (extra {h['extra_p99_ms']} ms; max "
              f"{h['max_ms_during']} ms; {h['requests_during']} and {h['requests_outside']} "
              "requests)")
    for label, f in result["failover"].items():
        out.print(f"failover ({label}: lease TTL {f['lease_ttl_s']:g}s, failover after "
                  f"{f['failover_after_s']:g}s): death to served again "
                  f"{fmt_spread(f['seconds'], '.1f', ' s')} over {len(f['runs'])} runs")


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.common import add_common_args

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_common_args(parser)
    parser.add_argument("--handoffs", type=int, default=6, help="handoffs, back and forth")
    parser.add_argument("--outstanding", type=int, default=4, help="probe requests in flight")
    parser.add_argument("--quiet-s", type=float, default=2.0,
                        help="seconds of probing before and after each handoff")
    parser.add_argument("--failover-runs", type=int, default=5, help="failovers per setting")
    args = parser.parse_args(argv)
    if min(args.handoffs, args.outstanding, args.failover_runs) < 1:
        parser.error("counts must be positive")
    return run_main("benchmarks.fleet", args, run, report)


if __name__ == "__main__":
    sys.exit(main())
