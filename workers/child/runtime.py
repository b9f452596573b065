"""The GPU runtime of one worker's pool child: the device, its buffers, its heartbeat.

Opened by :func:`open_device` in ``worker_process_init`` (after fork, after pinning;
:mod:`workers.boot` wires it), so the device context belongs to the process that uses
it. Every GPU task runs on it through :mod:`workers.child.executor`: the runtime says
whether this GPU still serves the entity's shard (:mod:`workers.consumer.ownership`),
makes the body's :class:`EntityContext` and the where-it-ran fields of the result.

A request that poisons the device context is answered with
:class:`~gpu_tasks.errors.ContextPoisoned`, and then the pool child ends
(:meth:`DeviceRuntime.after_task`): CUDA says such a process must be terminated
and relaunched, and the worker's parent, which never touched CUDA, forks a fresh
child that opens a fresh context at the next generation. The buffer ledger
(:mod:`workers.device.ledger_writer`) tells that child what was lost, and why.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from celery.exceptions import Reject

from gpu_tasks.control.fleet import FleetRegistry, GpuRecord
from gpu_tasks.control.shardmap import ShardMapStore
from gpu_tasks.errors import BadRequest, ContextPoisoned, DeviceError
from gpu_tasks.protocol.routing import gpu_queue, shard_index, shard_name, worker_name
from gpu_tasks.settings import Settings
from workers.child.completed import Completed
from workers.child.taskcounts import TaskCounts
from workers.consumer import ownership
from workers.device import kernels, values
from workers.device.base import Backend, Buffer, DeviceInfo, DevicePoisoned
from workers.device.ledger_writer import BufferLedger
from workers.device.registry import create_backend
from workers.device.store import BufferStore

EXIT_CONTEXT_POISONED = 75
"""Exit status of a pool child ended after a poisoned device context (EX_TEMPFAIL)."""
_FULL_COLLECTION_EVERY = 500
"""Tasks between full cycle collections where the backend collects on the task thread."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerIdentity:
    """Which GPU this worker serves; fixed by ``gpu-tasks worker`` before Celery starts."""

    node: str
    gpu_index: int
    backend: str  # resolved: "pycuda" or "sim"
    started_at: float = field(default_factory=time.time, compare=False)
    """When the worker started: made in its main process before Celery starts, so every
    pool child it forks (a fresh one after a poisoned context too) reports the same time."""

    @property
    def queue(self) -> str:
        """The GPU's own queue, which also names it in the shard map: ``gpu.<node>.<i>``."""
        return gpu_queue(self.node, self.gpu_index)

    @property
    def worker(self) -> str:
        return worker_name(self.node, self.gpu_index)

    def record(self, heartbeat_s: float, *, state: str = "running", error: str = "",
               device: DeviceInfo | None = None, generation: int = 0,
               totals: Mapping[str, int] | None = None) -> GpuRecord:
        """This GPU's fleet registry record, as this process sees it now: with its open
        ``device``, the store's ``generation`` and ``totals``; or without (a failed start)."""
        return GpuRecord(
            queue=self.queue,
            worker=self.worker,
            node=self.node,
            gpu_index=self.gpu_index,
            backend=device.backend if device is not None else self.backend,
            device_name=device.name if device is not None else "",
            device_uuid=device.uuid if device is not None else "",
            total_bytes=device.total_bytes if device is not None else 0,
            heartbeat_s=heartbeat_s,
            generation=generation,
            pid=os.getpid(),
            state=state,
            error=error,
            started_at=self.started_at,
            **(totals or {}),
        )


