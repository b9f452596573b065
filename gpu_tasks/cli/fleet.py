"""Fleet operations: ``gpu-tasks coordinator`` (keeps the fleet whole, from
:mod:`gpu_tasks.control.coordinator`), ``gpu-tasks drain`` and ``undrain`` (a GPU gives
its shards away before maintenance, and takes shards again after)."""

from __future__ import annotations

import click

from gpu_tasks.cli.base import (
    REBALANCE_BY,
    app_of,
    console,
    emit_json,
    handle_errors,
    json_option,
    settings_of,
)


@click.command()
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
    settings = settings_of(ctx).replace(failover_after_s=failover_after_s)
    boss = Coordinator(settings.redis_client(), app_of(settings),
                       failover_after_s=settings.failover_after_s,
                       auto_rebalance=auto_rebalance, max_moves=max_moves,
                       interval_s=interval_s, lease_ttl_s=settings.lease_ttl_s,
                       pause=handoff.parse_pause(settings.handoff_pause))
    if once:
        emit_json(boss.tick().as_dict())
        boss.release()
        return
    with stop_on_signals() as stop:
        boss.run(stop)


@click.command()
@click.argument("gpu")
@click.option("--dry-run", is_flag=True, help="Print the plan; move nothing.")
@click.option("--by", type=REBALANCE_BY, default="count", show_default=True)
@click.option("--parallel", type=click.IntRange(1, 64), default=4, show_default=True)
@json_option()
@click.pass_context
@handle_errors
def drain(ctx: click.Context, gpu: str, dry_run: bool, by: str, parallel: int,
          as_json: bool) -> None:
    """Move every shard off GPU (live handoffs), e.g. before maintenance; it takes no new
    shards until `gpu-tasks undrain GPU`."""
    from gpu_tasks.cli.handoffs import HandoffProgress, app_source, pause_of, show_rebalance
    from gpu_tasks.control import actions

    with HandoffProgress(as_json) as progress:
        done = actions.drain(settings_of(ctx).redis_client(), app_source(ctx), gpu, by=by,
                             dry_run=dry_run, parallel=parallel, pause=pause_of(ctx),
                             listener=progress)
    show_rebalance(done, dry_run, as_json)


@click.command()
@click.argument("gpu")
@click.pass_context
@handle_errors
def undrain(ctx: click.Context, gpu: str) -> None:
    """Let GPU take shards again (at the next `gpu-tasks shards rebalance`)."""
    from gpu_tasks.control.shardmap import ShardMapStore

    ShardMapStore(settings_of(ctx).redis_client()).set_drained(gpu, False)
    console.print(f"{gpu} takes shards again at the next `gpu-tasks shards rebalance`")
