"""How far the pool child is through the batch it runs: written by the child, read by the
main process.

A GPU worker hands its pool child a whole batch of requests as one job
(:mod:`workers.consumer.fetch`), so billiard, which times and watches jobs, sees one job
where the worker must answer for each request: its hard time limit, its share of a child
death, what goes back to its queue. The child reports each request's start and end here;
the main process reads it on its timer (a request past its hard limit gets the child
killed) and when the child dies (which request was running, which had run, which never
started; which were settled in Redis, their results stored and their messages
acknowledged, Redis itself says).

Like the ownership table, it lives in anonymous shared memory made before the pool forks,
so every child, a replacement too, writes where the main process reads. Times are
``time.monotonic()``, which is system-wide. Layout (native int64 / float64): the batch
(its number, set by the main process when it hands it over), the child's pid, the index of
the request running (-1: none), when it started, its hard limit in seconds (0: none), how
many requests have run (``[0, done)``), and the index of the request the main process
killed the child for (-1: none).
"""

from __future__ import annotations

import mmap
import struct
import time
from dataclasses import dataclass

_LAYOUT = struct.Struct("=qqqddqq")
_BATCH, _PID, _RUNNING, _STARTED, _HARD, _DONE, _KILLED = range(7)


@dataclass(frozen=True)
class Snapshot:
    """One read of :class:`BatchProgress`."""

    batch: int
    pid: int
    running: int
    """Index of the request running, or -1."""
    started: float
    hard_limit_s: float
    done: int
    """Requests ``[0, done)`` of the batch have run (their outcome may not be stored yet)."""
    killed: int
    """Index of the request whose hard limit had the child killed, or -1."""

    def past_hard_limit(self, now: float) -> bool:
        return self.running >= 0 and self.hard_limit_s > 0 and (
            now - self.started > self.hard_limit_s)


class BatchProgress:
    """The shared record (see the module)."""

    def __init__(self) -> None:
        # MAP_SHARED | MAP_ANONYMOUS: children forked later write where the parent reads
        self._mem = mmap.mmap(-1, _LAYOUT.size)
        _LAYOUT.pack_into(self._mem, 0, 0, 0, -1, 0.0, 0.0, 0, -1)

    def read(self) -> Snapshot:
        return Snapshot(*_LAYOUT.unpack_from(self._mem, 0))

    def _write(self, **fields: float) -> None:
        values = list(_LAYOUT.unpack_from(self._mem, 0))
        for name, value in fields.items():
            values[_FIELDS[name]] = value
        _LAYOUT.pack_into(self._mem, 0, *values)

    # -- the main process --------------------------------------------------------------

    def handed(self, batch: int) -> None:
        """Batch ``batch`` is handed to the child: nothing of it started yet."""
        self._write(batch=batch, running=-1, started=0.0, hard=0.0, done=0, killed=-1)

    def killing(self, index: int) -> None:
        """The child is about to be killed for request ``index``'s hard limit."""
        self._write(killed=index)

    # -- the pool child ----------------------------------------------------------------

    def starting(self, batch: int, pid: int, index: int, hard_limit_s: float | None) -> None:
        self._write(batch=batch, pid=pid, running=index, started=time.monotonic(),
                    hard=float(hard_limit_s or 0.0))

    def finished(self, index: int) -> None:
        self._write(running=-1, hard=0.0, done=index + 1)


_FIELDS = {"batch": _BATCH, "pid": _PID, "running": _RUNNING, "started": _STARTED,
           "hard": _HARD, "done": _DONE, "killed": _KILLED}

progress: BatchProgress | None = None
"""This worker's record: made by the boot before the pool forks; None outside GPU workers."""
