"""What the benchmarks share: process handling, readiness, CPU accounting, statistics,
the environment they ran in, and the command-line conventions (``--json``, ``--check``).

Every benchmark starts its own ``redis-server`` on a free loopback port and its workers
each in their own process group (:func:`gpu_tasks.local.cluster.spawn`), and stops all of them
in a ``finally`` (:func:`stop_all`), so an exception, Ctrl-C, SIGTERM or SIGHUP
(:func:`install_signal_handlers`) leaves nothing running.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.progress import Progress

from gpu_tasks.local.cluster import Process

NODE = "bench"
REPO_ROOT = Path(__file__).resolve().parent.parent
READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
RESULT_PREFIX = "celery-task-meta-"
"""Key (and pub/sub channel) prefix of Celery's Redis result backend: every app here
keeps Celery's default."""

console = Console(stderr=True)
"""Progress and status go to stderr, so ``--json`` leaves stdout to the JSON object."""


class BenchmarkError(RuntimeError):
    """A benchmark could not measure (a worker died, a task failed, a timeout)."""


# -- progress -----------------------------------------------------------------------------


@contextlib.contextmanager
def progress_bar() -> Iterator[Progress]:
    """A rich progress bar on a terminal (stderr); disabled otherwise."""
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        yield bar


@contextlib.contextmanager
def spinner(text: str) -> Iterator[None]:
    """A status spinner on a terminal; nothing otherwise."""
    if console.is_terminal:
        with console.status(text, spinner="dots"):
            yield
    else:
        yield


# -- processes ----------------------------------------------------------------------------


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops everything


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C does, through every ``finally``."""
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)


def check_alive(child: Process) -> None:
    if not child.alive():
        raise BenchmarkError(
            f"{child.name} exited with {child.popen.returncode}:\n{child.log_tail()}"
        )


def stop_all(children: Sequence[Process], timeout_s: float = 15.0) -> None:
    """SIGTERM each worker's leader (a warm shutdown: its pool child finishes and closes its
    device), wait up to ``timeout_s`` in all, then SIGKILL each whole process group (what the
    leader left), even if interrupted meanwhile."""
    try:
        for child in children:
            if child.alive():
                with contextlib.suppress(ProcessLookupError):
                    child.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(max(0.05, deadline - time.monotonic()))
    finally:
        for child in children:
            child.signal_group(signal.SIGKILL)
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(5.0)
            child.log_file.close()


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def group_cpu_s(pgid: int) -> tuple[float, float] | None:
    """CPU seconds (utime + stime, from /proc) of process group ``pgid``: its leader (a
    worker's main process, pid = pgid) and the rest of the group (its pool child)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    leader = rest = 0
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited meanwhile
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[2]) != pgid:  # fields: state ppid pgrp ...; utime, stime at 11, 12
            continue
        ticks = int(fields[11]) + int(fields[12])
        if int(stat.parent.name) == pgid:
            leader += ticks
        else:
            rest += ticks
    return leader / _CLOCK_TICKS, rest / _CLOCK_TICKS


class CpuMeter:
    """CPU seconds spent by some workers' process groups between :meth:`start` and
    :meth:`stop`, split into main processes and pool children, and by the redis-server
    (process ``redis_pid``) meanwhile."""

    def __init__(self, children: Iterable[Process], redis_pid: int | None = None) -> None:
        self.pgids = [c.popen.pid for c in children]
        self.redis_pid = redis_pid
        self._start: list[tuple[float, float] | None] = []
        self._redis_start: float | None = None

    def _read(self) -> list[tuple[float, float] | None]:
        return [group_cpu_s(pgid) for pgid in self.pgids]

    def start(self) -> None:
        self._start = self._read()
        self._redis_start = process_cpu_s(self.redis_pid)

    def stop(self, count: int) -> dict[str, int | None]:
        """µs per task (``count`` tasks) in all the workers, in their main processes, in
        their children, and in redis-server."""
        end = self._read()
        redis_end = process_cpu_s(self.redis_pid)
        redis_us = (None if redis_end is None or self._redis_start is None
                    else round((redis_end - self._redis_start) / count * 1e6))
        main = child = 0.0
        for before, after in zip(self._start, end, strict=True):
            if before is None or after is None:
                return {"total": None, "main": None, "child": None, "redis": redis_us}
            main += after[0] - before[0]
            child += after[1] - before[1]
        return {
            "total": round((main + child) / count * 1e6),
            "main": round(main / count * 1e6),
            "child": round(child / count * 1e6),
            "redis": redis_us,
        }


def process_cpu_s(pid: int | None) -> float | None:
    """CPU seconds (utime + stime) of one process, from /proc; None if unknown."""
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


# -- workers ------------------------------------------------------------------------------


def gpu_worker_argv(gpu_index: int, loglevel: str | None = None) -> list[str]:
    """A sim GPU worker as an operator starts one (env: GPU_TASKS_REDIS_URL, _NODE)."""
    argv = [sys.executable, "-m", "gpu_tasks.cli", "worker", "--gpu", str(gpu_index),
            "--backend", "sim", "--import", "benchmarks.trivial_tasks"]
    return [*argv, "--loglevel", loglevel] if loglevel else argv


def plain_worker_argv(app_name: str, queue: str, worker: str,
                      loglevel: str | None = None) -> list[str]:
    """A plain ``celery worker -P prefork -c 1`` on one queue of a trivial_tasks app."""
    argv = [sys.executable, "-m", "celery", "-A", f"benchmarks.trivial_tasks:{app_name}",
            "worker", "-P", "prefork", "-c", "1", "-Q", queue,
            "--without-gossip", "--without-mingle", "-n", worker]
    return [*argv, "--loglevel", loglevel] if loglevel else argv


