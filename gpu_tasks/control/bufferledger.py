"""The buffer ledger: which entity buffers each GPU holds, and which were lost, in Redis.

A GPU's pool child records every buffer it allocates and frees
(:mod:`workers.device.ledger_writer`).
When device state dies (its pool child crashed or ended after a poisoned context, or its
GPU died and its shards were failed over), the buffers it held become *losses*, kept per
shard, so that whichever GPU serves the shard later answers a request for one of them
with :class:`~gpu_tasks.errors.EntityStateLost` (which buffer, where, when, why), never
with ``NoSuchBuffer`` and never with a fresh zeroed buffer. Allocating the name again
clears the loss. Tools read the ledger too: how much state each shard has on a GPU.

- ``gpu-tasks:buffers:<gpu>``     hash ``<entity_id>\\x1f<name>`` -> ``{"generation": g,
  "shard": i, "nbytes": n}``: the buffers the GPU holds
- ``gpu-tasks:lost:shard-<i>``    hash ``<entity_id>\\x1f<name>`` -> ``{"generation": g,
  "why": "...", "at": unix time, "gpu": "..."}``: the shard's buffers that were lost
- ``gpu-tasks:ended:<gpu>``       why the GPU's last pool child ended, when it knew
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from gpu_tasks.control import scripts
from gpu_tasks.keys import ENDED_KEY, LIVE_KEY, LOST_KEY
from gpu_tasks.protocol.routing import SHARD_PREFIX, shard_name

SEPARATOR = "\x1f"

def buffer_key(entity_id: str, name: str) -> str:
    return f"{entity_id}{SEPARATOR}{name}"


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


@dataclass(frozen=True)
class Loss:
    """One buffer an entity had on a GPU and lost."""

    generation: int
    why: str
    at: float
    gpu: str = ""

    def to_json(self) -> str:
        return json.dumps({"generation": self.generation, "why": self.why, "at": self.at,
                           "gpu": self.gpu})

    @classmethod
    def from_json(cls, raw: bytes | str) -> Loss:
        data = json.loads(raw)
        return cls(int(data["generation"]), str(data["why"]), float(data["at"]),
                   str(data.get("gpu", "")))


def retire(client: redis.Redis, gpu: str, why: str = "",
           shards: Iterable[int] | None = None) -> int:
    """Record what ``gpu`` holds (of ``shards``, or all) as lost ``why``; returns how many
    buffers. Its next pool child does this for all at its start; failover for the shards it
    gives to other GPUs."""
    only = [] if shards is None else [str(i) for i in shards]
    if shards is not None and not only:
        return 0
    script = scripts.register(client, "ledger_retire")
    # The script appends each buffer's shard index to this (LOST_KEY of shard_name(i)).
    lost_prefix = LOST_KEY.format(shard=SHARD_PREFIX)
    return int(script(keys=[LIVE_KEY.format(gpu=gpu), ENDED_KEY.format(gpu=gpu)],
                      args=[why, time.time(), gpu, lost_prefix, *only]))


def lookup(client: redis.Redis, shard: int, entity_id: str, name: str) -> Loss | None:
    """The loss of ``entity_id``'s buffer ``name`` in ``shard``, if one is on record."""
    raw = client.hget(LOST_KEY.format(shard=shard_name(shard)), buffer_key(entity_id, name))
    return None if raw is None else Loss.from_json(raw)


@dataclass
class ShardUsage:
    """The state one GPU holds for one shard."""

    entities: int = 0
    buffers: int = 0
    bytes: int = 0


def usage_by_shard(client: redis.Redis, gpu: str) -> dict[int, ShardUsage]:
    """Per shard, the entities, buffers and bytes ``gpu`` holds (from its ledger)."""
    usage: dict[int, ShardUsage] = {}
    entities: dict[int, set[str]] = {}
    for field, value in client.hgetall(LIVE_KEY.format(gpu=gpu)).items():
        line = json.loads(value)
        shard = int(line["shard"])
        row = usage.setdefault(shard, ShardUsage())
        row.buffers += 1
        row.bytes += int(line.get("nbytes", 0))
        entities.setdefault(shard, set()).add(_text(field).partition(SEPARATOR)[0])
    for shard, names in entities.items():
        usage[shard].entities = len(names)
    return usage
