"""Where a request goes: entity -> shard -> the shard's queue.

The hash is part of the contract (other languages route the same way):
``shard index = xxh64(utf8(entity_id), seed=0) mod S``, named ``shard-{index}``, and
**the shard's name is the Celery queue** the request goes to. So a producer needs
only ``S``, which never changes for a deployment: it is read from Redis once per
process and the routing decision itself makes no Redis call. Which GPU consumes a
shard's queue is the shard map's business (:mod:`gpu_tasks.control.shardmap`), not the
producer's.

:class:`EntityRouter` is installed in the Celery app's ``task_routes``, so a plain
``task.apply_async(kwargs={"entity_id": ...})`` or ``app.send_task(name, ...)`` is
routed with no wrapper, whether or not the producer imported the task. Every
request must say where it goes: an ``entity_id`` (its shard) or an explicit GPU
queue ``gpu.<node>.<index>`` (one GPU: ``stats``, control). Anything else is
refused before it reaches the broker, so nothing ever lands in Celery's default
queue, which no GPU worker reads.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from gpu_tasks import settings as _settings
from gpu_tasks.errors import RoutingError, shown

ENTITY_KWARG = "entity_id"
"""The one marker of an entity-routed request: this keyword argument."""
SHARD_PREFIX = "shard-"

ROUTED_TASK_NAMES: set[str] = set()
"""Names of tasks defined with ``@gpu_task``, for clearer refusals (``gpu_tasks.tasks.declare``)."""
QUEUE_ADDRESSED_TASK_NAMES: set[str] = set()
"""Names of tasks that run on one GPU and are sent with ``queue=`` (``gpu_tasks.stats``)."""

_xxh64 = xxhash.xxh64_intdigest
_GPU_QUEUE = re.compile(r"gpu\.([^.@\s]+)\.(0|[1-9][0-9]*)\Z")
_SHARD_QUEUE = re.compile(r"shard-(0|[1-9][0-9]*)\Z")


def validate_entity_id(entity_id: object, max_chars: int | None = None) -> str:
    """Return ``entity_id`` if it can be routed, else raise :class:`RoutingError`.

    ``max_chars``: the longest id accepted (default: the process's settings,
    ``GPU_TASKS_MAX_ENTITY_ID_CHARS``)."""
    if not isinstance(entity_id, str):
        raise RoutingError(
            f"entity_id must be a non-empty string, got {type(entity_id).__name__} "
            f"{shown(entity_id)}"
        )
    if not entity_id:
        raise RoutingError("entity_id must be a non-empty string, got ''")
    limit = max_chars if max_chars is not None else _settings.current().max_entity_id_chars
    if len(entity_id) > limit:
        raise RoutingError(
            f"entity_id has {len(entity_id)} characters; at most {limit} are accepted "
            f"(GPU_TASKS_MAX_ENTITY_ID_CHARS), got {shown(entity_id)}"
        )
    try:
        entity_id.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RoutingError(
            f"entity_id must be valid Unicode text (it is hashed as UTF-8), got {entity_id!r}: "
            f"{exc.reason} at position {exc.start}"
        ) from None
    return entity_id


def shard_index(entity_id: str, shard_count: int) -> int:
    """The shard of an entity: ``xxh64(utf8(entity_id), seed=0) mod shard_count``."""
    return _xxh64(entity_id.encode("utf-8")) % shard_count


CELL_SEED = 1
"""The cell hash's xxh64 seed: independent of the shard hash (seed 0), so an entity's shard
within its cell does not depend on its cell."""


def cell_index(entity_id: str, cell_count: int) -> int:
    """The cell of an entity where one Redis is not enough (docs/PROTOCOL.md):
    ``xxh64(utf8(entity_id), seed=1) mod cell_count``; one cell means no cell routing."""
    return xxhash.xxh64_intdigest(entity_id.encode("utf-8"), seed=CELL_SEED) % cell_count


def shard_name(index: int) -> str:
    """A shard's name, which is also the name of its Celery queue: ``shard-<index>``."""
    return f"{SHARD_PREFIX}{index}"


def parse_shard_queue(name: str) -> int | None:
    """The index of shard queue ``shard-<index>``; None for any other name."""
    match = _SHARD_QUEUE.match(name)
    return int(match.group(1)) if match else None


def gpu_queue(node: str, gpu_index: int) -> str:
    """The Celery queue of one GPU (stats, control): ``gpu.<node>.<index>``; it also
    names the GPU in the shard map, the fleet registry and the leases."""
    return f"gpu.{node}.{gpu_index}"


def parse_gpu_queue(name: str) -> tuple[str, int] | None:
    """``(node, index)`` of GPU queue ``gpu.<node>.<index>``; None for any other name."""
    match = _GPU_QUEUE.match(name)
    return (match.group(1), int(match.group(2))) if match else None


def worker_name(node: str, gpu_index: int) -> str:
    """The Celery worker name of one GPU's worker: ``gpu<index>@<node>``."""
    return f"gpu{gpu_index}@{node}"


