"""The Prometheus exporter (``gpu-tasks exporter``) as a real process, the workers' task
counts behind it, and the alert rules over its metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import pytest
import redis

from gpu_tasks.control.shardmap import ShardMap, ShardMapStore
from gpu_tasks.errors import NoSuchBuffer
from gpu_tasks.local.cluster import LocalCluster
from gpu_tasks.settings import Settings
from gpu_tasks.tasks import alloc, read
from tests.conftest import GPUS, NODE, REPO, entity_owned_by, wait_until
from tests.support.exporter import Samples, exporter, scrape, value
from tests.support.messages import raw_task_message
from tests.support.ports import free_port

TIMEOUT = 30
def gpu_labels(i: int, node: str = NODE) -> dict[str, str]:
    return {"node": node, "gpu": f"gpu.{node}.{i}"}


def test_exporter_reports_every_gpu_of_the_cluster(cluster: LocalCluster) -> None:
    # Given the session cluster's four GPU workers, when Prometheus scrapes the exporter
    with exporter(cluster.settings) as url:
        # (a test before may have restarted a pool child: wait until all serve again)
        samples = wait_until(lambda: (now := scrape(url)) and all(
            value(now, "gpu_tasks_gpu_consuming", **gpu_labels(i)) == 1
            for i in range(GPUS)) and now, timeout=TIMEOUT)
    # Then every GPU has its series, labelled by node and GPU: consuming, its device, its
    # lease and its shards
    assert value(samples, "gpu_tasks_redis_up") == 1
    assert value(samples, "gpu_tasks_shard_count") == 1024
    assert (value(samples, "gpu_tasks_shard_map_epoch") or 0) >= 1
    for i in range(GPUS):
        gpu = gpu_labels(i)
        assert value(samples, "gpu_tasks_gpu_consuming", **gpu) == 1
        assert value(samples, "gpu_tasks_gpu_lease_held", **gpu) == 1
        assert value(samples, "gpu_tasks_gpu_stalled", **gpu) == 0
        assert (value(samples, "gpu_tasks_gpu_memory_total_bytes", **gpu) or 0) > 0
        assert value(samples, "gpu_tasks_gpu_memory_used_bytes", **gpu) is not None
        assert value(samples, "gpu_tasks_gpu_shards", **gpu) == 1024 // GPUS
        lease_age = value(samples, "gpu_tasks_gpu_lease_age_seconds", **gpu)
        assert lease_age is not None and lease_age < cluster.settings.lease_ttl_s
        assert value(samples, "gpu_tasks_gpu_lease_ttl_seconds", **gpu) == (
            cluster.settings.lease_ttl_s)
        for name in ("queued_requests", "oldest_waiting_seconds", "entities", "buffers",
                     "generation", "spilled_bytes", "spills_total", "evictions_total",
                     "device_failed", "heartbeat_timestamp_seconds"):
            assert value(samples, f"gpu_tasks_gpu_{name}", **gpu) is not None, name
        assert value(samples, "gpu_tasks_gpu_info", **gpu, worker=f"gpu{i}@{NODE}",
                     device_uuid=f"SIM-{NODE}-{i}", device_name="gpu-tasks simulated GPU",
                     backend="sim") == 1
    assert value(samples, "gpu_tasks_shards_unowned") == 0
    assert value(samples, "gpu_tasks_problems") == 0


def test_exporter_counts_task_outcomes_per_task_and_gpu(cluster: LocalCluster) -> None:
    client = cluster.settings.redis_client()
    gpu = cluster.queues[1]
    entity = entity_owned_by(client, gpu, "counted")
    labels = {**gpu_labels(1)}

    def count(task: str, outcome: str, samples: Samples) -> float:
        return value(samples, "gpu_tasks_tasks_total", **labels, task=task,
                     outcome=outcome) or 0.0

    with exporter(cluster.settings) as url:
        before = scrape(url)
        # When the GPU runs two allocs and a read of a buffer that does not exist
        for name in ("c1", "c2"):
            alloc.apply_async(kwargs={"entity_id": entity, "name": name, "shape": [4]}).get(
                timeout=TIMEOUT)
        with pytest.raises(NoSuchBuffer):
            read.apply_async(kwargs={"entity_id": entity, "name": "missing"}).get(
                timeout=TIMEOUT)

        # Then within a heartbeat the exporter counts them, on that GPU, by task and outcome
        def counted() -> Samples | None:
            now = scrape(url)
            done = (count("gpu_tasks.alloc", "succeeded", now)
                    >= count("gpu_tasks.alloc", "succeeded", before) + 2
                    and count("gpu_tasks.read", "failed", now)
                    >= count("gpu_tasks.read", "failed", before) + 1)
            return now if done else None

        after = wait_until(counted, timeout=10 * cluster.settings.heartbeat_s,
                           what=lambda: str({k: v for k, v in scrape(url).items()
                                             if k[0] == "gpu_tasks_tasks_total"}))
    assert count("gpu_tasks.read", "succeeded", after) == count(
        "gpu_tasks.read", "succeeded", before)
    from gpu_tasks.tasks import free

    free.apply_async(kwargs={"entity_id": entity}).get(timeout=TIMEOUT)


def test_exporter_shows_a_backlog_that_nothing_consumes(
        spare_url: str, settings: Settings) -> None:
    # Given a map over two GPUs that have no worker, and requests for one of them
    client = redis.Redis.from_url(spare_url)
    a, b = "gpu.idle.0", "gpu.idle.1"
    ShardMapStore(client).create(ShardMap.balanced([a, b], 64))
    for n in range(5):
        client.lpush("shard-0", raw_task_message("gpu_tasks.alloc", {"entity_id": f"e{n}"},
                                                 "shard-0")[1])
    # When Prometheus scrapes
    with exporter(settings.replace(redis_url=spare_url)) as url:
        samples = scrape(url)
        # Then GPU a has queued requests, consumes nothing and is stalled; b is idle
        idle_a, idle_b = gpu_labels(0, "idle"), gpu_labels(1, "idle")
        assert value(samples, "gpu_tasks_gpu_queued_requests", **idle_a) == 5
        assert value(samples, "gpu_tasks_gpu_consuming", **idle_a) == 0
        assert value(samples, "gpu_tasks_gpu_stalled", **idle_a) == 1
        assert value(samples, "gpu_tasks_gpu_lease_held", **idle_a) == 0
        assert value(samples, "gpu_tasks_gpu_lease_age_seconds", **idle_a) is None
        assert value(samples, "gpu_tasks_gpu_queued_requests", **idle_b) == 0
        assert value(samples, "gpu_tasks_gpu_stalled", **idle_b) == 0
        assert value(samples, "gpu_tasks_shards_waiting_without_consumer") == 1
        assert value(samples, "gpu_tasks_problems") == 1
        # And the oldest request's age grows from one scrape to the next
        first = value(samples, "gpu_tasks_gpu_oldest_waiting_seconds", **idle_a)
        assert first is not None
        wait_until(lambda: (value(scrape(url), "gpu_tasks_gpu_oldest_waiting_seconds",
                                  **idle_a) or 0) > first, timeout=5)


def test_exporter_answers_when_redis_is_down(settings: Settings) -> None:
    # Given an exporter whose Redis does not answer, a scrape still answers: Redis is down
    gone = settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0",
                            redis_timeout_s=0.5)
    with exporter(gone) as url:
        samples = scrape(url)
    assert value(samples, "gpu_tasks_redis_up") == 0


def test_task_counts_where_no_heartbeat_runs_are_written_at_once(spare_url: str) -> None:
    from gpu_tasks.control.fleet import FleetRegistry
    from workers.child.taskcounts import TaskCounts

    # Given the counts of a worker's main process, which has no heartbeat
    registry = FleetRegistry(redis.Redis.from_url(spare_url))
    counts = TaskCounts("gpu.unit.0")
    counts.write_to(registry)
    # When Celery fails a task there (a hard time limit), then again
    counts.add("gpu_tasks.run", "failed")
    counts.add("gpu_tasks.run", "failed")
    # Then Redis has both at once, and nothing waits in memory
    assert registry.task_counts(["gpu.unit.0"]) == {"gpu.unit.0": {("gpu_tasks.run",
                                                                    "failed"): 2}}
    assert counts.take() == {}
    # And a forked pool child starts from nothing, without the write-through
    counts.add("gpu_tasks.run", "succeeded")
    counts.reset()
    assert counts.write_through is None and counts.take() == {}


# -- alert rules -------------------------------------------------------------------------


OPS = REPO / "ops"


def test_alert_rules_use_only_metrics_the_exporter_exports() -> None:
    from gpu_tasks.monitor.metrics import _SPECS

    exported: set[str] = set()
    for name, spec in _SPECS.items():
        exported |= ({f"{name}_total"} if spec.kind == "counter" else
                     {f"{name}_info"} if spec.kind == "info" else {name})
    used = set(re.findall(r"\bgpu_tasks_[a-z_]+", (OPS / "alerts.yml").read_text()))
    assert used and used <= exported, used - exported


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (Debian: apt-get install prometheus)")
@pytest.mark.parametrize("args", [
    ("check", "rules", "alerts.yml"),
    ("test", "rules", "alerts.test.yml"),
    ("check", "config", "prometheus.yml"),
])
def test_promtool_accepts_the_rules_and_the_config(args: Any) -> None:
    done = subprocess.run(["promtool", *args], cwd=OPS, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_exporter_unit_runs_the_exporter() -> None:
    unit = (OPS / "systemd" / "gpu-tasks-exporter.service").read_text()
    assert "ExecStart=/opt/gpu-tasks/.venv/bin/gpu-tasks exporter " in unit
    assert "127.0.0.1:9487" in (OPS / "prometheus.yml").read_text()
