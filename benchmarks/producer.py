"""Producer cost: plain Celery's ``apply_async`` against gpu-tasks' routed one, the bulk path,
and ``gpu-tasks batch`` end to end, side by side in one run.

Run from the repository root::

    .venv/bin/python -m benchmarks.producer [--json] [--check]

It starts its own ``redis-server`` on a free loopback port (a shard map of S = 1024
over four GPUs in database 0; the plain app uses database 1) and measures, from one
process:

1. **apply_async**, in pairs of runs (the two sides interleaved in blocks, the side going
   first alternating): *plain*, a stock Celery app (``benchmarks.trivial_tasks``'s
   ``make_plain_app``: Redis broker and result backend, Celery's defaults) sending
   ``plain_noop.apply_async(kwargs=...)`` to its default queue, unrouted; *routed*,
   ``gpu_tasks.tasks.alloc.apply_async(kwargs={"entity_id": e, ...})``, the user's call
   through the entity router. No worker consumes (the messages are counted, then
   deleted). Target: routed/plain >= 1.5 (median over pairs).
2. **Bulk**: ``gpu_tasks.submit.bulk.submit_many`` of ``--bulk`` alloc requests (each checked,
   built and sent), ``--rounds`` times. Targets: >= 50,000 requests/s; >= 30x the plain
   ``apply_async`` loop of part 1; >= 30 % of ``redis-benchmark -t lpush -P 16``
   (Redis's own benchmark, pipelined 16 deep, its 3-byte value, 50 connections as it
   defaults to). Also shown, not judged: ``redis-benchmark`` from one connection
   (``-c 1``), and with a value of the bulk path's message size (``-d``).
3. **Batch**: ``gpu-tasks batch FILE --json`` of ``--batch-lines`` alloc lines, as cron
   runs it (a new process: import, check every line, send exactly once through the
   Lua script that records each line, release the lock). lines/s = lines / wall time.
4. **Executed correctly**: two sim GPU workers start; ``--verify`` requests sent by
   ``submit_many`` (allocations of distinct shapes) must all succeed with the shapes
   asked for, and ``gpu-tasks batch --wait`` of ``--verify`` lines must exit 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.common import (
    NODE,
    BenchmarkError,
    add_common_args,
    fmt_spread,
    machine,
    now_utc,
    progress_bar,
    run_main,
    spread,
    verdict,
    versions,
)

SHARD_COUNT = 1024
GPUS = [f"gpu.{NODE}.{i}" for i in range(4)]
APPLY_RATIO_TARGET = 1.5
BULK_RATE_TARGET = 50_000
BULK_OVER_PLAIN_TARGET = 30.0
BULK_OVER_REDIS_TARGET = 0.30


def redis_benchmark(port: int, extra: Sequence[str], requests: int) -> float:
    """LPUSH/s that ``redis-benchmark`` reports."""
    done = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t",
                           "lpush", "-n", str(requests), "-q", *extra],
                          capture_output=True, text=True, timeout=300)
    match = re.search(r"LPUSH: ([0-9.]+) requests per second", done.stdout.replace("\r", "\n"))
    if not match:
        raise BenchmarkError(f"redis-benchmark printed no rate: {done.stdout[-300:]}"
                             f"{done.stderr[-300:]}")
    return float(match.group(1))


def measure_apply(plain_task: Any, routed_task: Any, plain_client: Any, client: Any,
                  messages: int, pairs: int, block: int, bar: Any) -> dict[str, Any]:
    kwargs = [{"entity_id": f"user-{i}", "name": "x", "shape": [4]} for i in range(messages)]
    plain_kwargs = [{"n": i, "name": "x", "shape": [4]} for i in range(messages)]

    def routed(lo: int, hi: int) -> int:
        t0 = time.perf_counter_ns()
        for kw in kwargs[lo:hi]:
            routed_task.apply_async(kwargs=kw)
        return time.perf_counter_ns() - t0

    def plain(lo: int, hi: int) -> int:
        t0 = time.perf_counter_ns()
        for kw in plain_kwargs[lo:hi]:
            plain_task.apply_async(kwargs=kw)
        return time.perf_counter_ns() - t0

    def counted() -> tuple[int, int]:
        routed_n = sum(client.llen(f"shard-{i}") for i in range(SHARD_COUNT))
        return routed_n, int(plain_client.llen("celery"))

    def flush() -> None:
        client.delete(*[f"shard-{i}" for i in range(SHARD_COUNT)])
        plain_client.delete("celery")

    routed(0, min(messages, 500))
    plain(0, min(messages, 500))
    flush()
    senders = {"routed": routed, "plain": plain}
    rows: list[dict[str, Any]] = []
    step = bar.add_task("apply_async pairs", total=pairs)
    for pair in range(pairs):
        order = ("routed", "plain") if pair % 2 == 0 else ("plain", "routed")
        elapsed = {"routed": 0, "plain": 0}
        gc.collect()
        for lo in range(0, messages, block):
            for which in order:
                elapsed[which] += senders[which](lo, min(lo + block, messages))
        if counted() != (messages, messages):
            raise BenchmarkError(f"pair {pair}: queued {counted()}, not {messages} each")
        flush()
        rates = {k: messages / (ns / 1e9) for k, ns in elapsed.items()}
        rows.append({"first": order[0], "routed_per_s": round(rates["routed"], 1),
                     "plain_per_s": round(rates["plain"], 1),
                     "ratio": round(rates["routed"] / rates["plain"], 4)})
        bar.advance(step)
    ratio = spread(r["ratio"] for r in rows)
    return {"messages_per_run": messages, "block": block, "pairs": rows,
            "routed_per_s": spread((r["routed_per_s"] for r in rows), 1),
            "plain_per_s": spread((r["plain_per_s"] for r in rows), 1),
            "plain_us_per_call": round(1e6 / spread(r["plain_per_s"] for r in rows)["median"],
                                       1),
            "routed_us_per_call": round(
                1e6 / spread(r["routed_per_s"] for r in rows)["median"], 1),
            "ratio": ratio, "pass": ratio["median"] >= APPLY_RATIO_TARGET}


def bulk_requests(count: int) -> list[dict[str, Any]]:
    return [{"entity_id": f"user-{i}", "task": "gpu_tasks.alloc",
             "kwargs": {"name": "emb", "shape": [256], "dtype": "float32"}}
            for i in range(count)]


def measure_bulk(client: Any, count: int, rounds: int, bar: Any) -> dict[str, Any]:
    from gpu_tasks.submit.bulk import submit_many

    requests = bulk_requests(count)
    submit_many(requests[:2000])
    client.delete(*[f"shard-{i}" for i in range(SHARD_COUNT)])
    rates = []
    sizes = []
    step = bar.add_task("bulk rounds", total=rounds)
    for _ in range(rounds):
        gc.collect()
        t0 = time.perf_counter()
        ids = submit_many(requests)
        took = time.perf_counter() - t0
        queued = sum(client.llen(f"shard-{i}") for i in range(SHARD_COUNT))
        if len(ids) != count or queued != count:
            raise BenchmarkError(f"bulk sent {len(ids)} ids, {queued} queued, not {count}")
        sizes.append(len(client.lindex("shard-0", 0) or b""))
        client.delete(*[f"shard-{i}" for i in range(SHARD_COUNT)])
        rates.append(count / took)
        bar.advance(step)
    return {"requests_per_round": count, "per_s": spread(rates, 1),
            "message_bytes": max(sizes)}


def measure_batch(settings: Any, client: Any, lines: int, tmp: Path) -> dict[str, Any]:
    source = tmp / "batch.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in bulk_requests(lines)))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "gpu_tasks.cli", "batch", str(source),
                           "--json", "--max-backlog", str(10 * lines)],
                          env=settings.child_env(), capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - t0
    if done.returncode != 0:
        raise BenchmarkError(f"batch exited {done.returncode}: {done.stderr[-500:]}")
    summary = json.loads(done.stdout)
    queued = sum(client.llen(f"shard-{i}") for i in range(SHARD_COUNT))
    if summary["sent"] != lines or queued != lines:
        raise BenchmarkError(f"batch sent {summary['sent']}, {queued} queued, not {lines}")
    client.delete(*[f"shard-{i}" for i in range(SHARD_COUNT)])
    return {"lines": lines, "seconds": round(took, 3),
            "lines_per_s": round(lines / took, 1),
            "inside_seconds": summary["seconds"]}


def verify(settings: Any, count: int, tmp: Path) -> dict[str, Any]:
    """Workers execute what the bulk path and a batch sent, correctly."""
    from gpu_tasks.app import app
    from gpu_tasks.local.cluster import LocalCluster
    from gpu_tasks.submit.bulk import submit_many

    requests = [{"entity_id": f"v-{i}", "task": "alloc",
                 "kwargs": {"name": "b", "shape": [1 + i % 7, 2], "dtype": "int32"}}
                for i in range(count)]
    with LocalCluster(settings, gpus=2, backend="sim", flower=False,
                      log_dir=tmp / "logs") as cluster:
        del cluster
        results = submit_many(requests, results=True)
        wrong = 0
        for i, result in enumerate(results):
            value = result.get(timeout=300)
            if value["buffer"]["shape"] != [1 + i % 7, 2] or value["entity_id"] != f"v-{i}":
                wrong += 1
        source = tmp / "verify.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in requests))
        done = subprocess.run([sys.executable, "-m", "gpu_tasks.cli", "batch", str(source),
                               "--wait", "--json"], env=settings.child_env(),
                              capture_output=True, text=True, timeout=600)
        summary = json.loads(done.stdout) if done.stdout.strip() else {}
    del app
    return {"bulk_requests": count, "bulk_wrong": wrong, "batch_exit": done.returncode,
            "batch_succeeded": summary.get("succeeded"),
            "pass": wrong == 0 and done.returncode == 0 and summary.get("succeeded") == count}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import redis

    from gpu_tasks.control.shardmap import ShardMap, ShardMapStore
    from gpu_tasks.local.redis_server import RedisServer
    from gpu_tasks.settings import Settings

    with tempfile.TemporaryDirectory(prefix="gpu-tasks-bench-producer-") as tmpdir:
        tmp = Path(tmpdir)
        server = RedisServer(tmp / "redis").start()
        try:
            client = redis.Redis.from_url(server.url)
            plain_url = server.url.rsplit("/", 1)[0] + "/1"
            plain_client = redis.Redis.from_url(plain_url)
            ShardMapStore(client).create(ShardMap.balanced(GPUS, SHARD_COUNT))
            settings = Settings(redis_url=server.url, node=NODE, shard_count=SHARD_COUNT,
                                data_dir=str(tmp / "data"))
            from gpu_tasks import app as app_module
            from gpu_tasks import settings as settings_module

            settings_module.use(settings)
            app_module.configure(settings)
            from benchmarks.trivial_tasks import make_plain_app
            from gpu_tasks.tasks import alloc

            plain_app = make_plain_app(plain_url, name="bench_plain_producer")
            plain_task = plain_app.task(name="benchmarks.plain_kwargs")(_plain_body)
            with progress_bar() as bar:
                apply = measure_apply(plain_task, alloc, plain_client, client, args.messages,
                                      args.pairs, args.block, bar)
                bulk = measure_bulk(client, args.bulk, args.rounds, bar)
            redis_rates = {
                "default_P16": redis_benchmark(server.port, ["-P", "16"], args.redis_requests),
                "one_connection_P16": redis_benchmark(server.port, ["-c", "1", "-P", "16"],
                                                      args.redis_requests),
                "one_connection_P16_same_size": redis_benchmark(
                    server.port, ["-c", "1", "-P", "16", "-d", str(bulk["message_bytes"])],
                    args.redis_requests),
            }
            client.flushdb()
            ShardMapStore(client).create(ShardMap.balanced(GPUS, SHARD_COUNT))
            batch = measure_batch(settings, client, args.batch_lines, tmp)
            client.flushdb()
            checked = verify(settings, args.verify, tmp) if args.verify else None
            vers = versions(client)
            plain_app.close()
            app_module.app.close()
        finally:
            server.stop()
    bulk_rate = bulk["per_s"]["median"]
    over_plain = bulk_rate / apply["plain_per_s"]["median"]
    over_redis = bulk_rate / redis_rates["default_P16"]
    targets = {
        "apply_async routed/plain": {"ratio": apply["ratio"],
                                     "target": f">= {APPLY_RATIO_TARGET}",
                                     "pass": apply["pass"]},
        "bulk requests/s": {"value": bulk["per_s"], "unit": "/s", "fmt": ".0f",
                            "target": f">= {BULK_RATE_TARGET}",
                            "pass": bulk_rate >= BULK_RATE_TARGET},
        "bulk / plain apply_async loop": {
            "ratio": spread([over_plain], 2), "target": f">= {BULK_OVER_PLAIN_TARGET:g}x",
            "pass": over_plain >= BULK_OVER_PLAIN_TARGET},
        "bulk / redis-benchmark LPUSH -P 16": {
            "ratio": spread([over_redis], 3), "target": f">= {BULK_OVER_REDIS_TARGET}",
            "pass": over_redis >= BULK_OVER_REDIS_TARGET},
    }
    if checked is not None:
        targets["executed correctly"] = {
            "value": spread([checked["bulk_requests"] - checked["bulk_wrong"]]), "unit": "",
            "fmt": ".0f", "target": f"{checked['bulk_requests']} of {checked['bulk_requests']}"
            " + batch --wait exit 0", "pass": checked["pass"]}
    return {
        "benchmark": "producer", "date": now_utc(), "machine": machine(), "versions": vers,
        "shard_count": SHARD_COUNT, "apply_async": apply, "bulk": bulk,
        "redis_benchmark_lpush_per_s": redis_rates,
        "bulk_over_redis": {k: round(bulk_rate / v, 3) for k, v in redis_rates.items()},
        "bulk_over_plain": round(over_plain, 2), "batch": batch, "verify": checked,
        "targets": targets, "pass": all(t["pass"] for t in targets.values()),
    }


def _plain_body(n: int, name: str, shape: list[int]) -> None:
    """The plain app's task: never runs here (no worker), only sent."""


