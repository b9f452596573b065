"""The shard map: which GPU owns each shard, kept in Redis with an epoch.

The entity -> shard function never changes (:mod:`gpu_tasks.protocol.routing`); only shard ->
GPU does, and a shard's queued requests stay in its own queue while it does. GPU
workers read the map to know which shard queues to consume; producers never read
it (they need only ``S``).

Layout in Redis (one deployment per Redis database):

- ``gpu-tasks:shardmap:meta``  hash ``shard_count`` (S, fixed when the map is created)
  and ``epoch`` (one more on every change)
- ``gpu-tasks:shardmap``       hash ``shard-<i>`` -> JSON ``{"owner": "gpu.<node>.<j>",
  "state": "owned"}``; a shard being handed off also has ``"target"`` (the GPU it goes
  to) and ``"handoff"`` (the handoff's id); ``"version"`` counts how often the shard's
  state has moved or been lost, so a GPU can tell a stale copy it still holds
- ``gpu-tasks:shardmap:drained`` set of GPUs that take no shards (``gpu-tasks drain``)

Every change goes through a Lua script, so the map and its epoch change together; a
handoff's steps are compare-and-set transitions (:meth:`ShardMapStore.transition`), so
two tools can never both drive one shard.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from gpu_tasks.control import scripts
from gpu_tasks.control.lease import LeaseStore
from gpu_tasks.errors import ShardMapError
from gpu_tasks.keys import DRAINED_KEY, MAP_KEY, META_KEY
from gpu_tasks.protocol.routing import parse_gpu_queue, shard_name

NO_MAP = ("no shard map in Redis: create one with `gpu-tasks shards init --gpus N` "
          "(or `--owners gpu.<node>.<i>,...`)")

MAX_SHARDS = 1 << 16
"""Most shards a deployment may have (a GPU worker keeps one byte per shard)."""


STATES: Mapping[str, str] = {
    "owned": "its owner consumes the shard's queue and holds its entities' state",
    "releasing": "being handed off: nobody consumes its queue (requests wait there, in "
                 "order); its owner finishes what it holds and exports the state",
    "importing": "being handed off: nobody consumes its queue; the target imports the "
                 "state while the owner keeps its copy, in case the import fails",
}
"""Each state a shard can be in, and who consumes its queue in it."""

def check_gpu(gpu: str) -> str:
    """``gpu`` if it names a GPU (``gpu.<node>.<index>``), else :class:`ShardMapError`."""
    if parse_gpu_queue(gpu) is None:
        raise ShardMapError(f"{gpu!r} does not name a GPU: expected gpu.<node>.<index>")
    return gpu


@dataclass(frozen=True)
class Shard:
    """One shard's entry: its owner and its state (and, while handed off, where it goes)."""

    owner: str | None
    state: str = "owned"
    target: str | None = None
    handoff: str | None = None
    version: int = 0
    """One more each time the shard's state moves to another GPU or dies with one: a GPU
    holding a copy of an older version holds a stale one."""

    @property
    def consumer(self) -> str | None:
        """The GPU that consumes this shard's queue now, or None: the one place that
        decides it, for workers and for ``status`` alike."""
        return self.owner if self.state == "owned" else None

    @property
    def holders(self) -> tuple[str, ...]:
        """The GPUs that must keep this shard's entities' state now: the owner, and while
        importing the target too (the owner's copy is what a failed import falls back to)."""
        holders = tuple(g for g in (self.owner,) if g)
        if self.state == "importing" and self.target:
            holders += (self.target,)
        return holders

    def as_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"owner": self.owner, "state": self.state}
        if self.target is not None:
            entry["target"] = self.target
        if self.handoff is not None:
            entry["handoff"] = self.handoff
        if self.version:
            entry["version"] = self.version
        return entry

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str, name: str) -> Shard:
        try:
            data = json.loads(raw)
            shard = cls(data["owner"], data["state"], data.get("target"), data.get("handoff"),
                        int(data.get("version", 0)))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ShardMapError(f"shard map is malformed: {name} is {raw!r} ({exc})") from None
        if shard.state not in STATES:
            raise ShardMapError(f"shard map is malformed: {name} has unknown state {shard.state!r}")
        return shard


