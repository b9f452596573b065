"""Run every benchmark and (re)write BENCHMARKS.md with what they measured.

Run from the repository root (``make bench`` does)::

    .venv/bin/python -m benchmarks.report [--output BENCHMARKS.md] [--check] [--quick]

Each benchmark runs in its own process, as ``python -m benchmarks.<name> --json``
(its progress bar, on a terminal, goes to stderr); this collects the JSON objects and
writes one Markdown file: the machine (CPU model, cores, RAM, from /proc), the date,
the versions of Python, Celery, kombu, redis-py and redis-server, the exact commands,
and for each figure the median, min-max, target and PASS/FAIL, the compared sides
next to each other. ``--quick`` runs small counts (to check the pipeline, not to
measure). ``--check`` exits 1 if a target is missed; a benchmark that could not
measure makes it exit 2 either way.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.chaos import section_of
from benchmarks.common import (
    REPO_ROOT,
    command_line,
    console,
    install_signal_handlers,
    machine,
    now_utc,
)

BENCHMARKS = ("router", "drain", "e2e", "fleet", "producer", "status")
QUICK_ARGS: dict[str, list[str]] = {
    "router": ["--calls", "20000", "--repeats", "5", "--messages", "300", "--pairs", "5"],
    "drain": ["--tasks", "300", "--rounds", "5", "--warmup", "50"],
    "e2e": ["--requests", "300", "--serial", "50", "--rounds", "5", "--warmup", "50"],
    "fleet": ["--handoffs", "2", "--quiet-s", "1", "--failover-runs", "1"],
    "producer": ["--messages", "300", "--pairs", "3", "--bulk", "20000", "--rounds", "2",
                 "--redis-requests", "100000", "--batch-lines", "5000", "--verify", "200"],
    "status": ["--messages", "100000", "--repeats", "5"],
}


def run_benchmark(name: str, extra: Sequence[str]) -> tuple[str, dict[str, Any] | None, int]:
    """Run one benchmark with ``--json``: its command line, its JSON (None if it failed)
    and its exit status."""
    argv = ["--json", *extra]
    command = command_line(f"benchmarks.{name}", argv)
    console.print(f"[bold]running[/] {command}")
    proc = subprocess.Popen([sys.executable, "-m", f"benchmarks.{name}", *argv],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        stdout, _ = proc.communicate()
    except BaseException as exc:
        stop_child(proc, exc)
        raise
    try:
        result = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return command, None, proc.returncode
    return command, result, proc.returncode


def stop_child(proc: subprocess.Popen[str], exc: BaseException) -> None:
    """Let an interrupted benchmark stop what it started, then reap it.

    Ctrl-C on a terminal reaches the benchmark too (same process group); a SIGINT sent to
    this process alone, or a SIGTERM/SIGHUP, is passed on. Either way the benchmark
    unwinds through its own cleanup (workers, redis-server), which is waited for: killing
    it now would leave its workers running."""
    if proc.poll() is None and not isinstance(exc, KeyboardInterrupt):
        proc.send_signal(signal.SIGTERM)
    for sig in (signal.SIGINT, signal.SIGKILL):
        try:
            proc.wait(10.0 if sig == signal.SIGINT else 60.0)
            return
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
    proc.wait()


# -- Markdown -----------------------------------------------------------------------------


def _num(value: float | int | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _spread(s: dict[str, Any], fmt: str = ".3f", unit: str = "") -> str:
    if s.get("median") is None:
        return "n/a"
    return (f"**{s['median']:{fmt}}**{unit} ({s['min']:{fmt}}-{s['max']:{fmt}})")


def _verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**FAIL**"


def _environment(results: dict[str, dict[str, Any]]) -> list[str]:
    first = next(iter(results.values()), None)
    mach = first["machine"] if first else machine()
    vers = first["versions"] if first else {}
    ram = mach.get("ram_bytes")
    load = mach.get("loadavg_at_start")
    lines = [
        "## Machine and versions",
        "",
        f"- CPU: {mach.get('cpu_model')}, {mach.get('cpus')} cores (logical CPUs)",
        f"- RAM: {_num(ram / 2**30 if ram else None, '.1f')} GiB; kernel {mach.get('kernel')}",
        f"- load average when the first benchmark started: {' '.join(load) if load else 'n/a'}",
        f"- Python {vers.get('python')}, Celery {vers.get('celery')}, kombu {vers.get('kombu')}, "
        f"redis-py {vers.get('redis_py')}, redis-server {vers.get('redis_server')}",
        "",
    ]
    return lines


def _summary(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Summary", "", "| benchmark | figure | median (min-max) | target | result |",
             "|---|---|---|---|---|"]
    for name, result in results.items():
        for figure, t in result["targets"].items():
            measured = (_spread(t["ratio"]) if "ratio" in t
                        else _spread(t["value"], t.get("fmt", ".0f"), t.get("unit", " ns")))
            lines.append(f"| {name} | {figure} | {measured} | {t['target']} | "
                         f"{_verdict(t['pass'])} |")
    lines.append("")
    return lines


def _router(r: dict[str, Any]) -> list[str]:
    d, p = r["decision"], r["apply_async"]
    lines = [
        "## Router (`benchmarks/router.py`)",
        "",
        f"S = {r['shard_count']} shards over {len(r['gpus'])} GPUs. Decision: "
        f"{d['repeats']} repetitions x {d['calls_per_repeat']} calls over "
        f"{d['distinct_entities']} entities. `apply_async`: {len(p['pairs'])} pairs x "
        f"{p['messages_per_run']} messages (over {p['queues_used']} shard queues), the two "
        f"sides interleaved in blocks of {p['block']}, the side going first alternating.",
        "",
        "| figure | median (min-max) | target | result |",
        "|---|---|---|---|",
        f"| router decision | {_spread(d['ns_per_decision'], '.0f', ' ns')} | "
        f"≤ {d['target_ns']:.0f} ns | {_verdict(d['ns_per_decision']['median'] <= d['target_ns'])}"
        " |",
        f"| bare loop (included above) | {_spread(d['ns_loop_overhead'], '.0f', ' ns')} | | |",
        f"| Redis commands during the timed decisions | {d['redis_commands_during_timing']} | 0 |"
        f" {_verdict(d['redis_commands_during_timing'] == 0)} |",
        "",
        "| `apply_async` | routed (EntityRouter) | baseline (`queue=` shard queue, no router) |",
        "|---|---|---|",
        f"| messages/s | {_spread(p['routed_per_s'], '.0f')} | "
        f"{_spread(p['baseline_per_s'], '.0f')} |",
        "",
        f"Routed/baseline per pair: {_spread(p['ratio'])}, target ≥ {p['target_ratio']}: "
        f"{_verdict(p['pass'])}. Median difference per call: "
        f"{p['us_per_call_difference_median']:+.1f} µs.",
        "",
    ]
    return lines


def _drain(r: dict[str, Any]) -> list[str]:
    workers: list[str] = r["workers"]
    labels = {
        "gpu256": "GPU worker, 256 shard queues",
        "gpu1024": "GPU worker, 1024 shard queues",
        "plain_late": "plain `prefork -c 1`, same delivery settings",
        "plain": "plain `prefork -c 1`, Celery defaults",
    }
    lines = [
        "## Drain (`benchmarks/drain.py`)",
        "",
        f"{len(r['rounds'])} rounds x {r['tasks_per_round']} trivial tasks per worker, the "
        f"order of the {len(workers)} workers rotating between rounds. Shards consumed: "
        f"gpu256 {r['shards_consumed']['gpu256']}, gpu1024 {r['shards_consumed']['gpu1024']}; "
        f"shards hit per drain: gpu256 {r['shards_hit_per_drain']['gpu256']}, gpu1024 "
        f"{r['shards_hit_per_drain']['gpu1024']}. Worker CPU from /proc (main process + pool "
        "child).",
        "",
        "| worker | tasks/s | worker CPU µs/task | main | child | redis-server CPU µs/task |"
        " publisher CPU µs/task |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in workers:
        w = r["per_worker"][name]
        lines.append(
            f"| {name}: {labels.get(name, name)} | {_spread(w['tasks_per_s'], '.1f')} | "
            f"{_spread(w['worker_cpu_us_per_task'], '.0f')} | "
            f"{_num(w['worker_main_cpu_us_per_task']['median'], '.0f')} | "
            f"{_num(w['worker_child_cpu_us_per_task']['median'], '.0f')} | "
            f"{_num(w['redis_cpu_us_per_task']['median'], '.0f')} | "
            f"{_num(w['publisher_cpu_us_per_task']['median'], '.0f')} |"
        )
    lines += ["", "| ratio (per round, then median over rounds) | median (min-max) | target |"
              " result |", "|---|---|---|---|"]
    for key, t in r["targets"].items():
        lines.append(f"| {key} | {_spread(t['ratio'])} | {t['target']} | {_verdict(t['pass'])} |")
    for g, s in r.get("ratios_vs_defaults", {}).items():
        lines.append(f"| {g}/plain (Celery defaults) | {_spread(s)} | none | |")
    lines.append("")
    return lines


def _e2e(r: dict[str, Any]) -> list[str]:
    g, p = r["per_side"]["gpu"], r["per_side"]["plain"]
    lines = [
        "## End to end (`benchmarks/e2e.py`)",
        "",
        f"{r['workers_per_side']} sim GPU workers (S = {r['shard_count']}) vs "
        f"{r['workers_per_side']} plain `prefork -c 1` workers with the same delivery "
        f"settings. {len(r['rounds'])} rounds; in each, per side: a closed loop of "
        f"{r['requests_per_run']} requests with {r['outstanding']} in flight (loaded), then "
        f"{r['serial_requests_per_run']} requests one at a time (unloaded); the side going "
        "first alternates.",
        "",
        "| figure | GPU workers | plain workers | ratio GPU/plain | target | result |",
        "|---|---|---|---|---|---|",
    ]
    rows = [
        ("throughput, requests/s", "loaded", "requests_per_s", ".1f", "throughput",
         "throughput gpu/plain"),
        ("p50 round trip, ms (loaded)", "loaded", "p50_ms", ".2f", "p50",
         "p50 latency gpu/plain (loaded)"),
        ("p99 round trip, ms (loaded)", "loaded", "p99_ms", ".2f", "p99", None),
        ("p50 round trip, ms (unloaded)", "unloaded", "p50_ms", ".2f", "unloaded_p50",
         "p50 latency gpu/plain (unloaded)"),
        ("p99 round trip, ms (unloaded)", "unloaded", "p99_ms", ".2f", "unloaded_p99", None),
        ("worker CPU µs/request (loaded)", "loaded", "worker_cpu_us_per_request", ".0f", None,
         None),
        ("worker CPU, main processes", "loaded", "worker_main_cpu_us_per_request", ".0f", None,
         None),
        ("worker CPU, pool children", "loaded", "worker_child_cpu_us_per_request", ".0f", None,
         None),
        ("redis-server CPU µs/request (loaded)", "loaded", "redis_cpu_us_per_request", ".0f",
         None, None),
    ]
    for label, phase, key, fmt, ratio_key, target_key in rows:
        ratio = _spread(r["ratios"][ratio_key]) if ratio_key else ""
        target = r["targets"][target_key] if target_key else None
        lines.append(
            f"| {label} | {_spread(g[phase][key], fmt)} | {_spread(p[phase][key], fmt)} | "
            f"{ratio} | {target['target'] if target else ''} | "
            f"{_verdict(target['pass']) if target else ''} |"
        )
    served = [r["rounds"][i]["gpu"]["loaded"]["served_by"] for i in range(len(r["rounds"]))]
    lines += ["", "Requests each GPU served per loaded run (the hash spreads distinct entities "
              "unevenly; the plain side is round-robin): "
              + "; ".join(", ".join(f"{q.rsplit('.', 1)[-1]}: {n}" for q, n in row.items())
                          for row in served) + ".", ""]
    return lines


def _fleet(r: dict[str, Any]) -> list[str]:
    h = r["handoff"]
    lines = [
        "## Fleet changes (`benchmarks/fleet.py`)",
        "",
        f"Rebalance plans for S = {r['shard_count']} when an (N+1)th GPU joins N:",
        "",
        "| N | moves | fraction of shards | limit 1.02/(N+1) | max-min shards per GPU after |"
        " result |",
        "|---|---|---|---|---|---|",
    ]
    for n, row in r["rebalance"].items():
        lines.append(f"| {n} | {row['moves']} | {row['fraction']:.4f} | {row['limit']:.4f} | "
                     f"{row['max_minus_min_after']} | {_verdict(row['pass'])} |")
    lines += [
        "",
        f"Live handoff of one shard holding {h['entities']} entities x "
        f"{h['buffer_bytes'] >> 20} MiB between two sim GPU workers, {len(h['handoffs'])} "
        "times back and forth, while a producer keeps probe writes to those entities in "
        "flight:",
        "",
        "| figure | value |",
        "|---|---|",
        f"| handoff duration | {_spread(h['seconds'], '.2f', ' s')} |",
        f"| the shard's requests, p50 / p99 round trip outside handoffs | "
        f"{h['p50_ms_outside']} / {h['p99_ms_outside']} ms ({h['requests_outside']} requests) |",
        f"| the shard's requests, p50 / p99 round trip sent during a handoff | "
        f"{h['p50_ms_during']} / {h['p99_ms_during']} ms ({h['requests_during']} requests) |",
        f"| extra p99 during a handoff | {h['extra_p99_ms']} ms (max {h['max_ms_during']} ms) |",
        "",
        "Failover: from the SIGKILL of a GPU's whole worker to a request for one of its "
        "shards being served by the other GPU (a coordinator running):",
        "",
        "| setting | lease TTL | failover after | death to served again | runs |",
        "|---|---|---|---|---|",
    ]
    for label, f in r["failover"].items():
        lines.append(f"| {label} | {f['lease_ttl_s']:g} s | {f['failover_after_s']:g} s | "
                     f"{_spread(f['seconds'], '.1f', ' s')} | {len(f['runs'])} |")
    lines.append("")
    return lines


def _producer(r: dict[str, Any]) -> list[str]:
    a, b, c, v = r["apply_async"], r["bulk"], r["batch"], r["verify"]
    rb, over = r["redis_benchmark_lpush_per_s"], r["bulk_over_redis"]
    t = r["targets"]
    lines = [
        "## Producers (`benchmarks/producer.py`)",
        "",
        f"One process. `apply_async`: {len(a['pairs'])} pairs x {a['messages_per_run']} "
        f"messages, the two sides interleaved in blocks of {a['block']}, the side going "
        "first alternating; plain is a stock Celery app (Redis broker and result backend) "
        "sending to its default queue, routed is `gpu_tasks.tasks.alloc.apply_async` "
        f"through the entity router. Bulk: `submit_many` of {b['requests_per_round']} alloc "
        f"requests ({b['message_bytes']} bytes each as stored), checked, built and sent, "
        f"{b['per_s']['n']} rounds. Redis runs as ops/redis.conf does (append-only file, "
        "fsync every second).",
        "",
        "| figure | value | target | result |",
        "|---|---|---|---|",
        f"| plain Celery `apply_async` (unrouted) | {_spread(a['plain_per_s'], '.0f', '/s')}"
        f" = {a['plain_us_per_call']} µs/call | | |",
        f"| gpu-tasks routed `apply_async` | {_spread(a['routed_per_s'], '.0f', '/s')} = "
        f"{a['routed_us_per_call']} µs/call | | |",
        f"| routed / plain (per pair) | {_spread(a['ratio'])} | ≥ 1.5 | "
        f"{_verdict(a['pass'])} |",
        f"| bulk `submit_many` | {_spread(b['per_s'], '.0f', '/s')} | ≥ 50,000/s | "
        f"{_verdict(t['bulk requests/s']['pass'])} |",
        f"| bulk / plain `apply_async` loop | {r['bulk_over_plain']}x | ≥ 30x | "
        f"{_verdict(t['bulk / plain apply_async loop']['pass'])} |",
        f"| `redis-benchmark -t lpush -P 16` (50 connections, 3-byte value) | "
        f"{rb['default_P16']:.0f}/s; bulk is {over['default_P16']:.3f} of it | ≥ 0.30 | "
        f"{_verdict(t['bulk / redis-benchmark LPUSH -P 16']['pass'])} |",
        f"| the same from one connection (`-c 1`) | {rb['one_connection_P16']:.0f}/s; bulk "
        f"is {over['one_connection_P16']:.3f} of it | (shown) | |",
        f"| one connection, value of the bulk message's size (`-c 1 -d "
        f"{b['message_bytes']}`) | {rb['one_connection_P16_same_size']:.0f}/s; bulk is "
        f"{over['one_connection_P16_same_size']:.3f} of it | (shown) | |",
        f"| `gpu-tasks batch` of {c['lines']} lines, end to end (new process, check, send "
        f"exactly once) | {c['lines_per_s']:.0f} lines/s ({c['seconds']} s) | (reported) | |",
    ]
    if v:
        lines.append(f"| executed by 2 sim GPU workers | {v['bulk_requests'] - v['bulk_wrong']}"
                     f"/{v['bulk_requests']} bulk requests right; `batch --wait` exit "
                     f"{v['batch_exit']}, {v['batch_succeeded']} succeeded | all | "
                     f"{_verdict(v['pass'])} |")
    lines.append("")
    return lines


def _status(r: dict[str, Any]) -> list[str]:
    t = next(iter(r["targets"].values()))
    return [
        "## Status at scale (`benchmarks/status.py`)",
        "",
        f"{r['gpus']} GPUs, S = {r['shard_count']}, {r['queued']:,} requests queued (two GPUs "
        "with work and no consumer, which the snapshot must flag); one "
        "`gpu_tasks.control.status.snapshot` per call, as `gpu-tasks status` and the exporter "
        "take it.",
        "",
        "| figure | value | target | result |",
        "|---|---|---|---|",
        f"| first snapshot (notes every queue's oldest message) | {r['snapshot_first_ms']} ms "
        "| | |",
        f"| later snapshots | {_spread(r['snapshot_ms'], '.1f', ' ms')} | | |",
        f"| slowest snapshot, the first included | {t['value']['median']:.1f} ms | ≤ 100 ms | "
        f"{_verdict(t['pass'])} |",
        f"| of which the one Lua read of every queue | "
        f"{_spread(r['read_queues_ms'], '.1f', ' ms')} | | |",
        f"| `gpu-tasks status` in-process (snapshot and table, piped) | "
        f"{_spread(r['status_command_ms'], '.1f', ' ms')} | | |",
        f"| one exporter scrape | {_spread(r['exporter_scrape_ms'], '.1f', ' ms')} | | |",
        "",
    ]


def markdown(results: dict[str, dict[str, Any]], commands: dict[str, str],
             failures: dict[str, int], date: str) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`python -m benchmarks.report`) on {date}. How each figure "
        "is measured: [benchmarks/README.md](benchmarks/README.md) and each module's "
        "docstring. Figures are medians over rounds with the min-max beside them; ratios are "
        "taken per round, with the compared sides measured in the same run, in a rotating "
        "order.",
        "",
        *_environment(results),
        "## Commands",
        "",
        "```sh",
        *commands.values(),
        "```",
        "",
    ]
    if failures:
        lines += ["## Benchmarks that could not measure", ""]
        lines += [f"- `{commands[n]}` exited with {rc}" for n, rc in failures.items()]
        lines.append("")
    lines += _summary(results)
    sections = {"router": _router, "drain": _drain, "e2e": _e2e, "fleet": _fleet,
                "producer": _producer, "status": _status}
    for name, result in results.items():
        lines += sections[name](result)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--output", default="BENCHMARKS.md", help="Markdown file to (re)write")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument("--only", choices=BENCHMARKS, action="append",
                        help="run only this benchmark (repeatable)")
    args = parser.parse_args(argv)
    install_signal_handlers()
    date = now_utc()
    results: dict[str, dict[str, Any]] = {}
    commands: dict[str, str] = {}
    failures: dict[str, int] = {}
    try:
        for name in args.only or BENCHMARKS:
            extra = QUICK_ARGS[name] if args.quick else []
            command, result, rc = run_benchmark(name, extra)
            commands[name] = command
            if result is None:
                failures[name] = rc
                console.print(f"[bold red]{name} failed[/] (exit {rc})")
            else:
                results[name] = result
    except KeyboardInterrupt:
        console.print("interrupted; nothing written")
        return 130
    output = Path(args.output)
    if not output.is_absolute():
        output = REPO_ROOT / output
    text = markdown(results, commands, failures, date)
    # The Reliability section is make chaos's (benchmarks/chaos.py): kept as it was.
    kept = section_of(output.read_text()) if output.exists() else None
    if kept:
        text = text.rstrip("\n") + "\n\n" + kept
    output.write_text(text)
    print(text)
    console.print(f"wrote {output}")
    if failures:
        return 2
    return 1 if args.check and not all(r["pass"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
