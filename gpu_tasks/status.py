"""A snapshot of the deployment: every GPU with its lease, shards, backlog and device.

GPUs come from the shard map (owners), the leases and the fleet registry, so a GPU
that owns shards but never started still shows, with the work waiting for it. A
GPU is *alive* while a worker holds its lease (judged on Redis's clock) and
*consuming* while that worker consumes by the shard map's current epoch. Per-GPU
backlogs are sums over the GPU's shard queues. Everything is read in a few
pipelined round trips, whatever S is. ``gpu-tasks status`` renders it; an exporter
or a test can call :func:`snapshot` too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from gpu_tasks.errors import ShardMapError
from gpu_tasks.fleet import FleetRegistry, GpuRecord
from gpu_tasks.lease import Lease, LeaseStore
from gpu_tasks.routing import shard_name
from gpu_tasks.shardmap import ShardMap, ShardMapStore


@dataclass
class GpuStatus:
    gpu: str
    worker: str | None
    alive: bool
    """A worker holds this GPU's lease."""
    lease_age_s: float | None
    consuming: bool
    """That worker consumes the queues of this GPU's shards at the map's current epoch."""
    worker_epoch: int | None
    shards: int
    """Shards whose queues this GPU is to consume (by the shard map)."""
    queued: int
    """Requests waiting in this GPU's shard queues and its own queue."""
    gpu_queue: int
    """Of those, the ones in its own queue (``gpu.<node>.<i>``)."""
    device: dict[str, Any] = field(default_factory=dict)
    """The fleet registry's record: device, memory, entities, buffers, generation."""
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FleetStatus:
    shard_count: int | None
    epoch: int | None
    gpus: list[GpuStatus]
    unowned_shards: list[str]
    """Shards nobody consumes (no owner in the map)."""
    unowned_queued: int
    problems: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "shard_count": self.shard_count,
            "epoch": self.epoch,
            "gpus": [g.as_dict() for g in self.gpus],
            "unowned_shards": self.unowned_shards,
            "unowned_queued": self.unowned_queued,
            "problems": self.problems,
        }


def _problem(gpu: str, lease: Lease | None, consuming: bool, queued: int,
             record: GpuRecord | None, epoch: int | None) -> str | None:
    if record is not None and record.state == "failed" and lease is not None:
        return f"{gpu}: its device failed to start: {record.error}"
    if consuming:
        return None
    if lease is None:
        why = "no worker holds its lease"
        if record is not None and record.state == "failed":
            why += f" (its last worker failed: {record.error})"
    else:
        why = (f"its worker {lease.worker} consumes by shard map epoch {lease.epoch}, "
               f"not {epoch}")
    if queued:
        return f"{gpu}: {queued} requests wait in its queues and nothing consumes them: {why}"
    return None


def snapshot(client: redis.Redis) -> FleetStatus:
    """Read the whole deployment's state."""
    try:
        shard_map: ShardMap | None = ShardMapStore(client).load()
    except ShardMapError:
        shard_map = None
    leases = LeaseStore(client).all()
    records = {record.queue: record for record in FleetRegistry(client).all()}
    owned = shard_map.by_owner() if shard_map else {}
    gpus = sorted({*(g for g in owned if g is not None), *leases, *records})
    pipe = client.pipeline(transaction=False)
    count = shard_map.shard_count if shard_map else 0
    for i in range(count):
        pipe.llen(shard_name(i))
    for gpu in gpus:
        pipe.llen(gpu)
    depths = pipe.execute()
    shard_depth, gpu_depth = depths[:count], dict(zip(gpus, depths[count:], strict=True))

    rows: list[GpuStatus] = []
    for gpu in gpus:
        lease, record = leases.get(gpu), records.get(gpu)
        shards = owned.get(gpu, [])
        queued = sum(shard_depth[i] for i in shards) + gpu_depth[gpu]
        epoch = shard_map.epoch if shard_map else None
        consuming = lease is not None and (shard_map is None or lease.epoch == shard_map.epoch)
        rows.append(GpuStatus(
            gpu=gpu,
            worker=lease.worker if lease else (record.worker if record else None),
            alive=lease is not None,
            lease_age_s=round(lease.age_s, 3) if lease else None,
            consuming=consuming,
            worker_epoch=lease.epoch if lease else None,
            shards=len(shards),
            queued=queued,
            gpu_queue=gpu_depth[gpu],
            device=_device(record),
            problem=_problem(gpu, lease, consuming, queued, record, epoch),
        ))
    unowned = owned.get(None, [])
    unowned_queued = sum(shard_depth[i] for i in unowned)
    problems = [r.problem for r in rows if r.problem]
    if unowned:
        problems.append(f"{len(unowned)} shards have no owner"
                        + (f" and {unowned_queued} requests wait in them" if unowned_queued
                           else ""))
    return FleetStatus(
        shard_count=shard_map.shard_count if shard_map else None,
        epoch=shard_map.epoch if shard_map else None,
        gpus=rows,
        unowned_shards=[shard_name(i) for i in unowned],
        unowned_queued=unowned_queued,
        problems=problems,
    )


def _device(record: GpuRecord | None) -> dict[str, Any]:
    if record is None:
        return {}
    keep = ("backend", "device_name", "device_uuid", "total_bytes", "used_bytes", "entities",
            "buffers", "spilled_bytes", "spills", "restores", "evictions", "generation", "pid",
            "state", "error", "started_at", "heartbeat_at")
    return {k: getattr(record, k) for k in keep}
