"""``gpu-tasks shards``: create and show the shard map, and move shards: one by hand
(``move``), to balance the fleet (``rebalance``), off a dead GPU (``failover``). What
each move does lives in :mod:`gpu_tasks.control.actions`; this module renders it
(through :mod:`gpu_tasks.cli.handoffs`)."""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from gpu_tasks.cli.base import (
    REBALANCE_BY,
    emit_json,
    handle_errors,
    json_option,
    print_wide,
    settings_of,
)
from gpu_tasks.control.shardmap import MAX_SHARDS
from gpu_tasks.errors import GpuTasksError


@click.group()
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
@json_option()
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

    settings = settings_of(ctx).replace(shard_count=shard_count)
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
@json_option()
@click.pass_context
@handle_errors
def shards_show(ctx: click.Context, as_json: bool) -> None:
    """Print the shard map: shards per GPU and the epoch (--json: every shard too)."""
    from gpu_tasks.control.shardmap import ShardMapStore

    _print_map(ShardMapStore(settings_of(ctx).redis_client()).load(), as_json)


def _print_map(shard_map: Any, as_json: bool) -> None:
    summary = shard_map.summary()
    if as_json:
        emit_json({**shard_map.as_dict(), "gpus": summary})
        return
    table = Table("GPU", "shards", "states",
                  title=f"{shard_map.shard_count} shards, epoch {shard_map.epoch}")
    for gpu, row in summary.items():
        states = ", ".join(f"{n} {state}" for state, n in sorted(row["states"].items()))
        table.add_row(gpu if gpu != "none" else "[red]no owner[/]", str(row["shards"]), states)
    print_wide(table)


def _shard_index(text: str) -> int:
    from gpu_tasks.protocol.routing import parse_shard_queue

    index = parse_shard_queue(text) if text.startswith("shard-") else (
        int(text) if text.isdigit() else None)
    if index is None:
        raise click.BadParameter(f"{text!r} is not a shard (shard-<n> or <n>)",
                                 param_hint="SHARD")
    return index


@shards.command("move")
@click.argument("shard")
@click.argument("gpu")
@json_option()
@click.pass_context
@handle_errors
def shards_move(ctx: click.Context, shard: str, gpu: str, as_json: bool) -> None:
    """Hand SHARD (shard-<n>) off to GPU live, with its queued work and its state; on a
    shard already being handed off, finish or roll back that handoff."""
    from gpu_tasks.cli.handoffs import HandoffProgress, app_source, pause_of, show_handoffs
    from gpu_tasks.control import actions

    index = _shard_index(shard)
    with HandoffProgress(as_json) as progress:
        outcomes = actions.move(settings_of(ctx).redis_client(), app_source(ctx), index, gpu,
                                pause=pause_of(ctx), listener=progress)
    show_handoffs(outcomes, as_json)


@shards.command("rebalance")
@click.option("--dry-run", is_flag=True, help="Print the plan; move nothing.")
@click.option("--max-moves", type=click.IntRange(min=1), help="Move at most N shards now.")
@click.option("--by", type=REBALANCE_BY, default="count", show_default=True,
              help="Shares by shard count, or in proportion to device memory.")
@click.option("--parallel", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Handoffs at a time.")
@json_option()
@click.pass_context
@handle_errors
def shards_rebalance(ctx: click.Context, dry_run: bool, max_moves: int | None, by: str,
                     parallel: int, as_json: bool) -> None:
    """Give every live, undrained GPU its share of shards, moving the fewest, as live
    handoffs (unfinished ones are finished first)."""
    from gpu_tasks.cli.handoffs import HandoffProgress, app_source, pause_of, show_rebalance
    from gpu_tasks.control import actions

    with HandoffProgress(as_json) as progress:
        done = actions.rebalance(settings_of(ctx).redis_client(), app_source(ctx), by=by,
                                 max_moves=max_moves, dry_run=dry_run, parallel=parallel,
                                 pause=pause_of(ctx), listener=progress)
    show_rebalance(done, dry_run, as_json)


@shards.command("failover")
@click.argument("gpu")
@json_option()
@click.pass_context
@handle_errors
def shards_failover(ctx: click.Context, gpu: str, as_json: bool) -> None:
    """Give a dead GPU's shards to live GPUs now: the requests it had taken go first, and
    the state it held is reported lost (EntityStateLost). Refused while GPU has a worker."""
    from gpu_tasks.cli.handoffs import FailoverProgress, app_source, pause_of, show_handoffs
    from gpu_tasks.control import actions

    with FailoverProgress(as_json) as progress:
        done = actions.fail_over_and_resume(settings_of(ctx).redis_client(), app_source(ctx),
                                            gpu, pause=pause_of(ctx), listener=progress)
    if done.report.resumed:
        show_handoffs(done.outcomes, as_json)
