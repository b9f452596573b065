"""What the worker's main process knows about its ownership, shared with its pool child.

The main process fetches messages, holds the GPU's lease and follows the shard
map; the pool child executes and holds the device state. They share this table in
anonymous shared memory, made before the pool forks (so a replacement child gets
it too): the main process writes, the child reads it before every entity request.
That lets the child refuse a request whose shard left this GPU between its
admission and its execution, and drop the state of shards it no longer serves.

Layout: the shard map epoch the main process consumes by (int64), the monotonic
time until which the lease is known to be held (float64; CLOCK_MONOTONIC is
system-wide, so both processes read the same clock), then one byte per shard: 2, this
GPU consumes the shard's queue (and holds its state); 1, it only holds its state (a
shard being handed off); 0, neither; then the shard map's version of each shard it holds
(uint32), against which the child tells a stale copy of a shard's state.
"""

from __future__ import annotations

import mmap
import struct
import time
from collections.abc import Iterable, Mapping

import numpy as np

from gpu_tasks.control.shardmap import MAX_SHARDS
from gpu_tasks.errors import ConfigError

_HEADER = struct.Struct("=qd")
HOLD, CONSUME = 1, 2


class OwnershipTable:
    """Shard flags, the map epoch and the lease deadline, in memory shared across fork."""

    def __init__(self, max_shards: int = MAX_SHARDS) -> None:
        self.max_shards = max_shards
        # MAP_SHARED | MAP_ANONYMOUS: the pool child, forked later, sees every write
        self._mem = mmap.mmap(-1, _HEADER.size + max_shards + 4 * max_shards)
        self._flags_at = _HEADER.size
        self._versions = np.frombuffer(self._mem, np.uint32, max_shards,
                                       _HEADER.size + max_shards)
        _HEADER.pack_into(self._mem, 0, -1, 0.0)

    # -- the main process writes ---------------------------------------------------

    def publish(self, epoch: int, consumed: Iterable[int], held: Iterable[int] = (),
                versions: Mapping[int, int] | None = None) -> None:
        """Make ``consumed`` the shards this GPU serves at ``epoch``, and ``held`` those whose
        state it keeps without serving them, at the given shard ``versions``. Flags first,
        epoch last: a child that sees the new epoch also sees the new flags."""
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
        self._mem[self._flags_at : self._flags_at + self.max_shards] = bytes(flags)
        _HEADER.pack_into(self._mem, 0, epoch, self.lease_until)

    def hold_lease_until(self, deadline: float) -> None:
        """The lease is known held until monotonic time ``deadline`` (0: not held)."""
        _HEADER.pack_into(self._mem, 0, self.epoch, deadline)

    # -- the pool child reads --------------------------------------------------------

    @property
    def epoch(self) -> int:
        epoch: int = _HEADER.unpack_from(self._mem, 0)[0]
        return epoch

    @property
    def lease_until(self) -> float:
        until: float = _HEADER.unpack_from(self._mem, 0)[1]
        return until

    def lease_held(self) -> bool:
        return time.monotonic() < self.lease_until

    def serves(self, index: int) -> bool:
        """Whether this GPU runs requests of shard ``index`` now."""
        return 0 <= index < self.max_shards and self._mem[self._flags_at + index] == CONSUME

    def served(self) -> list[int]:
        flags = np.frombuffer(self._mem, np.uint8, self.max_shards, self._flags_at)
        return [int(i) for i in np.flatnonzero(flags == CONSUME)]

    def version(self, index: int) -> int:
        """The shard map's version of shard ``index``, as of the last publish that held it."""
        return int(self._versions[index])

    def held(self) -> list[int]:
        """Shards whose state this GPU keeps: those it serves and those being handed off."""
        flags = np.frombuffer(self._mem, np.uint8, self.max_shards, self._flags_at)
        return [int(i) for i in np.flatnonzero(flags)]


table: OwnershipTable | None = None
"""This worker's table: made by the boot before the pool forks; None outside GPU workers."""
