"""``gpu-tasks dlq``: the dead letters GPU workers refused to run: list, show, retry
(once fixed elsewhere: it must pass the workers' checks now) and purge them
(:mod:`gpu_tasks.control.deadletter` keeps them)."""

from __future__ import annotations

import time
from typing import Any

import click

from gpu_tasks.cli.base import (
    console,
    emit_json,
    handle_errors,
    json_option,
    settings_of,
    text_columns,
)


@click.group()
def dlq() -> None:
    """Dead letters: messages GPU workers refused to run (undecodable, not JSON, compressed,
    too big or too deep, an unknown task, or one that kept killing its pool child)."""


def _letter_row(letter: Any) -> dict[str, Any]:
    data: dict[str, Any] = letter.to_json()
    data.pop("raw_b64")
    return data


@dlq.command("list")
@json_option()
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="Show at most this many, newest first.")
@click.pass_context
@handle_errors
def dlq_list(ctx: click.Context, as_json: bool, limit: int) -> None:
    """Dead letters, newest first (without their raw bytes: see `dlq show`)."""
    from gpu_tasks.control.deadletter import DeadLetterStore

    store = DeadLetterStore(settings_of(ctx).redis_client())
    letters, total = store.list(limit), store.count()
    if as_json:
        emit_json({"total": total, "letters": [_letter_row(x) for x in letters]})
        return
    if not letters:
        console.print("no dead letters")
        return
    rows = [["ID", "AT", "QUEUE", "TASK", "BYTES", "REASON"]]
    for x in letters:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(x.at))
        size = f"{x.raw_bytes}" + (" (truncated)" if x.truncated else "")
        rows.append([x.id, at, x.queue, x.task or "-", size, x.reason])
    click.echo(text_columns(rows))
    if total > len(letters):
        click.echo(f"({total - len(letters)} older not shown: --limit)")


@dlq.command("show")
@click.argument("letter_id")
@json_option()
@click.pass_context
@handle_errors
def dlq_show(ctx: click.Context, letter_id: str, as_json: bool) -> None:
    """One dead letter, with its raw bytes (as text where they are UTF-8)."""
    from gpu_tasks.control.deadletter import DeadLetterStore

    letter = DeadLetterStore(settings_of(ctx).redis_client()).get(letter_id)
    if as_json:
        emit_json(letter.to_json())
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

    settings = settings_of(ctx)
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

    store = DeadLetterStore(settings_of(ctx).redis_client())
    if not yes:
        click.confirm(f"drop all {store.count()} dead letters?", abort=True)
    click.echo(f"dropped {store.purge()} dead letters")