def element_range(buf: Buffer, offset: object, count: object) -> tuple[int, int]:
    """``(offset, count)`` checked against ``buf``'s elements (``count`` None: to the end);
    else :class:`BadRequest` naming the field."""
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= buf.size:
        raise BadRequest(f"offset must be an integer from 0 to {buf.size} (the buffer's "
                         f"elements), got {offset!r}", "offset")
    if count is None:
        return offset, buf.size - offset
    if isinstance(count, bool) or not isinstance(count, int) or not (
            0 <= count <= buf.size - offset):
        raise BadRequest(f"count must be an integer from 0 to {buf.size - offset} (the "
                         f"elements from offset {offset} on), got {count!r}", "count")
    return offset, count


class EntityContext:
    """What a ``@gpu_task`` body gets: one entity's view of this GPU.

    ``device`` is the backend (``info``, ``mem_info()``; for ``pycuda`` a live
    context is current in this thread) and ``store`` the GPU's buffer store. A
    :class:`~workers.device.base.Buffer`'s ``allocation`` is a PyCUDA device
    allocation on real GPUs (wrap it with ``pycuda.gpuarray.GPUArray(buf.shape,
    buf.dtype, gpudata=buf.allocation)``) and a numpy byte array on ``sim``.
    """

    def __init__(self, runtime: DeviceRuntime, entity_id: str, shard: int,
                 redelivered: bool = False) -> None:
        self.entity_id = entity_id
        self.shard = shard_name(shard)
        self.redelivered = redelivered
        """Redis delivered this request before (its worker died, or lost its connection,
        before acknowledging it): a body that is not idempotent may check what is already
        done. A copy of a request this pool child completed never reaches the body."""
        self.device: Backend = runtime.backend
        self.store: BufferStore = runtime.store
        self.settings: Settings = runtime.settings
        self._runtime = runtime

    @property
    def generation(self) -> int:
        return self.store.generation

    def buffer(self, name: str, generation: int | None = None) -> Buffer:
        return self.store.get(self.entity_id, name, generation)

    def alloc(self, name: str, shape: object, dtype: object = "float32") -> Buffer:
        return self.store.alloc(self.entity_id, name, shape, dtype)

    def free(self, name: str | None = None) -> list[Buffer]:
        return self.store.free(self.entity_id, name)

    def names(self) -> list[str]:
        return self.store.names(self.entity_id)

    def read(self, name: str, generation: int | None = None, offset: int = 0,
             count: int | None = None) -> np.ndarray[Any, Any]:
        """A host copy of the buffer, with its dtype and shape; or, given ``offset`` or
        ``count``, a 1-D copy of elements ``[offset, offset + count)`` of the flattened
        buffer (``count`` None: to its end)."""
        buf = self.buffer(name, generation)
        if offset == 0 and count is None:
            return self.device.download(buf)
        start, size = element_range(buf, offset, count)
        return self.device.download_range(buf, start, size)

    def write(
        self, name: str, data: object, offset: int = 0, generation: int | None = None,
        cast: str = "safe", field: str = "values",
    ) -> Buffer:
        """Copy ``data`` (a flat list of numbers or an array) in from element ``offset``.

        A value the buffer's dtype cannot hold (NaN or 1.5 into an integer buffer, 300 into
        uint8, 70000 into float16) fails with :class:`BadRequest` naming ``field`` and its
        index, unless ``cast="unsafe"`` asks for numpy's cast instead."""
        buf = self.buffer(name, generation)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise BadRequest(f"offset must be a non-negative integer, got {offset!r}", "offset")
        cast = values.parse_cast(cast)
        if isinstance(data, np.ndarray):
            host = values.to_dtype(data, buf.dtype, field, cast)
        elif isinstance(data, (list, tuple)):
            host = values.to_dtype(list(data), buf.dtype, field, cast)
        else:
            raise BadRequest(f"{field} must be a flat list of numbers, got "
                             f"{type(data).__name__}", field)
        if offset + host.size > buf.size:
            raise BadRequest(
                f"writing {host.size} elements at offset {offset} overruns buffer "
                f"{name!r} of {buf.size} elements",
                field,
            )
        self.device.upload(buf, host, offset)
        return buf

    def launch(self, kernel: str, generation: int | None = None, cast: str = "safe",
               **params: Any) -> dict[str, Any]:
        """Run a named kernel (see :mod:`workers.device.kernels`) on this entity's buffers."""
        return kernels.launch(self.store, self.entity_id, kernel, params, generation,
                              allow_fault=self._runtime.settings.fault_injection, cast=cast)


