"""A snapshot of the deployment: every GPU with its lease, shards, backlog and device.

GPUs come from the shard map (owners), the leases and the fleet registry, so a GPU
that owns shards but never started still shows, with the work waiting for it. A
GPU is *alive* while a worker holds its lease (judged on Redis's clock) and its
process is not known to be gone, and *consuming* while that worker also consumes by
the shard map's current epoch. Per-GPU backlogs are sums over the GPU's shard queues
and its own queue. A GPU whose queues hold work while it consumes nothing is
*stalled*: a problem, as are shards with no owner. ``gpu-tasks status`` renders it and
the Prometheus exporter (:mod:`gpu_tasks.monitor.metrics`) exports it; a test can call
:func:`snapshot` too.

**Age of the oldest waiting request.** Messages carry no enqueue time, so the age is
measured by watching: producers ``LPUSH`` and workers ``BRPOP``, so a queue's next
request is its tail (``LINDEX queue -1``). Each snapshot notes, per queue, the tail's
``delivery_tag`` (a fresh UUID per message, required by the wire format) and the Redis
time it first saw that tail; while the same tail is still there, its age is the time
since then. It is a lower bound: a request that waited before any snapshot saw it is
counted from that first sighting, so with snapshots every T seconds (a Prometheus
scrape interval, a cron ``status``) it is low by at most T, and 0 on the first
snapshot. A request put back at the head (fencing, a restarted worker) is a new tail
and counts from when it was put back. Every snapshot shares the notes, kept in

- ``gpu-tasks:status:tails``  hash ``<queue>`` -> ``<first seen, Redis ms> <tag>``;
  fields of empty queues are dropped, and the hash expires a day after the last snapshot

One Lua call reads every queue's length and tail and updates the notes, so the whole
snapshot is five round trips whatever S is (its cost, and how long that call blocks
Redis as any Lua script does: ``python -m benchmarks.status``, in BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from gpu_tasks.control import scripts
from gpu_tasks.control.fleet import FleetRegistry, GpuRecord
from gpu_tasks.control.lease import Lease, LeaseStore
from gpu_tasks.control.shardmap import ShardMap, ShardMapStore
from gpu_tasks.errors import ShardMapError
from gpu_tasks.keys import TAILS_KEY
from gpu_tasks.protocol.routing import parse_gpu_queue, shard_name

TAILS_TTL_S = 24 * 3600
"""How long the tail notes outlive the last snapshot: long enough to cover any gap
between scrapes, short enough that a deployment no longer watched leaves nothing."""

@dataclass
class GpuStatus:
    gpu: str
    node: str | None
    """The ``<node>`` of ``gpu.<node>.<i>``."""
    worker: str | None
    alive: bool
    """A worker holds this GPU's lease (and its process is not known to be gone)."""
    lease_age_s: float | None
    """Seconds since the lease was last renewed (Redis's clock); None: no lease."""
    lease_ttl_s: float | None
    consuming: bool
    """That worker consumes the queues of this GPU's shards at the map's current epoch."""
    worker_epoch: int | None
    shards: int
    """Shards this GPU owns in the shard map (in any state)."""
    queued: int
    """Requests waiting in this GPU's shard queues and its own queue."""
    gpu_queue: int
    """Of those, the ones in its own queue (``gpu.<node>.<i>``)."""
    oldest_s: float | None = None
    """Age of the oldest request waiting in those queues, a lower bound (see the module);
    None when nothing waits."""
    stalled: bool = False
    """Requests wait in its queues and nothing consumes them."""
    device: dict[str, Any] = field(default_factory=dict)
    """The fleet registry's record: device, memory, entities, buffers, generation."""
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ShardBacklog:
    """A shard whose queue has no consumer now, with what waits in it."""

    shard: str
    state: str
    owner: str | None
    target: str | None
    queued: int
    oldest_s: float | None

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
    unowned_oldest_s: float | None = None
    handoffs: list[ShardBacklog] = field(default_factory=list)
    """Shards being handed off (``releasing``/``importing``): nobody consumes them meanwhile."""
    waiting_without_consumer: list[str] = field(default_factory=list)
    """Shards whose queue holds requests and has no consumer: unowned, being handed off,
    or owned by a GPU that consumes nothing."""
    redis_time: float = 0.0
    """When the snapshot was taken, by Redis's clock (Unix seconds)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "shard_count": self.shard_count,
            "epoch": self.epoch,
            "redis_time": self.redis_time,
            "gpus": [g.as_dict() for g in self.gpus],
            "unowned_shards": self.unowned_shards,
            "unowned_queued": self.unowned_queued,
            "unowned_oldest_s": self.unowned_oldest_s,
            "handoffs": [h.as_dict() for h in self.handoffs],
            "waiting_without_consumer": self.waiting_without_consumer,
            "problems": self.problems,
        }


def _age(age_ms: int) -> float | None:
    return None if age_ms < 0 else age_ms / 1000


def _oldest(ages: list[float | None]) -> float | None:
    known = [a for a in ages if a is not None]
    return max(known) if known else None


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.0f}s"
    if value < 7200:
        return f"{value / 60:.0f}m"
    return f"{value / 3600:.1f}h"


def _problem(gpu: str, lease: Lease | None, gone: bool, consuming: bool, queued: int,
             oldest_s: float | None, record: GpuRecord | None,
             epoch: int | None) -> str | None:
    if record is not None and record.state == "failed" and lease is not None and not gone:
        return f"{gpu}: its device failed to start: {record.error}"
    if consuming or not queued:
        return None
    if lease is None:
        why = "no worker holds its lease"
        if record is not None and record.state == "failed":
            why += f" (its last worker failed: {record.error})"
    elif gone:
        why = (f"its worker {lease.worker} (pid {lease.pid} on {lease.host}) is gone; its "
               f"lease expires in {lease.expires_in_s:.0f}s")
    else:
        why = (f"its worker {lease.worker} consumes by shard map epoch {lease.epoch}, "
               f"not {epoch}")
    return (f"{gpu}: {queued} requests wait in its queues and nothing consumes them: {why}; "
            f"the oldest has waited at least {_seconds(oldest_s)}")


def read_queues(client: redis.Redis, queues: list[str]) -> tuple[float, list[int],
                                                                 list[float | None]]:
    """``(Redis time in s, lengths, oldest ages in s)`` of ``queues``, in one call that also
    notes each queue's tail for the next snapshot (see the module)."""
    script = scripts.register(client, "status_queues")
    reply = script(keys=[TAILS_KEY, *queues], args=[TAILS_TTL_S * 1000])
    now_ms, *values = map(int, reply.split())
    return now_ms / 1000, values[0::2], [_age(a) for a in values[1::2]]


