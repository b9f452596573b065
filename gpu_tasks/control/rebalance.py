"""Rebalance plans: which shards move where, so that every live GPU gets its share while
the fewest shards move.

A GPU's share is S/N, within one shard (``by="count"``), or in proportion to its device
memory (``by="memory"``, from the fleet registry). GPUs above their share give up their
surplus, those below receive it; nothing else moves, so adding a 9th GPU to 8 moves about
S/9 shards, and draining one moves exactly its shards. A GPU gives up the shards that hold
the least state first (from its buffer ledger), since those are the cheapest to hand off.

Only live GPUs (a worker holds the lease) that are not drained take shards. Shards of a
GPU with no live worker are not planned here: their state died with it (failover's job);
shards in the middle of a handoff are finished first, by resuming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis

from gpu_tasks.control.bufferledger import ShardUsage, usage_by_shard
from gpu_tasks.control.fleet import FleetRegistry
from gpu_tasks.control.lease import LeaseStore
from gpu_tasks.control.shardmap import ShardMap, ShardMapStore
from gpu_tasks.errors import HandoffError
from gpu_tasks.protocol.routing import shard_name

BY = ("count", "memory")


@dataclass(frozen=True)
class Move:
    shard: int
    source: str
    target: str
    entities: int = 0
    bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"shard": shard_name(self.shard), "from": self.source, "to": self.target,
                "entities": self.entities, "bytes": self.bytes}


@dataclass
class Plan:
    moves: list[Move]
    before: dict[str, int]
    """Shards per GPU now."""
    after: dict[str, int]
    """Shards per GPU once every move is done."""
    targets: dict[str, int]
    """Each eligible GPU's share."""
    left_out: list[str] = field(default_factory=list)
    """What the plan does not cover, and why."""

    def as_dict(self) -> dict[str, Any]:
        return {"moves": [m.as_dict() for m in self.moves], "before": self.before,
                "after": self.after, "targets": self.targets, "left_out": self.left_out,
                "entities": sum(m.entities for m in self.moves),
                "bytes": sum(m.bytes for m in self.moves)}


def shares(shard_count: int, gpus: list[str], current: dict[str, int],
           weights: dict[str, float] | None = None) -> dict[str, int]:
    """Each GPU's number of shards: S/N within one (or in proportion to ``weights``, largest
    remainders first). Where shares differ by rounding, GPUs that hold more now get the
    larger ones, so fewer shards move."""
    if not gpus:
        raise HandoffError("no live, undrained GPU to give shards to")
    w = {g: float(weights[g]) if weights else 1.0 for g in gpus}
    if any(v <= 0 for v in w.values()):
        raise HandoffError(f"every GPU needs a positive weight, got {w}")
    total = sum(w.values())
    exact = {g: shard_count * w[g] / total for g in gpus}
    share = {g: int(exact[g]) for g in gpus}
    spare = shard_count - sum(share.values())
    order = sorted(gpus, key=lambda g: (-(exact[g] - share[g]), -current.get(g, 0), g))
    for g in order[:spare]:
        share[g] += 1
    return share


def plan(shard_map: ShardMap, live: set[str], drained: set[str],
         usage: dict[str, dict[int, ShardUsage]] | None = None, *, by: str = "count",
         memory: dict[str, int] | None = None, max_moves: int | None = None) -> Plan:
    """The fewest moves that give every live, undrained GPU its share (see the module)."""
    if by not in BY:
        raise HandoffError(f"rebalance by must be one of {', '.join(BY)}, not {by!r}")
    usage = usage or {}
    owned = shard_map.by_owner()
    eligible = sorted(live - drained)
    current = {g: len(owned.get(g, [])) for g in eligible}
    weights = None
    if by == "memory":
        weights = {g: float((memory or {}).get(g, 0)) for g in eligible}
        missing = [g for g, v in weights.items() if v <= 0]
        if missing:
            raise HandoffError(f"no device memory on record for {', '.join(missing)}: "
                               "rebalance --by count, or let their workers report")
    targets = shares(shard_map.shard_count, eligible, current, weights)
    left_out: list[str] = []
    moving = shard_map.moving()
    if moving:
        left_out.append(f"{len(moving)} shards are being handed off "
                        f"({', '.join(shard_name(i) for i in sorted(moving)[:5])}); "
                        "they are finished first")
    donors: dict[str, list[int]] = {}
    for owner, indices in owned.items():
        settled = [i for i in indices if i not in moving]
        if owner is None:
            left_out.append(f"{len(settled)} shards have no owner")
        elif owner not in live:
            left_out.append(f"{len(settled)} shards of {owner}, which has no live worker "
                            "(their state died with it: failover, not rebalance)")
        else:
            surplus = len(settled) - targets.get(owner, 0)
            if surplus > 0:
                held = usage.get(owner, {})
                settled.sort(key=lambda i: (held.get(i, ShardUsage()).bytes,
                                            held.get(i, ShardUsage()).entities, i))
                donors[owner] = settled[:surplus]
    deficit = {g: targets[g] - current[g] for g in eligible if targets[g] > current[g]}
    moves: list[Move] = []
    receivers = sorted(deficit, key=lambda g: (-deficit[g], g))
    for source in sorted(donors):
        for index in donors[source]:
            receivers = [g for g in receivers if deficit[g] > 0]
            if not receivers:
                break
            receivers.sort(key=lambda g: (-deficit[g], g))
            target = receivers[0]
            deficit[target] -= 1
            state = usage.get(source, {}).get(index, ShardUsage())
            moves.append(Move(index, source, target, state.entities, state.bytes))
    if max_moves is not None and len(moves) > max_moves:
        left_out.append(f"{len(moves) - max_moves} more moves, beyond --max-moves "
                        f"{max_moves}: run rebalance again")
        moves = moves[:max_moves]
    before = {g: len(v) for g, v in owned.items() if g is not None}
    after = dict(before)
    for move in moves:
        after[move.source] -= 1
        after[move.target] = after.get(move.target, 0) + 1
    for g in eligible:
        after.setdefault(g, 0)
        before.setdefault(g, 0)
    return Plan(moves, dict(sorted(before.items())), dict(sorted(after.items())), targets,
                left_out)


def plan_from_redis(client: redis.Redis, *, by: str = "count",
                    max_moves: int | None = None, drain: str | None = None) -> Plan:
    """:func:`plan` for the deployment as it is now (``drain``: as if that GPU were drained)."""
    store = ShardMapStore(client)
    shard_map = store.load()
    live = {g for g, lease in LeaseStore(client).all().items() if lease is not None}
    drained = store.drained() | ({drain} if drain else set())
    usage = {g: usage_by_shard(client, g) for g in live}
    memory = {r.queue: r.total_bytes for r in FleetRegistry(client).all()}
    return plan(shard_map, live, drained, usage, by=by, memory=memory, max_moves=max_moves)