class GpuContext:
    """What a task sent to a GPU's own queue gets (``gpu_tasks.stats``): the GPU, no entity."""

    def __init__(self, runtime: DeviceRuntime) -> None:
        self.device: Backend = runtime.backend
        self.store: BufferStore = runtime.store
        self.runtime = runtime


class DeviceRuntime:
    """The device, buffer store and fleet heartbeat of one pool child."""

    def __init__(self, identity: WorkerIdentity, settings: Settings, client: Any) -> None:
        self.identity = identity
        self.settings = settings
        self.client = client
        self.fleet = FleetRegistry(client)
        self._shard_map = ShardMapStore(client)
        self._shard_count: int | None = None
        self.backend = create_backend(
            identity.backend,
            node=identity.node,
            gpu_index=identity.gpu_index,
            sim_memory_bytes=settings.sim_memory_bytes,
        )
        self.backend.open()
        self.store = BufferStore(
            self.backend,
            self.fleet.next_generation(identity.queue),
            settings.entity_memory_bytes,
            shard_of=lambda entity_id: shard_index(entity_id, self.shard_count),
            ledger=BufferLedger(client, identity.queue),
            idle_s=settings.entity_idle_s,
            spill_capacity_bytes=settings.spill_memory_bytes,
            max_buffers=settings.max_buffers_per_entity,
        )
        table = ownership.table
        if table is not None:
            self.store.version_of = table.version
        self.task_counts: TaskCounts | None = None
        """This process's task counts, added to Redis with each heartbeat (set by the boot)."""
        self.ending: str | None = None
        """Why this child must end after the task at hand (a poisoned context), or None."""
        self._seen_epoch = -2
        self._tasks = 0
        self.completed = Completed()
        """Results of the requests this child completed last, for second copies."""
        # The cycle collector runs in whichever thread allocates at the wrong moment; a
        # backend whose device objects must be finalised on the task thread gets it there
        # (after_task) and nowhere else.
        self._collects_garbage = bool(getattr(self.backend, "collects_garbage", False))
        if self._collects_garbage:
            gc.disable()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        log.info(
            "%s: %s %s (%d bytes), generation %d",
            identity.worker,
            self.backend.info.backend,
            self.backend.info.uuid,
            self.backend.info.total_bytes,
            self.store.generation,
        )

    @property
    def shard_count(self) -> int:
        """S of the deployment's map, read on first use: a worker may start before
        ``shards init``, but no routed task reaches it before there is a map."""
        if self._shard_count is None:
            self._shard_count = self._shard_map.shard_count()
        return self._shard_count

    # -- fleet registry ---------------------------------------------------------

    def record(self, state: str = "running", error: str = "") -> GpuRecord:
        return self.identity.record(self.settings.heartbeat_s, state=state, error=error,
                                    device=self.backend.info, generation=self.store.generation,
                                    totals=self.store.totals())

    def heartbeat(self, state: str = "running") -> None:
        """Write this GPU's record and add the task counts gathered since the last beat, in
        one round trip (a transaction: the counts are added once or, on failure, kept for
        the next beat)."""
        counts = self.task_counts.take() if self.task_counts is not None else {}
        pipe = self.client.pipeline(transaction=True)
        self.fleet.heartbeat(self.record(state=state), pipe)
        self.fleet.add_task_counts(self.identity.queue, counts, pipe)
        try:
            pipe.execute()
        except BaseException:
            if self.task_counts is not None:
                self.task_counts.put_back(counts)
            raise

    def start_heartbeat(self) -> None:
        self.heartbeat()
        self._beat = threading.Thread(
            target=self._beat_loop, name="gpu-tasks-heartbeat", daemon=True
        )
        self._beat.start()

    def _beat_loop(self) -> None:
        failing_since: float | None = None
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                self.heartbeat()
            except Exception as exc:  # Redis away: keep serving, say so once, try again
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("%s: heartbeat failed (%s); serving on, and trying every "
                                "%gs", self.identity.queue, exc, self.settings.heartbeat_s)
                continue
            if failing_since is not None:
                log.warning("%s: heartbeat written again after %.1fs", self.identity.queue,
                            time.monotonic() - failing_since)
                failing_since = None

    def stop(self) -> None:
        self._stop.set()
        try:
            self.heartbeat(state="stopped")
        except Exception as exc:
            log.warning("could not record the stop in the fleet registry: %s", exc)
        self.backend.close()

    # -- serving ------------------------------------------------------------------

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Turn a poisoned context into a :class:`ContextPoisoned` answer, and doom this child:
        it ends once the answer is stored (:meth:`after_task`)."""
        try:
            yield
        except DevicePoisoned as exc:
            old, lost = self.store.generation, self.store.totals()["buffers"]
            self.ending = f"when the device context failed ({exc})"
            try:
                if self.store.ledger is not None:
                    self.store.ledger.ending(self.ending)
            except Exception as ledger_exc:  # the loss is still reported, less precisely
                log.warning("could not record why this pool child ends: %s", ledger_exc)
            log.error("%s: the device context failed (%s); this pool child ends once the "
                      "request is answered, and a fresh one opens the device at generation %d",
                      self.identity.queue, exc, old + 1)
            raise ContextPoisoned(
                f"the device context failed ({exc}): generation {old} -> {old + 1}, in a fresh "
                f"pool child; {lost} buffers on {self.identity.queue} were lost",
                old + 1,
            ) from None

    def after_task(self) -> None:
        """After each task, its result stored: collect garbage here if the backend needs it,
        and end this child if its context was poisoned (raises ``SystemExit``; the worker's
        parent forks a fresh child, and the request, already answered, is not run again)."""
        self._tasks += 1
        if self.ending is None:
            self.store.passivate_idle()
        if self._collects_garbage:
            gc.collect(0 if self._tasks % _FULL_COLLECTION_EVERY else 2)
        if self.ending is not None:
            raise SystemExit(EXIT_CONTEXT_POISONED)

    def sync_ownership(self) -> None:
        """Drop the buffers of shards this GPU no longer holds (on the task thread, where
        device memory may be freed), once per change of the map's epoch. A shard handed off
        with its state is simply freed; one taken away without it is recorded as lost."""
        table = ownership.table
        if table is None or table.epoch == self._seen_epoch:
            return
        self._seen_epoch = table.epoch
        held = set(table.held())
        stale = [i for i in self.store.shards() if table.serves(i)
                 and self.store.versions.get(i, table.version(i)) != table.version(i)]
        if stale:
            # The shard moved on while this GPU kept a copy (its handoff committed, then its
            # new owner died and failover gave it back): that copy is stale. The loss was
            # recorded where the state died.
            for index in stale:
                self.store.exported.pop(index, None)
            dropped = self.store.drop_shards(stale, "", lose=False)
            log.warning("%s: dropped %d buffers of %d shards whose state moved on since",
                        self.identity.queue, dropped, len(stale))
        for index in [i for i in self.store.exported if table.serves(i)]:
            del self.store.exported[index]  # the handoff was rolled back: it is ours again
        gone = [i for i in self.store.shards() if i not in held]
        if gone:
            dropped = self.store.drop_shards(
                gone, f"when its shard stopped being served by {self.identity.queue}")
            log.warning("%s: shard map epoch %d: dropped %d buffers of %d shards this GPU no "
                        "longer holds", self.identity.queue, self._seen_epoch, dropped,
                        len(gone))

    def served_shard(self, entity_id: str, task_name: str) -> int:
        """The entity's shard, if this GPU serves it now; else the request goes back to the
        head of its shard's queue (``Reject(requeue=True)``) for the shard's new consumer.

        The main process admitted the request when this GPU served its shard; the map may
        have moved it since."""
        index = shard_index(entity_id, self.shard_count)
        table = ownership.table
        if table is None:  # a runtime without a worker around it (tests of the device layer)
            return index
        if not table.lease_held():
            raise Reject(f"{self.identity.queue} does not hold its lease; {task_name} for "
                         f"{entity_id!r} goes back to its queue", requeue=True)
        if not table.serves(index):
            raise Reject(f"{shard_name(index)} left {self.identity.queue}; {task_name} for "
                         f"{entity_id!r} goes back to its queue", requeue=True)
        return index

    def where(self, entity_id: str | None = None, shard: int | None = None) -> dict[str, Any]:
        """The where-it-ran fields every result carries: an entity request names its shard
        and the shard's queue; a GPU-queue request names the GPU's queue."""
        where: dict[str, Any] = {"queue": self.identity.queue}
        if entity_id is not None and shard is not None:
            where = {"entity_id": entity_id, "shard": shard_name(shard),
                     "queue": shard_name(shard)}
        return {
            **where,
            "gpu": self.identity.queue,
            "worker": self.identity.worker,
            "device": self.backend.info.uuid,
            "generation": self.store.generation,
        }


# -- this process's runtime -----------------------------------------------------------

_runtime: DeviceRuntime | None = None
_boot_error: str | None = None


def install(runtime: DeviceRuntime | None, error: str | None = None) -> None:
    """Make ``runtime`` this process's; None: it has none, for the reason ``error``."""
    global _runtime, _boot_error
    _runtime, _boot_error = runtime, error


