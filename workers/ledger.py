"""The buffer ledger of one GPU: which entity buffers live there, and which were lost.

A pool child's device state dies with it: a crash, a SIGKILL, or the exit that
follows a poisoned context. The ledger keeps, in Redis, a line per live buffer
(written when it is allocated, erased when it is freed), so the child that takes
over finds out what its predecessor held and answers a later request for one of
those buffers with the loss (when, why), never with a puzzling ``NoSuchBuffer``
and never with a fresh zeroed buffer. Allocating the name again clears the loss.

The layout in Redis is in :mod:`gpu_tasks.ledger`, where tools read it too.

Only the pool child of the worker holding the GPU's lease writes these, on its
task thread, and only when buffers are allocated, freed or lost: reads, writes
and kernels cost no Redis call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from gpu_tasks.ledger import ENDED_KEY, LIVE_KEY, LOST_KEY, SEPARATOR, buffer_key

# Every live line becomes a lost one, with the given reason or one naming the ended
# child's generation; returns the lost lines. Atomic, so a crash here loses nothing.
_TAKE_OVER = """
local live = redis.call('HGETALL', KEYS[1])
local why = redis.call('GET', KEYS[3])
for i = 1, #live, 2 do
  local line = cjson.decode(live[i + 1])
  local reason = why or ('when the pool child of generation ' .. line.generation .. ' ended')
  redis.call('HSET', KEYS[2], live[i], cjson.encode(
    {generation = line.generation, why = reason, at = tonumber(ARGV[1])}))
end
redis.call('DEL', KEYS[1], KEYS[3])
return redis.call('HGETALL', KEYS[2])
"""


@dataclass(frozen=True)
class Loss:
    """One buffer an entity had on this GPU and lost."""

    generation: int
    why: str
    at: float


class BufferLedger:
    """A GPU's live and lost buffers, in Redis (see the module docstring)."""

    def __init__(self, client: redis.Redis, gpu: str) -> None:
        self.client = client
        self.gpu = gpu
        self._keys = [k.format(gpu=gpu) for k in (LIVE_KEY, LOST_KEY, ENDED_KEY)]
        self._take_over = client.register_script(_TAKE_OVER)

    def take_over(self) -> dict[tuple[str, str], Loss]:
        """At a pool child's start: what the previous child held is lost now; returns
        every loss on record, for this child to answer with."""
        raw = self._take_over(keys=self._keys, args=[time.time()])
        losses: dict[tuple[str, str], Loss] = {}
        for field, value in zip(raw[::2], raw[1::2], strict=True):
            entity_id, _, name = field.decode().partition(SEPARATOR)
            data = json.loads(value)
            losses[(entity_id, name)] = Loss(int(data["generation"]), data["why"],
                                             float(data["at"]))
        return losses

    def ending(self, why: str) -> None:
        """Say why this child is about to end (its successor reports the loss so)."""
        self.client.set(self._keys[2], why)

    def allocated(self, entity_id: str, name: str, generation: int, shard: int,
                  nbytes: int) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self._keys[0], buffer_key(entity_id, name),
                  json.dumps({"generation": generation, "shard": shard, "nbytes": nbytes}))
        pipe.hdel(self._keys[1], buffer_key(entity_id, name))
        pipe.execute()

    def freed(self, entity_id: str, names: Iterable[str], forget_losses: Iterable[str] = ()
              ) -> None:
        """``names`` were freed; the losses of ``forget_losses`` are no longer of interest."""
        pipe = self.client.pipeline(transaction=True)
        live = [buffer_key(entity_id, n) for n in names]
        lost = [buffer_key(entity_id, n) for n in forget_losses]
        if live:
            pipe.hdel(self._keys[0], *live)
        if lost:
            pipe.hdel(self._keys[1], *lost)
        pipe.execute()

    def lost(self, losses: dict[tuple[str, str], Loss]) -> None:
        """These buffers are gone while this child runs (a shard left this GPU)."""
        if not losses:
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(self._keys[0], *(buffer_key(e, n) for e, n in losses))
        pipe.hset(self._keys[1], mapping={
            buffer_key(e, n): json.dumps({"generation": loss.generation, "why": loss.why,
                                    "at": loss.at})
            for (e, n), loss in losses.items()})
        pipe.execute()
