"""``gpu-tasks worker``: one GPU worker in this process. One of the two commands that
import ``workers`` (the GPU side), and only when they run."""

from __future__ import annotations

import sys

import click

from gpu_tasks.cli.base import handle_errors, require_worker_extra, settings_of
from gpu_tasks.settings import BACKENDS, parse_size


@click.command()
@click.option(
    "--gpu",
    "gpu_index",
    type=click.IntRange(min=0),
    required=True,
    help="Physical GPU index (as nvidia-smi numbers them).",
)
@click.option("--backend", type=click.Choice(BACKENDS), help="Device backend (default auto).")
@click.option("--import", "imports", multiple=True, help="Module with your @gpu_task tasks.")
@click.option(
    "--pool", type=click.Choice(["prefork", "solo"]), default="prefork", show_default=True
)
@click.option("--loglevel", help="Celery log level (default: $GPU_TASKS_LOG_LEVEL or INFO).")
@click.option("--sim-memory", help="Capacity of a sim GPU, e.g. 512MiB.")
@click.pass_context
@handle_errors
def worker(
    ctx: click.Context,
    gpu_index: int,
    backend: str | None,
    imports: tuple[str, ...],
    pool: str,
    loglevel: str | None,
    sim_memory: str | None,
) -> None:
    """Run one Celery worker pinned to GPU I: it takes GPU I's lease and consumes the queues
    of the shards the shard map gives gpu.<node>.<I>, plus that GPU's own queue."""
    require_worker_extra("worker")
    from gpu_tasks.local.gpus import resolve_backend
    from workers.boot import run_worker
    from workers.child.runtime import WorkerIdentity

    settings = settings_of(ctx)
    settings = settings.replace(
        backend=backend,
        imports=(*settings.imports, *imports) if imports else None,
        sim_memory_bytes=parse_size(sim_memory) if sim_memory else None,
    )
    identity = WorkerIdentity(settings.node, gpu_index, resolve_backend(settings.backend))
    settings.require_redis_url()
    sys.exit(run_worker(identity, settings, loglevel=loglevel or settings.log_level, pool=pool))
