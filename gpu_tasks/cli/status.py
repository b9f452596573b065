"""``gpu-tasks status``: each GPU's lease, shards, backlog, memory and device, then every
problem (:func:`gpu_tasks.control.status.snapshot` finds them; this module lays them out
for a terminal of any width, or whole and plain when piped)."""

from __future__ import annotations

from typing import Any

import click
from rich import box
from rich.table import Table

from gpu_tasks.cli.base import (
    console,
    emit_json,
    handle_errors,
    json_option,
    mib,
    settings_of,
    text_columns,
)


@click.command()
@json_option()
@click.pass_context
@handle_errors
def status(ctx: click.Context, as_json: bool) -> None:
    """Each GPU: lease, consuming or not, shards, queued requests and how long the oldest
    has waited, memory, entities, spills; then each PROBLEM (work that nothing consumes,
    shards with no owner)."""
    from rich.text import Text

    from gpu_tasks.control.status import format_seconds, snapshot

    fleet = snapshot(settings_of(ctx).redis_client())
    if as_json:
        emit_json(fleet.as_dict())
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
            f"{mib(d['used_bytes'])}/{mib(d['total_bytes'])}" if d else "-",
            str(d.get("entities", "-")),
            mib(d["spilled_bytes"]) if d else "-",
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
        click.echo(text_columns([headers, *rows]))
