"""Every error gpu-tasks raises, in one shallow tree.

    GpuTasksError
     +-- ConfigError        bad settings or CLI flags
     +-- RoutingError       refused at submit time; nothing was enqueued
     +-- ShardMapError      the shard map is missing, already exists, or is malformed
     +-- LeaseHeld          another GPU worker serves this GPU (it holds the GPU's lease)
     +-- HandoffError       a shard could not be handed off (it stays, or is left to a re-run)
     +-- RedisServerError   the embedded redis-server could not be started
     +-- BrokerUnavailable  Redis did not answer in time; nothing was enqueued (or, for a
     |                      result, nothing was read): also a kombu OperationalError
     +-- BatchError         a batch cannot run now (another run holds its lock)
     +-- DeadLetterError    a dead letter is not there, or cannot be sent again
     +-- DeviceError        raised by a GPU worker; travels back through Celery's result
          +-- DeadLettered     the worker refused the request (malformed, or it kept ending
          |                    the pool child): it is in the dead-letter stream, never run
          +-- BadRequest       a request field is wrong (the field is named)
          |    +-- BadArguments  arguments that do not fit the task (also a TypeError)
          +-- OutOfMemory      the GPU (or the entity's quota) cannot hold the allocation
          +-- NoSuchBuffer     the entity has no buffer of that name on this GPU
          +-- StaleHandle      the buffer belonged to an older context generation
          |    +-- EntityStateLost  the entity had the buffer here and it is gone
          +-- ContextPoisoned  the request broke the device context; it was rebuilt
          +-- TaskTimeLimitExceeded  the request ran past its soft or hard time limit

Device errors are rebuilt on the producer by Celery's JSON result backend, which
calls ``cls(*args)``; so every class here keeps all of its state in ``args`` and
takes only JSON-safe positional arguments.
"""

from __future__ import annotations

from kombu.exceptions import OperationalError

