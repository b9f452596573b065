"""Prometheus metrics of a deployment: ``gpu-tasks exporter`` serves them at ``/metrics``.

One :class:`FleetCollector` takes one status snapshot (:func:`gpu_tasks.control.status.snapshot`)
and reads the task counts on each scrape, so every scrape is a consistent, fresh view
in six round trips to Redis, and the exporter holds no state of its own: run it on any
host that reaches Redis, and as many as you like. Flower's metrics (``flower_*``) say
what Celery sees; these say what only gpu-tasks knows: backlogs per GPU and how old
they are, who consumes them, leases, shards, device memory.

Per GPU (labels ``node``, ``gpu``)::

    gpu_tasks_gpu_queued_requests              requests waiting in its shard queues and its own
    gpu_tasks_gpu_oldest_waiting_seconds       age of the oldest of them, a lower bound (0: none)
    gpu_tasks_gpu_consuming                    1 if its worker consumes by the map's epoch
    gpu_tasks_gpu_stalled                      1 if requests wait and nothing consumes them
    gpu_tasks_gpu_lease_held                   1 if a worker holds its lease
    gpu_tasks_gpu_lease_age_seconds            since the lease was renewed (only while held)
    gpu_tasks_gpu_lease_ttl_seconds            the lease's time to live (only while held)
    gpu_tasks_gpu_shards                       shards it owns in the map
    gpu_tasks_gpu_memory_used_bytes            device memory in use (fleet registry)
    gpu_tasks_gpu_memory_total_bytes           device memory
    gpu_tasks_gpu_spilled_bytes                host memory holding spilled buffers
    gpu_tasks_gpu_entities, _buffers           entities and buffers on the device
    gpu_tasks_gpu_generation                   device context generation
    gpu_tasks_gpu_spills_total, _restores_total, _evictions_total   (per pool child: they
                                               restart from 0 with a new one, as counters may)
    gpu_tasks_gpu_device_failed                1 if its worker's device failed to start
    gpu_tasks_gpu_heartbeat_timestamp_seconds  last fleet heartbeat (the worker's clock)
    gpu_tasks_gpu_info                         worker, device_uuid, device_name, backend

Per task name (labels ``node``, ``gpu``, ``task``, ``outcome`` = succeeded, failed,
retried): ``gpu_tasks_tasks_total``, counted by the workers (:mod:`workers.child.taskcounts`).

The deployment: ``gpu_tasks_redis_up``, ``gpu_tasks_shard_count``,
``gpu_tasks_shard_map_epoch``, ``gpu_tasks_shards_handoff{state}`` (shards being handed
off), ``gpu_tasks_shards_unowned``, ``gpu_tasks_shards_waiting_without_consumer``,
``gpu_tasks_unowned_queued_requests``, ``gpu_tasks_problems`` (what ``gpu-tasks status``
prints as PROBLEM lines), ``gpu_tasks_status_snapshot_seconds``.

``ops/alerts.yml`` holds alert rules over these.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

import redis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

from gpu_tasks.control.fleet import TASK_OUTCOMES, FleetRegistry
from gpu_tasks.control.status import FleetStatus, snapshot

log = logging.getLogger(__name__)

GPU = ("node", "gpu")
HANDOFF_STATES = ("releasing", "importing")


@dataclass(frozen=True)
class _Spec:
    kind: str  # gauge, counter or info
    doc: str
    labels: tuple[str, ...] = ()


_SPECS: dict[str, _Spec] = {
    "gpu_tasks_redis_up": _Spec("gauge", "1 if the last scrape could read Redis"),
    "gpu_tasks_status_snapshot_seconds": _Spec("gauge", "How long this scrape's status "
                                               "snapshot took"),
    "gpu_tasks_shard_count": _Spec("gauge", "Shards of the deployment (S)"),
    "gpu_tasks_shard_map_epoch": _Spec("gauge", "The shard map's epoch (one more per change)"),
    "gpu_tasks_shards_handoff": _Spec("gauge", "Shards being handed off, by state: nobody "
                                      "consumes their queues meanwhile", ("state",)),
    "gpu_tasks_shards_unowned": _Spec("gauge", "Shards with no owner in the map"),
    "gpu_tasks_shards_waiting_without_consumer": _Spec(
        "gauge", "Shards whose queue holds requests and has no consumer"),
    "gpu_tasks_unowned_queued_requests": _Spec("gauge", "Requests waiting in shards with no "
                                               "owner"),
    "gpu_tasks_problems": _Spec("gauge", "Problems `gpu-tasks status` reports"),
    "gpu_tasks_gpu_queued_requests": _Spec("gauge", "Requests waiting in the GPU's shard "
                                           "queues and its own queue", GPU),
    "gpu_tasks_gpu_oldest_waiting_seconds": _Spec(
        "gauge", "Age of the oldest request waiting for the GPU, a lower bound (first seen "
        "by a scrape or status); 0 when none waits", GPU),
    "gpu_tasks_gpu_consuming": _Spec("gauge", "1 if a live worker consumes the GPU's shard "
                                     "queues by the map's current epoch", GPU),
    "gpu_tasks_gpu_stalled": _Spec("gauge", "1 if requests wait for the GPU and nothing "
                                   "consumes them", GPU),
    "gpu_tasks_gpu_lease_held": _Spec("gauge", "1 if a live worker holds the GPU's lease", GPU),
    "gpu_tasks_gpu_lease_age_seconds": _Spec("gauge", "Seconds since the GPU's lease was "
                                             "renewed, by Redis's clock", GPU),
    "gpu_tasks_gpu_lease_ttl_seconds": _Spec("gauge", "Time to live the GPU's lease is "
                                             "renewed with", GPU),
    "gpu_tasks_gpu_shards": _Spec("gauge", "Shards the GPU owns in the map", GPU),
    "gpu_tasks_gpu_memory_used_bytes": _Spec("gauge", "Device memory in use", GPU),
    "gpu_tasks_gpu_memory_total_bytes": _Spec("gauge", "Device memory", GPU),
    "gpu_tasks_gpu_spilled_bytes": _Spec("gauge", "Host memory holding the GPU's spilled "
                                         "buffers", GPU),
    "gpu_tasks_gpu_entities": _Spec("gauge", "Entities with buffers on the GPU", GPU),
    "gpu_tasks_gpu_buffers": _Spec("gauge", "Buffers on the GPU", GPU),
    "gpu_tasks_gpu_generation": _Spec("gauge", "The GPU's device context generation", GPU),
    "gpu_tasks_gpu_spills": _Spec("counter", "Entities spilled to host memory by the "
                                  "current pool child", GPU),
    "gpu_tasks_gpu_restores": _Spec("counter", "Spilled entities restored by the current "
                                    "pool child", GPU),
    "gpu_tasks_gpu_evictions": _Spec("counter", "Entities evicted (state lost) by the "
                                     "current pool child", GPU),
    "gpu_tasks_gpu_device_failed": _Spec("gauge", "1 if the GPU's device failed to start",
                                         GPU),
    "gpu_tasks_gpu_heartbeat_timestamp_seconds": _Spec(
        "gauge", "When the GPU's worker last wrote its fleet record (its host's clock)", GPU),
    "gpu_tasks_gpu": _Spec("info", "The GPU's worker and device",
                           (*GPU, "worker", "device_uuid", "device_name", "backend")),
    "gpu_tasks_tasks": _Spec("counter", "Tasks that ended, by name and outcome (succeeded, "
                             "failed, retried), counted by the GPU's worker",
                             (*GPU, "task", "outcome")),
}


def _families() -> dict[str, Metric]:
    families: dict[str, Metric] = {}
    for name, spec in _SPECS.items():
        labels = list(spec.labels)
        if spec.kind == "counter":
            families[name] = CounterMetricFamily(name, spec.doc, labels=labels)
        elif spec.kind == "info":
            families[name] = InfoMetricFamily(name, spec.doc, labels=labels[:2])
        else:
            families[name] = GaugeMetricFamily(name, spec.doc, labels=labels)
    return families


class FleetCollector:
    """A Prometheus collector: on each scrape, one status snapshot and the task counts."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def describe(self) -> Iterator[Metric]:
        # Names only: registering must not reach Redis.
        yield from _families().values()

    def collect(self) -> Iterator[Metric]:
        families = _families()
        started = time.perf_counter()
        try:
            fleet = snapshot(self.client)
            counts = FleetRegistry(self.client).task_counts([g.gpu for g in fleet.gpus])
        except redis.RedisError as exc:
            # An answer, not an HTTP 500: the alert on gpu_tasks_redis_up says why.
            log.warning("cannot read the deployment from Redis: %s", exc)
            _put(families, "gpu_tasks_redis_up", [], 0)
            yield families["gpu_tasks_redis_up"]
            return
        _put(families, "gpu_tasks_redis_up", [], 1)
        _put(families, "gpu_tasks_status_snapshot_seconds", [], time.perf_counter() - started)
        fill(families, fleet, counts)
        yield from families.values()


