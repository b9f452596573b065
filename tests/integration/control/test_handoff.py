"""Live handoff: shards move between running GPUs with their queued work and their device
state while a producer keeps sending, checked by the history checker
(tests/support/history.py); a move the target cannot hold is rolled back. The plan is in
tests/unit/control/test_rebalance.py, interrupted handoffs in test_handoff_interrupted.py and
test_handoff_gpu_killed.py."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from gpu_tasks.control.lease import LeaseStore
from gpu_tasks.control.shardmap import Shard, ShardMapStore
from gpu_tasks.local.cluster import LocalCluster
from gpu_tasks.protocol.routing import shard_index
from gpu_tasks.settings import Settings
from gpu_tasks.tasks import alloc, read, stats, write
from tests.conftest import own_cluster, wait_until
from tests.support.handoff import GPU, TIMEOUT, Producer, S, cli, other_gpu, owner_of


@pytest.mark.slow  # moves, a rebalance and a drain under a stream
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
