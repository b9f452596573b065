"""How the CLI shows shards being handed off, for ``gpu-tasks shards move|rebalance|
failover`` and ``gpu-tasks drain``: a progress bar on a terminal while the actions of
:mod:`gpu_tasks.control.actions` run, then their outcomes or their plan.

Commands import this module when they run (it imports the control plane).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click
from rich.progress import Progress, TaskID
from rich.table import Table

from gpu_tasks.cli.base import app_of, console, emit_json, print_wide, settings_of
from gpu_tasks.control.actions import Listener, Rebalanced, succeeded
from gpu_tasks.control.failover import Failover
from gpu_tasks.control.handoff import Outcome, parse_pause


class HandoffProgress(Listener):
    """A rich progress bar of handoffs on a terminal; nothing when piped or with --json."""

    def __init__(self, as_json: bool) -> None:
        show = console.is_terminal and not as_json
        self.bar: Progress | None = Progress(console=console, transient=True) if show else None
        self.task: TaskID | None = None
        self.total = 0

    def handing_off(self, count: int) -> None:
        """The bar starts at the first handoff (none for a rebalance with nothing to do),
        and grows when the plan's moves follow the unfinished handoffs."""
        if self.bar is None:
            return
        self.total += count
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task("handing off", total=self.total)
        else:
            self.bar.update(self.task, total=self.total)

    def handed_off(self, outcome: Outcome) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.advance(self.task)

    def __enter__(self) -> HandoffProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.stop()


class FailoverProgress(HandoffProgress):
    """:class:`HandoffProgress` that first says what failing the GPU over did: a line, or
    (--json) its own JSON document, before that of the handoffs it resumes."""

    def __init__(self, as_json: bool) -> None:
        super().__init__(as_json)
        self.as_json = as_json

    def failed_over(self, report: Failover) -> None:
        if self.as_json:
            emit_json(report.as_dict())
        else:
            console.print(f"{report.gpu}: {len(report.moved)} shards to live GPUs, "
                          f"{report.requeued} requests put back first, "
                          f"{report.lost_buffers} buffers lost", soft_wrap=True)


def app_source(ctx: click.Context) -> Callable[[], Any]:
    """The Celery app, configured only once a handoff needs it."""
    settings = settings_of(ctx)
    return lambda: app_of(settings)


def pause_of(ctx: click.Context) -> tuple[str, float] | None:
    """The drill pause of the settings (``GPU_TASKS_HANDOFF_PAUSE``), if any."""
    return parse_pause(settings_of(ctx).handoff_pause)


def show_handoffs(outcomes: list[Outcome], as_json: bool,
                  extra: dict[str, Any] | None = None) -> None:
    """Print handoffs' outcomes; exit 1 if any did not leave its shard where asked."""
    ok = succeeded(outcomes)
    if as_json:
        emit_json({**(extra or {}), "ok": ok, "handoffs": [o.as_dict() for o in outcomes]})
    elif outcomes:
        table = Table("shard", "from", "to", "outcome", "entities", "MiB", "seconds", "why",
                      title=f"{len(outcomes)} handoffs")
        for o in outcomes:
            colour = "green" if o.status == "moved" else "red" if o.status in (
                "failed", "rolled back") else "white"
            table.add_row(f"shard-{o.shard}", o.source, o.target, f"[{colour}]{o.status}[/]",
                          str(o.entities), f"{o.bytes / (1 << 20):.1f}", f"{o.seconds:.2f}",
                          o.message)
        print_wide(table)
    if not ok:
        sys.exit(1)


def show_rebalance(done: Rebalanced, dry_run: bool, as_json: bool) -> None:
    """A rebalance that handed shards off: its handoffs; else its plan (and, for a dry
    run, the handoffs it would finish first)."""
    assert done.plan is not None
    plan = done.plan
    if done.outcomes:
        show_handoffs(done.outcomes, as_json, {
            "plan": plan.as_dict(), "resumed": [f"shard-{i}" for i in done.unfinished]})
        return
    if as_json:
        emit_json({"dry_run": dry_run, "unfinished": [f"shard-{i}" for i in done.unfinished],
                   **plan.as_dict()})
        return
    table = Table("shard", "from", "to", "entities", "MiB",
                  title=f"{len(plan.moves)} moves" + (" (dry run)" if dry_run else ""))
    for m in plan.moves:
        table.add_row(f"shard-{m.shard}", m.source, m.target, str(m.entities),
                      f"{m.bytes / (1 << 20):.1f}")
    print_wide(table)
    counts = ", ".join(f"{g} {plan.before.get(g, 0)}->{n}" for g, n in plan.after.items())
    console.print(f"shards per GPU: {counts}", soft_wrap=True)
    for line in plan.left_out:
        console.print(f"left out: {line}", soft_wrap=True)