def _put(families: dict[str, Metric], name: str, labels: list[str], value: float) -> None:
    cast(GaugeMetricFamily | CounterMetricFamily, families[name]).add_metric(labels, value)


def fill(families: dict[str, Metric], fleet: FleetStatus,
         counts: dict[str, dict[tuple[str, str], int]]) -> None:
    """Add the samples of one snapshot (and the task counts per GPU) to ``families``."""

    def put(name: str, labels: list[str], value: float) -> None:
        _put(families, name, labels, value)

    if fleet.shard_count is not None:
        put("gpu_tasks_shard_count", [], fleet.shard_count)
    if fleet.epoch is not None:
        put("gpu_tasks_shard_map_epoch", [], fleet.epoch)
    for state in HANDOFF_STATES:
        put("gpu_tasks_shards_handoff", [state],
            sum(1 for h in fleet.handoffs if h.state == state))
    put("gpu_tasks_shards_unowned", [], len(fleet.unowned_shards))
    put("gpu_tasks_shards_waiting_without_consumer", [], len(fleet.waiting_without_consumer))
    put("gpu_tasks_unowned_queued_requests", [], fleet.unowned_queued)
    put("gpu_tasks_problems", [], len(fleet.problems))
    for g in fleet.gpus:
        labels = [g.node or "", g.gpu]
        put("gpu_tasks_gpu_queued_requests", labels, g.queued)
        put("gpu_tasks_gpu_oldest_waiting_seconds", labels, g.oldest_s or 0.0)
        put("gpu_tasks_gpu_consuming", labels, int(g.consuming))
        put("gpu_tasks_gpu_stalled", labels, int(g.stalled))
        put("gpu_tasks_gpu_lease_held", labels, int(g.alive))
        if g.lease_age_s is not None and g.lease_ttl_s is not None:
            put("gpu_tasks_gpu_lease_age_seconds", labels, g.lease_age_s)
            put("gpu_tasks_gpu_lease_ttl_seconds", labels, g.lease_ttl_s)
        put("gpu_tasks_gpu_shards", labels, g.shards)
        d = g.device
        if d:
            put("gpu_tasks_gpu_memory_used_bytes", labels, d["used_bytes"])
            put("gpu_tasks_gpu_memory_total_bytes", labels, d["total_bytes"])
            put("gpu_tasks_gpu_spilled_bytes", labels, d["spilled_bytes"])
            put("gpu_tasks_gpu_entities", labels, d["entities"])
            put("gpu_tasks_gpu_buffers", labels, d["buffers"])
            put("gpu_tasks_gpu_generation", labels, d["generation"])
            put("gpu_tasks_gpu_spills", labels, d["spills"])
            put("gpu_tasks_gpu_restores", labels, d["restores"])
            put("gpu_tasks_gpu_evictions", labels, d["evictions"])
            put("gpu_tasks_gpu_device_failed", labels, int(d["state"] == "failed"))
            put("gpu_tasks_gpu_heartbeat_timestamp_seconds", labels, d["heartbeat_at"])
            cast(InfoMetricFamily, families["gpu_tasks_gpu"]).add_metric(labels, {
                "worker": g.worker or "", "device_uuid": d["device_uuid"],
                "device_name": d["device_name"], "backend": d["backend"]})
        for (task, outcome), n in sorted(counts.get(g.gpu, {}).items()):
            if outcome in TASK_OUTCOMES:
                put("gpu_tasks_tasks", [*labels, task, outcome], n)


def registry(client: redis.Redis) -> CollectorRegistry:
    """A registry holding only the deployment's metrics (not this process's own)."""
    reg = CollectorRegistry()
    reg.register(FleetCollector(client))
    return reg


def serve(client: redis.Redis, address: str, port: int, stop: threading.Event,
          on_ready: Callable[[], None] | None = None) -> None:
    """Serve ``/metrics`` on ``address:port`` until ``stop`` is set; ``on_ready`` is called
    once it listens."""
    server, thread = start_http_server(port, address, registry(client))
    try:
        if on_ready is not None:
            on_ready()
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