@dataclass(frozen=True)
class ShardMap:
    """One consistent snapshot: ``shards[i]`` is ``shard-i``."""

    shard_count: int
    epoch: int
    shards: tuple[Shard, ...]

    @classmethod
    def balanced(cls, owners: Sequence[str], shard_count: int, epoch: int = 0) -> ShardMap:
        """Shard i goes to ``owners[i % len(owners)]``: every GPU within one shard of even."""
        if not owners:
            raise ShardMapError("a shard map needs at least one GPU")
        for owner in owners:
            check_gpu(owner)
        if len(set(owners)) != len(owners):
            raise ShardMapError(f"GPUs must be distinct, got {list(owners)}")
        if shard_count < len(owners):
            raise ShardMapError(
                f"{shard_count} shards cannot cover {len(owners)} GPUs; use more shards"
            )
        if shard_count > MAX_SHARDS:
            raise ShardMapError(f"{shard_count} shards is more than the {MAX_SHARDS} supported")
        return cls(
            shard_count, epoch, tuple(Shard(owners[i % len(owners)]) for i in range(shard_count))
        )

    def consumed_by(self, gpu: str) -> list[int]:
        """Indices of the shards whose queues ``gpu`` consumes, ascending."""
        return [i for i, shard in enumerate(self.shards) if shard.consumer == gpu]

    def held_by(self, gpu: str) -> list[int]:
        """Indices of the shards whose state ``gpu`` must keep, ascending."""
        return [i for i, shard in enumerate(self.shards) if gpu in shard.holders]

    def moving(self) -> dict[int, Shard]:
        """Shards in the middle of a handoff."""
        return {i: s for i, s in enumerate(self.shards) if s.state != "owned"}

    def by_owner(self) -> dict[str | None, list[int]]:
        """Shard indices per owner (None: shards nobody owns)."""
        owned: dict[str | None, list[int]] = defaultdict(list)
        for i, shard in enumerate(self.shards):
            owned[shard.owner].append(i)
        return dict(owned)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per owner ("none" for shards without one): how many shards, in which states."""
        rows: dict[str, dict[str, Any]] = {}
        for shard in self.shards:
            row = rows.setdefault(shard.owner or "none", {"shards": 0, "states": {}})
            row["shards"] += 1
            row["states"][shard.state] = row["states"].get(shard.state, 0) + 1
        return dict(sorted(rows.items()))

    def as_dict(self) -> dict[str, Any]:
        """The ``shards show --json`` form."""
        return {
            "shard_count": self.shard_count,
            "epoch": self.epoch,
            "shards": {shard_name(i): s.as_dict() for i, s in enumerate(self.shards)},
        }


class ShardMapStore:
    """Reads and changes the shard map in Redis. Writers accept a pipeline to compose."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._init = scripts.register(client, "shardmap_init")
        self._assign = scripts.register(client, "shardmap_assign")
        self._transition = scripts.register(client, "shardmap_transition")

    def create(self, shard_map: ShardMap, *, force: bool = False) -> int:
        """Store ``shard_map`` (ignoring its epoch); refuses an existing map unless ``force``.

        Returns the new epoch: one more than any map stored before.
        """
        try:
            epoch = self._init(
                keys=[MAP_KEY, META_KEY],
                args=["1" if force else "0", *(s.to_json() for s in shard_map.shards)],
            )
        except redis.ResponseError as exc:
            if "EXISTS" in str(exc):
                raise ShardMapError(
                    "a shard map already exists; `gpu-tasks shards show` prints it, and "
                    "`shards init --force` replaces it"
                ) from None
            raise
        return int(epoch)

    def assign(
        self, moves: Mapping[int, str], pipeline: redis.client.Pipeline | None = None
    ) -> Any:
        """Give each shard index in ``moves`` to its new owner and bump the epoch, atomically.

        This changes ownership only: the entities' device state stays where it was."""
        args: list[str | int] = []
        for index, owner in moves.items():
            args += [index, Shard(check_gpu(owner)).to_json()]
        try:
            return self._assign(keys=[MAP_KEY, META_KEY], args=args, client=pipeline)
        except redis.ResponseError as exc:
            raise ShardMapError(f"cannot move shards: {exc}") from None

    def transition(self, index: int, expected: Shard, new: Shard) -> int:
        """Replace shard ``index``'s entry by ``new`` if it is still ``expected``, bumping the
        epoch; returns the new epoch. :class:`ShardMapError` (naming the entry there now)
        if someone changed it meanwhile."""
        try:
            return int(self._transition(keys=[MAP_KEY, META_KEY],
                                        args=[index, expected.to_json(), new.to_json()]))
        except redis.ResponseError as exc:
            raise ShardMapError(f"shard-{index} changed under this handoff: {exc}") from None

    def drained(self) -> set[str]:
        """GPUs that take no shards (``gpu-tasks drain``)."""
        return {g.decode() if isinstance(g, bytes) else g
                for g in self.client.smembers(DRAINED_KEY)}

    def set_drained(self, gpu: str, drained: bool) -> None:
        check_gpu(gpu)
        if drained:
            self.client.sadd(DRAINED_KEY, gpu)
        else:
            self.client.srem(DRAINED_KEY, gpu)

    def shard_count(self) -> int:
        """S of the stored map; :class:`ShardMapError` if there is none."""
        raw = self.client.hget(META_KEY, "shard_count")
        if raw is None:
            raise ShardMapError(NO_MAP)
        return int(raw)

    def epoch(self) -> int | None:
        raw = self.client.hget(META_KEY, "epoch")
        return None if raw is None else int(raw)

    def load(self) -> ShardMap:
        """Read the map and its epoch in one transaction; :class:`ShardMapError` if absent."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(META_KEY)
        pipe.hgetall(MAP_KEY)
        meta, entries = pipe.execute()
        if not meta:
            raise ShardMapError(NO_MAP)
        count = int(meta[b"shard_count"])
        shards = []
        # Most entries are alike (one per owner, when settled): parse each text once.
        parsed: dict[bytes, Shard] = {}
        for i in range(count):
            name = shard_name(i)
            raw = entries.get(name.encode())
            if raw is None:
                raise ShardMapError(f"shard map is malformed: {name} has no entry")
            shard = parsed.get(raw)
            if shard is None:
                shard = parsed[raw] = Shard.from_json(raw, name)
            shards.append(shard)
        return ShardMap(count, int(meta[b"epoch"]), tuple(shards))

    def exists(self) -> bool:
        return bool(self.client.exists(META_KEY))


def replacement_problems(client: redis.Redis, new_map: ShardMap, *,
                         discard_state: bool = False) -> list[str]:
    """Why replacing the stored map by ``new_map`` would lose work or state (empty: safe).

    GPU workers that hold leases hold their shards' device state: replacing the map
    under them moves shards without it, so that takes ``discard_state``. Changing S
    moves every entity to another shard: only with no worker running, and never while
    requests wait in shard queues that the new map would not have."""
    problems = []
    live = {gpu: lease for gpu, lease in LeaseStore(client).all().items() if lease}
    old = ShardMapStore(client).load()
    if live and old.shard_count != new_map.shard_count:
        problems.append(
            f"S would change from {old.shard_count} to {new_map.shard_count} while GPU workers "
            f"run ({', '.join(sorted(live))}); S is fixed for a deployment's life (producers "
            "keep it too): stop every worker and producer first"
        )
    elif live and not discard_state:
        moving = sum(1 for i, shard in enumerate(new_map.shards)
                     if i < old.shard_count and old.shards[i].owner != shard.owner)
        problems.append(
            f"GPU workers hold leases ({', '.join(x.describe() for x in live.values())}) and "
            f"{moving} shards would change owner without their entities' device state: "
            "stop the workers first, or pass --discard-state to accept that loss"
        )
    if new_map.shard_count < old.shard_count:
        pipe = client.pipeline(transaction=False)
        gone = [shard_name(i) for i in range(new_map.shard_count, old.shard_count)]
        for name in gone:
            pipe.llen(name)
        waiting = {name: n for name, n in zip(gone, pipe.execute(), strict=True) if n}
        if waiting:
            problems.append(
                f"{sum(waiting.values())} requests wait in {len(waiting)} shard queues that a "
                f"map of {new_map.shard_count} shards would leave unconsumed "
                f"({', '.join(list(waiting)[:5])}{', ...' if len(waiting) > 5 else ''}): "
                "let them drain first"
            )
    return problems
