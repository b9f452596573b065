"""Where a request goes: entity -> shard -> GPU queue.

The hash is part of the contract (other languages route the same way):
``shard index = xxh64(utf8(entity_id), seed=0) mod S``, named ``shard-{index}``.
:class:`EntityRouter` is installed in the Celery app's ``task_routes``, so a plain
``task.apply_async(kwargs={"entity_id": ...})`` or ``app.send_task(...)`` is
routed with no wrapper, and a routed task without a usable ``entity_id`` is
refused before anything reaches the broker.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from gpu_tasks.errors import RoutingError
from gpu_tasks.shardmap import ShardMapCache

ENTITY_KWARG = "entity_id"

ROUTED_TASK_NAMES: set[str] = set()
"""Names of entity-routed tasks, filled as they are defined (see ``gpu_tasks.task``)."""
QUEUE_ADDRESSED_TASK_NAMES: set[str] = set()
"""Names of tasks that must be sent to one GPU's queue with ``queue=`` (``gpu_tasks.stats``)."""
_xxh64 = xxhash.xxh64_intdigest


def validate_entity_id(entity_id: object) -> str:
    """Return ``entity_id`` if it can be routed, else raise :class:`RoutingError`."""
    if not isinstance(entity_id, str):
        raise RoutingError(
            f"entity_id must be a non-empty string, got {type(entity_id).__name__} {entity_id!r}"
        )
    if not entity_id:
        raise RoutingError("entity_id must be a non-empty string, got ''")
    return entity_id


def shard_index(entity_id: str, shard_count: int) -> int:
    """The shard of an entity: ``xxh64(utf8(entity_id), seed=0) mod shard_count``."""
    return _xxh64(entity_id.encode("utf-8")) % shard_count


def shard_name(index: int) -> str:
    return f"shard-{index}"


def queue_name(node: str, gpu_index: int) -> str:
    """The Celery queue of one GPU: ``gpu.<node>.<index>``."""
    return f"gpu.{node}.{gpu_index}"


def worker_name(node: str, gpu_index: int) -> str:
    """The Celery worker name of one GPU's worker: ``gpu<index>@<node>``."""
    return f"gpu{gpu_index}@{node}"


@dataclass(frozen=True)
class Route:
    """Where one entity's work goes, as ``gpu-tasks route --json`` prints it."""

    entity_id: str
    shard: str
    shard_index: int
    queue: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "entity_id": self.entity_id,
            "shard": self.shard,
            "shard_index": self.shard_index,
            "queue": self.queue,
        }


class EntityRouter:
    """Celery router: sends entity-routed tasks to the queue of their shard's GPU.

    A task is entity-routed when its class says so (``entity_routed = True``, set
    by :func:`gpu_tasks.task.gpu_task`), when its name is listed in
    :data:`ROUTED_TASK_NAMES` (so ``send_task`` by name works in a process that never
    imported the task), or when its kwargs carry an ``entity_id``. Other tasks are
    left to Celery's other routes.
    """

    def __init__(
        self, shard_map: ShardMapCache, routed_names: set[str] = ROUTED_TASK_NAMES
    ) -> None:
        self.shard_map = shard_map
        self.routed_names = routed_names

    def route(self, entity_id: object) -> Route:
        """Route one entity (raises :class:`RoutingError` for an unusable id)."""
        eid = validate_entity_id(entity_id)
        cached = self.shard_map.get()
        index = shard_index(eid, cached.shard_count)
        return Route(eid, shard_name(index), index, cached.queues[index])

    def __call__(
        self,
        name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        options: Mapping[str, Any],
        task: Any = None,
        **_: Any,
    ) -> str | None:
        # Runs on every apply_async: keep it to a dict lookup, a hash and a list index.
        entity_id = kwargs.get(ENTITY_KWARG) if kwargs else None
        if entity_id is None:
            if not (name in self.routed_names or getattr(task, "entity_routed", False)):
                if "queue" not in options and (
                    name in QUEUE_ADDRESSED_TASK_NAMES or getattr(task, "queue_addressed", False)
                ):
                    raise RoutingError(
                        f"task {name} runs on one GPU: send it with "
                        "queue='gpu.<node>.<index>'; nothing was enqueued"
                    )
                return None
            hint = " (pass it as a keyword argument)" if args else ""
            raise RoutingError(
                f"task {name} is routed by entity but was sent without entity_id"
                f"{hint}; nothing was enqueued"
            )
        if entity_id.__class__ is not str or not entity_id:
            try:
                validate_entity_id(entity_id)
            except RoutingError as exc:
                raise RoutingError(f"task {name}: {exc}; nothing was enqueued") from None
        cached = self.shard_map.get()
        return cached.queues[_xxh64(entity_id.encode("utf-8")) % cached.shard_count]
