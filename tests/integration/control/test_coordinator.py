"""The coordinator: one acts at a time, it fails a dead GPU over and rebalances when it returns,
finishes handoffs whose driver died, and one killed at any step of its handoff is replaced by
another."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from gpu_tasks.app import app
from gpu_tasks.control.coordinator import Coordinator
from gpu_tasks.control.handoff import STEPS
from gpu_tasks.control.lease import LeaseStore
from gpu_tasks.control.shardmap import Shard, ShardMap, ShardMapStore
from gpu_tasks.protocol.routing import shard_index
from gpu_tasks.settings import Settings
from gpu_tasks.tasks import alloc, read
from tests.conftest import (
    REPO,
    entity_owned_by,
    gpu_tasks_cli,
    kill_worker,
    own_cluster,
    wait_until,
)
from tests.support.handoff import GPU, TIMEOUT, Producer, S, cli, owner_of, start_paused

GPU0, GPU1 = GPU[0], GPU[1]


@pytest.mark.slow  # a kill -9 at each step, a cluster each
@pytest.mark.parametrize("step", STEPS)
def test_a_coordinator_killed_at_any_step_of_its_handoff_is_replaced_by_another(
        settings: Settings, spare_url: str, tmp_path: Path, step: str) -> None:
    # Given both shards of S=2 on GPU 0 and an empty GPU 1: a rebalance moves one, the one
    # holding less state, which is the streamed entity's
    client = redis.Redis.from_url(spare_url)
    ShardMapStore(client).create(ShardMap.balanced([GPU[0]], 2))
    small = next(f"light-{i}" for i in range(100) if shard_index(f"light-{i}", 2) == 0)
    heavy = next(f"heavy-{i}" for i in range(100) if shard_index(f"heavy-{i}", 2) == 1)
    with own_cluster(settings, spare_url, tmp_path, gpus=2, shard_count=2) as cluster:
        alloc.apply_async(kwargs={"entity_id": heavy, "name": "h", "shape": [4096]}).get(
            TIMEOUT)
        producer = Producer([small])
        producer.round()
        env = {**cluster.settings.child_env(), "GPU_TASKS_HANDOFF_PAUSE": f"{step}:60"}
        boss = subprocess.Popen(
            [sys.executable, "-m", "gpu_tasks.cli", "coordinator", "--auto-rebalance",
             "--interval", "0.2"], env=env, cwd=REPO, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        assert boss.stdout is not None
        for line in boss.stdout:
            if f"after step {step}" in line:
                break
        # When the coordinator is SIGKILLed there, with requests sent meanwhile
        boss.send_signal(signal.SIGKILL)
        boss.wait()
        producer.round()
        # Then another coordinator takes the lease over once it expires, and finishes it
        wait_until(lambda: not client.exists("gpu-tasks:coordinator"),
                   timeout=cluster.settings.lease_ttl_s * 6)
        tick = json.loads(cli(cluster, "coordinator", "--once").stdout)
        assert tick["acting"], tick
        assert owner_of(client, small) == Shard(GPU[1], "owned"), tick
        producer.round()
        verdict = producer.verdict(client)
        assert verdict.ok and verdict.executions == 3 and not verdict.reported_losses, (
            str(verdict))


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
