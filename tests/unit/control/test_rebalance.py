"""The rebalance plan: adding, draining and weighting GPUs moves the fewest shards, and a dead
GPU's shards are left to failover."""

from __future__ import annotations

import pytest

from gpu_tasks.control.rebalance import plan
from gpu_tasks.control.shardmap import ShardMap


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
