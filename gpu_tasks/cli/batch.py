"""``gpu-tasks batch``: send every request of a file exactly once
(:mod:`gpu_tasks.submit.batch` does; this module draws its progress and its summary)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.progress import Progress, TaskID

from gpu_tasks.cli.base import app_of, console, json_option, settings_of
from gpu_tasks.errors import GpuTasksError


class _BatchProgress:
    """A rich progress bar on a terminal; nothing when piped or with --json."""

    def __init__(self, show: bool) -> None:
        self.bar: Progress | None = Progress(console=Console(stderr=True),
                                             transient=True) if show else None
        self.task: TaskID | None = None

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


@click.command()
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
@json_option("Print the summary as one JSON line.")
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

    settings = settings_of(ctx)
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
                           progress, app=app_of(settings))
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
