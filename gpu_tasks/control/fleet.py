"""The fleet registry: one record per GPU in Redis, with its device and its accounting.

- ``gpu-tasks:fleet``               hash ``gpu.<node>.<i>`` -> JSON record (below)
- ``gpu-tasks:generation:<gpu>``    the GPU's context generation counter
- ``gpu-tasks:taskcounts:<gpu>``    hash ``<task name>:<outcome>`` -> how many tasks of
  that name ended so on that GPU (outcomes: ``succeeded``, ``failed``, ``retried``),
  summed over every worker and pool child the GPU has had

A record holds the worker and device identity (name, UUID or sim id, total
memory), the latest accounting (used bytes, entities, buffers, generation),
``started_at`` (when the worker started: its main process, so the same for every pool
child it forks, and not moved by heartbeats) and ``heartbeat_at``; the pool child
that holds the device writes it every ``heartbeat_s``, adding its task counts in the
same round trip. Whether a GPU is served at all is the lease's business
(:mod:`gpu_tasks.control.lease`), judged on Redis's clock by the process that fetches its
messages; a record only says what the device held when last heard of.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import redis

from gpu_tasks.keys import FLEET_KEY, GENERATION_KEY, TASK_COUNTS_KEY

TASK_OUTCOMES = ("succeeded", "failed", "retried")


@dataclass
class GpuRecord:
    """What the registry knows about one GPU worker."""

    queue: str
    worker: str
    node: str
    gpu_index: int
    backend: str
    device_name: str
    device_uuid: str
    total_bytes: int
    heartbeat_s: float
    used_bytes: int = 0
    entities: int = 0
    buffers: int = 0
    spilled_bytes: int = 0
    spills: int = 0
    restores: int = 0
    evictions: int = 0
    generation: int = 0
    pid: int = 0
    state: str = "running"
    """``running``, ``stopped`` (clean shutdown) or ``failed`` (see ``error``)."""
    error: str = ""
    started_at: float = field(default_factory=time.time)
    """When the worker started (wall clock of its host). Writers pass the worker's start
    time; this default is only for a record made outside a worker."""
    heartbeat_at: float = field(default_factory=time.time)


class FleetRegistry:
    """Reads and writes GPU records. Writers take an optional pipeline to compose."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def heartbeat(self, record: GpuRecord, pipeline: redis.client.Pipeline | None = None) -> None:
        record.heartbeat_at = time.time()
        (pipeline or self.client).hset(FLEET_KEY, record.queue, json.dumps(asdict(record)))

    def add_task_counts(self, queue: str, counts: Mapping[str, int],
                        pipeline: redis.client.Pipeline | None = None) -> None:
        """Add ``counts`` (``<task>:<outcome>`` -> n) to ``queue``'s GPU's task counts."""
        target = pipeline or self.client.pipeline(transaction=False)
        key = TASK_COUNTS_KEY.format(queue=queue)
        for name, n in counts.items():
            target.hincrby(key, name, n)
        if pipeline is None and counts:
            target.execute()

    def task_counts(self, queues: Sequence[str]) -> dict[str, dict[tuple[str, str], int]]:
        """Per GPU: ``(task, outcome)`` -> how many, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for queue in queues:
            pipe.hgetall(TASK_COUNTS_KEY.format(queue=queue))
        out: dict[str, dict[tuple[str, str], int]] = {}
        for queue, raw in zip(queues, pipe.execute() if queues else [], strict=True):
            counts: dict[tuple[str, str], int] = {}
            for field_name, n in raw.items():
                # Task names may hold colons; outcomes never do.
                task, _, outcome = field_name.decode().rpartition(":")
                counts[(task, outcome)] = int(n)
            out[queue] = counts
        return out

    def next_generation(self, queue: str) -> int:
        """A new context generation for ``queue``'s GPU, larger than every earlier one,
        including those of pool children that died."""
        return int(self.client.incr(GENERATION_KEY.format(queue=queue)))

    def get(self, queue: str) -> GpuRecord | None:
        raw = self.client.hget(FLEET_KEY, queue)
        return None if raw is None else GpuRecord(**json.loads(raw))

    def all(self) -> list[GpuRecord]:
        """Every GPU ever registered (dead ones too), sorted by queue."""
        raw = self.client.hgetall(FLEET_KEY)
        return sorted((GpuRecord(**json.loads(v)) for v in raw.values()), key=lambda r: r.queue)
