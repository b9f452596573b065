"""Failover and the coordinator: a dead GPU's shards go to live GPUs, the requests it had
taken run first there, the state it held is reported lost; one coordinator acts at a time,
finishes handoffs whose driver died, and rebalances onto a GPU that comes back."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from gpu_tasks.app import app
from gpu_tasks.coordinator import Coordinator
from gpu_tasks.errors import EntityStateLost
from gpu_tasks.lease import LeaseStore
from gpu_tasks.routing import shard_index
from gpu_tasks.settings import Settings
from gpu_tasks.shardmap import Shard, ShardMapStore
from gpu_tasks.tasks import alloc, read, write
from tests import usertasks
from tests.conftest import (
    NODE,
    REPO,
    entity_owned_by,
    gpu_tasks_cli,
    kill_worker,
    own_cluster,
    wait_until,
)
from tests.test_handoff import start_paused

TIMEOUT = 60
S = 16
GPU0, GPU1 = f"gpu.{NODE}.0", f"gpu.{NODE}.1"


def test_a_killed_gpus_shards_go_to_a_live_one_with_its_unfinished_work_first(
        settings: Settings, spare_url: str, tmp_path: Path) -> None:
    with own_cluster(settings, spare_url, tmp_path, gpus=2, shard_count=S) as cluster:
        client = cluster.settings.redis_client()
        env = cluster.settings.child_env()
        # Given an entity with state on GPU 0, whose worker is running a slow request of it
        # with more queued behind
        entity = entity_owned_by(client, GPU0, "dies")
        alloc.apply_async(kwargs={"entity_id": entity, "name": "x", "shape": [2]}).get(TIMEOUT)
        write.apply_async(kwargs={"entity_id": entity, "name": "x", "values": [5, 6]}).get(
            TIMEOUT)
        log = f"executions:{uuid.uuid4().hex[:8]}"
        slow = usertasks.record.apply_async(kwargs={"entity_id": entity, "log": log,
                                                    "seq": 0, "seconds": 30})
        queued = [usertasks.record.apply_async(kwargs={"entity_id": entity, "log": log,
                                                       "seq": n}) for n in range(1, 6)]
        wait_until(lambda: client.get(f"{log}:running"), timeout=TIMEOUT)
        # When GPU 0's whole worker is SIGKILLed, and the operator fails it over by hand
        kill_worker(cluster, 0)
        done = gpu_tasks_cli("shards", "failover", GPU0, "--json", env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        assert report["requeued"] == 1 and report["lost_buffers"] == 1
        assert set(report["moved"].values()) == {GPU1}
        # Then GPU 1 owns every shard, and runs the request GPU 0 had taken first
        assert ShardMapStore(client).load().consumed_by(GPU1) == list(range(S))
        for result in [slow, *queued]:
            assert result.get(timeout=TIMEOUT)["gpu"] == GPU1
        assert [x.decode() for x in client.lrange(log, 0, -1)] == [
            f"{entity}:{n}" for n in range(6)]
        # And the state that died with GPU 0 is reported, not hidden
        with pytest.raises(EntityStateLost, match=f"when {GPU0} died") as lost:
            read.apply_async(kwargs={"entity_id": entity, "name": "x"}).get(TIMEOUT)
        assert (lost.value.entity_id, lost.value.buffer, lost.value.gpu) == (entity, "x", GPU0)
        alloc.apply_async(kwargs={"entity_id": entity, "name": "x", "shape": [2]}).get(TIMEOUT)
        assert read.apply_async(kwargs={"entity_id": entity, "name": "x", "as_list": True}
                                ).get(TIMEOUT)["values"] == [0.0, 0.0]


def test_failover_is_refused_while_the_gpu_has_a_live_worker(
        settings: Settings, spare_url: str, tmp_path: Path) -> None:
    with own_cluster(settings, spare_url, tmp_path, gpus=2, shard_count=S) as cluster:
        done = gpu_tasks_cli("shards", "failover", GPU0, env=cluster.settings.child_env())
        assert done.returncode == 1 and "has a live worker" in done.stderr
        assert "drain it instead" in done.stderr


def test_two_coordinators_never_act_at_once(spare_url: str) -> None:
    client = redis.Redis.from_url(spare_url)
    first = Coordinator(client, app, lease_ttl_s=5)
    second = Coordinator(client, app, lease_ttl_s=5)
    assert first.holds_lease() and not second.holds_lease()
    assert second.tick().acting is False
    assert first.holds_lease()  # renewing its own lease
    first.release()
    assert second.holds_lease() and not first.holds_lease()


def test_the_coordinator_fails_over_a_dead_gpu_and_rebalances_when_it_returns(
        settings: Settings, spare_url: str, tmp_path: Path) -> None:
    with own_cluster(settings, spare_url, tmp_path, gpus=2, shard_count=S) as cluster:
        client = cluster.settings.redis_client()
        env = cluster.settings.child_env()
        boss = subprocess.Popen(
            [sys.executable, "-m", "gpu_tasks.cli", "coordinator", "--failover-after", "1",
             "--auto-rebalance", "--interval", "0.2"], env=env, cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            entity = entity_owned_by(client, GPU0, "coordinated")
            # When GPU 0's worker dies with a request for one of its entities waiting
            kill_worker(cluster, 0)
            died = time.monotonic()
            waiting = alloc.apply_async(kwargs={"entity_id": entity, "name": "y",
                                                "shape": [1]})
            # Then once its lease has expired for --failover-after, GPU 1 serves its shards
            assert waiting.get(timeout=TIMEOUT)["gpu"] == GPU1
            took = time.monotonic() - died
            assert took < cluster.settings.lease_ttl_s + 1 + 5, took
            # And when GPU 0 comes back it rejoins empty, and the coordinator gives it shards
            cluster.workers[0] = cluster.start_worker(0)
            wait_until(lambda: LeaseStore(client).get(GPU0), timeout=TIMEOUT)
            wait_until(lambda: len(ShardMapStore(client).load().consumed_by(GPU0)) == S // 2,
                       timeout=TIMEOUT)
        finally:
            boss.send_signal(signal.SIGTERM)
            out = boss.communicate(timeout=30)[0]
        assert boss.returncode == 0, out
        assert "failed over" in out and f"rebalancing onto {GPU0}" in out


def test_the_coordinator_finishes_a_handoff_whose_driver_died(
        settings: Settings, spare_url: str, tmp_path: Path) -> None:
    with own_cluster(settings, spare_url, tmp_path, gpus=2, shard_count=S) as cluster:
        client = cluster.settings.redis_client()
        entity = entity_owned_by(client, GPU0, "orphaned")
        index = shard_index(entity, S)
        alloc.apply_async(kwargs={"entity_id": entity, "name": "x", "shape": [1]}).get(TIMEOUT)
        driver = start_paused(cluster, "exported", index, GPU1)
        assert ShardMapStore(client).load().shards[index].state == "releasing"
        # While its driver lives, a re-run leaves the handoff alone and says so
        busy = gpu_tasks_cli("shards", "move", str(index), GPU1,
                             env=cluster.settings.child_env())
        assert busy.returncode == 1 and "being driven by another process" in busy.stdout
        # Once the driver is gone (SIGKILL: known at once on this host), a coordinator
        # round finishes the handoff
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        tick = json.loads(gpu_tasks_cli("coordinator", "--once",
                                        env=cluster.settings.child_env()).stdout)
        assert tick["acting"] and [h["status"] for h in tick["handoffs"]] == ["moved"]
        assert ShardMapStore(client).load().shards[index] == Shard(GPU1, "owned", version=1)
        assert read.apply_async(kwargs={"entity_id": entity, "name": "x"}).get(
            TIMEOUT)["gpu"] == GPU1