def wait_ready(
    children: Sequence[Process],
    gpus: Sequence[tuple[Any, str, Process]],
    pings: Sequence[tuple[Any, str]],
    timeout_s: float,
) -> None:
    """Until every ``(redis client, gpu, process)`` serves its GPU and every ``(app, worker
    name)`` answers a ping.

    A GPU worker serves when its lease says it consumes by the shard map's current epoch
    and its device is registered in the fleet by this process (``started_at`` no earlier
    than the process): what :meth:`gpu_tasks.local.cluster.LocalCluster.wait_ready` checks."""
    from gpu_tasks.control.fleet import FleetRegistry
    from gpu_tasks.control.lease import LeaseStore
    from gpu_tasks.control.shardmap import ShardMapStore

    deadline = time.monotonic() + timeout_s
    pending_gpus = list(gpus)
    pending_pings = list(pings)
    while pending_gpus or pending_pings:
        for child in children:
            check_alive(child)
        for item in list(pending_gpus):
            client, gpu, child = item
            epoch = ShardMapStore(client).epoch()
            lease, record = LeaseStore(client).get(gpu), FleetRegistry(client).get(gpu)
            if (lease is not None and lease.epoch == (-1 if epoch is None else epoch)
                    and record is not None and record.started_at >= child.started_at):
                pending_gpus.remove(item)
        for app, worker in list(pending_pings):
            if app.control.ping(destination=[worker], timeout=0.5):
                pending_pings.remove((app, worker))
        if time.monotonic() > deadline:
            waiting = [g for _c, g, _p in pending_gpus] + [w for _a, w in pending_pings]
            tails = "\n".join(f"--- {c.name}:\n{c.log_tail(1500)}" for c in children)
            raise BenchmarkError(f"not ready after {timeout_s}s: {waiting}\n{tails}")
        if pending_gpus or pending_pings:
            time.sleep(0.1)


def entities_for_shards(shards: Sequence[int], shard_count: int, per_shard: int,
                        prefix: str) -> list[str]:
    """``per_shard`` entity ids for each shard in ``shards``, in round-robin order over the
    shards (shard a, b, c, ..., a, b, c, ...): every shard gets its share of any prefix of
    the list that is a multiple of ``len(shards)`` long."""
    from gpu_tasks.protocol.routing import shard_index

    wanted = set(shards)
    found: dict[int, list[str]] = {s: [] for s in shards}
    missing = len(shards) * per_shard
    i = 0
    while missing:
        entity = f"{prefix}{i}"
        i += 1
        index = shard_index(entity, shard_count)
        if index in wanted and len(found[index]) < per_shard:
            found[index].append(entity)
            missing -= 1
    return [found[s][k] for k in range(per_shard) for s in shards]


def result_key(task_id: str) -> str:
    return f"{RESULT_PREFIX}{task_id}"


def states(client: Any, task_ids: Sequence[str]) -> list[str | None]:
    """The stored state of each task (None: no result yet)."""
    if not task_ids:
        return []
    return [None if raw is None else json.loads(raw).get("status")
            for raw in client.mget([result_key(t) for t in task_ids])]


# -- statistics ---------------------------------------------------------------------------


def spread(values: Iterable[float | int | None], digits: int = 4) -> dict[str, Any]:
    """Median, min and max of ``values`` (Nones left out)."""
    kept = [v for v in values if v is not None]
    if not kept:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": round(statistics.median(kept), digits),
        "min": round(min(kept), digits),
        "max": round(max(kept), digits),
        "n": len(kept),
    }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, nearest rank."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 1))))
    return sorted_values[rank - 1]


def verdict(ok: bool) -> str:
    return "[bold green]PASS[/]" if ok else "[bold red]FAIL[/]"


def fmt_spread(s: dict[str, Any], fmt: str = ".3f", unit: str = "") -> str:
    """``median (min-max)``."""
    if s["median"] is None:
        return "n/a"
    return f"{s['median']:{fmt}}{unit} ({s['min']:{fmt}}-{s['max']:{fmt}})"


# -- environment --------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """CPU model, cores and RAM of this machine, from /proc where there is one."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ram_bytes = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_bytes = int(line.split()[1]) * 1024
                break
    loadavg = None
    with contextlib.suppress(OSError):
        loadavg = Path("/proc/loadavg").read_text().split()[:3]
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "ram_bytes": ram_bytes,
        "kernel": platform.release(),
        "loadavg_at_start": loadavg,
    }


def versions(redis_client: Any | None = None) -> dict[str, Any]:
    """Python, Celery, kombu, redis-py and (from a running server) redis-server versions."""
    import celery
    import kombu
    import redis

    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "redis_py": redis.__version__,
        "redis_server": None,
    }
    if redis_client is not None:
        with contextlib.suppress(Exception):
            out["redis_server"] = redis_client.info("server").get("redis_version")
    return out


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- command line -------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")


def command_line(module: str, argv: Sequence[str]) -> str:
    """How this benchmark was started, as one would type it in the repository root."""
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(REPO_ROOT)
    return " ".join([str(python), "-m", module, *argv])


def run_main(
    module: str,
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    report: Callable[[dict[str, Any]], None],
) -> int:
    """Run a benchmark; print its JSON or its report; the exit status ``--check`` asks for."""
    install_signal_handlers()
    try:
        result = run(args)
    except KeyboardInterrupt:
        console.print("interrupted; everything this benchmark started was stopped")
        return 130
    except BenchmarkError as exc:
        console.print(f"[bold red]benchmark failed:[/] {exc}")
        return 2
    result["command"] = command_line(module, sys.argv[1:])
    if args.json:
        print(json.dumps(result))
    else:
        report(result)
    return 1 if args.check and not result["pass"] else 0
