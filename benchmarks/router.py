"""Routing cost: the router's decision time, and apply_async's rate with and without it.

Run from the repository root::

    .venv/bin/python -m benchmarks.router [--json] [--check]

It starts its own ``redis-server`` on a free loopback port, creates a balanced shard
map over four GPUs ``gpu.bench.0..3`` (S = 1024 shards), and measures:

1. **Decision cost**: ``router(name, (), {"entity_id": e}, {}, task)``, the call Celery
   makes on every ``apply_async``, on an :class:`~gpu_tasks.protocol.routing.EntityRouter` built
   as the app builds it (``EntityRouter(shard_count_reader(settings))``: S is read from
   Redis once, on the first routed request, before timing). ns per decision over
   ``--calls`` calls cycling over ``--entities`` distinct ids, per repetition; the median
   over repetitions is compared with the target (<= 1000 ns), and the bare loop's cost is
   reported beside it. **No Redis on the hot path**: Redis's own count of commands
   processed (``INFO stats``) is read before and after the timed repetitions; the
   difference, less what the two ``INFO`` calls themselves add, must be 0.
2. **apply_async rate**, routed vs not, in pairs of runs (interleaved in blocks of
   ``--block`` messages, which side goes first alternating between pairs):

   - routed: ``alloc.apply_async(kwargs={"entity_id": e, ...})``: the user's call;
     Celery consults ``task_routes`` and :class:`EntityRouter` picks the shard queue;
   - baseline: the same call with ``queue=<that shard queue>`` (looked up before the
     clock starts) and ``router=`` a Celery router with no routes, so
     :class:`EntityRouter` is never called. Same app, same connection pool, same
     messages, same queues; only the routing decision differs.

   No worker consumes: the messages stay in Redis (their count is checked) and the
   queues are emptied between pairs. Median of the per-pair ratios routed/baseline;
   target >= 0.97.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

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

DECISION_TARGET_NS = 1000.0
RATE_TARGET_RATIO = 0.97
GPUS = [f"gpu.{NODE}.{i}" for i in range(4)]
SHARD_COUNT = 1024


def entity_ids(count: int) -> list[str]:
    return [f"user-{i:06d}" for i in range(count)]


def commands_processed(client: Any) -> int:
    return int(client.info("stats")["total_commands_processed"])


# -- 1. decision cost ---------------------------------------------------------------------


def measure_decisions(
    router: Callable[..., Any],
    name: str,
    task: Any,
    entities: Sequence[str],
    calls: int,
    repeats: int,
    client: Any,
    bar: Progress,
) -> dict[str, Any]:
    """ns per ``router(...)`` call, ns per iteration of the same loop doing nothing, and
    Redis commands sent meanwhile."""
    kwargs_pool = [{"entity_id": e} for e in entities]
    sequence = [kwargs_pool[(i * 7919) % len(kwargs_pool)] for i in range(calls)]
    args: tuple[Any, ...] = ()
    options: dict[str, Any] = {}
    for kw in kwargs_pool:  # warm: S read from Redis here, every id seen once
        router(name, args, kw, options, task)

    def empty_loop() -> int:
        t0 = time.perf_counter_ns()
        for _kw in sequence:
            pass
        return time.perf_counter_ns() - t0

    def routed_loop() -> int:
        t0 = time.perf_counter_ns()
        for kw in sequence:
            router(name, args, kw, options, task)
        return time.perf_counter_ns() - t0

    # What two INFO calls in a row count (themselves): subtracted below.
    calibration = -commands_processed(client) + commands_processed(client)
    step = bar.add_task("router decisions", total=repeats)
    per_call: list[float] = []
    loop_only: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()  # the loop allocates nothing long-lived; keep collections out of the timing
    commands_before = commands_processed(client)
    try:
        for _ in range(repeats):
            loop_only.append(empty_loop() / calls)
            per_call.append(routed_loop() / calls)
            bar.advance(step)
    finally:
        if gc_was_enabled:
            gc.enable()
    redis_commands = commands_processed(client) - commands_before - calibration
    ns = spread(per_call, 1)
    return {
        "calls_per_repeat": calls,
        "distinct_entities": len(entities),
        "repeats": repeats,
        "ns_per_decision": ns,
        "ns_loop_overhead": spread(loop_only, 1),
        "per_repeat_ns": [round(v, 1) for v in per_call],
        "redis_commands_during_timing": redis_commands,
        "target_ns": DECISION_TARGET_NS,
        "pass": ns["median"] <= DECISION_TARGET_NS and redis_commands == 0,
    }


# -- 2. apply_async rate ------------------------------------------------------------------


def measure_publish(
    app: Any,
    task: Any,
    entity_router: Any,
    client: Any,
    entities: Sequence[str],
    messages: int,
    pairs: int,
    block: int,
    bar: Progress,
) -> dict[str, Any]:
    from celery.app.routes import Router

    no_routes = Router([], app.amqp.queues, True, app=app)
    picked = [entities[(i * 7919) % len(entities)] for i in range(messages)]
    queue_of = {e: entity_router.route(e).queue for e in set(picked)}
    queues = sorted(set(queue_of.values()))
    kwargs: list[dict[str, Any]] = [{"entity_id": e, "name": "x", "shape": [4]} for e in picked]
    baseline_calls = [(kw, queue_of[e]) for kw, e in zip(kwargs, picked, strict=True)]

    def send_routed(lo: int, hi: int) -> int:
        t0 = time.perf_counter_ns()
        for kw in kwargs[lo:hi]:
            task.apply_async(kwargs=kw)
        return time.perf_counter_ns() - t0

    def send_baseline(lo: int, hi: int) -> int:
        t0 = time.perf_counter_ns()
        for kw, queue in baseline_calls[lo:hi]:
            task.apply_async(kwargs=kw, queue=queue, router=no_routes)
        return time.perf_counter_ns() - t0

    def depth() -> int:
        pipe = client.pipeline(transaction=False)
        for q in queues:
            pipe.llen(q)
        return sum(int(n) for n in pipe.execute())

    def flush() -> None:
        client.delete(*queues)

    # Warm both paths over every message: connections, first-call imports, and the
    # declaration of each shard queue (kombu declares a queue on a connection's first
    # publish to it, which costs a Redis round trip or two: in a timed pair it would be
    # paid by whichever side reached that queue first).
    send_routed(0, messages)
    send_baseline(0, messages)
    if depth() != 2 * messages:
        raise BenchmarkError(f"warm-up published {depth()} messages, not {2 * messages}")
    flush()

    # A shared 2-core VM drifts by tens of percent over seconds, so each pair sends its
    # two runs interleaved in blocks (A B A B ..., A alternating between pairs) and sums
    # each side's time: drift hits both sides alike.
    step = bar.add_task("apply_async pairs", total=pairs)
    rows: list[dict[str, Any]] = []
    senders = {"routed": send_routed, "baseline": send_baseline}
    for pair in range(pairs):
        order = ("routed", "baseline") if pair % 2 == 0 else ("baseline", "routed")
        elapsed_ns = {"routed": 0, "baseline": 0}
        gc.collect()
        for lo in range(0, messages, block):
            hi = min(lo + block, messages)
            for which in order:
                elapsed_ns[which] += senders[which](lo, hi)
        if depth() != 2 * messages:
            raise BenchmarkError(f"pair {pair} left {depth()} messages, not {2 * messages}")
        flush()
        rates = {k: messages / (ns / 1e9) for k, ns in elapsed_ns.items()}
        rows.append({
            "first": order[0],
            "routed_per_s": round(rates["routed"], 1),
            "baseline_per_s": round(rates["baseline"], 1),
            "ratio": round(rates["routed"] / rates["baseline"], 4),
        })
        bar.advance(step)
    ratio = spread(r["ratio"] for r in rows)
    return {
        "messages_per_run": messages,
        "block": block,
        "queues_used": len(queues),
        "pairs": rows,
        "routed_per_s": spread((r["routed_per_s"] for r in rows), 1),
        "baseline_per_s": spread((r["baseline_per_s"] for r in rows), 1),
        "us_per_call_difference_median": round(statistics.median(
            1e6 / r["routed_per_s"] - 1e6 / r["baseline_per_s"] for r in rows), 2),
        "ratio": ratio,
        "target_ratio": RATE_TARGET_RATIO,
        "pass": ratio["median"] >= RATE_TARGET_RATIO,
    }


# -- main ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    import redis

    from gpu_tasks.control.shardmap import ShardMap, ShardMapStore
    from gpu_tasks.local.redis_server import RedisServer
    from gpu_tasks.settings import Settings

    with tempfile.TemporaryDirectory(prefix="gpu-tasks-bench-router-") as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            client = redis.Redis.from_url(server.url)
            ShardMapStore(client).create(ShardMap.balanced(GPUS, SHARD_COUNT))
            settings = Settings(redis_url=server.url, node=NODE)

            from gpu_tasks import app as app_module
            from gpu_tasks.protocol.routing import EntityRouter

            app_module.configure(settings)
            from gpu_tasks.tasks import alloc

            entities = entity_ids(args.entities)
            with progress_bar() as bar:
                standalone = EntityRouter(app_module.shard_count_reader(settings))
                decisions = measure_decisions(standalone, alloc.name, alloc, entities,
                                              args.calls, args.repeats, client, bar)
                publish = measure_publish(app_module.app, alloc, app_module.router, client,
                                          entities, args.messages, args.pairs, args.block, bar)
            vers = versions(client)
            app_module.app.close()
            client.close()
        finally:
            server.stop()
    return {
        "benchmark": "router",
        "date": now_utc(),
        "machine": machine(),
        "versions": vers,
        "shard_count": SHARD_COUNT,
        "gpus": GPUS,
        "decision": decisions,
        "apply_async": publish,
        "targets": {
            "router decision ns": {
                "value": decisions["ns_per_decision"],
                "target": f"<= {DECISION_TARGET_NS:.0f} ns, 0 Redis commands",
                "pass": decisions["pass"],
            },
            "apply_async routed/baseline": {
                "ratio": publish["ratio"],
                "target": f">= {RATE_TARGET_RATIO}",
                "pass": publish["pass"],
            },
        },
        "pass": decisions["pass"] and publish["pass"],
    }


def report(result: dict[str, Any]) -> None:
    d, p = result["decision"], result["apply_async"]
    out = Console(soft_wrap=True)
    out.print(
        f"router decision: {fmt_spread(d['ns_per_decision'], '.0f', ' ns')} median (min-max) "
        f"over {d['repeats']} x {d['calls_per_repeat']} calls, {d['distinct_entities']} "
        f"entities; bare loop ~{d['ns_loop_overhead']['median']:.0f} ns; Redis commands "
        f"while timing: {d['redis_commands_during_timing']}; target <= "
        f"{d['target_ns']:.0f} ns and 0 commands: {verdict(d['pass'])}"
    )
    for i, row in enumerate(p["pairs"]):
        out.print(
            f"  pair {i}: routed {row['routed_per_s']:8.0f}/s  "
            f"baseline {row['baseline_per_s']:8.0f}/s  ratio {row['ratio']:.3f}  "
            f"({row['first']} first)"
        )
    out.print(
        f"apply_async: routed {fmt_spread(p['routed_per_s'], '.0f', '/s')} vs baseline "
        f"{fmt_spread(p['baseline_per_s'], '.0f', '/s')} ({p['messages_per_run']} messages "
        f"per run over {p['queues_used']} shard queues, blocks of {p['block']}); "
        f"routed/baseline {fmt_spread(p['ratio'])}, target >= {p['target_ratio']}: "
        f"{verdict(p['pass'])}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_common_args(parser)
    parser.add_argument("--calls", type=int, default=200_000, help="router calls per repeat")
    parser.add_argument("--entities", type=int, default=10_000, help="distinct entity ids")
    parser.add_argument("--repeats", type=int, default=9, help="decision-cost repetitions")
    parser.add_argument("--messages", type=int, default=2000, help="messages per publish run")
    parser.add_argument("--pairs", type=int, default=7, help="routed/baseline run pairs")
    parser.add_argument(
        "--block", type=int, default=100, help="messages per interleaved block within a pair"
    )
    args = parser.parse_args(argv)
    return run_main("benchmarks.router", args, run, report)


if __name__ == "__main__":
    sys.exit(main())
