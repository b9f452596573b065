"""Start one Celery worker pinned to one GPU.

Order matters (the dask-cuda rule): the parent sets ``CUDA_VISIBLE_DEVICES``
before anything can import PyCUDA; the device context is made in the pool child
after fork (``worker_process_init``) and released in ``worker_process_shutdown``.
The parent never touches CUDA, so it stays responsive to Flower and remote
control, enforces hard time limits, and replaces a crashed child.

The parent also owns the GPU's place in the fleet: it takes the GPU's lease before
Celery starts (refusing to start if a live worker serves the GPU), puts back what a
crashed predecessor had taken, and then consumes exactly the shard queues the map
gives its GPU (:mod:`workers.consumer.consumption`), fencing every message it fetches
(:mod:`workers.consumer.fence`).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from celery import signals

from gpu_tasks.control.fleet import FleetRegistry
from gpu_tasks.control.lease import Holder
from gpu_tasks.control.unacked import restore_unacked, unacked_keys
from gpu_tasks.errors import ConfigError
from gpu_tasks.settings import Settings
from gpu_tasks.tasks.declare import install_executor
from workers.child import executor, runtime, taskcounts
from workers.child.batch import run_batch
from workers.child.runtime import WorkerIdentity
from workers.consumer import control, ownership, progress, request
from workers.consumer.consumption import CONSUMER, Consumption, bootstep
from workers.consumer.fetch import BatchFetch
from workers.consumer.transport import Guard, install_guard, transport_for

log = logging.getLogger(__name__)


def _revoked() -> frozenset[str]:
    """The task ids this worker was told to revoke (``celery control revoke``), for a batch."""
    from celery.worker import state as worker_state

    return frozenset(worker_state.revoked) if worker_state.revoked else frozenset()


def pin_to_gpu(gpu_index: int) -> None:
    """Make physical GPU ``gpu_index`` the only one this process and its children see."""
    if "pycuda" in sys.modules or "pycuda.driver" in sys.modules:
        raise ConfigError("PyCUDA was imported before the worker was pinned to its GPU")
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # same numbering as nvidia-smi
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_index)


def record_fatal_exit(identity: WorkerIdentity, settings: Settings, reason: str) -> None:
    """Mark this GPU's record ``failed`` with ``reason`` (the worker is exiting on an
    unrecoverable error), keeping what it says about the device; best effort."""
    try:
        registry = FleetRegistry(settings.redis_client())
        record = registry.get(identity.queue)
        if record is None:
            runtime.record_failure(identity, settings, reason)
            return
        record.state, record.error = "failed", reason
        registry.heartbeat(record)
    except Exception as exc:
        log.warning("could not record the worker's failure in the fleet registry: %s", exc)


class FatalErrors(logging.Handler):
    """Keeps what Celery logs as it gives up (``Unrecoverable error: ...``), so the worker
    exits non-zero and the fleet registry (`gpu-tasks status`) says why."""

    def __init__(self) -> None:
        super().__init__(logging.CRITICAL)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


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
    table = ownership.table = ownership.OwnershipTable(identity.queue)
    record = progress.progress = progress.BatchProgress()
    fetch = BatchFetch(identity.queue, settings, record, run_batch, app, _revoked)
    consumption = Consumption(table, Holder(identity.worker), settings, client, app, fetch)
    consumption.take_lease()
    restored = restore_unacked(client, identity.queue)
    if restored:
        log.warning("%s: put back %d requests its previous worker had taken and not "
                    "finished", identity.queue, restored)
    app.conf.update(
        {GPU_WORKER_FLAG: identity.queue},
        broker_transport=transport_for(settings),
        broker_transport_options={**app.conf.broker_transport_options,
                                  **unacked_keys(identity.queue)},
        worker_consumer=CONSUMER,
        # A result that cannot be stored while Redis is away is stored once it is back
        # (tried again every 2 s at most), not lost or replaced by a BrokerUnavailable
        # failure: the request ran, and its message is acknowledged after its result.
        result_backend_always_retry=True,
        result_backend_max_sleep_between_retries_ms=2000,
        worker_proc_alive_timeout=settings.device_open_timeout_s,
        # From the first task on where Flower watches (GPU_TASKS_TASK_EVENTS; `gpu-tasks
        # up` sets it): Flower's own enable_events broadcast comes seconds after it starts
        # and misses what ran before. In the conf, so `inspect conf` shows it.
        worker_send_task_events=settings.task_events,
    )
    # What the transport accepts; app.tasks is the live registry (users' imports included).
    install_guard(Guard(max_bytes=settings.max_message_bytes, max_nesting=settings.max_nesting,
                        max_child_deaths=settings.max_child_deaths,
                        visibility_timeout_s=settings.visibility_timeout_s, tasks=app.tasks))
    app.steps["consumer"].add(bootstep(consumption))
    control.install(fetch)
    install_executor(executor.execute, executor.after_task)
    request.install(settings)
    counts = taskcounts.install(identity.queue)
    counts.write_to(FleetRegistry(client))  # this process's own; each pool child resets it

    def open_device(**_: Any) -> None:
        runtime.open_device(identity, settings, counts)

    def close_device(**_: Any) -> None:
        runtime.close_device()

    signals.worker_process_init.connect(open_device, weak=False)
    signals.worker_process_shutdown.connect(close_device, weak=False)
    if pool == "solo":  # no child: the worker process itself holds the device
        signals.worker_ready.connect(open_device, weak=False)
        signals.worker_shutdown.connect(close_device, weak=False)

    worker = app.Worker(
        hostname=identity.worker,
        pool_cls=pool,
        concurrency=1,
        loglevel=loglevel,
        queues=[identity.queue],
        without_gossip=True,
        without_mingle=True,
    )
    fatal = FatalErrors()
    celery_log = logging.getLogger("celery.worker.worker")  # where Celery logs giving up
    celery_log.addHandler(fatal)
    try:
        worker.start()
    finally:
        celery_log.removeHandler(fatal)
        consumption.release_lease()
    code = int(worker.exitcode or 0)
    if fatal.messages:
        # Whatever Celery's exit code says, this worker stopped on a fault: systemd's
        # Restart=on-failure must restart it, and `gpu-tasks status` must say why.
        record_fatal_exit(identity, settings, fatal.messages[-1])
        code = code or 1
    return code