def installed() -> DeviceRuntime | None:
    """This process's runtime, or None."""
    return _runtime


def current() -> DeviceRuntime:
    """This process's runtime, or a clear :class:`DeviceError` if there is none."""
    if _runtime is None:
        if _boot_error:
            raise DeviceError(f"this GPU worker failed to start its device: {_boot_error}")
        raise DeviceError(
            "GPU tasks must run in a GPU worker started with "
            "`gpu-tasks worker --gpu N`; this process has no device"
        )
    return _runtime


def open_device(identity: WorkerIdentity, settings: Settings, counts: TaskCounts) -> None:
    """Open this GPU's device in a fresh pool child (``worker_process_init``; the worker
    itself with ``--pool solo``) and start its heartbeat. A device that fails to open
    leaves the child alive, so that every task answers with the reason, and the fleet
    registry, where `gpu-tasks status` shows it, says so too."""
    counts.reset()
    try:
        runtime = DeviceRuntime(identity, settings, settings.redis_client())
    except Exception as exc:
        log.exception("GPU %d failed to start", identity.gpu_index)
        reason = f"{type(exc).__name__}: {exc}"
        install(None, reason)
        record_failure(identity, settings, reason)
        counts.write_to(FleetRegistry(settings.redis_client()))
        return
    runtime.task_counts = counts
    install(runtime)
    runtime.start_heartbeat()


def close_device() -> None:
    """At the pool child's shutdown: a last heartbeat (``stopped``), and the device closed."""
    if _runtime is not None:
        _runtime.stop()
        install(None)


def record_failure(identity: WorkerIdentity, settings: Settings, reason: str) -> None:
    """Register this GPU as ``failed`` with ``reason``, without a device (best effort:
    Redis may be the cause)."""
    try:
        FleetRegistry(settings.redis_client()).heartbeat(
            identity.record(settings.heartbeat_s, state="failed", error=reason))
    except Exception as exc:
        log.warning("could not record the failed start in the fleet registry: %s", exc)
