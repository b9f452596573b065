"""A GPU worker's device in Celery's ``inspect stats``, and so on Flower's worker page.

Celery adds each consumer bootstep's ``info()`` to the answer to ``stats``; Flower
shows the keys it does not know on the worker page's **Other** tab. The answer is
made in the worker's main process, which never touches the device: the pool child
that holds it publishes its accounting to the fleet registry every ``heartbeat_s``
(:meth:`workers.child.runtime.DeviceRuntime.record`), and this reads it back from there,
with a short timeout, since ``stats`` runs on the event loop that also renews the
GPU's lease. What the main process knows itself (the shards it consumes and the
shard map's epoch) comes from :class:`workers.consumer.consumption.Consumption`.

Values are strings where units make a number readable, numbers where a count is
the whole story; every key starts with ``gpu`` so they sort together.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from gpu_tasks.control.fleet import FleetRegistry, GpuRecord
from gpu_tasks.settings import Settings

REGISTRY_TIMEOUT_S = 0.5
"""Longest ``stats`` waits for the fleet registry before answering without the device."""


def registry_client(settings: Settings) -> redis.Redis:
    """A client for the registry read, apart from the worker's own (whose timeouts are
    the deployment's ``redis_timeout_s``, seconds too long to hold the event loop)."""
    return settings.replace(redis_timeout_s=REGISTRY_TIMEOUT_S).redis_client()


def _size(n: int) -> str:
    """Bytes in the largest binary unit that keeps one digit before the point."""
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def device_stats(gpu: str, registry: FleetRegistry, *, shards: int, epoch: int,
                 now: float | None = None) -> dict[str, Any]:
    """The GPU's rows for ``inspect stats``: never raises (a worker's stats must answer)."""
    consumed = f"{shards} shard queues consumed (shard map epoch {epoch})"
    try:
        record = registry.get(gpu)
    except (redis.RedisError, ValueError, TypeError) as exc:  # away, or a malformed record
        return {"gpu": gpu, "gpu_shards": consumed,
                "gpu_state": f"unknown: cannot read the fleet registry ({type(exc).__name__})"}
    if record is None:
        return {"gpu": gpu, "gpu_shards": consumed,
                "gpu_state": "unknown: the device has not registered yet"}
    return _record_rows(record, consumed, time.time() if now is None else now)


def _record_rows(r: GpuRecord, consumed: str, now: float) -> dict[str, Any]:
    age_s = max(0.0, now - r.heartbeat_at)
    state = r.state if not r.error else f"{r.state}: {r.error}"
    if r.state == "running" and age_s > 3 * r.heartbeat_s:
        state += f" (no heartbeat for {age_s:.0f} s: the pool child may be stuck or gone)"
    return {
        "gpu": r.queue,
        "gpu_device": f"{r.device_name or '?'} ({r.device_uuid or 'no UUID'}, {r.backend})",
        "gpu_memory": f"{_size(r.used_bytes)} used of {_size(r.total_bytes)}",
        "gpu_entities": r.entities,
        "gpu_buffers": r.buffers,
        "gpu_shards": consumed,
        "gpu_generation": r.generation,
        "gpu_spills": (f"{r.spills} spills, {r.restores} restores, {r.evictions} evictions; "
                       f"{_size(r.spilled_bytes)} spilled to host memory"),
        "gpu_state": f"{state}; heard from {age_s:.1f} s ago",
    }
