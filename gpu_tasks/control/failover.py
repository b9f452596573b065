"""Failover: a dead GPU's shards go to live GPUs, and its unfinished work runs first there.

A GPU is dead when its lease has been expired for ``failover_after_s`` (its worker was
killed, its host went down, or it was stopped without a drain). Then, in this order:

1. the requests its worker had taken and not finished go back to the head of their
   shard queues (:func:`gpu_tasks.control.unacked.restore_unacked`), so the new owner runs them
   first, in the order they were taken;
2. the buffers it held are recorded as lost, per shard
   (:func:`gpu_tasks.control.bufferledger.retire`), so a later request for one answers
   ``EntityStateLost`` (naming the entity, the buffer, the GPU and when), never
   ``NoSuchBuffer``, never a silent zero buffer;
3. each of its shards gets a live GPU, by the rebalance rule (every live, undrained GPU
   towards its share), in one compare-and-set per shard; a shard it was handing off
   is finished or rolled back by resuming that handoff instead.

A GPU that comes back rejoins empty: it owns nothing until the next rebalance.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from gpu_tasks.control import bufferledger as ledger
from gpu_tasks.control.lease import LeaseStore
from gpu_tasks.control.rebalance import shares
from gpu_tasks.control.shardmap import Shard, ShardMapStore, check_gpu
from gpu_tasks.control.unacked import restore_unacked
from gpu_tasks.errors import HandoffError
from gpu_tasks.protocol.routing import shard_name

log = logging.getLogger(__name__)


@dataclass
class Failover:
    """What failing a GPU over did."""

    gpu: str
    requeued: int = 0
    """Requests it had taken and not finished, put back at the head of their queues."""
    lost_buffers: int = 0
    moved: dict[str, str] = field(default_factory=dict)
    """Shard -> the GPU that owns it now."""
    resumed: list[int] = field(default_factory=list)
    """Shards whose handoff involved it: resume them (gpu_tasks.control.handoff)."""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "requeued": self.requeued, "lost_buffers": self.lost_buffers,
                "moved": self.moved, "resumed": [shard_name(i) for i in self.resumed],
                "seconds": round(self.seconds, 3)}


def fail_over(client: redis.Redis, gpu: str) -> Failover:
    """Give ``gpu``'s shards to live GPUs (see the module); refuses while it has a live
    worker (``gpu-tasks drain`` moves a live GPU's shards with their state)."""
    check_gpu(gpu)
    started = time.monotonic()
    leases = LeaseStore(client)
    if leases.alive(gpu):
        raise HandoffError(f"{gpu} has a live worker (it holds its lease): drain it instead, "
                           "which moves its shards with their state")
    store = ShardMapStore(client)
    report = Failover(gpu)
    report.requeued = restore_unacked(client, gpu)
    shard_map = store.load()
    own = [i for i, s in enumerate(shard_map.shards)
           if s.owner == gpu and s.state in ("owned", "releasing")]
    report.resumed = [i for i, s in enumerate(shard_map.shards)
                      if s.state != "owned" and gpu in (s.owner, s.target) and i not in own]
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    report.lost_buffers = ledger.retire(
        client, gpu, f"when {gpu} died (failed over at {when} UTC)", own)
    live = {g for g, lease in leases.all().items() if lease is not None and not
            lease.holder_gone()}
    eligible = sorted(live - store.drained() - {gpu})
    if own and not eligible:
        raise HandoffError(f"no live, undrained GPU to take {len(own)} shards of {gpu}: its "
                           "requests wait in their shard queues until one is")
    counts = shard_map.by_owner()
    current = {g: len(counts.get(g, [])) for g in eligible}
    target_counts = shares(shard_map.shard_count, eligible, current)
    deficit = {g: target_counts[g] - current[g] for g in eligible}
    for index in own:
        target = max(eligible, key=lambda g: (deficit[g], -current[g], g))
        deficit[target] -= 1
        current[target] += 1
        entry = shard_map.shards[index]
        store.transition(index, entry, Shard(target, "owned", version=entry.version + 1))
        report.moved[shard_name(index)] = target
    report.seconds = time.monotonic() - started
    log.warning("%s failed over: %d shards moved, %d requests put back first, %d buffers "
                "lost", gpu, len(report.moved), report.requeued, report.lost_buffers)
    return report