@dataclass(frozen=True)
class Route:
    """Where one entity's work goes, as ``gpu-tasks route --json`` prints it."""

    entity_id: str
    shard_index: int
    owner: str | None = None
    """The GPU that owns the shard now (from the shard map), when asked for."""

    @property
    def shard(self) -> str:
        return shard_name(self.shard_index)

    @property
    def queue(self) -> str:
        return self.shard

    def as_dict(self) -> dict[str, Any]:
        return {
            "entity_id": self.entity_id,
            "shard": self.shard,
            "shard_index": self.shard_index,
            "queue": self.queue,
            "owner": self.owner,
        }


def _queue_option(options: Mapping[str, Any]) -> str | None:
    """The queue name a caller gave with ``queue=`` (Celery has expanded it to a Queue)."""
    queue = options.get("queue")
    if queue is None:
        return None
    return queue if isinstance(queue, str) else str(getattr(queue, "name", queue))


class EntityRouter:
    """Celery router: an entity's request goes to its shard's queue; nothing else passes
    without an explicit GPU queue.

    ``shard_count`` returns S (and raises if it cannot be known); it is called once,
    on the first routed request, and S is kept for the life of the router.
    """

    def __init__(self, shard_count: Callable[[], int], max_entity_id_chars: int | None = None
                 ) -> None:
        self._read_shard_count = shard_count
        self._max_chars = (max_entity_id_chars if max_entity_id_chars is not None
                           else _settings.current().max_entity_id_chars)
        self._queues: tuple[str, ...] = ()
        self._count = 0
        self._lock = threading.Lock()

    @property
    def max_entity_id_chars(self) -> int:
        return self._max_chars

    @property
    def shard_count(self) -> int:
        if not self._count:
            with self._lock:
                if not self._count:
                    count = self._read_shard_count()
                    self._queues = tuple(shard_name(i) for i in range(count))
                    self._count = count
        return self._count

    def route(self, entity_id: object) -> Route:
        """Route one entity (raises :class:`RoutingError` for an unusable id)."""
        eid = validate_entity_id(entity_id, self._max_chars)
        return Route(eid, shard_index(eid, self.shard_count))

    def __call__(
        self,
        name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        options: Mapping[str, Any],
        task: Any = None,
        **_: Any,
    ) -> str | None:
        # Runs on every apply_async: for the common case (an entity id, no queue given)
        # it is a dict lookup, a hash and a tuple index. The length limit costs one len()
        # and a comparison (a few tens of ns); a too-long id takes the slow path, which
        # names the problem.
        entity_id = kwargs.get(ENTITY_KWARG) if kwargs else None
        if (
            entity_id.__class__ is str
            and entity_id
            and len(entity_id) <= self._max_chars
            and self._count
            and "queue" not in options
            and options.get("routing_key") is None
            and options.get("exchange") is None
        ):
            try:
                return self._queues[_xxh64(entity_id.encode("utf-8")) % self._count]
            except UnicodeEncodeError:
                pass  # the slow path names the problem
        return self._slow_path(name, args, entity_id, options, task)

    def _slow_path(
        self, name: str, args: Sequence[Any], entity_id: object, options: Mapping[str, Any],
        task: Any,
    ) -> str | None:
        """Everything but a plain entity request: explain refusals, accept explicit queues."""
        for option in ("exchange", "routing_key"):
            if options.get(option) is not None:
                raise RoutingError(
                    f"task {name}: gpu-tasks routes by queue, so {option}= cannot be given "
                    f"(got {options[option]!r}); nothing was enqueued"
                )
        queue = _queue_option(options)
        if entity_id is not None:
            try:
                eid = validate_entity_id(entity_id, self._max_chars)
            except RoutingError as exc:
                raise RoutingError(f"task {name}: {exc}; nothing was enqueued") from None
            index = shard_index(eid, self.shard_count)  # reads S on first use
            shard_queue = self._queues[index]
            if queue is not None and queue != shard_queue:
                raise RoutingError(
                    f"task {name} for entity {eid!r} goes to its shard's queue {shard_queue}, "
                    f"not queue={queue!r}: leave queue= out; nothing was enqueued"
                )
            return shard_queue
        if queue is not None and parse_gpu_queue(queue) is not None:
            return None  # addressed to one GPU; Celery keeps the caller's queue
        if name in ROUTED_TASK_NAMES or getattr(task, "entity_routed", False):
            hint = " (pass it as a keyword argument)" if args else ""
            raise RoutingError(
                f"task {name} is routed by entity but was sent without entity_id{hint}; "
                "nothing was enqueued"
            )
        where = f"queue={queue!r} is not a GPU queue" if queue is not None else "no queue"
        if name in QUEUE_ADDRESSED_TASK_NAMES or getattr(task, "queue_addressed", False):
            raise RoutingError(
                f"task {name} runs on one GPU: send it with queue='gpu.<node>.<index>' "
                f"({where}); nothing was enqueued"
            )
        raise RoutingError(
            f"task {name} was sent with neither entity_id= (routes it to its shard) nor "
            f"queue='gpu.<node>.<index>' (one GPU) ({where}); nothing was enqueued"
        )
