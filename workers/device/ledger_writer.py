"""What a GPU's pool child writes to the buffer ledger (:mod:`gpu_tasks.control.bufferledger`).

A pool child's device state dies with it: a crash, a SIGKILL, or the exit that follows
a poisoned context. So the child records each buffer it allocates and frees, and at its
start turns whatever its predecessor still had on record into losses; a later request
for one of those buffers is answered with the loss. Only the pool child of the worker
holding the GPU's lease writes these, on its task thread, and only when buffers are
allocated, freed or lost: reads, writes and kernels cost no Redis call.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import redis

from gpu_tasks.control import bufferledger as ledger
from gpu_tasks.control.bufferledger import Loss, buffer_key
from gpu_tasks.keys import ENDED_KEY, LIVE_KEY, LOST_KEY
from gpu_tasks.protocol.routing import shard_name


class BufferLedger:
    """One GPU's writer of the ledger."""

    def __init__(self, client: redis.Redis, gpu: str) -> None:
        self.client = client
        self.gpu = gpu
        self._live = LIVE_KEY.format(gpu=gpu)

    def take_over(self) -> int:
        """At a pool child's start: what the previous child held is lost now (for the reason
        it gave, if it knew); returns how many buffers."""
        return ledger.retire(self.client, self.gpu)

    def ending(self, why: str) -> None:
        """Say why this child is about to end (its successor records the losses so)."""
        self.client.set(ENDED_KEY.format(gpu=self.gpu), why)

    def lookup(self, shard: int, entity_id: str, name: str) -> Loss | None:
        return ledger.lookup(self.client, shard, entity_id, name)

    def allocated(self, entity_id: str, name: str, generation: int, shard: int,
                  nbytes: int) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self._live, buffer_key(entity_id, name),
                  json.dumps({"generation": generation, "shard": shard, "nbytes": nbytes}))
        pipe.hdel(LOST_KEY.format(shard=shard_name(shard)), buffer_key(entity_id, name))
        pipe.execute()

    def freed(self, entity_id: str, names: Iterable[str], shard: int | None = None,
              forget_losses: bool = False) -> None:
        """``names`` were freed; with ``forget_losses``, every loss of the entity in ``shard``
        is no longer of interest either (it freed all it had)."""
        pipe = self.client.pipeline(transaction=True)
        live = [buffer_key(entity_id, n) for n in names]
        if live:
            pipe.hdel(self._live, *live)
        if forget_losses and shard is not None:
            lost_key = LOST_KEY.format(shard=shard_name(shard))
            lost = list(self.client.hscan_iter(lost_key, match=buffer_key(entity_id, "*")))
            if lost:
                pipe.hdel(lost_key, *(field for field, _ in lost))
        pipe.execute()

    def lost(self, losses: dict[tuple[int, str, str], Loss]) -> None:
        """These buffers (shard, entity, name) are gone while this child runs."""
        if not losses:
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(self._live, *(buffer_key(e, n) for _, e, n in losses))
        for (shard, e, n), loss in losses.items():
            pipe.hset(LOST_KEY.format(shard=shard_name(shard)), buffer_key(e, n),
                      loss.to_json())
        pipe.execute()
