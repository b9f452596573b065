"""``gpu-tasks up``: a whole deployment on this host (Redis unless one is configured, a GPU
worker per GPU, Flower) under :class:`gpu_tasks.local.supervisor.Supervisor`, with the
demo once it serves. This module prints what the supervisor tells it."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from gpu_tasks.cli.base import console, handle_errors, require_worker_extra, settings_of
from gpu_tasks.settings import BACKENDS

if TYPE_CHECKING:
    from gpu_tasks.local.cluster import LocalCluster


@click.command()
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
    require_worker_extra("up")
    from gpu_tasks.local.supervisor import Supervisor, run_demo, this_host

    cluster = this_host(settings_of(ctx).replace(backend=backend), gpus=gpus, flower=flower,
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
        console.print(f"Redis:   {cluster.settings.redis_url_shown}"
                      + (f" (its URL with the password, for your other shells: "
                         f"{cluster.redis_url_file})" if cluster.redis_url_file else ""),
                      soft_wrap=True, markup=False)
        console.print(f"Workers: {', '.join(cluster.queues)} (logs in {cluster.log_dir})")
        for done in cluster.adopted:
            console.print(f"up: the shard map gave {len(done.moved)} shards to {done.gpu}, "
                          "which this run does not start: they go to the GPUs it does, "
                          f"with {done.requeued} unfinished requests first ({done.lost_buffers} "
                          "buffers were gone with the run that held them)",
                          soft_wrap=True, markup=False)
        if cluster.flower_url and cluster.flower_auth:
            # Where the credentials are, never the password itself (terminals and CI
            # logs are read by others).
            console.print(f"Flower:  {cluster.flower_url} (user "
                          f"{cluster.flower_auth.user}; password in "
                          f"{cluster.flower_auth.shown})", soft_wrap=True, markup=False)

    def watching(self, cluster: LocalCluster) -> None:
        console.print("up: Ctrl-C or SIGTERM stops everything")

    def let_go(self, cluster: LocalCluster, name: str) -> None:
        console.print(f"up: {name} exited: another worker took its GPU's lease and serves "
                      "it now; the rest stay up")

    def stopping(self, cluster: LocalCluster) -> None:
        console.print("stopping ...")

    def stopped(self, cluster: LocalCluster) -> None:
        console.print("stopped")
