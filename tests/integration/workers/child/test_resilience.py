"""Nothing accepted is lost: a pool child killed mid-task, a restarted Redis."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from gpu_tasks.app import configure
from gpu_tasks.control.fleet import FleetRegistry
from gpu_tasks.control.shardmap import ShardMapStore
from gpu_tasks.control.unacked import mark_redelivered
from gpu_tasks.errors import (
    BrokerUnavailable,
    DeviceError,
    EntityStateLost,
    NoSuchBuffer,
    TaskTimeLimitExceeded,
)
from gpu_tasks.local.cluster import LocalCluster
from gpu_tasks.local.redis_server import RedisServer
from gpu_tasks.protocol.routing import shard_index, shard_name
from gpu_tasks.settings import Settings
from gpu_tasks.tasks import alloc, free, read, stats, write
from tests import usertasks
from tests.conftest import NODE, entity_on, gpu_tasks_cli, own_redis_cluster, wait_until
from tests.support.messages import raw_task_message

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


@pytest.mark.slow  # a Redis restart under a cluster of its own
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
        # And status says so: it names the problem while the worker holds its lease (on a
        # loaded machine the 3 s lease of this test can lapse for a moment)
        def status_row() -> dict[str, Any]:
            shown = gpu_tasks_cli("status", "--json", env={**os.environ, **own.to_env()})
            return dict(json.loads(shown.stdout)["gpus"][0])

        row = wait_until(lambda: (r := status_row())["problem"] and r, timeout=30,
                         what=lambda: str(status_row()))
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


# -- a Redis blip, redelivery, time limits ------------------------------------------------


def _running(client: redis.Redis, log: str) -> bool:
    return bool(client.get(f"{log}:running"))


def _unacked(client: redis.Redis, gpu: int = 0) -> int:
    """Requests GPU ``gpu`` has taken and not acknowledged."""
    return int(client.hlen(f"gpu-tasks:unacked:gpu.{NODE}.{gpu}"))


def _generation(gpu: int = 0) -> int:
    return int(stats.apply_async(queue=f"gpu.{NODE}.{gpu}").get(timeout=TIMEOUT)["generation"])


@pytest.mark.slow  # Redis restarted or frozen for 3 s, a cluster each
@pytest.mark.parametrize("blip", ["restart", "pause"])
def test_a_redis_blip_under_a_running_task_keeps_the_device_state(
        blip: str, tmp_path: Path, settings: Settings) -> None:
    # Given a worker holding an entity's buffer and running a request of that entity
    with own_redis_cluster(settings, tmp_path, 1, redis_timeout_s=2.0) as (server, _):
        client = redis.Redis.from_url(server.url)
        alloc.apply_async(kwargs={"entity_id": "e", "name": "x", "shape": [2]}).get(TIMEOUT)
        write.apply_async(kwargs={"entity_id": "e", "name": "x", "values": [1, 2]}).get(TIMEOUT)
        before = _generation()
        pending = usertasks.record.apply_async(kwargs={"entity_id": "e", "log": "ran",
                                                       "seconds": 3.0})
        wait_until(lambda: _running(client, "ran"), timeout=TIMEOUT, what="never started")
        # When Redis goes away for a moment (restarted, or frozen for 3 s)
        if blip == "restart":
            server.restart()
        else:
            server.pause()
            time.sleep(3.0)  # the fault itself lasts 3 s: nothing to wait for
            server.resume()
        # Then the running request finishes, once, on the same pool child
        result = wait_until(lambda: _result_or_none(pending), timeout=TIMEOUT,
                            what="the running request never finished")
        assert result["generation"] == before
        assert client.lrange("ran", 0, -1) == [b"e:0"]
        # And the GPU kept the entity's buffer, with its values
        assert _generation() == before
        kept = read.apply_async(kwargs={"entity_id": "e", "name": "x", "as_list": True})
        assert kept.get(timeout=TIMEOUT)["values"] == [1.0, 2.0]
        # And nothing is left behind to run again later
        wait_until(lambda: not _unacked(client), timeout=TIMEOUT,
                   what="an answered request is still unacknowledged")
        assert client.lrange("ran", 0, -1) == [b"e:0"]


def _result_or_none(pending: Any) -> Any:
    """The request's result once it has one; None while Redis is still away or it runs."""
    try:
        return pending.get(timeout=2)
    except (BrokerUnavailable, CeleryTimeoutError):
        return None


