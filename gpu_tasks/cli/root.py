"""``gpu-tasks``: run and inspect a deployment.

Flags override ``GPU_TASKS_*`` settings; ``--json`` prints one JSON document for
scripts. Errors print one line naming what was wrong and exit 1.

This module is the root command only: it makes the settings every command reads and adds
the commands, one module per group (as ``celery/bin/`` does).
"""

from __future__ import annotations

import click

from gpu_tasks.cli.batch import batch
from gpu_tasks.cli.demo import demo
from gpu_tasks.cli.dlq import dlq
from gpu_tasks.cli.fleet import coordinator, drain, undrain
from gpu_tasks.cli.monitor import exporter, flower
from gpu_tasks.cli.route import route
from gpu_tasks.cli.shards import shards
from gpu_tasks.cli.status import status
from gpu_tasks.cli.submit import submit
from gpu_tasks.cli.up import up
from gpu_tasks.cli.worker import worker
from gpu_tasks.errors import GpuTasksError
from gpu_tasks.settings import Settings


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


for command in (route, shards, coordinator, drain, undrain, worker, submit, batch, status,
                dlq, exporter, demo, flower, up):
    main.add_command(command)


if __name__ == "__main__":
    main()
