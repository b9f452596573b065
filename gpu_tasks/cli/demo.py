"""``gpu-tasks demo``: send the demo workload (:mod:`gpu_tasks.local.demo`) and show where
each entity's requests ran and whether every result is right (``gpu-tasks up`` runs it)."""

from __future__ import annotations

import sys

import click
from rich.progress import Progress
from rich.table import Table

from gpu_tasks.cli.base import (
    app_of,
    console,
    emit_json,
    handle_errors,
    json_option,
    print_wide,
    settings_of,
)


@click.command()
@click.option(
    "--entities", "entity_count", type=click.IntRange(min=1), default=50, show_default=True
)
@click.option("--timeout", "timeout_s", type=float, default=120.0, show_default=True)
@json_option()
@click.pass_context
@handle_errors
def demo(ctx: click.Context, entity_count: int, timeout_s: float, as_json: bool) -> None:
    """Send a demo workload and print entity -> shard -> GPU with the results."""
    from gpu_tasks.local import demo as workload

    app_of(settings_of(ctx))
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
        emit_json(
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
        print_wide(table)
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