@pytest.mark.parametrize("copy", ["redelivered", "sent twice"])
def test_a_second_copy_of_a_request_that_completed_is_answered_again_not_run_twice(
        copy: str, cluster: LocalCluster, client: redis.Redis) -> None:
    # Given a scale that completed on GPU 0, and a second copy of its message: Redis delivers
    # it again (the worker lost Redis as it stored the result, which never arrived), or a
    # producer sent it twice (its publish to a hung Redis timed out and was retried)
    e = entity_on(cluster, 0, f"copied-{copy.replace(' ', '-')}")
    alloc.apply_async(kwargs={"entity_id": e, "name": "x", "shape": [1]}).get(TIMEOUT)
    write.apply_async(kwargs={"entity_id": e, "name": "x", "values": [3]}).get(TIMEOUT)
    before = _generation()
    queue = shard_name(shard_index(e, ShardMapStore(client).shard_count()))
    kwargs = {"entity_id": e, "kernel": "scale", "x": "x", "alpha": 2.0}
    task_id, message = raw_task_message("gpu_tasks.run", kwargs, queue)
    client.lpush(queue, message)
    first = AsyncResult(task_id).get(timeout=TIMEOUT)
    payload = json.loads(message)
    if copy == "redelivered":
        client.delete(f"celery-task-meta-{task_id}")
        mark_redelivered(payload)  # as kombu's restore marks it
    # When the copy arrives
    client.lpush(queue, json.dumps(payload))
    wait_until(lambda: client.llen(queue) == 0 and not _unacked(client), timeout=TIMEOUT,
               what="the copy was never taken")
    # Then it is answered with the same result, and the buffer was scaled once, not twice
    assert AsyncResult(task_id).get(timeout=TIMEOUT) == first
    kept = read.apply_async(kwargs={"entity_id": e, "name": "x", "as_list": True})
    assert kept.get(timeout=TIMEOUT)["values"] == [6.0]
    assert _generation() == before


def test_a_redelivered_free_of_a_buffer_already_gone_succeeds(
        cluster: LocalCluster, client: redis.Redis) -> None:
    # Given an entity whose buffer a first delivery of a free already freed
    e = entity_on(cluster, 1, "freed-twice")
    alloc.apply_async(kwargs={"entity_id": e, "name": "x", "shape": [1]}).get(TIMEOUT)
    free.apply_async(kwargs={"entity_id": e, "name": "x"}).get(TIMEOUT)
    queue = shard_name(shard_index(e, ShardMapStore(client).shard_count()))
    # When the free is delivered again, then it succeeds: the buffer is gone, as asked
    task_id, message = raw_task_message("gpu_tasks.free", {"entity_id": e, "name": "x"}, queue)
    payload = json.loads(message)
    mark_redelivered(payload)
    client.lpush(queue, json.dumps(payload))
    again = AsyncResult(task_id).get(timeout=TIMEOUT)
    assert again["freed"] == [] and again["already_gone"] == ["x"]
    # And a free of a buffer that never existed, delivered once, is still an error
    with pytest.raises(NoSuchBuffer, match="'x'"):
        free.apply_async(kwargs={"entity_id": e, "name": "x"}).get(timeout=TIMEOUT)


def test_a_request_past_its_soft_time_limit_is_stopped_and_the_gpu_keeps_its_buffers(
        cluster: LocalCluster) -> None:
    # Given an entity with a buffer on GPU 2
    e = entity_on(cluster, 2, "soft-limit")
    alloc.apply_async(kwargs={"entity_id": e, "name": "kept", "shape": [2]}).get(TIMEOUT)
    before = _generation(2)
    # When one of its requests runs past its soft time limit
    slow = usertasks.slow.apply_async(kwargs={"entity_id": e, "seconds": 30, "marker": "m"},
                                      soft_time_limit=1, time_limit=20)
    # Then it is stopped there and answered with a typed error naming the limit
    with pytest.raises(TaskTimeLimitExceeded, match=r"soft time limit \(1 s\)") as raised:
        slow.get(timeout=TIMEOUT)
    assert raised.value.soft and raised.value.limit_s == 1.0
    # And the pool child, and every buffer, stayed
    assert _generation(2) == before
    names = read.apply_async(kwargs={"entity_id": e, "name": "kept"}).get(TIMEOUT)
    assert names["shape"] == [2]
    assert read.apply_async(kwargs={"entity_id": e, "name": "m"}).get(TIMEOUT)["shape"] == [1]


def test_a_request_past_its_hard_time_limit_is_answered_and_the_loss_is_named(
        cluster: LocalCluster) -> None:
    # Given an entity with a buffer on GPU 3
    e = entity_on(cluster, 3, "hard-limit")
    alloc.apply_async(kwargs={"entity_id": e, "name": "kept", "shape": [2]}).get(TIMEOUT)
    before = _generation(3)
    # When one of its requests runs past its hard time limit (no soft limit before it)
    slow = usertasks.slow.apply_async(kwargs={"entity_id": e, "seconds": 30, "marker": "m"},
                                      time_limit=1.5, soft_time_limit=1000)
    # Then it is answered with a typed error saying what the GPU lost
    with pytest.raises(TaskTimeLimitExceeded, match=r"hard time limit \(1.5 s\).*were lost"
                       ) as raised:
        slow.get(timeout=TIMEOUT)
    assert not raised.value.soft
    # And the GPU serves again, from a fresh pool child, naming what was lost
    assert wait_until(lambda: _generation(3) > before, timeout=TIMEOUT)
    with pytest.raises(EntityStateLost, match="'kept'"):
        read.apply_async(kwargs={"entity_id": e, "name": "kept"}).get(timeout=TIMEOUT)


