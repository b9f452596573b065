"""Start one Celery worker pinned to one GPU.

Order matters (the dask-cuda rule): the parent sets ``CUDA_VISIBLE_DEVICES``
before anything can import PyCUDA; the device context is made in the pool child
after fork (``worker_process_init``) and released in ``worker_process_shutdown``.
The parent never touches CUDA, so it stays responsive to Flower and remote
control, enforces hard time limits, and replaces a crashed child.

The parent also owns the GPU's place in the fleet: it takes the GPU's lease before
Celery starts (refusing to start if a live worker serves the GPU), puts back what a
crashed predecessor had taken, and then consumes exactly the shard queues the map
gives its GPU (:mod:`workers.consumption`), fencing every message it fetches
(:mod:`workers.fence`).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from celery import signals

from gpu_tasks.errors import ConfigError
from gpu_tasks.fleet import FleetRegistry, GpuRecord
from gpu_tasks.lease import Holder
from gpu_tasks.settings import Settings
from gpu_tasks.unacked import restore_unacked, unacked_keys
from workers import control, ownership, runtime, taskcounts
from workers.consumption import CONSUMER, Consumption, bootstep
from workers.runtime import DeviceRuntime, WorkerIdentity
from workers.transport import TRANSPORT

log = logging.getLogger(__name__)


def pin_to_gpu(gpu_index: int) -> None:
    """Make physical GPU ``gpu_index`` the only one this process and its children see."""
    if "pycuda" in sys.modules or "pycuda.driver" in sys.modules:
        raise ConfigError("PyCUDA was imported before the worker was pinned to its GPU")
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # same numbering as nvidia-smi
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_index)


def record_boot_failure(identity: WorkerIdentity, settings: Settings, reason: str) -> None:
    """Register this GPU as ``failed`` with ``reason`` (best effort: Redis may be the cause)."""
    record = GpuRecord(queue=identity.queue, worker=identity.worker, node=identity.node,
                       gpu_index=identity.gpu_index, backend=identity.backend, device_name="",
                       device_uuid="", total_bytes=0, heartbeat_s=settings.heartbeat_s,
                       pid=os.getpid(), state="failed", error=reason,
                       started_at=identity.started_at)
    try:
        FleetRegistry(settings.redis_client()).heartbeat(record)
    except Exception as exc:
        log.warning("could not record the failed start in the fleet registry: %s", exc)


def install_executor() -> None:
    """Run every declared GPU task through this process's runtime, built-ins through
    their implementations; after each, once its result is stored, let the runtime collect
    garbage or end a child whose context was poisoned."""
    from gpu_tasks.task import install_executor as install
    from workers import handlers

    implementations = handlers.IMPLEMENTATIONS

    def executor(task: Any, body: Any, entity_id: object, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
        return runtime.execute(task, implementations.get(task.name, body), entity_id,
                               args, kwargs)

    def after_task() -> None:
        rt = runtime._runtime
        if rt is not None:
            rt.after_task()

    install(executor, after_task)


def run_worker(
    identity: WorkerIdentity, settings: Settings, loglevel: str = "INFO", pool: str = "prefork"
) -> int:
    """Pin, take the GPU's lease, put back what a crashed predecessor had taken, wire the
    shard consumption and the device lifecycle, and run the worker (blocks); returns the
    worker's exit status.

    Raises :class:`~gpu_tasks.errors.LeaseHeld` when a live worker serves this GPU."""
    pin_to_gpu(identity.gpu_index)
    from gpu_tasks.app import GPU_WORKER_FLAG, app, configure

    configure(settings)
    client = settings.redis_client()
    table = ownership.table = ownership.OwnershipTable()
    consumption = Consumption(identity.queue, Holder(identity.worker), settings, client,
                              table, app)
    consumption.take_lease()
    restored = restore_unacked(client, identity.queue)
    if restored:
        log.warning("%s: put back %d requests its previous worker had taken and not "
                    "finished", identity.queue, restored)
    app.conf.update(
        {GPU_WORKER_FLAG: identity.queue},
        broker_transport=TRANSPORT,
        broker_transport_options={**app.conf.broker_transport_options,
                                  **unacked_keys(identity.queue)},
        worker_consumer=CONSUMER,
        worker_proc_alive_timeout=settings.device_open_timeout_s,
        # From the first task on where Flower watches (GPU_TASKS_TASK_EVENTS; `gpu-tasks
        # up` sets it): Flower's own enable_events broadcast comes seconds after it starts
        # and misses what ran before. In the conf, so `inspect conf` shows it.
        worker_send_task_events=settings.task_events,
    )
    app.steps["consumer"].add(bootstep(consumption))
    control.install()
    install_executor()
    counts = taskcounts.install(identity.queue)
    counts.write_to(FleetRegistry(client))  # this process's own; each pool child resets it

    @signals.worker_process_init.connect(weak=False)
    def _open_device(**_: Any) -> None:
        counts.reset()
        try:
            rt = DeviceRuntime(identity, settings, settings.redis_client())
        except Exception as exc:
            # Keep the child alive so every task answers with the reason, and tell the
            # fleet registry, where `gpu-tasks status` shows it.
            log.exception("GPU %d failed to start", identity.gpu_index)
            reason = f"{type(exc).__name__}: {exc}"
            runtime.install(None, reason)
            record_boot_failure(identity, settings, reason)
            counts.write_to(FleetRegistry(settings.redis_client()))
            return
        rt.task_counts = counts
        runtime.install(rt)
        rt.start_heartbeat()

    @signals.worker_process_shutdown.connect(weak=False)
    def _close_device(**_: Any) -> None:
        rt = runtime._runtime
        if rt is not None:
            rt.stop()
            runtime.install(None)

    if pool == "solo":  # no child: the worker process itself holds the device
        signals.worker_ready.connect(lambda **_: _open_device(), weak=False)
        signals.worker_shutdown.connect(lambda **_: _close_device(), weak=False)

    worker = app.Worker(
        hostname=identity.worker,
        pool_cls=pool,
        concurrency=1,
        loglevel=loglevel,
        queues=[identity.queue],
        without_gossip=True,
        without_mingle=True,
    )
    try:
        worker.start()
    finally:
        consumption.release_lease()
    return int(worker.exitcode or 0)
