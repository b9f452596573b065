"""The buffer ledger's keys, and what the light side reads from it.

Each GPU's pool child records in Redis which entity buffers it holds and which were lost
(:mod:`workers.ledger` writes it); tools read it to know how much state each shard has on
a GPU, e.g. to plan a rebalance that moves the least state.

- ``gpu-tasks:buffers:<gpu>``  hash ``<entity_id>\\x1f<name>`` -> ``{"generation": g,
  "shard": i, "nbytes": n}``: the buffers the GPU holds
- ``gpu-tasks:lost:<gpu>``     hash ``<entity_id>\\x1f<name>`` -> ``{"generation": g,
  "why": "...", "at": unix time}``: the buffers it lost
- ``gpu-tasks:ended:<gpu>``    why its last pool child ended, when it knew
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis

LIVE_KEY = "gpu-tasks:buffers:{gpu}"
LOST_KEY = "gpu-tasks:lost:{gpu}"
ENDED_KEY = "gpu-tasks:ended:{gpu}"
SEPARATOR = "\x1f"


def buffer_key(entity_id: str, name: str) -> str:
    return f"{entity_id}{SEPARATOR}{name}"


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
        key = field.decode() if isinstance(field, bytes) else field
        entities.setdefault(shard, set()).add(key.partition(SEPARATOR)[0])
    for shard, names in entities.items():
        usage[shard].entities = len(names)
    return usage
