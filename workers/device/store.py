"""The buffer store of one GPU: which entity of which shard owns which device buffer.

Memory is accounted per GPU (the backend refuses what does not fit) and per entity (an
optional quota). Entities are passivated: one idle for ``idle_s`` has its buffers
spilled to host memory, and restored on its next use; when an allocation would not fit,
the least recently used entities are spilled first, so ``OutOfMemory`` means the working
set really does not fit. Host spill space has a cap (``spill_capacity_bytes``): an entity
that would not fit there is evicted instead.

Buffers are lost when the pool child holding them ends (a crash, a poisoned context),
when their shard stops being served here, and when they are evicted; the store remembers
which names were lost, when and why, so a later request for one fails with
:class:`~gpu_tasks.errors.EntityStateLost` instead of a puzzling :class:`NoSuchBuffer`.
With a :class:`~workers.device.ledger_writer.BufferLedger` that memory outlives the process.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpu_tasks.control.bufferledger import Loss
from gpu_tasks.errors import BadRequest, EntityStateLost, NoSuchBuffer, OutOfMemory, StaleHandle
from workers.device.base import DTYPES, Backend, Buffer
from workers.device.ledger_writer import BufferLedger

MAX_DIMS = 8


def parse_dtype(dtype: object) -> np.dtype[Any]:
    """A supported dtype from its name, or :class:`BadRequest` naming ``dtype``."""
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise BadRequest(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", "dtype")
    return np.dtype(dtype)


def parse_shape(shape: object) -> tuple[int, ...]:
    """A shape from a list of positive ints (or one int); else :class:`BadRequest`."""
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = [shape]
    if not isinstance(shape, (list, tuple)) or not shape:
        raise BadRequest(
            f"shape must be a non-empty list of positive integers, got {shape!r}", "shape"
        )
    if len(shape) > MAX_DIMS:
        raise BadRequest(f"shape has {len(shape)} dimensions; at most {MAX_DIMS}", "shape")
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise BadRequest(
                f"shape must be a list of positive integers, got {list(shape)!r}", "shape"
            )
    return tuple(shape)


def parse_name(name: object, field: str = "name") -> str:
    if not isinstance(name, str) or not name or len(name) > 256:
        raise BadRequest(f"{field} must be a buffer name (1-256 characters), got {name!r}", field)
    if not name.isascii():
        try:  # the name is stored in Redis (the buffer ledger, handoffs) as UTF-8
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"{field} {name!r} is not valid Unicode text (it holds a lone "
                             "surrogate)", field) from None
    return name


@dataclass(frozen=True)
class EntityUsage:
    buffers: int
    bytes: int


def _single_shard(entity_id: str) -> int:
    return 0


class BufferStore:
    """Buffers of every entity served by one GPU worker, keyed shard -> entity -> name.

    Keying by shard lets a whole shard's state be found, dropped or moved at once;
    ``shard_of`` maps an entity to its shard index (the routing hash).
    """

    def __init__(
        self,
        backend: Backend,
        generation: int,
        entity_quota_bytes: int = 0,
        shard_of: Callable[[str], int] = _single_shard,
        ledger: BufferLedger | None = None,
        idle_s: float = 0.0,
        spill_capacity_bytes: int = 0,
        max_buffers: int = 0,
    ) -> None:
        self.backend = backend
        self.max_buffers = max_buffers
        """Most buffers one entity may hold here (0: no limit)."""
        self.generation = generation
        self.entity_quota_bytes = entity_quota_bytes
        self.shard_of = shard_of
        self.ledger = ledger
        self._shards: dict[int, dict[str, dict[str, Buffer]]] = {}
        if ledger is not None:
            ledger.take_over()
        self._lost: dict[tuple[str, str], Loss] = {}
        """(entity, name) -> when and why this process lost it, for a clear answer later;
        with a ledger, losses recorded anywhere else are looked up there."""
        self._used_bytes = 0
        self.idle_s = idle_s
        """Seconds unused after which an entity is spilled to host memory (0: never)."""
        self.spill_capacity_bytes = spill_capacity_bytes
        self._spilled_bytes = 0
        self._used_at: OrderedDict[str, float] = OrderedDict()
        """Entities holding buffers, least recently used first, with when (monotonic)."""
        self.counts = {"spills": 0, "restores": 0, "evictions": 0}
        self.version_of: Callable[[int], int] = lambda index: 0
        """The shard map's version of a shard now (set by the runtime from the ownership
        table): state allocated in a shard is of that version."""
        self.versions: dict[int, int] = {}
        """Per shard this GPU holds state for, the version of that state."""
        self.exported: dict[int, str] = {}
        """Shards whose state was exported for a handoff (shard -> handoff id): once the
        shard has left, dropping their buffers loses nothing."""
        # The heartbeat thread reads the totals while a task may be changing them.
        self._lock = threading.Lock()

    def _entity(self, entity_id: str) -> dict[str, Buffer]:
        return self._shards.get(self.shard_of(entity_id), {}).get(entity_id, {})

    # -- reading -------------------------------------------------------------

    def get(self, entity_id: str, name: str, generation: int | None = None) -> Buffer:
        """The entity's buffer ``name``; ``generation``, if given, must be the current one."""
        parse_name(name)
        if generation is not None and generation != self.generation:
            raise StaleHandle(
                f"handle to buffer {name!r} of entity {entity_id!r} is from context generation "
                f"{generation}; this GPU is at generation {self.generation} and its buffers "
                "from older generations are gone",
                generation,
                self.generation,
            )
        owned = self._entity(entity_id)
        buf = owned.get(name)
        if buf is not None:
            if buf.host is not None:
                self.restore(entity_id)
            return buf
        lost = self._lost.get((entity_id, name))
        if lost is None and self.ledger is not None:  # a miss: the rare path may ask Redis
            lost = self.ledger.lookup(self.shard_of(entity_id), entity_id, name)
        if lost is not None:
            here = self.ledger.gpu if self.ledger is not None else "this GPU"
            gpu = lost.gpu or here
            # Generations count per GPU: name the GPU of each number when the buffer was
            # lost on another one (a failed-over shard), never mix them in one phrase.
            generations = (f"generation {lost.generation}; now generation {self.generation}"
                           if gpu == here else
                           f"{gpu}'s generation {lost.generation}; {here} is at generation "
                           f"{self.generation}")
            raise EntityStateLost(
                f"buffer {name!r} of entity {entity_id!r} on {gpu} was lost {lost.why} "
                f"({generations}, at "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(lost.at))} UTC); allocate "
                "it again",
                lost.generation, self.generation, entity_id, name, gpu, lost.at, lost.why,
            )
        raise NoSuchBuffer(
            f"entity {entity_id!r} has no buffer {name!r} on this GPU "
            f"(it has: {', '.join(sorted(owned)) if owned else 'none'})"
        )

    def names(self, entity_id: str) -> list[str]:
        return sorted(self._entity(entity_id))

    def usage(self, entity_id: str) -> EntityUsage:
        bufs = self._entity(entity_id)
        return EntityUsage(len(bufs), sum(b.nbytes for b in bufs.values()))

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    def shards(self) -> list[int]:
        """Indices of the shards this GPU holds state for."""
        with self._lock:
            return sorted(self._shards)

    def totals(self) -> dict[str, int]:
        """Counts for the heartbeat and ``stats``: entities, buffers, bytes on the device and
        spilled, and how many spills, restores and evictions there were."""
        with self._lock:
            entities = [bufs for shard in self._shards.values() for bufs in shard.values()]
            return {
                "entities": len(entities),
                "buffers": sum(len(b) for b in entities),
                "used_bytes": self._used_bytes,
                "spilled_bytes": self._spilled_bytes,
                **self.counts,
            }

    def host_copy(self, buf: Buffer) -> np.ndarray[Any, Any]:
        """The buffer's contents on the host, wherever it is (device or spilled)."""
        return buf.host.copy() if buf.host is not None else self.backend.download(buf)

    # -- passivation ---------------------------------------------------------

    def touch(self, entity_id: str) -> None:
        """The entity is in use now (a request of it is about to run)."""
        if entity_id in self._used_at:
            self._used_at[entity_id] = time.monotonic()
            self._used_at.move_to_end(entity_id)

    def restore(self, entity_id: str) -> None:
        """Bring every spilled buffer of the entity back to the device."""
        spilled = [b for b in self._entity(entity_id).values() if b.host is not None]
        if not spilled:
            return
        self.make_room(sum(b.nbytes for b in spilled), keep=entity_id)
        for buf in spilled:
            self._unspill(buf)
        self.counts["restores"] += 1
        self.touch(entity_id)

    def make_room(self, nbytes: int, keep: str | None = None) -> None:
        """Spill (or evict) the least recently used entities but ``keep`` until ``nbytes``
        fit on the device, or nothing more can go."""
        free, _ = self.backend.mem_info()
        for entity_id in list(self._used_at):
            if free >= nbytes:
                return
            if entity_id != keep:
                self._passivate(entity_id, "when memory was needed for another entity")
                free, _ = self.backend.mem_info()

    def passivate_idle(self, now: float | None = None) -> int:
        """Spill every entity unused for ``idle_s``; returns how many."""
        if not self.idle_s:
            return 0
        cutoff = (time.monotonic() if now is None else now) - self.idle_s
        done = 0
        for entity_id, used_at in list(self._used_at.items()):
            if used_at > cutoff:
                break
            if self._passivate(entity_id, f"after {self.idle_s:g}s idle"):
                done += 1
        return done

    def _passivate(self, entity_id: str, why: str) -> bool:
        """Spill the entity's device buffers to the host, or evict them if the spill space
        cannot take them; False if it had nothing on the device."""
        on_device = [b for b in self._entity(entity_id).values() if b.host is None]
        if not on_device:
            return False
        size = sum(b.nbytes for b in on_device)
        if self._spilled_bytes + size > self.spill_capacity_bytes:
            index = self.shard_of(entity_id)
            loss = self._loss(f"evicted {why}: the host spill space "
                              f"({self.spill_capacity_bytes} bytes) was full")
            evicted = {(index, entity_id, b.name): loss for b in self._entity(entity_id).values()}
            for buf in list(self._entity(entity_id).values()):
                self._forget(index, buf)
            self._record_losses(evicted)
            self.counts["evictions"] += 1
            return True
        for buf in on_device:
            self._spill(buf)
        self.counts["spills"] += 1
        return True

    # -- changing ------------------------------------------------------------

    def alloc(self, entity_id: str, name: str, shape: object, dtype: object) -> Buffer:
        """A zeroed buffer; replaces an existing one of the same name. The old one is freed
        only once the new one is allocated: a replacement that fails (``OutOfMemory``, a
        quota, a limit) leaves it exactly as it was."""
        parse_name(name)
        np_dtype, dims = parse_dtype(dtype), parse_shape(shape)
        nbytes = int(np.prod(dims, dtype=object)) * np_dtype.itemsize
        existing = self._entity(entity_id).get(name)
        reuse = existing.nbytes if existing is not None else 0
        if existing is None and self.max_buffers:
            count = len(self._entity(entity_id))
            if count >= self.max_buffers:
                raise BadRequest(
                    f"entity {entity_id!r} holds {count} buffers on this GPU, the most one "
                    f"entity may (GPU_TASKS_MAX_BUFFERS_PER_ENTITY); free one or replace one "
                    f"of the same name instead of allocating {name!r}",
                    "name",
                )
        if self.entity_quota_bytes:
            held = self.usage(entity_id).bytes - reuse
            if held + nbytes > self.entity_quota_bytes:
                raise OutOfMemory(
                    f"entity {entity_id!r} would hold {held + nbytes} bytes on this GPU; its "
                    f"quota is {self.entity_quota_bytes} bytes",
                    nbytes,
                    max(self.entity_quota_bytes - held, 0),
                )
        free, total = self.backend.mem_info()
        if nbytes > total:
            raise OutOfMemory(
                f"buffer {name!r} needs {nbytes} bytes; the whole GPU has {total} bytes",
                nbytes,
                free,
            )
        # The old buffer's place counts as room (it goes once the new one is allocated), so
        # replacing a buffer spills no other entity that freeing it first would not have.
        in_place = existing.nbytes if existing is not None and existing.host is None else 0
        self.make_room(nbytes - in_place, keep=entity_id)
        index = self.shard_of(entity_id)
        try:
            allocation = self.backend.alloc(nbytes)
        except OutOfMemory:
            if existing is None or existing.host is not None:
                raise
            # It may fit only in the old buffer's place: move the old one to host memory (as
            # a spill does) rather than free it, so that a failure can put it back as it was.
            self._spill(existing)
            try:
                allocation = self.backend.alloc(nbytes)
            except OutOfMemory:
                # Back on the device if it still fits there; else it stays spilled, intact,
                # and comes back on its entity's next use.
                with contextlib.suppress(OutOfMemory):
                    self._unspill(existing)
                raise
        if existing is not None:
            self._forget(index, existing)  # not free(): its get() would restore a spilled one
        buf = Buffer(entity_id, name, np_dtype, dims, self.generation, allocation)
        with self._lock:
            if index not in self._shards:
                self.versions[index] = self.version_of(index)
            shard = self._shards.setdefault(index, {})
            shard.setdefault(entity_id, {})[name] = buf
            self._used_bytes += nbytes
            self._lost.pop((entity_id, name), None)
            self._used_at[entity_id] = time.monotonic()
            self._used_at.move_to_end(entity_id)
        if self.ledger is not None:
            self.ledger.allocated(entity_id, name, self.generation, index, nbytes)
        return buf

    def _spill(self, buf: Buffer) -> None:
        """Move one buffer's contents to host memory and release its device memory."""
        host = self.backend.download(buf)
        self.backend.release(buf.allocation)
        with self._lock:
            buf.host, buf.allocation = host, None
            self._used_bytes -= buf.nbytes
            self._spilled_bytes += buf.nbytes

    def _unspill(self, buf: Buffer) -> None:
        """Put a buffer :meth:`_spill` moved to host memory back on the device (raises
        ``OutOfMemory``, leaving it spilled, if it does not fit)."""
        host = buf.host
        assert host is not None
        buf.allocation = self.backend.alloc(buf.nbytes)
        self.backend.upload(buf, host.reshape(-1), 0)
        with self._lock:
            buf.host = None
            self._used_bytes += buf.nbytes
            self._spilled_bytes -= buf.nbytes

    def free(self, entity_id: str, name: str | None = None) -> list[Buffer]:
        """Free one buffer (``NoSuchBuffer`` if absent) or, with no name, all of the entity's."""
        if name is None:
            victims = list(self._entity(entity_id).values())
        else:
            victims = [self.get(entity_id, name)]
        index = self.shard_of(entity_id)
        for buf in victims:
            self._forget(index, buf)
        if name is None:
            with self._lock:
                for key in [k for k in self._lost if k[0] == entity_id]:
                    del self._lost[key]
        if self.ledger is not None:
            self.ledger.freed(entity_id, [b.name for b in victims], index,
                              forget_losses=name is None)
        return victims

    def _forget(self, index: int, buf: Buffer) -> None:
        """Free ``buf`` wherever it is (device or spilled) and drop it from the store."""
        if buf.host is None:
            self.backend.release(buf.allocation)
        with self._lock:
            shard = self._shards[index]
            owned = shard[buf.entity_id]
            del owned[buf.name]
            if not owned:
                del shard[buf.entity_id]
                self._used_at.pop(buf.entity_id, None)
                if not shard:
                    del self._shards[index]
                    self.versions.pop(index, None)
            if buf.host is None:
                self._used_bytes -= buf.nbytes
            else:
                self._spilled_bytes -= buf.nbytes
                buf.host = None

    def _loss(self, why: str) -> Loss:
        """A loss of this store's buffers now, ``why``."""
        return Loss(self.generation, why, time.time(),
                    self.ledger.gpu if self.ledger is not None else "")

    def _record_losses(self, losses: dict[tuple[int, str, str], Loss]) -> None:
        with self._lock:
            self._lost.update({(e, n): loss for (_, e, n), loss in losses.items()})
        if self.ledger is not None:
            self.ledger.lost(losses)

    def shard_buffers(self, index: int) -> list[Buffer]:
        """Every buffer of shard ``index``, entity by entity."""
        with self._lock:
            return [buf for bufs in self._shards.get(index, {}).values()
                    for buf in bufs.values()]

    def drop_shards(self, indices: Iterable[int], why: str, *, lose: bool = True) -> int:
        """Free every buffer of these shards; returns how many were dropped. They are
        remembered as lost ``why``, unless their state was handed off (:attr:`exported`) or
        was never theirs to keep (``lose=False``: a failed import's leftovers)."""
        losses: dict[tuple[int, str, str], Loss] = {}
        handed_off: dict[str, list[str]] = {}
        dropped = 0
        for index in indices:
            moved = self.exported.pop(index, None) is not None or not lose
            for buf in self.shard_buffers(index):
                self._forget(index, buf)
                dropped += 1
                if moved:
                    handed_off.setdefault(buf.entity_id, []).append(buf.name)
                else:
                    losses[(index, buf.entity_id, buf.name)] = self._loss(why)
        self._record_losses(losses)
        if self.ledger is not None:
            for entity_id, names in handed_off.items():
                self.ledger.freed(entity_id, names)
        return dropped
