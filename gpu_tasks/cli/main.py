"""``gpu-tasks``: run and inspect a deployment.

Flags override ``GPU_TASKS_*`` settings; ``--json`` prints one JSON document for
scripts. Errors print one line naming what was wrong and exit 1.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich import box
from rich.console import Console
from rich.progress import Progress, TaskID
from rich.table import Table

from gpu_tasks.control.actions import Listener, Rebalanced
from gpu_tasks.control.failover import Failover
from gpu_tasks.control.handoff import Outcome
from gpu_tasks.control.shardmap import MAX_SHARDS
from gpu_tasks.errors import ConfigError, GpuTasksError
from gpu_tasks.settings import BACKENDS, Settings, parse_size

if TYPE_CHECKING:
    from gpu_tasks.local.cluster import LocalCluster

F = TypeVar("F", bound=Callable[..., Any])
console = Console()


def _settings(ctx: click.Context) -> Settings:
    settings: Settings = ctx.find_root().obj
    return settings


def _app(settings: Settings) -> Any:
    from gpu_tasks.app import app, configure

    configure(settings)
    return app


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def _print(renderable: Any) -> None:
    """Print to the terminal at its width; piped, at whatever width the content needs."""
    if console.is_terminal:
        console.print(renderable)
    else:
        Console(width=10_000, color_system=None).print(renderable)


def _require_worker_extra(command: str) -> None:
    """Name the extra to install instead of failing on a numpy import deep inside."""
    import importlib.util

    if importlib.util.find_spec("numpy") is None:
        raise ConfigError(
            f"`gpu-tasks {command}` runs GPU workers, which need the worker extra: "
            "pip install 'gpu-tasks[worker]' (or '.[worker]' in a checkout; "
            "'gpu-tasks[cuda]' on hosts with NVIDIA GPUs)"
        )


def handle_errors(fn: F) -> F:
    """Turn our errors, and Redis being unreachable, into one clear line and exit 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import redis

        try:
            return fn(*args, **kwargs)
        except GpuTasksError as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
        except (redis.ConnectionError, redis.TimeoutError,
                redis.exceptions.NoPermissionError) as exc:
            raise click.ClickException(_redis_error_line(exc)) from None

    return wrapper  # type: ignore[return-value]


def _redis_error_line(exc: BaseException) -> str:
    """The line a command's Redis error ends it with (the address without the password)."""
    from gpu_tasks import settings as settings_module
    from gpu_tasks.connection.failures import describe

    settings = settings_module.current()
    shown = settings.redis_url_shown
    failure = describe(exc)
    if failure.kind == "login":
        return (f"{failure.what(shown, settings.redis_timeout_s)}: "
                f"{type(failure.cause).__name__}: {failure.cause}")
    if failure.kind == "permission":
        return f"{failure.what(shown, settings.redis_timeout_s)}: {failure.cause}"
    return (f"cannot reach Redis at {shown} (within GPU_TASKS_REDIS_TIMEOUT_S): "
            f"{type(exc).__name__}: {exc}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--redis-url", help="Redis URL (default: $GPU_TASKS_REDIS_URL).")
@click.option("--node", help="This host's name in queue names (default: short host name).")
@click.pass_context
def main(ctx: click.Context, redis_url: str | None, node: str | None) -> None:
    """Entity-sticky GPU work over Celery and Redis."""
    try:
        ctx.obj = Settings.from_env().replace(redis_url=redis_url, node=node)
    except GpuTasksError as exc:
        raise click.ClickException(str(exc)) from None
    from gpu_tasks import settings as settings_module

    settings_module.use(ctx.obj)


# -- route ------------------------------------------------------------------------------