__all__ = [
    "BadArguments",
    "BadRequest",
    "BatchError",
    "BrokerUnavailable",
    "ConfigError",
    "ContextPoisoned",
    "DeadLetterError",
    "DeadLettered",
    "DeviceError",
    "EntityStateLost",
    "GpuTasksError",
    "HandoffError",
    "LeaseHeld",
    "NoSuchBuffer",
    "OutOfMemory",
    "RedisServerError",
    "RoutingError",
    "ShardMapError",
    "StaleHandle",
    "TaskTimeLimitExceeded",
]


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` as an error message quotes it: cut to its head and tail past
    ``limit`` characters, so a refusal never echoes a megabyte of input back."""
    text = repr(value)
    if len(text) <= limit:
        return text
    keep = (limit - 4) // 2
    return f"{text[:keep]}...{text[-keep:]} ({len(text)} characters)"


class GpuTasksError(Exception):
    """Base of every gpu-tasks error; ``str(exc)`` is the human-readable message."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class ConfigError(GpuTasksError, ValueError):
    """A setting or flag has a value gpu-tasks cannot use."""


class RoutingError(GpuTasksError, ValueError):
    """A routed task could not be routed; it was refused before anything was enqueued."""


class ShardMapError(GpuTasksError):
    """The shard map in Redis is missing, already present, or malformed."""


class LeaseHeld(GpuTasksError):
    """A live worker holds the lease of the GPU this worker was started for."""


class HandoffError(GpuTasksError):
    """A shard could not be handed off now; the message says where it stays."""


class RedisServerError(GpuTasksError):
    """The embedded redis-server could not be found or started."""


class BrokerUnavailable(GpuTasksError, OperationalError):
    """Redis (broker or result backend) refused, dropped or did not answer the call within
    the configured timeout (``GPU_TASKS_REDIS_TIMEOUT_S``). A submit to a Redis that refused
    the connection enqueued nothing; one to a Redis that stopped answering may still be
    carried out if that Redis resumes (the message says which). ``url`` is the Redis URL
    without its password."""

    def __init__(self, message: str, url: str = "") -> None:
        super().__init__(message, url)

    @property
    def url(self) -> str:
        return str(self.args[1]) if len(self.args) > 1 else ""


class BatchError(GpuTasksError):
    """A batch cannot be run now, e.g. another run of the same batch holds its lock."""


class DeadLetterError(GpuTasksError):
    """A dead letter (:mod:`gpu_tasks.control.deadletter`) is not there, or cannot be sent again
    (it was kept truncated, or it still fails the worker's checks). ``letter_id`` says
    which."""

    def __init__(self, message: str, letter_id: str = "") -> None:
        super().__init__(message, letter_id)

    @property
    def letter_id(self) -> str:
        return str(self.args[1]) if len(self.args) > 1 else ""


class DeviceError(GpuTasksError):
    """Raised inside a GPU worker; the worker keeps serving afterwards."""


class DeadLettered(DeviceError):
    """A GPU worker refused this request and kept it in the dead-letter stream
    (``gpu-tasks dlq list``): it was malformed, or its execution kept ending the pool child.
    It was not run (or not run to completion). ``reason`` says why."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message, reason)

    @property
    def reason(self) -> str:
        return str(self.args[1]) if len(self.args) > 1 else ""


class BadRequest(DeviceError, ValueError):
    """A request field is wrong. ``field`` names it."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message, field)

    @property
    def field(self) -> str | None:
        return self.args[1] if len(self.args) > 1 else None


class BadArguments(BadRequest, TypeError):
    """The request's arguments do not fit its task's signature (missing, unknown, or named
    ``self``): refused at submit, nothing enqueued, or by the worker for a message sent
    without that check. Also a ``TypeError``, which Celery's own check raises."""


class OutOfMemory(DeviceError):
    """The allocation does not fit in the GPU's free memory or in the entity's quota.

    Deliberately not a ``MemoryError``: Celery treats that as fatal and stops the worker.
    """

    def __init__(self, message: str, requested_bytes: int = 0, free_bytes: int = 0) -> None:
        super().__init__(message, requested_bytes, free_bytes)

    @property
    def requested_bytes(self) -> int:
        return int(self.args[1]) if len(self.args) > 1 else 0

    @property
    def free_bytes(self) -> int:
        return int(self.args[2]) if len(self.args) > 2 else 0


class NoSuchBuffer(DeviceError, KeyError):
    """The entity owns no buffer of that name on this GPU."""


class StaleHandle(DeviceError):
    """The buffer was created in a context generation that no longer exists."""

    def __init__(self, message: str, handle_generation: int = 0, generation: int = 0) -> None:
        super().__init__(message, handle_generation, generation)

    @property
    def handle_generation(self) -> int:
        return int(self.args[1]) if len(self.args) > 1 else 0

    @property
    def generation(self) -> int:
        return int(self.args[2]) if len(self.args) > 2 else 0


class ContextPoisoned(DeviceError):
    """The request left the device context unusable; it was rebuilt at a new generation."""

    def __init__(self, message: str, generation: int = 0) -> None:
        super().__init__(message, generation)

    @property
    def generation(self) -> int:
        return int(self.args[1]) if len(self.args) > 1 else 0


class EntityStateLost(StaleHandle):
    """The entity had this buffer on this GPU and it is gone: the pool child holding it
    ended (a crash, a poisoned context) or its shard stopped being served here. Never
    answered with a silently recreated buffer: allocate it again to go on.

    ``handle_generation`` is the generation the buffer was lost at, ``generation`` the
    GPU's now; ``entity_id``, ``buffer``, ``gpu``, ``lost_at`` (Unix time) and ``why``
    say which, where, when and why."""

    def __init__(self, message: str, handle_generation: int = 0, generation: int = 0,
                 entity_id: str = "", buffer: str = "", gpu: str = "", lost_at: float = 0.0,
                 why: str = "") -> None:
        DeviceError.__init__(self, message, handle_generation, generation, entity_id, buffer,
                             gpu, lost_at, why)

    @property
    def entity_id(self) -> str:
        return str(self.args[3]) if len(self.args) > 3 else ""

    @property
    def buffer(self) -> str:
        return str(self.args[4]) if len(self.args) > 4 else ""

    @property
    def gpu(self) -> str:
        return str(self.args[5]) if len(self.args) > 5 else ""

    @property
    def lost_at(self) -> float:
        return float(self.args[6]) if len(self.args) > 6 else 0.0

    @property
    def why(self) -> str:
        return str(self.args[7]) if len(self.args) > 7 else ""


class TaskTimeLimitExceeded(DeviceError):
    """The request ran past its time limit. ``soft``: it was interrupted where it ran
    Python code and the GPU kept every buffer (what the task had written so far stays
    written). Hard: its pool child was killed, and every entity's buffers on that GPU were
    lost with it (answered ``EntityStateLost``). ``limit_s`` is the limit it ran past."""

    def __init__(self, message: str, limit_s: float = 0.0, soft: bool = True) -> None:
        super().__init__(message, limit_s, soft)

    @property
    def limit_s(self) -> float:
        return float(self.args[1]) if len(self.args) > 1 else 0.0

    @property
    def soft(self) -> bool:
        return bool(self.args[2]) if len(self.args) > 2 else True
