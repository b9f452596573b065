"""The demo workload ``gpu-tasks up`` runs from a separate producer process.

Each entity gets a small pipeline of ordinary ``apply_async`` calls: allocate a
buffer, write values, scale it on the GPU, sum it, read it back, free it. The
calls for one entity land on its shard's queue, served in order by the one GPU
that owns the shard, so they are all sent at once and collected afterwards. The
report checks the arithmetic and that every entity stayed on one GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from celery.result import AsyncResult

from gpu_tasks.tasks import alloc, free, read, run, write

STEPS = ("alloc", "write", "scale", "sum", "read", "free")
BUFFER_SIZE = 64


@dataclass
class EntityReport:
    entity_id: str
    expected_sum: float
    shard: str = ""
    queues: set[str] = field(default_factory=set)
    gpus: set[str] = field(default_factory=set)
    workers: set[str] = field(default_factory=set)
    device: str = ""
    gpu_sum: float | None = None
    read_ok: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            not self.errors
            and self.queues == {self.shard}
            and len(self.gpus) == 1
            and self.read_ok
            and self.gpu_sum == self.expected_sum
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "entity_id": self.entity_id,
            "shard": self.shard,
            "queue": _one(self.queues),
            "gpu": _one(self.gpus),
            "worker": _one(self.workers),
            "device": self.device,
            "gpu_sum": self.gpu_sum,
            "expected_sum": self.expected_sum,
            "ok": self.ok,
            "errors": self.errors,
        }


def _one(values: set[str]) -> str | list[str]:
    """The one value, or all of them when there were several (which the report flags)."""
    return next(iter(values)) if len(values) == 1 else sorted(values)


def entity_ids(count: int) -> list[str]:
    return [f"demo-user-{i}" for i in range(count)]


def submit(entity_id: str, seed: int) -> list[AsyncResult]:
    """Send one entity's pipeline; returns its results in STEPS order."""
    values = [float((seed + j) % 17) for j in range(BUFFER_SIZE)]
    base = {"entity_id": entity_id}
    return [
        alloc.apply_async(kwargs={**base, "name": "x", "shape": [BUFFER_SIZE], "dtype": "float32"}),
        write.apply_async(kwargs={**base, "name": "x", "values": values}),
        run.apply_async(kwargs={**base, "kernel": "scale", "x": "x", "alpha": 2.0}),
        run.apply_async(kwargs={**base, "kernel": "sum", "x": "x"}),
        read.apply_async(kwargs={**base, "name": "x", "as_list": True}),
        free.apply_async(kwargs={**base, "name": "x"}),
    ]


def expected(seed: int) -> list[float]:
    return [2.0 * float((seed + j) % 17) for j in range(BUFFER_SIZE)]


def collect(
    entity_id: str, seed: int, results: list[AsyncResult], timeout_s: float
) -> EntityReport:
    want = expected(seed)
    report = EntityReport(entity_id, float(sum(want)))
    for step, result in zip(STEPS, results, strict=True):
        try:
            value = result.get(timeout=timeout_s)
        except Exception as exc:
            report.errors.append(f"{step}: {type(exc).__name__}: {exc}")
            continue
        report.shard = value["shard"]
        report.queues.add(value["queue"])
        report.gpus.add(value["gpu"])
        report.workers.add(value["worker"])
        report.device = value["device"]
        if step == "sum":
            report.gpu_sum = value["value"]
        elif step == "read":
            report.read_ok = value["values"] == want
    return report
