"""What this worker owns, at which epoch: the one record of it, shared with the pool child.

The main process holds the GPU's lease and follows the shard map
(:mod:`workers.consumer.consumption`, the only writer); its fence
(:mod:`workers.consumer.fence`) reads this table for every message it fetches, and the pool
child reads it before every entity request, so a request whose shard left this GPU
between its admission and its execution is refused, and the state of shards no longer
held here is dropped. The table lives in anonymous shared memory made before the pool
forks (so a replacement child gets it too).

Layout: the shard map epoch the worker consumes by (int64), the monotonic time until
which the lease is known to be held (float64; CLOCK_MONOTONIC is system-wide, so both
processes read the same clock), the map's shard count S (int64; 0 until a map was read),
then one byte per shard: 2, this GPU consumes the shard's queue (and holds its state); 1,
it only holds its state (a shard being handed off); 0, neither; then the shard map's
version of each shard it holds (uint32), against which the child tells a stale copy of a
shard's state.
"""

from __future__ import annotations

import mmap
import struct
import time
from collections.abc import Iterable, Mapping

import numpy as np

from gpu_tasks.control.shardmap import MAX_SHARDS
from gpu_tasks.errors import ConfigError

_EPOCH, _LEASE, _SHARDS = struct.Struct("=q"), struct.Struct("=d"), struct.Struct("=q")
_EPOCH_AT, _LEASE_AT, _SHARDS_AT = 0, 8, 16
_FLAGS_AT = 24
HOLD, CONSUME = 1, 2


class OwnershipTable:
    """GPU ``gpu``'s shard flags, map epoch, shard count and lease deadline, in memory
    shared across fork."""

    def __init__(self, gpu: str, max_shards: int = MAX_SHARDS) -> None:
        self.gpu = gpu
        """The GPU's own queue (``gpu.<node>.<i>``), which names it in the shard map."""
        self.max_shards = max_shards
        # MAP_SHARED | MAP_ANONYMOUS: the pool child, forked later, sees every write
        self._mem = mmap.mmap(-1, _FLAGS_AT + max_shards + 4 * max_shards)
        self._versions = np.frombuffer(self._mem, np.uint32, max_shards,
                                       _FLAGS_AT + max_shards)
        _EPOCH.pack_into(self._mem, _EPOCH_AT, -1)

    # -- the main process writes ---------------------------------------------------

    def publish(self, epoch: int, consumed: Iterable[int], held: Iterable[int] = (),
                versions: Mapping[int, int] | None = None, *,
                shard_count: int | None = None) -> None:
        """Make ``consumed`` the shards this GPU serves at ``epoch``, and ``held`` those whose
        state it keeps without serving them, at the given shard ``versions``, of a map of
        ``shard_count`` shards (None: as before). Flags first, epoch last: a child that sees
        the new epoch also sees the new flags."""
        for index, version in (versions or {}).items():
            self._versions[index] = version
        flags = bytearray(self.max_shards)
        for flag, indices in ((HOLD, held), (CONSUME, consumed)):
            for index in indices:
                if not 0 <= index < self.max_shards:
                    raise ConfigError(
                        f"shard index {index} is beyond the {self.max_shards} shards a GPU "
                        "worker supports"
                    )
                flags[index] = flag
        if shard_count is not None:
            _SHARDS.pack_into(self._mem, _SHARDS_AT, shard_count)
        self._mem[_FLAGS_AT : _FLAGS_AT + self.max_shards] = bytes(flags)
        _EPOCH.pack_into(self._mem, _EPOCH_AT, epoch)

    def hold_lease_until(self, deadline: float) -> None:
        """The lease is known held until monotonic time ``deadline`` (0: not held)."""
        _LEASE.pack_into(self._mem, _LEASE_AT, deadline)

    # -- the fence and the pool child read -------------------------------------------

    @property
    def epoch(self) -> int:
        epoch: int = _EPOCH.unpack_from(self._mem, _EPOCH_AT)[0]
        return epoch

    @property
    def lease_until(self) -> float:
        until: float = _LEASE.unpack_from(self._mem, _LEASE_AT)[0]
        return until

    @property
    def shard_count(self) -> int:
        """S of the map this GPU consumes by; 0 until a map has been read."""
        count: int = _SHARDS.unpack_from(self._mem, _SHARDS_AT)[0]
        return count

    def lease_held(self) -> bool:
        return time.monotonic() < self.lease_until

    def serves(self, index: int) -> bool:
        """Whether this GPU runs requests of shard ``index`` now (consumes its queue)."""
        return 0 <= index < self.max_shards and self._mem[_FLAGS_AT + index] == CONSUME

    def served(self) -> list[int]:
        flags = np.frombuffer(self._mem, np.uint8, self.max_shards, _FLAGS_AT)
        return [int(i) for i in np.flatnonzero(flags == CONSUME)]

    def version(self, index: int) -> int:
        """The shard map's version of shard ``index``, as of the last publish that held it."""
        return int(self._versions[index])

    def held(self) -> list[int]:
        """Shards whose state this GPU keeps: those it serves and those being handed off."""
        flags = np.frombuffer(self._mem, np.uint8, self.max_shards, _FLAGS_AT)
        return [int(i) for i in np.flatnonzero(flags)]


table: OwnershipTable | None = None
"""This worker's table: made by the boot before the pool forks; None outside GPU workers."""