@main.command()
@click.argument("entities", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.pass_context
@handle_errors
def route(ctx: click.Context, entities: tuple[str, ...], as_json: bool) -> None:
    """Print the shard, queue and owning GPU of each ENTITY."""
    from dataclasses import replace

    from gpu_tasks.control.shardmap import ShardMapStore
    from gpu_tasks.protocol.routing import EntityRouter, validate_entity_id

    for entity in entities:
        validate_entity_id(entity)
    shard_map = ShardMapStore(_settings(ctx).redis_client()).load()
    router = EntityRouter(lambda: shard_map.shard_count)
    routes = [router.route(e) for e in entities]
    routes = [replace(r, owner=shard_map.shards[r.shard_index].owner) for r in routes]
    if as_json:
        _emit_json([r.as_dict() for r in routes])
        return
    table = Table("entity", "shard = queue", "owner")
    for r in routes:
        table.add_row(r.entity_id, r.shard, r.owner or "[red]none[/]")
    _print(table)


# -- shards -----------------------------------------------------------------------------


@main.group()
def shards() -> None:
    """Create and show the shard map (which GPU owns each shard)."""


@shards.command("init")
@click.option(
    "--shards",
    "shard_count",
    type=click.IntRange(min=1, max=MAX_SHARDS),
    help="Shard count S (default: $GPU_TASKS_SHARD_COUNT or 1024); fixed for the deployment.",
)
@click.option("--gpus", type=click.IntRange(min=1), help="This node's GPUs 0..N-1.")
@click.option("--owners", help="Comma-separated GPUs, e.g. gpu.a.0,gpu.a.1,gpu.b.0.")
@click.option("--force", is_flag=True, help="Replace an existing map (bumps the epoch).")
@click.option(
    "--discard-state",
    is_flag=True,
    help="With --force while GPU workers run: shards that change owner lose their "
    "entities' device state (their queued requests follow them).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
@handle_errors
def shards_init(
    ctx: click.Context,
    shard_count: int | None,
    gpus: int | None,
    owners: str | None,
    force: bool,
    discard_state: bool,
    as_json: bool,
) -> None:
    """Create a balanced shard map over GPUs."""
    from gpu_tasks.control.shardmap import ShardMap, ShardMapStore, replacement_problems
    from gpu_tasks.protocol.routing import gpu_queue

    settings = _settings(ctx).replace(shard_count=shard_count)
    if (gpus is None) == (owners is None):
        raise click.UsageError("give exactly one of --gpus N or --owners GPU1,GPU2,...")
    targets = (
        [gpu_queue(settings.node, i) for i in range(gpus)]
        if gpus is not None
        else [q.strip() for q in (owners or "").split(",") if q.strip()]
    )
    try:
        new_map = ShardMap.balanced(targets, settings.shard_count)
    except GpuTasksError as exc:
        raise click.BadParameter(str(exc), param_hint="--owners/--gpus") from None
    client = settings.redis_client()
    store = ShardMapStore(client)
    if force and store.exists():
        problems = replacement_problems(client, new_map, discard_state=discard_state)
        if problems:
            raise click.ClickException(
                "not replacing the shard map:\n- " + "\n- ".join(problems))
    store.create(new_map, force=force)
    _print_map(store.load(), as_json)


@shards.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
@handle_errors
def shards_show(ctx: click.Context, as_json: bool) -> None:
    """Print the shard map: shards per GPU and the epoch (--json: every shard too)."""
    from gpu_tasks.control.shardmap import ShardMapStore

    _print_map(ShardMapStore(_settings(ctx).redis_client()).load(), as_json)


def _print_map(shard_map: Any, as_json: bool) -> None:
    summary = shard_map.summary()
    if as_json:
        _emit_json({**shard_map.as_dict(), "gpus": summary})
        return
    table = Table("GPU", "shards", "states",
                  title=f"{shard_map.shard_count} shards, epoch {shard_map.epoch}")
    for gpu, row in summary.items():
        states = ", ".join(f"{n} {state}" for state, n in sorted(row["states"].items()))
        table.add_row(gpu if gpu != "none" else "[red]no owner[/]", str(row["shards"]), states)
    _print(table)


def _shard_index(text: str) -> int:
    from gpu_tasks.protocol.routing import parse_shard_queue

    index = parse_shard_queue(text) if text.startswith("shard-") else (
        int(text) if text.isdigit() else None)
    if index is None:
        raise click.BadParameter(f"{text!r} is not a shard (shard-<n> or <n>)",
                                 param_hint="SHARD")
    return index


class _HandoffProgress(Listener):
    """A rich progress bar of handoffs on a terminal; nothing when piped or with --json."""

    def __init__(self, show: bool) -> None:
        self.bar: Progress | None = Progress(console=console, transient=True) if show else None
        self.task: TaskID | None = None

    def handing_off(self, count: int) -> None:
        if self.bar is None:
            return
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task("handing off", total=count)
        else:
            total = self.bar.tasks[0].total or 0
            self.bar.update(self.task, total=total + count)

    def handed_off(self, outcome: Outcome) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.advance(self.task)

    def __enter__(self) -> _HandoffProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.stop()


def _show_handoffs(outcomes: list[Outcome], as_json: bool,
                   extra: dict[str, Any] | None = None) -> None:
    """Print handoffs' outcomes; exit 1 if any did not leave its shard where asked."""
    from gpu_tasks.control.actions import succeeded

    ok = succeeded(outcomes)
    if as_json:
        _emit_json({**(extra or {}), "ok": ok, "handoffs": [o.as_dict() for o in outcomes]})
    elif outcomes:
        table = Table("shard", "from", "to", "outcome", "entities", "MiB", "seconds", "why",
                      title=f"{len(outcomes)} handoffs")
        for o in outcomes:
            colour = "green" if o.status == "moved" else "red" if o.status in (
                "failed", "rolled back") else "white"
            table.add_row(f"shard-{o.shard}", o.source, o.target, f"[{colour}]{o.status}[/]",
                          str(o.entities), f"{o.bytes / (1 << 20):.1f}", f"{o.seconds:.2f}",
                          o.message)
        _print(table)
    if not ok:
        sys.exit(1)


def _show_rebalance(done: Rebalanced, dry_run: bool, as_json: bool) -> None:
    """A rebalance that handed shards off: its handoffs; else its plan (and, for a dry
    run, the handoffs it would finish first)."""
    assert done.plan is not None
    plan = done.plan
    if done.outcomes:
        _show_handoffs(done.outcomes, as_json, {
            "plan": plan.as_dict(), "resumed": [f"shard-{i}" for i in done.unfinished]})
        return
    if as_json:
        _emit_json({"dry_run": dry_run, "unfinished": [f"shard-{i}" for i in done.unfinished],
                    **plan.as_dict()})
        return
    table = Table("shard", "from", "to", "entities", "MiB",
                  title=f"{len(plan.moves)} moves" + (" (dry run)" if dry_run else ""))
    for m in plan.moves:
        table.add_row(f"shard-{m.shard}", m.source, m.target, str(m.entities),
                      f"{m.bytes / (1 << 20):.1f}")
    _print(table)
    counts = ", ".join(f"{g} {plan.before.get(g, 0)}->{n}" for g, n in plan.after.items())
    console.print(f"shards per GPU: {counts}", soft_wrap=True)
    for line in plan.left_out:
        console.print(f"left out: {line}", soft_wrap=True)


def _app_source(ctx: click.Context) -> Callable[[], Any]:
    """The Celery app, configured only once a handoff needs it."""
    settings = _settings(ctx)
    return lambda: _app(settings)


def _pause(ctx: click.Context) -> tuple[str, float] | None:
    from gpu_tasks.control.handoff import parse_pause

    return parse_pause(_settings(ctx).handoff_pause)


@shards.command("move")
@click.argument("shard")
@click.argument("gpu")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
@handle_errors
def shards_move(ctx: click.Context, shard: str, gpu: str, as_json: bool) -> None:
    """Hand SHARD (shard-<n>) off to GPU live, with its queued work and its state; on a
    shard already being handed off, finish or roll back that handoff."""
    from gpu_tasks.control import actions

    index = _shard_index(shard)
    with _HandoffProgress(show=console.is_terminal and not as_json) as progress:
        outcomes = actions.move(_settings(ctx).redis_client(), _app_source(ctx), index, gpu,
                                pause=_pause(ctx), listener=progress)
    _show_handoffs(outcomes, as_json)


_BY = click.Choice(["count", "memory"])


@shards.command("rebalance")
@click.option("--dry-run", is_flag=True, help="Print the plan; move nothing.")
@click.option("--max-moves", type=click.IntRange(min=1), help="Move at most N shards now.")
@click.option("--by", type=_BY, default="count", show_default=True,
              help="Shares by shard count, or in proportion to device memory.")
@click.option("--parallel", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Handoffs at a time.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
@handle_errors
def shards_rebalance(ctx: click.Context, dry_run: bool, max_moves: int | None, by: str,
                     parallel: int, as_json: bool) -> None:
    """Give every live, undrained GPU its share of shards, moving the fewest, as live
    handoffs (unfinished ones are finished first)."""
    from gpu_tasks.control import actions

    with _HandoffProgress(show=console.is_terminal and not as_json) as progress:
        done = actions.rebalance(_settings(ctx).redis_client(), _app_source(ctx), by=by,
                                 max_moves=max_moves, dry_run=dry_run, parallel=parallel,
                                 pause=_pause(ctx), listener=progress)
    _show_rebalance(done, dry_run, as_json)


@shards.command("failover")
@click.argument("gpu")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
@handle_errors
def shards_failover(ctx: click.Context, gpu: str, as_json: bool) -> None:
    """Give a dead GPU's shards to live GPUs now: the requests it had taken go first, and
    the state it held is reported lost (EntityStateLost). Refused while GPU has a worker."""
    from gpu_tasks.control import actions

    class Shown(_HandoffProgress):
        def failed_over(self, report: Failover) -> None:
            if as_json:
                _emit_json(report.as_dict())
            else:
                console.print(f"{gpu}: {len(report.moved)} shards to live GPUs, "
                              f"{report.requeued} requests put back first, "
                              f"{report.lost_buffers} buffers lost", soft_wrap=True)

    with Shown(show=console.is_terminal and not as_json) as progress:
        done = actions.fail_over_and_resume(_settings(ctx).redis_client(), _app_source(ctx),
                                            gpu, parallel=4, pause=_pause(ctx),
                                            listener=progress)
    if done.report.resumed:
        _show_handoffs(done.outcomes, as_json)


@main.command()
@click.option("--failover-after", "failover_after_s", type=click.FloatRange(min=0),
              help="Seconds a GPU's lease must have been expired before failover "
              "(default: $GPU_TASKS_FAILOVER_AFTER_S or 30).")
@click.option("--auto-rebalance", is_flag=True,
              help="Rebalance when a live GPU owns no shard (one joined or came back).")
@click.option("--max-moves", type=click.IntRange(min=1), default=8, show_default=True,
              help="Handoffs per automatic rebalance round.")
@click.option("--interval", "interval_s", type=click.FloatRange(min=0.1), default=1.0,
              show_default=True, help="Seconds between rounds.")
@click.option("--once", is_flag=True, help="One round, then exit (prints what it did).")
@click.pass_context
@handle_errors
def coordinator(ctx: click.Context, failover_after_s: float | None, auto_rebalance: bool,
                max_moves: int, interval_s: float, once: bool) -> None:
    """Keep the fleet whole: fail over dead GPUs, finish abandoned handoffs, rebalance onto
    GPUs that join. One acts at a time; others stand by."""
    import logging

    from gpu_tasks.control import handoff
    from gpu_tasks.control.coordinator import Coordinator
    from gpu_tasks.local.signals import stop_on_signals

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    settings = _settings(ctx).replace(failover_after_s=failover_after_s)
    boss = Coordinator(settings.redis_client(), _app(settings),
                       failover_after_s=settings.failover_after_s,
                       auto_rebalance=auto_rebalance, max_moves=max_moves,
                       interval_s=interval_s, lease_ttl_s=settings.lease_ttl_s,
                       pause=handoff.parse_pause(settings.handoff_pause))
    if once:
        _emit_json(boss.tick().as_dict())
        boss.release()
        return
    with stop_on_signals() as stop:
        boss.run(stop)


@main.command()
@click.argument("gpu")
@click.option("--dry-run", is_flag=True, help="Print the plan; move nothing.")
@click.option("--by", type=_BY, default="count", show_default=True)
@click.option("--parallel", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
@handle_errors
def drain(ctx: click.Context, gpu: str, dry_run: bool, by: str, parallel: int,
          as_json: bool) -> None:
    """Move every shard off GPU (live handoffs), e.g. before maintenance; it takes no new
    shards until `gpu-tasks undrain GPU`."""
    from gpu_tasks.control import actions

    with _HandoffProgress(show=console.is_terminal and not as_json) as progress:
        done = actions.drain(_settings(ctx).redis_client(), _app_source(ctx), gpu, by=by,
                             dry_run=dry_run, parallel=parallel, pause=_pause(ctx),
                             listener=progress)
    _show_rebalance(done, dry_run, as_json)


@main.command()
@click.argument("gpu")
@click.pass_context
@handle_errors
def undrain(ctx: click.Context, gpu: str) -> None:
    """Let GPU take shards again (at the next `gpu-tasks shards rebalance`)."""
    from gpu_tasks.control.shardmap import ShardMapStore

    ShardMapStore(_settings(ctx).redis_client()).set_drained(gpu, False)
    console.print(f"{gpu} takes shards again at the next `gpu-tasks shards rebalance`")


# -- worker -----------------------------------------------------------------------------


@main.command()
@click.option(
    "--gpu",
    "gpu_index",
    type=click.IntRange(min=0),
    required=True,
    help="Physical GPU index (as nvidia-smi numbers them).",
)
@click.option("--backend", type=click.Choice(BACKENDS), help="Device backend (default auto).")
@click.option("--import", "imports", multiple=True, help="Module with your @gpu_task tasks.")
@click.option(
    "--pool", type=click.Choice(["prefork", "solo"]), default="prefork", show_default=True
)
@click.option("--loglevel", help="Celery log level (default: $GPU_TASKS_LOG_LEVEL or INFO).")
@click.option("--sim-memory", help="Capacity of a sim GPU, e.g. 512MiB.")
@click.pass_context
@handle_errors
def worker(
    ctx: click.Context,
    gpu_index: int,
    backend: str | None,
    imports: tuple[str, ...],
    pool: str,
    loglevel: str | None,
    sim_memory: str | None,
) -> None:
    """Run one Celery worker pinned to GPU I: it takes GPU I's lease and consumes the queues
    of the shards the shard map gives gpu.<node>.<I>, plus that GPU's own queue."""
    _require_worker_extra("worker")
    from gpu_tasks.local.gpus import resolve_backend
    from workers.boot import run_worker
    from workers.child.runtime import WorkerIdentity

    settings = _settings(ctx)
    settings = settings.replace(
        backend=backend,
        imports=(*settings.imports, *imports) if imports else None,
        sim_memory_bytes=parse_size(sim_memory) if sim_memory else None,
    )
    identity = WorkerIdentity(settings.node, gpu_index, resolve_backend(settings.backend))
    settings.require_redis_url()
    sys.exit(run_worker(identity, settings, loglevel=loglevel or settings.log_level, pool=pool))


# -- submit -----------------------------------------------------------------------------


@main.command()
@click.argument("task")
@click.option("--entity", help="entity_id to route by.")
@click.option("--kwargs", "kwargs_json", default="{}", help="Task keyword arguments as JSON.")
@click.option("--queue", help="Send to this GPU queue (for gpu_tasks.stats).")
@click.option("--wait", is_flag=True, help="Wait for the result and print it.")
@click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
@handle_errors
def submit(
    ctx: click.Context,
    task: str,
    entity: str | None,
    kwargs_json: str,
    queue: str | None,
    wait: bool,
    timeout_s: float,
    as_json: bool,
) -> None:
    """Send TASK (e.g. alloc or gpu_tasks.alloc) with Celery's send_task.

    \b
    Exit codes with --wait: 0 the task succeeded; 1 it failed (the error is printed);
    3 it had not finished within --timeout (still queued or running: it will run, so
    do not send it again).
    """
    try:
        kwargs = json.loads(kwargs_json)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--kwargs") from None
    if not isinstance(kwargs, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--kwargs")
    if entity is not None:
        kwargs["entity_id"] = entity
    from gpu_tasks.submit.bulk import task_name

    name = task_name(task)
    app = _app(_settings(ctx))
    options = {"queue": queue} if queue else {}
    result = app.send_task(name, kwargs=kwargs, **options)
    out: dict[str, Any] = {"task_id": result.id, "task": name}
    code = 0
    if wait:
        from celery.exceptions import TimeoutError as ResultTimeout

        try:
            out["result"] = result.get(timeout=timeout_s)
        except ResultTimeout:
            # Not an answer: the request is still queued or running and will run. Exit 3,
            # not 1, so a retrying caller does not send it again.
            out["unfinished"] = {"state": result.state, "timeout_s": timeout_s}
            code = 3
        except Exception as exc:
            out["error"] = {"type": type(exc).__name__, "message": str(exc)}
            code = 1
    if as_json:
        _emit_json(out)
    else:
        console.print_json(data=out)
    sys.exit(code)


# -- batch ------------------------------------------------------------------------------


class _BatchProgress:
    """A rich progress bar on a terminal; nothing when piped or with --json."""

    def __init__(self, show: bool) -> None:
        self.bar: Progress | None = Progress(console=Console(stderr=True),
                                             transient=True) if show else None
        self.task: Any = None

    def start(self, phase: str, total: int) -> None:
        if self.bar is None:
            return
        if self.task is None:
            self.bar.start()
        else:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(phase, total=total or None)

    def advance(self, n: int) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.advance(self.task, n)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)

    def stop(self) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.stop()
            self.task = None


@main.command()
@click.argument("source", metavar="FILE|-")
@click.option("--wait", is_flag=True, help="Wait for every request's result.")
@click.option("--timeout", "timeout_s", type=float, default=600.0, show_default=True,
              help="With --wait: seconds to wait for the results.")
@click.option("--batch-id", help="The batch's id (default: from the file's content). "
              "Re-running a batch id sends only what it has not sent.")
@click.option("--format", "file_format", type=click.Choice(["jsonl", "csv"]),
              help="Input format (default: csv for *.csv, else jsonl).")
@click.option("--task", "default_task", help="Task of lines that name none (e.g. alloc).")
@click.option("--results", "results_path", type=click.Path(dir_okay=False, writable=True),
              help="Write one JSON line per input line (its outcome) to this file.")
@click.option("--max-backlog", type=click.IntRange(min=1),
              help="Slow down while a target GPU has more requests queued than this "
                   "(default: GPU_TASKS_MAX_BACKLOG).")
@click.option("--fail-fast", is_flag=True,
              help="Stop (exit 1) instead of slowing down when a GPU's backlog is too deep.")
@click.option("--lock-wait", "lock_wait_s", type=float, default=0.0, show_default=True,
              help="Seconds to wait for another run of the same batch to finish.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON line.")
@click.pass_context
def batch(ctx: click.Context, source: str, wait: bool, timeout_s: float,
          batch_id: str | None, file_format: str | None, default_task: str | None,
          results_path: str | None, max_backlog: int | None, fail_fast: bool,
          lock_wait_s: float, as_json: bool) -> None:
    """Send every request in FILE (JSONL or CSV; - for standard input) exactly once.

    \b
    Exit codes:
      0  every line accepted (with --wait: and succeeded)
      1  some lines rejected or failed, or sending stopped (--fail-fast, a stalled GPU)
      2  usage, configuration or connection error, or another run is sending this batch
      3  with --wait: some requests had not finished in time (still queued, or taken)
    """
    from pathlib import Path

    import redis

    from gpu_tasks.submit.batch import BatchOptions, run_batch, spool

    settings = _settings(ctx)
    spooled: Path | None = None
    try:
        if source == "-":
            spooled = path = spool(sys.stdin.buffer)
        else:
            path = Path(source)
            if not path.is_file():
                raise click.BadParameter(f"{source}: no such file", param_hint="FILE")
        options = BatchOptions(batch_id=batch_id, file_format=file_format,
                               default_task=default_task, wait=wait, timeout_s=timeout_s,
                               max_backlog=max_backlog, fail_fast=fail_fast,
                               lock_wait_s=lock_wait_s)
        progress = _BatchProgress(show=console.is_terminal and not as_json)
        report = run_batch(path, "-" if source == "-" else source, settings, options,
                           progress, app=_app(settings))
    except (GpuTasksError, redis.RedisError) as exc:
        click.echo(f"gpu-tasks batch: {type(exc).__name__}: {exc}", err=True)
        sys.exit(2)
    finally:
        if spooled is not None:
            spooled.unlink(missing_ok=True)
    if results_path:
        with open(results_path, "w", encoding="utf-8") as out:
            report.write_results(out)
    summary = report.as_dict()
    if as_json:
        click.echo(json.dumps(summary, separators=(",", ":")))
    else:
        _print_batch(summary, report.rejections)
    sys.exit(int(report.exit_code))


def _print_batch(summary: dict[str, Any], rejections: list[Any]) -> None:
    err = Console(stderr=True, soft_wrap=True)
    for r in rejections[:20]:
        err.print(f"line {r.line}: rejected: {r.reason}", markup=False, highlight=False)
    if len(rejections) > 20:
        err.print(f"... and {len(rejections) - 20} more rejected lines (see --results)")
    line = (f"batch {summary['batch_id']}: {summary['lines']} lines, {summary['sent']} sent, "
            f"{summary['skipped']} skipped (already sent), {summary['rejected']} rejected")
    if "succeeded" in summary:
        line += (f"; {summary['succeeded']} succeeded, {summary['failed']} failed, "
                 f"{summary['unfinished']} unfinished ({summary['unfinished_queued']} still "
                 f"queued, {summary['unfinished_taken']} taken by a worker)")
    line += f" in {summary['seconds']:.1f} s"
    console.print(line, markup=False, highlight=False, soft_wrap=True)
    if summary["stopped"]:
        err.print(f"stopped: {summary['stopped']}; re-run to send the rest",
                  markup=False, highlight=False)


# -- status -----------------------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
@handle_errors
def status(ctx: click.Context, as_json: bool) -> None:
    """Each GPU: lease, consuming or not, shards, queued requests and how long the oldest
    has waited, memory, entities, spills; then each PROBLEM (work that nothing consumes,
    shards with no owner)."""
    from rich.text import Text

    from gpu_tasks.control.status import format_seconds, snapshot

    fleet = snapshot(_settings(ctx).redis_client())
    if as_json:
        _emit_json(fleet.as_dict())
        return
    if fleet.gpus:
        _print_gpus(fleet)
    else:
        console.print("no GPUs: no shard map, no worker registered")
    waiting = [h for h in fleet.handoffs if h.queued]
    if fleet.handoffs:
        shown = ", ".join(h.shard for h in fleet.handoffs[:5])
        more = ", ..." if len(fleet.handoffs) > 5 else ""
        line = f"{len(fleet.handoffs)} shards are being handed off ({shown}{more})"
        if waiting:
            line += (f"; {sum(h.queued for h in waiting)} requests wait in them until the "
                     "handoffs finish, the oldest for at least "
                     f"{format_seconds(max(h.oldest_s or 0.0 for h in waiting))}")
        console.print(Text(line), soft_wrap=True)
    for problem in fleet.problems:
        console.print(Text.assemble(("PROBLEM", "bold red"), " ", problem), soft_wrap=True)


def _print_gpus(fleet: Any) -> None:
    """The status table: at the terminal's width in colour, or piped, whole and plain."""
    from rich.measure import Measurement
    from rich.table import Column
    from rich.text import Text

    from gpu_tasks.control.status import format_seconds

    title = (f"{fleet.shard_count} shards, epoch {fleet.epoch}" if fleet.shard_count
             else "no shard map")
    headers = ["GPU", "worker", "lease", "consuming", "shards", "queued", "oldest",
               "MiB used/total", "entities", "MiB spilled", "spills/restores/evictions", "gen",
               "device"]
    rows: list[list[str]] = []
    for g in fleet.gpus:
        d = g.device
        rows.append([
            g.gpu,
            g.worker or "-",
            (f"{g.lease_age_s:.1f}s" if g.alive
             else "gone" if g.lease_age_s is not None else "none"),
            "yes" if g.consuming else "NO",
            str(g.shards),
            str(g.queued),
            format_seconds(g.oldest_s),
            f"{_mib(d['used_bytes'])}/{_mib(d['total_bytes'])}" if d else "-",
            str(d.get("entities", "-")),
            _mib(d["spilled_bytes"]) if d else "-",
            f"{d['spills']}/{d['restores']}/{d['evictions']}" if d else "-",
            str(d.get("generation", "-")),
            d.get("device_uuid", "-") or "-",
        ])
    if console.is_terminal:
        def table_of(columns: list[int]) -> Table:
            # overflow="fold": a narrow terminal breaks a long GPU name, never cuts it.
            table = Table(Column(headers[0], overflow="fold"),
                          *(headers[i] for i in columns[1:]), title=title,
                          box=box.SIMPLE_HEAD)
            for g, row in zip(fleet.gpus, rows, strict=True):
                cells = {i: Text(row[i]) for i in columns}
                cells[2].stylize("" if g.alive else "red")
                cells[3].stylize("green" if g.consuming else "red")
                table.add_row(*cells.values(), style="bold red" if g.problem else None)
            return table

        # Too narrow for every column: leave out the least telling ones, in this order,
        # rather than squeeze every cell into an ellipsis.
        columns = list(range(len(headers)))
        table = table_of(columns)
        for name in ("device", "spills/restores/evictions", "MiB spilled", "gen", "worker",
                     "entities"):
            natural = Measurement.get(console, console.options.update_width(1 << 16), table)
            if natural.maximum <= console.width:
                break
            columns.remove(headers.index(name))
            table = table_of(columns)
        console.print(table)
        if len(columns) < len(headers):
            left_out = ", ".join(h for i, h in enumerate(headers) if i not in columns)
            console.print(Text(f"not shown at this width: {left_out} (--json has them)",
                               style="dim"), soft_wrap=True)
    else:
        # Piped: every cell whole, whatever the width, and no colour. Plain columns rather
        # than a rich table, which for 64 GPUs costs ~80 ms to lay out.
        click.echo(title)
        click.echo(_columns([headers, *rows]))


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f}"


def _columns(rows: list[list[str]]) -> str:
    """``rows`` as left-aligned columns two spaces apart, nothing cut."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     .rstrip() for row in rows)


# -- dlq --------------------------------------------------------------------------------


@main.group()
def dlq() -> None:
    """Dead letters: messages GPU workers refused to run (undecodable, not JSON, compressed,
    too big or too deep, an unknown task, or one that kept killing its pool child)."""


def _letter_row(letter: Any) -> dict[str, Any]:
    data: dict[str, Any] = letter.to_json()
    data.pop("raw_b64")
    return data


@dlq.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="Show at most this many, newest first.")
@click.pass_context
@handle_errors
def dlq_list(ctx: click.Context, as_json: bool, limit: int) -> None:
    """Dead letters, newest first (without their raw bytes: see `dlq show`)."""
    from gpu_tasks.control.deadletter import DeadLetterStore

    store = DeadLetterStore(_settings(ctx).redis_client())
    letters, total = store.list(limit), store.count()
    if as_json:
        _emit_json({"total": total, "letters": [_letter_row(x) for x in letters]})
        return
    if not letters:
        console.print("no dead letters")
        return
    rows = [["ID", "AT", "QUEUE", "TASK", "BYTES", "REASON"]]
    for x in letters:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(x.at))
        size = f"{x.raw_bytes}" + (" (truncated)" if x.truncated else "")
        rows.append([x.id, at, x.queue, x.task or "-", size, x.reason])
    click.echo(_columns(rows))
    if total > len(letters):
        click.echo(f"({total - len(letters)} older not shown: --limit)")


@dlq.command("show")
@click.argument("letter_id")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
@handle_errors
def dlq_show(ctx: click.Context, letter_id: str, as_json: bool) -> None:
    """One dead letter, with its raw bytes (as text where they are UTF-8)."""
    from gpu_tasks.control.deadletter import DeadLetterStore

    letter = DeadLetterStore(_settings(ctx).redis_client()).get(letter_id)
    if as_json:
        _emit_json(letter.to_json())
        return
    for key, value in _letter_row(letter).items():
        click.echo(f"{key}: {value}")
    try:
        text = letter.raw.decode("utf-8")
    except UnicodeDecodeError:
        click.echo(f"raw (base64, not UTF-8): {letter.raw_b64}")
        return
    click.echo("raw" + (" (truncated)" if letter.truncated else "") + ":")
    click.echo(text)


@dlq.command("retry")
@click.argument("letter_id")
@click.pass_context
@handle_errors
def dlq_retry(ctx: click.Context, letter_id: str) -> None:
    """Send a dead letter's message to its queue again, if it was kept whole and now passes
    the workers' checks (refused otherwise, and kept)."""
    from gpu_tasks.control.deadletter import DeadLetterStore

    settings = _settings(ctx)
    letter = DeadLetterStore(settings.redis_client()).retry(
        letter_id, max_bytes=settings.max_message_bytes, max_nesting=settings.max_nesting)
    click.echo(f"sent {letter.task or 'the message'} {letter.task_id or ''} to "
               f"{letter.queue} again")


@dlq.command("purge")
@click.option("--yes", is_flag=True, help="Do not ask first.")
@click.pass_context
@handle_errors
def dlq_purge(ctx: click.Context, yes: bool) -> None:
    """Drop every dead letter."""
    from gpu_tasks.control.deadletter import DeadLetterStore

    store = DeadLetterStore(_settings(ctx).redis_client())
    if not yes:
        click.confirm(f"drop all {store.count()} dead letters?", abort=True)
    click.echo(f"dropped {store.purge()} dead letters")


# -- exporter ---------------------------------------------------------------------------


@main.command()
@click.option("--port", type=click.IntRange(1, 65535), default=9487, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface).")
@click.pass_context
@handle_errors
def exporter(ctx: click.Context, port: int, address: str) -> None:
    """Serve Prometheus metrics at http://ADDRESS:PORT/metrics: per GPU its backlog and the
    oldest request's age, consuming or not, lease, shards, memory, task outcomes; the
    shard map's epoch, handoffs, shards with no owner or no consumer. Each scrape takes one
    status snapshot. Runs until SIGTERM or Ctrl-C."""
    import importlib.util

    if importlib.util.find_spec("prometheus_client") is None:
        raise ConfigError("`gpu-tasks exporter` needs prometheus-client, in the ops extra: "
                          "pip install 'gpu-tasks[ops]'")
    from gpu_tasks.connection.failures import check_login
    from gpu_tasks.local.signals import stop_on_signals
    from gpu_tasks.monitor.metrics import serve

    settings = _settings(ctx)
    check_login(settings.redis_client())
    try:
        with stop_on_signals() as stop:
            serve(settings.redis_client(), address, port, stop, on_ready=lambda: click.echo(
                f"serving metrics at http://{address}:{port}/metrics", err=True))
    except OSError as exc:  # the port is taken, or the address is not this host's
        raise click.ClickException(f"cannot listen on {address}:{port}: {exc}") from None


# -- demo -------------------------------------------------------------------------------


@main.command()
@click.option(
    "--entities", "entity_count", type=click.IntRange(min=1), default=50, show_default=True
)
@click.option("--timeout", "timeout_s", type=float, default=120.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
@handle_errors
def demo(ctx: click.Context, entity_count: int, timeout_s: float, as_json: bool) -> None:
    """Send a demo workload and print entity -> shard -> GPU with the results."""
    from gpu_tasks.local import demo as workload

    _app(_settings(ctx))
    ids = workload.entity_ids(entity_count)
    quiet = as_json or not console.is_terminal
    pending = []
    with Progress(console=console, disable=quiet, transient=True) as progress:
        sending = progress.add_task("sending", total=len(ids))
        for seed, eid in enumerate(ids):
            pending.append((eid, seed, workload.submit(eid, seed)))
            progress.advance(sending)
        collecting = progress.add_task("collecting", total=len(ids))
        reports = []
        for eid, seed, results in pending:
            reports.append(workload.collect(eid, seed, results, timeout_s))
            progress.advance(collecting)
    requests = len(ids) * len(workload.STEPS)
    gpus = {g for r in reports for g in r.gpus}
    ok = all(r.ok for r in reports)
    if as_json:
        _emit_json(
            {
                "requests": requests,
                "entities": len(ids),
                "gpus": sorted(gpus),
                "ok": ok,
                "results": [r.as_dict() for r in reports],
            }
        )
    else:
        table = Table(
            "entity",
            "shard = queue",
            "GPU",
            "worker",
            "sum on GPU",
            "expected",
            "ok",
            title=f"{requests} requests over {len(ids)} entities",
        )
        for r in reports:
            row = r.as_dict()
            table.add_row(
                r.entity_id,
                str(row["queue"]),
                str(row["gpu"]),
                str(row["worker"]),
                str(r.gpu_sum),
                str(r.expected_sum),
                "[green]ok[/]" if r.ok else f"[red]{'; '.join(r.errors) or 'wrong'}[/]",
            )
        _print(table)
        console.print(
            f"{requests} requests, {len(ids)} entities, {len(gpus)} GPUs: "
            + (
                "every entity stayed on one GPU and every result is right"
                if ok
                else "[red]FAILED[/]"
            ),
            soft_wrap=True,
        )
    if not ok:
        sys.exit(1)


# -- flower -----------------------------------------------------------------------------


@main.command()
@click.option("--port", type=click.IntRange(1, 65535), default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to listen on ('' or 0.0.0.0: every interface).")
@click.option("--basic-auth", metavar="USER:PASS",
              help="Credentials for the pages and the REST API (default: "
                   "$GPU_TASKS_FLOWER_BASIC_AUTH; a flag shows in `ps`, the setting does not).")
@click.option("--no-auth", is_flag=True,
              help="No authentication: allowed on a loopback address only.")
@click.pass_context
@handle_errors
def flower(ctx: click.Context, port: int, address: str, basic_auth: str | None,
           no_auth: bool) -> None:
    """Run Flower for this deployment: authenticated, REST API on, task history kept in
    <data dir>/flower.db across restarts. Replaces this process (for systemd)."""
    import os
    from pathlib import Path

    from gpu_tasks.connection.failures import check_login
    from gpu_tasks.monitor.flower import flower_argv, flower_env, resolve_auth

    settings = _settings(ctx)
    settings.require_redis_url()
    auth = resolve_auth(settings, basic_auth, no_auth, address)
    check_login(settings.redis_client())
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    argv = flower_argv(settings, port=port, address=address)
    host = f"[{address}]" if ":" in address else (address or "0.0.0.0")
    click.echo(f"Flower on http://{host}:{port}, Redis "
               f"{settings.redis_url_shown}; credentials: {auth.shown}", err=True)
    os.execve(argv[0], argv, flower_env(settings, auth))


# -- up ---------------------------------------------------------------------------------


@main.command()
@click.option(
    "--gpus", type=click.IntRange(min=1), help="GPU workers (default: every GPU, or 4 sim GPUs)."
)
@click.option("--backend", type=click.Choice(BACKENDS), help="Device backend (default auto).")
@click.option("--flower/--no-flower", default=True, show_default=True)
@click.option("--flower-port", type=click.IntRange(1, 65535))
@click.option(
    "--entities",
    "entity_count",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Entities in the demo workload.",
)
@click.option("--once", is_flag=True, help="Exit after the demo (0 if it passed).")
@click.pass_context
@handle_errors
def up(
    ctx: click.Context,
    gpus: int | None,
    backend: str | None,
    flower: bool,
    flower_port: int | None,
    entity_count: int,
    once: bool,
) -> None:
    """Start Redis (unless configured), GPU workers and Flower; run the demo; stay up.

    Flower asks for a login: $GPU_TASKS_FLOWER_BASIC_AUTH, or else a password made for
    this run, in <data dir>/flower-credentials (mode 0600)."""
    _require_worker_extra("up")
    from gpu_tasks.local.supervisor import Supervisor, run_demo, this_host

    cluster = this_host(_settings(ctx).replace(backend=backend), gpus=gpus, flower=flower,
                        flower_port=flower_port)
    code = Supervisor(cluster, _UpShown()).run(lambda c: run_demo(c, entity_count),
                                               stay_up=not once)
    sys.exit(code)


class _UpShown:
    """What `up` prints as its supervisor goes (a gpu_tasks.local.supervisor.Listener)."""

    def starting(self, cluster: LocalCluster) -> None:
        console.print(f"starting {cluster.gpus} {cluster.backend} GPU worker(s)"
                      + ("" if cluster.settings.redis_url else " and an embedded Redis")
                      + " ...")

    def started(self, cluster: LocalCluster) -> None:
        console.print(f"Redis:   {cluster.settings.redis_url_shown}")
        console.print(f"Workers: {', '.join(cluster.queues)} (logs in {cluster.log_dir})")
        if cluster.flower_url and cluster.flower_auth:
            # Where the credentials are, never the password itself (terminals and CI
            # logs are read by others).
            console.print(f"Flower:  {cluster.flower_url} (user "
                          f"{cluster.flower_auth.user}; password in "
                          f"{cluster.flower_auth.shown})", soft_wrap=True, markup=False)

    def watching(self, cluster: LocalCluster) -> None:
        console.print("up: Ctrl-C or SIGTERM stops everything")

    def stopping(self, cluster: LocalCluster) -> None:
        console.print("stopping ...")

    def stopped(self, cluster: LocalCluster) -> None:
        console.print("stopped")


if __name__ == "__main__":
    main()