def snapshot(client: redis.Redis) -> FleetStatus:
    """Read the whole deployment's state (and note the queues' tails)."""
    try:
        shard_map: ShardMap | None = ShardMapStore(client).load()
    except ShardMapError:
        shard_map = None
    leases = LeaseStore(client).all()
    records = {record.queue: record for record in FleetRegistry(client).all()}
    owned = shard_map.by_owner() if shard_map else {}
    gpus = sorted({*(g for g in owned if g is not None), *leases, *records})
    count = shard_map.shard_count if shard_map else 0
    epoch = shard_map.epoch if shard_map else None
    now_s, depths, ages = read_queues(client, [*(shard_name(i) for i in range(count)), *gpus])
    shard_depth, shard_age = depths[:count], ages[:count]
    gpu_depth = dict(zip(gpus, depths[count:], strict=True))
    gpu_age = dict(zip(gpus, ages[count:], strict=True))

    rows: list[GpuStatus] = []
    for gpu in gpus:
        lease, record = leases.get(gpu), records.get(gpu)
        gone = lease is not None and lease.holder_gone() is True
        shards = owned.get(gpu, [])
        queued = sum(shard_depth[i] for i in shards) + gpu_depth[gpu]
        oldest = _oldest([*(shard_age[i] for i in shards), gpu_age[gpu]])
        consuming = (lease is not None and not gone
                     and (shard_map is None or lease.epoch == shard_map.epoch))
        parsed = parse_gpu_queue(gpu)
        rows.append(GpuStatus(
            gpu=gpu,
            node=parsed[0] if parsed else None,
            worker=lease.worker if lease else (record.worker if record else None),
            alive=lease is not None and not gone,
            lease_age_s=round(lease.age_s, 3) if lease else None,
            lease_ttl_s=lease.ttl_ms / 1000 if lease else None,
            consuming=consuming,
            worker_epoch=lease.epoch if lease else None,
            shards=len(shards),
            queued=queued,
            gpu_queue=gpu_depth[gpu],
            oldest_s=oldest,
            stalled=queued > 0 and not consuming,
            device=_device(record),
            problem=_problem(gpu, lease, gone, consuming, queued, oldest, record, epoch),
        ))
    consuming_gpus = {r.gpu for r in rows if r.consuming}
    unowned = owned.get(None, [])
    unowned_queued = sum(shard_depth[i] for i in unowned)
    unowned_oldest = _oldest([shard_age[i] for i in unowned])
    handoffs: list[ShardBacklog] = []
    waiting: list[str] = []
    for i, shard in enumerate(shard_map.shards if shard_map else ()):
        if shard.state != "owned":
            handoffs.append(ShardBacklog(shard_name(i), shard.state, shard.owner,
                                         shard.target, shard_depth[i], shard_age[i]))
        if shard_depth[i] and shard.consumer not in consuming_gpus:
            waiting.append(shard_name(i))
    problems = [r.problem for r in rows if r.problem]
    if unowned:
        problems.append(f"{len(unowned)} shards have no owner"
                        + (f" and {unowned_queued} requests wait in them, the oldest for at "
                           f"least {_seconds(unowned_oldest)}" if unowned_queued else ""))
    return FleetStatus(
        shard_count=shard_map.shard_count if shard_map else None,
        epoch=epoch,
        gpus=rows,
        unowned_shards=[shard_name(i) for i in unowned],
        unowned_queued=unowned_queued,
        unowned_oldest_s=unowned_oldest,
        handoffs=handoffs,
        waiting_without_consumer=waiting,
        problems=problems,
        redis_time=now_s,
    )


def _device(record: GpuRecord | None) -> dict[str, Any]:
    if record is None:
        return {}
    keep = ("backend", "device_name", "device_uuid", "total_bytes", "used_bytes", "entities",
            "buffers", "spilled_bytes", "spills", "restores", "evictions", "generation", "pid",
            "state", "error", "started_at", "heartbeat_at")
    return {k: getattr(record, k) for k in keep}


format_seconds = _seconds
"""How the CLI writes an age: ``45s``, ``12m``, ``3.5h``; ``-`` for None."""
