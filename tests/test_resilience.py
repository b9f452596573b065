"""Nothing accepted is lost: a pool child killed mid-task, a restarted Redis."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest
import redis

from gpu_tasks.app import configure
from gpu_tasks.cluster import LocalCluster
from gpu_tasks.errors import DeviceError, EntityStateLost
from gpu_tasks.fleet import FleetRegistry
from gpu_tasks.redis_server import RedisServer
from gpu_tasks.settings import Settings
from gpu_tasks.tasks import alloc, read, stats, write
from tests import usertasks
from tests.conftest import NODE, gpu_tasks_cli, wait_until

TIMEOUT = 60


def pool_child(cluster: LocalCluster, gpu: int) -> psutil.Process:
    children = psutil.Process(cluster.workers[gpu].popen.pid).children()
    assert len(children) == 1, "prefork with concurrency 1 has exactly one pool child"
    return children[0]


def running_on(cluster: LocalCluster, worker: str, task_id: str) -> bool:
    """Whether ``worker`` says (Celery remote control) it is running ``task_id``."""
    from gpu_tasks.app import app

    active = app.control.inspect(destination=[worker], timeout=1.0).active() or {}
    return any(t["id"] == task_id for t in active.get(worker, []))


def test_a_task_whose_pool_child_dies_is_redelivered_and_the_gpu_keeps_serving(
        cluster: LocalCluster) -> None:
    # Given a slow task running on GPU 0's pool child
    from tests.test_cluster import entity_on

    e = entity_on(cluster, 0, "crash")
    child = pool_child(cluster, 0)
    alloc.apply_async(kwargs={"entity_id": e, "name": "kept", "shape": [2]}).get(TIMEOUT)
    before = stats.apply_async(queue=f"gpu.{NODE}.0").get(timeout=TIMEOUT)["generation"]
    pending = usertasks.slow.apply_async(kwargs={"entity_id": e, "seconds": 1.5,
                                                 "marker": "m"})
    wait_until(lambda: running_on(cluster, f"gpu0@{NODE}", pending.id), timeout=20,
               what="the task never started")
    # When the child is killed mid-task
    os.kill(child.pid, signal.SIGKILL)
    # Then the task is redelivered to the replacement child and completes
    result = pending.get(timeout=TIMEOUT)
    assert result["result"]["pid"] != child.pid
    assert pool_child(cluster, 0).pid == result["result"]["pid"]
    assert result["generation"] > before  # a new child is a new context generation
    # And the buffer the dead child held is reported lost, not missing, not recreated
    with pytest.raises(EntityStateLost, match=rf"lost when the pool child of generation {before} "
                                          rf"ended \(generation {before}; now generation"):
        read.apply_async(kwargs={"entity_id": e, "name": "kept"}).get(timeout=TIMEOUT)
    alloc.apply_async(kwargs={"entity_id": e, "name": "kept", "shape": [2]}).get(TIMEOUT)
    assert read.apply_async(kwargs={"entity_id": e, "name": "kept"}).get(TIMEOUT)["shape"] == [2]


def test_work_queued_before_a_redis_restart_is_served_after_it(tmp_path: Path,
                                                                settings: Settings) -> None:
    # Given a Redis with AOF and a producer that enqueues before any worker exists
    server = RedisServer(tmp_path / "redis").start()
    own = settings.replace(redis_url=server.url, data_dir=str(tmp_path / "data"))
    cluster = LocalCluster(own, gpus=1, backend="sim", flower=False)
    try:
        configure(own)
        assert cluster.ensure_shard_map()
        entities = [f"queued-{i}" for i in range(10)]
        for e in entities:
            alloc.apply_async(kwargs={"entity_id": e, "name": "x", "shape": [2]})
            write.apply_async(kwargs={"entity_id": e, "name": "x", "values": [1, 2]})
        reads = [read.apply_async(kwargs={"entity_id": e, "name": "x", "as_list": True})
                 for e in entities]
        # When Redis restarts, then the worker starts
        server.restart()
        cluster.start()
        # Then every queued request is served, in order, on the one GPU
        for result in reads:
            assert result.get(timeout=TIMEOUT)["values"] == [1.0, 2.0]
        # And a restart under a running worker: it reconnects and keeps serving
        server.restart()
        late = alloc.apply_async(kwargs={"entity_id": "late", "name": "y", "shape": [1]})
        assert late.get(timeout=TIMEOUT)["gpu"] == f"gpu.{NODE}.0"
    finally:
        cluster.stop()
        server.stop()
        configure(settings)


@pytest.fixture(autouse=True)
def _needs_the_session_cluster(cluster: LocalCluster) -> None:
    """Both tests configure the shared app; the session cluster must exist first."""


def test_a_worker_started_before_the_shard_map_serves_once_it_exists(
        spare_url: str, settings: Settings, tmp_path: Path) -> None:
    # Given a GPU worker started on a Redis with no shard map yet (systemd before init)
    own = settings.replace(redis_url=spare_url, data_dir=str(tmp_path))
    cluster = LocalCluster(own, gpus=1, backend="sim", flower=False)
    try:
        cluster.log_dir.mkdir(parents=True)
        cluster.workers.append(cluster.start_worker(0))
        cluster.wait_ready(60)
        # When the operator creates the map, then a producer sends work
        assert cluster.ensure_shard_map()
        configure(own)
        done = alloc.apply_async(kwargs={"entity_id": "early", "name": "x", "shape": [1]})
        # Then the worker serves it
        assert done.get(timeout=TIMEOUT)["gpu"] == f"gpu.{NODE}.0"
    finally:
        cluster.stop()
        configure(settings)


def test_a_gpu_that_fails_to_start_says_why_in_status_and_in_every_answer(
        spare_url: str, settings: Settings, tmp_path: Path) -> None:
    # Given a GPU whose boot fails (its generation counter in Redis is corrupt)
    own = settings.replace(redis_url=spare_url, data_dir=str(tmp_path))
    client = redis.Redis.from_url(spare_url)
    client.set(f"gpu-tasks:generation:gpu.{NODE}.0", "corrupt")
    cluster = LocalCluster(own, gpus=1, backend="sim", flower=False)
    try:
        cluster.log_dir.mkdir(parents=True)
        assert cluster.ensure_shard_map()
        cluster.workers.append(cluster.start_worker(0))
        # Then the fleet registry says it failed, and why
        registry = FleetRegistry(client)
        record = wait_until(lambda: registry.get(f"gpu.{NODE}.0"), timeout=60,
                            what=cluster.workers[0].log_tail)
        assert record.state == "failed"
        assert "not an integer" in record.error
        shown = gpu_tasks_cli("status", "--json", env={**os.environ, **own.to_env()})
        row = json.loads(shown.stdout)["gpus"][0]
        assert row["device"]["state"] == "failed"
        assert "its device failed to start" in row["problem"] and "not an integer" in row["problem"]
        # And a request gets that reason back instead of hanging
        configure(own)
        with pytest.raises(DeviceError, match=r"failed to start its device.*not an integer"):
            alloc.apply_async(kwargs={"entity_id": "e", "name": "x", "shape": [1]}).get(
                timeout=TIMEOUT)
    finally:
        cluster.stop()
        configure(settings)
