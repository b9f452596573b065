"""Live handoff: shards move between running GPUs with their queued work and their device
state while a producer keeps sending, checked by the history checker (tests/history.py);
the plan moves the fewest shards; a handoff interrupted at any step is finished by a re-run,
and one the target cannot hold is rolled back."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from celery.result import AsyncResult

from gpu_tasks.cluster import LocalCluster
from gpu_tasks.handoff import STEPS
from gpu_tasks.lease import LeaseStore
from gpu_tasks.rebalance import plan
from gpu_tasks.routing import shard_index
from gpu_tasks.settings import Settings
from gpu_tasks.shardmap import Shard, ShardMap, ShardMapStore
from gpu_tasks.tasks import alloc, read, stats, write
from tests import usertasks
from tests.conftest import NODE, REPO, gpu_tasks_cli, kill_worker, own_cluster, wait_until
from tests.history import check

TIMEOUT = 60
S = 16
GPU = [f"gpu.{NODE}.{i}" for i in range(3)]


# -- the plan ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [4, 8])
def test_adding_a_gpu_moves_about_one_share_and_balances_within_one(n: int) -> None:
    gpus = [f"gpu.a.{i}" for i in range(n)]
    shard_map = ShardMap.balanced(gpus, 1024)
    new = f"gpu.a.{n}"
    result = plan(shard_map, {*gpus, new}, set())
    moved = len(result.moves) / 1024
    assert moved <= 1.02 / (n + 1), moved
    assert all(m.target == new for m in result.moves)
    assert max(result.after.values()) - min(result.after.values()) <= 1
    assert result.after[new] == len(result.moves)


def test_a_drained_gpu_gives_up_every_shard_and_nothing_else_moves() -> None:
    gpus = ["gpu.a.0", "gpu.a.1", "gpu.a.2"]
    shard_map = ShardMap.balanced(gpus, 30)
    result = plan(shard_map, set(gpus), {"gpu.a.1"})
    assert sorted(m.shard for m in result.moves) == shard_map.consumed_by("gpu.a.1")
    assert {m.source for m in result.moves} == {"gpu.a.1"}
    assert result.after == {"gpu.a.0": 15, "gpu.a.1": 0, "gpu.a.2": 15}


def test_shares_follow_device_memory_when_asked() -> None:
    gpus = ["gpu.a.0", "gpu.a.1"]
    shard_map = ShardMap.balanced(gpus, 30)
    result = plan(shard_map, set(gpus), set(), by="memory",
                  memory={"gpu.a.0": 80 << 30, "gpu.a.1": 40 << 30})
    assert result.targets == {"gpu.a.0": 20, "gpu.a.1": 10}
    assert len(result.moves) == 5


def test_a_dead_gpus_shards_are_left_to_failover() -> None:
    shard_map = ShardMap.balanced(["gpu.a.0", "gpu.a.1"], 10)
    result = plan(shard_map, {"gpu.a.0"}, set())
    assert result.moves == []
    assert any("no live worker" in line for line in result.left_out)


# -- live handoffs under a streaming producer ----------------------------------------------


class Producer:
    """Sends steps 0, 1, 2, ... to each of ``entities`` from a thread, one round at a
    time, ``pause_s`` apart, until stopped; remembers every request."""

    def __init__(self, entities: list[str], pause_s: float = 0.1) -> None:
        self.entities = entities
        self.log = f"history:{uuid.uuid4().hex[:8]}"
        self.pause_s = pause_s
        self.sent: list[AsyncResult] = []
        self.steps = dict.fromkeys(entities, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="producer")

    def __enter__(self) -> Producer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.round()
            self._stop.wait(self.pause_s)

    def round(self) -> None:
        for e in self.entities:
            self.sent.append(usertasks.step.apply_async(
                kwargs={"entity_id": e, "log": self.log, "seq": self.steps[e]}))
            self.steps[e] += 1

    def verdict(self, client: redis.Redis) -> Any:
        for result in self.sent:
            result.get(timeout=TIMEOUT)
        return check(client.lrange(self.log, 0, -1), self.steps)


def cli(cluster: LocalCluster, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return gpu_tasks_cli(*args, env={**cluster.settings.child_env(), **env}, timeout=180)


def other_gpu(gpu: str | None) -> str:
    """The other of the two GPUs (the target of a move away from ``gpu``)."""
    return GPU[1] if gpu == GPU[0] else GPU[0]


def owner_of(client: redis.Redis, entity: str) -> Shard:
    """The entity's shard's entry, its version left out (it counts moves)."""
    shard_map = ShardMapStore(client).load()
    return replace(shard_map.shards[shard_index(entity, shard_map.shard_count)], version=0)


@pytest.fixture()
def two_gpus(settings: Settings, spare_url: str, tmp_path: Path) -> Iterator[LocalCluster]:
    with own_cluster(settings, spare_url, tmp_path, gpus=2, shard_count=S) as cluster:
        yield cluster


def test_shards_move_rebalance_and_drain_while_a_producer_streams(
        two_gpus: LocalCluster) -> None:
    cluster = two_gpus
    client = cluster.settings.redis_client()
    entities = [f"streamed-{i}" for i in range(50)]
    with Producer(entities) as producer:
        # Given requests streaming to 50 entities on two GPUs
        wait_until(lambda: client.llen(producer.log) >= 100, timeout=TIMEOUT)
        # When single shards move, each with its state
        for entity in entities[:2]:
            shard = owner_of(client, entity)
            target = other_gpu(shard.owner)
            moved = cli(cluster, "shards", "move", f"shard-{shard_index(entity, S)}", target,
                        "--json")
            assert moved.returncode == 0, moved.stdout + moved.stderr
            assert json.loads(moved.stdout)["handoffs"][0]["status"] == "moved"
            assert owner_of(client, entity) == Shard(target, "owned")
        # And a third GPU joins and the shards are rebalanced onto it
        cluster.workers.append(cluster.start_worker(2))
        wait_until(lambda: LeaseStore(client).get(GPU[2]), timeout=TIMEOUT)
        rebalanced = cli(cluster, "shards", "rebalance", "--json")
        assert rebalanced.returncode == 0, rebalanced.stdout + rebalanced.stderr
        outcome = json.loads(rebalanced.stdout)
        assert {h["status"] for h in outcome["handoffs"]} == {"moved"}
        assert {h["target"] for h in outcome["handoffs"]} == {GPU[2]}
        counts = ShardMapStore(client).load().summary()
        assert sorted(row["shards"] for row in counts.values()) == [5, 5, 6]
        # And GPU 0 is drained for maintenance
        drained = cli(cluster, "drain", GPU[0], "--json")
        assert drained.returncode == 0, drained.stdout + drained.stderr
        assert ShardMapStore(client).load().consumed_by(GPU[0]) == []
        wait_until(lambda: client.llen(producer.log) >= 50 * (max(producer.steps.values()) - 1),
                   timeout=TIMEOUT)
    # Then no request was lost, none ran twice, each entity's ran in order, and every step
    # found the counter exactly as the step before left it, wherever that ran
    verdict = producer.verdict(client)
    assert verdict.ok, str(verdict)
    assert verdict.executions == sum(producer.steps.values()) >= 500
    # And the drained GPU holds nothing, takes nothing, and says so
    assert stats.apply_async(queue=GPU[0]).get(TIMEOUT)["buffers"] == 0
    assert "takes shards again" in cli(cluster, "undrain", GPU[0]).stdout
    assert ShardMapStore(client).drained() == set()


def test_every_dtype_arrives_bit_for_bit_and_the_source_lets_go(two_gpus: LocalCluster) -> None:
    client = two_gpus.settings.redis_client()
    entity = "all-dtypes"
    rng = np.random.default_rng(3)
    sent = {}
    for dtype in ("float16", "float32", "float64", "int32", "int64", "uint8"):
        raw = rng.integers(0, 256, size=64 * np.dtype(dtype).itemsize, dtype=np.uint8)
        if dtype.startswith("float"):  # NaN payloads and infinities are bits too
            raw[:np.dtype(dtype).itemsize] = 0xFF
        sent[dtype] = raw.tobytes()
        alloc.apply_async(kwargs={"entity_id": entity, "name": dtype, "shape": [8, 8],
                                  "dtype": dtype}).get(TIMEOUT)
        write.apply_async(kwargs={"entity_id": entity, "name": dtype, "data_b64":
                                  base64.b64encode(sent[dtype]).decode()}).get(TIMEOUT)
    source = owner_of(client, entity).owner
    target = other_gpu(source)
    held_before = stats.apply_async(queue=source).get(TIMEOUT)["buffers"]
    moved = cli(two_gpus, "shards", "move", str(shard_index(entity, S)), target, "--json")
    assert moved.returncode == 0, moved.stderr
    handoff = json.loads(moved.stdout)["handoffs"][0]
    assert (handoff["entities"], handoff["buffers"]) == (1, 6)
    for dtype, raw in sent.items():
        got = read.apply_async(kwargs={"entity_id": entity, "name": dtype}).get(TIMEOUT)
        assert got["gpu"] == target and got["dtype"] == dtype and got["shape"] == [8, 8]
        assert base64.b64decode(got["data_b64"]) == raw, dtype
    wait_until(lambda: stats.apply_async(queue=source).get(TIMEOUT)["buffers"]
               == held_before - 6, timeout=10)
    assert not list(client.scan_iter(match=f"gpu-tasks:handoff:{handoff['handoff']}:*"))


def test_a_target_that_cannot_hold_the_state_leaves_the_shard_where_it_was(
        settings: Settings, spare_url: str, tmp_path: Path) -> None:
    with own_cluster(settings, spare_url, tmp_path, gpus=2, shard_count=S,
                     sim_memory_bytes=8 << 20) as cluster:
        client = cluster.settings.redis_client()
        entity = "too-big"
        source = owner_of(client, entity).owner
        target = other_gpu(source)
        filler = next(f"filler-{i}" for i in range(1000)
                      if owner_of(client, f"filler-{i}").owner == target)
        alloc.apply_async(kwargs={"entity_id": filler, "name": "f", "shape": [6 << 20],
                                  "dtype": "uint8"}).get(TIMEOUT)
        alloc.apply_async(kwargs={"entity_id": entity, "name": "x", "shape": [5 << 20],
                                  "dtype": "uint8"}).get(TIMEOUT)
        write.apply_async(kwargs={"entity_id": entity, "name": "x", "values": [7, 8]}).get(
            TIMEOUT)
        moved = cli(cluster, "shards", "move", f"shard-{shard_index(entity, S)}", target,
                    "--json")
        assert moved.returncode == 1
        handoff = json.loads(moved.stdout)["handoffs"][0]
        assert handoff["status"] == "rolled back"
        assert "OutOfMemory" in handoff["message"] and f"stays on {source}" in (
            handoff["message"])
        assert owner_of(client, entity) == Shard(source, "owned")
        got = read.apply_async(kwargs={"entity_id": entity, "name": "x", "as_list": True,
                                       "count": 3})
        assert got.get(TIMEOUT)["values"] == [7, 8, 0]
        assert stats.apply_async(queue=target).get(TIMEOUT)["entities"] == 1  # the filler


# -- interrupted handoffs ------------------------------------------------------------------


def start_paused(cluster: LocalCluster, step: str, shard: int, target: str
                 ) -> subprocess.Popen[str]:
    """`shards move` that pauses after ``step``; returns once it is paused there."""
    env = {**cluster.settings.child_env(), "GPU_TASKS_HANDOFF_PAUSE": f"{step}:60"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "gpu_tasks.cli", "shards", "move", f"shard-{shard}", target],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert driver.stderr is not None
    for line in driver.stderr:
        if f"after step {step}" in line:
            return driver
    raise AssertionError(f"the driver never paused at {step}: {driver.wait()}")


@pytest.mark.parametrize("step", STEPS)
def test_a_handoff_whose_driver_is_killed_at_any_step_is_finished_by_a_rerun(
        two_gpus: LocalCluster, step: str) -> None:
    cluster = two_gpus
    client = cluster.settings.redis_client()
    entity = f"interrupted-{step}"
    index = shard_index(entity, S)
    producer = Producer([entity])
    producer.round()
    producer.round()
    source = owner_of(client, entity).owner
    target = other_gpu(source)
    # When the driver is SIGKILLed after the step, with requests sent meanwhile
    driver = start_paused(cluster, step, index, target)
    producer.round()
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    # Then the map says where the handoff stands, and no shard has two consumers
    shown = json.loads(cli(cluster, "shards", "show", "--json").stdout)
    entry = shown["shards"][f"shard-{index}"]
    assert entry["state"] == {"releasing": "releasing", "exported": "releasing",
                              "importing": "importing", "imported": "importing",
                              "owned": "owned"}[step], entry
    # And running the command again finishes it
    again = cli(cluster, "shards", "move", f"shard-{index}", target, "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    assert owner_of(client, entity) == Shard(target, "owned")
    producer.round()
    verdict = producer.verdict(client)
    assert verdict.ok and verdict.executions == 4, str(verdict)


def test_a_target_killed_during_the_import_leaves_the_shard_with_its_source(
        two_gpus: LocalCluster) -> None:
    cluster = two_gpus
    client = cluster.settings.redis_client()
    entity = "target-dies"
    index = shard_index(entity, S)
    producer = Producer([entity])
    producer.round()
    source = owner_of(client, entity).owner
    assert source is not None
    target_index = 1 if source == GPU[0] else 0
    target = GPU[target_index]
    driver = start_paused(cluster, "importing", index, target)
    cluster.workers[target_index].signal_group(signal.SIGKILL)
    cluster.workers[target_index].popen.wait(10)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    again = cli(cluster, "shards", "move", f"shard-{index}", target, "--json")
    assert again.returncode == 1
    assert json.loads(again.stdout)["handoffs"][0]["status"] == "rolled back"
    assert owner_of(client, entity) == Shard(source, "owned")
    producer.round()
    # And the source kept the entity's state: the second step found the first's counter
    verdict = producer.verdict(client)
    assert verdict.ok and verdict.executions == 2, str(verdict)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("victim", ["source", "target"])
def test_a_gpu_killed_at_any_step_of_a_handoff_loses_nothing_silently(
        two_gpus: LocalCluster, victim: str, step: str) -> None:
    cluster = two_gpus
    client = cluster.settings.redis_client()
    entity = f"{victim}-dies-{step}"
    index = shard_index(entity, S)
    producer = Producer([entity])
    producer.round()
    producer.round()
    source = owner_of(client, entity).owner
    target = other_gpu(source)
    dead = source if victim == "source" else target
    # When the GPU dies while the handoff is paused after the step, and the driver too
    driver = start_paused(cluster, step, index, target)
    kill_worker(cluster, GPU.index(dead))
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    producer.round()
    # And the operator runs the move again, then fails the dead GPU over
    gpu_tasks_cli("shards", "move", str(index), target, env=cluster.settings.child_env())
    failed_over = gpu_tasks_cli("shards", "failover", dead, env=cluster.settings.child_env())
    assert failed_over.returncode == 0, failed_over.stdout + failed_over.stderr
    producer.round()
    # Then the shard is on the GPU that lives, every request ran once and in order, and
    # state was lost only where it died with its GPU: and then it was said so
    survivor = target if dead == source else source
    assert owner_of(client, entity) == Shard(survivor, "owned")
    verdict = producer.verdict(client)
    assert verdict.ok and verdict.executions == 4, str(verdict)
    state_died = (victim == "source" and step in ("releasing", "exported")) or (
        victim == "target" and step == "owned")
    assert bool(verdict.reported_losses) == state_died, str(verdict)


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