def report(result: dict[str, Any]) -> None:
    out = Console(soft_wrap=True)
    a, b, t = result["apply_async"], result["bulk"], result["targets"]
    out.print(f"apply_async: plain Celery {fmt_spread(a['plain_per_s'], '.0f', '/s')} "
              f"({a['plain_us_per_call']} us/call), routed gpu-tasks "
              f"{fmt_spread(a['routed_per_s'], '.0f', '/s')} ({a['routed_us_per_call']} "
              f"us/call); routed/plain {fmt_spread(a['ratio'])}, target >= "
              f"{APPLY_RATIO_TARGET}: {verdict(a['pass'])}")
    out.print(f"bulk: {fmt_spread(b['per_s'], '.0f', '/s')} over {b['requests_per_round']} "
              f"requests ({b['message_bytes']} bytes each): "
              f"{verdict(t['bulk requests/s']['pass'])}; {result['bulk_over_plain']}x the "
              f"plain loop: {verdict(t['bulk / plain apply_async loop']['pass'])}")
    for name, rate in result["redis_benchmark_lpush_per_s"].items():
        out.print(f"  redis-benchmark LPUSH {name}: {rate:.0f}/s; bulk is "
                  f"{result['bulk_over_redis'][name]:.3f} of it")
    out.print(f"  judged against default_P16 (target >= {BULK_OVER_REDIS_TARGET}): "
              f"{verdict(t['bulk / redis-benchmark LPUSH -P 16']['pass'])}")
    c = result["batch"]
    out.print(f"batch: {c['lines']} lines in {c['seconds']} s end to end = "
              f"{c['lines_per_s']:.0f} lines/s")
    if result["verify"]:
        v = result["verify"]
        out.print(f"executed: {v['bulk_requests'] - v['bulk_wrong']}/{v['bulk_requests']} "
                  f"bulk requests right; batch --wait exit {v['batch_exit']}, "
                  f"{v['batch_succeeded']} succeeded: {verdict(v['pass'])}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_common_args(parser)
    parser.add_argument("--messages", type=int, default=3000, help="apply_async per run")
    parser.add_argument("--pairs", type=int, default=7, help="routed/plain run pairs")
    parser.add_argument("--block", type=int, default=100, help="messages per block")
    parser.add_argument("--bulk", type=int, default=100_000, help="requests per bulk round")
    parser.add_argument("--rounds", type=int, default=5, help="bulk rounds")
    parser.add_argument("--redis-requests", type=int, default=1_000_000,
                        help="LPUSHes per redis-benchmark run")
    parser.add_argument("--batch-lines", type=int, default=100_000, help="lines of the batch")
    parser.add_argument("--verify", type=int, default=2000,
                        help="requests the workers must execute correctly (0: skip)")
    args = parser.parse_args(argv)
    return run_main("benchmarks.producer", args, run, report)


if __name__ == "__main__":
    sys.exit(main())
