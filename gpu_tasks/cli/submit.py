"""``gpu-tasks submit``: send one task by name, and with ``--wait`` its result (exit 3:
not finished in time, so not to be sent again)."""

from __future__ import annotations

import sys
from typing import Any

import click

from gpu_tasks.cli.base import (
    JSONObject,
    app_of,
    console,
    emit_json,
    handle_errors,
    json_option,
    settings_of,
)


@click.command()
@click.argument("task")
@click.option("--entity", help="entity_id to route by.")
@click.option("--kwargs", "kwargs", type=JSONObject(), default="{}", metavar="TEXT",
              help="Task keyword arguments as JSON.")
@click.option("--queue", help="Send to this GPU queue (for gpu_tasks.stats).")
@click.option("--wait", is_flag=True, help="Wait for the result and print it.")
@click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True)
@json_option()
@click.pass_context
@handle_errors
def submit(
    ctx: click.Context,
    task: str,
    entity: str | None,
    kwargs: dict[str, Any],
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
    kwargs = dict(kwargs)
    if entity is not None:
        kwargs["entity_id"] = entity
    from gpu_tasks.submit.bulk import task_name

    name = task_name(task)
    app = app_of(settings_of(ctx))
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
        emit_json(out)
    else:
        console.print_json(data=out)
    sys.exit(code)
