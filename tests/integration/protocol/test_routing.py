"""Routing against a real Redis: a router reads S once; `gpu-tasks route` agrees with the
vectors whatever the process's hash seed."""

from __future__ import annotations

import json
import os
from typing import Any

from gpu_tasks.control.shardmap import ShardMap, ShardMapStore
from gpu_tasks.protocol.routing import (
    EntityRouter,
)
from tests.conftest import VECTORS_FILE, gpu_tasks_cli

VECTORS: list[dict[str, Any]] = json.loads(VECTORS_FILE.read_text())["vectors"]

def test_the_router_needs_only_s_read_once(spare_url: str) -> None:
    # Given a 7-shard map over three GPUs, and a router counting its reads of S
    import redis

    ShardMapStore(redis.Redis.from_url(spare_url)).create(
        ShardMap.balanced(["gpu.a.0", "gpu.a.1", "gpu.b.0"], 7))
    reads = []

    def shard_count() -> int:
        reads.append(1)
        return ShardMapStore(redis.Redis.from_url(spare_url)).shard_count()

    router = EntityRouter(shard_count)
    for vector in VECTORS:
        # When routing each vector's entity
        route = router.route(vector["entity_id"])
        # Then the shard is the vector's and the queue is the shard's own name
        assert route.shard == route.queue == vector["shard_7"]
        assert router("gpu_tasks.alloc", (), {"entity_id": vector["entity_id"]}, {}) == (
            vector["shard_7"])
    # And S was read once, whatever happens to the map afterwards
    redis.Redis.from_url(spare_url).flushdb()
    assert router("x.y", (), {"entity_id": "user-42"}, {}) == "shard-5"
    assert len(reads) == 1


def test_route_cli_gives_the_same_answer_whatever_the_hash_seed(spare_url: str) -> None:
    # Given a 1024-shard map and the CLI run under different PYTHONHASHSEEDs
    import redis

    ShardMapStore(redis.Redis.from_url(spare_url)).create(
        ShardMap.balanced(["gpu.n.0", "gpu.n.1", "gpu.n.2", "gpu.n.3"], 1024))
    ShardMapStore(redis.Redis.from_url(spare_url)).assign({129: "gpu.n.3"})
    entities = [v["entity_id"] for v in VECTORS]
    answers = []
    for seed in ("0", "1", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "GPU_TASKS_REDIS_URL": spare_url}
        done = gpu_tasks_cli("route", "--json", *entities, env=env)
        assert done.returncode == 0, done.stderr
        answers.append(json.loads(done.stdout))
    # Then every process agrees, and agrees with the vectors
    assert all(a == answers[0] for a in answers)
    for row, vector in zip(answers[0], VECTORS, strict=True):
        assert set(row) == {"entity_id", "shard", "shard_index", "queue", "owner"}
        assert row["entity_id"] == vector["entity_id"]
        assert row["shard"] == row["queue"] == vector["shard_1024"]
        assert row["shard"] == f"shard-{row['shard_index']}"
        # The owner is the map's now: shard-129 (user-42's) was moved to gpu.n.3
        owner = "gpu.n.3" if row["shard_index"] == 129 else f"gpu.n.{row['shard_index'] % 4}"
        assert row["owner"] == owner


def test_route_cli_without_a_shard_map_says_how_to_make_one(spare_url: str) -> None:
    env = {**os.environ, "GPU_TASKS_REDIS_URL": spare_url}
    done = gpu_tasks_cli("route", "user-42", env=env)
    assert done.returncode == 1
    assert "no shard map" in done.stderr and "shards init" in done.stderr


def test_route_cli_refuses_an_empty_entity(spare_url: str) -> None:
    env = {**os.environ, "GPU_TASKS_REDIS_URL": spare_url}
    done = gpu_tasks_cli("route", "", env=env)
    assert done.returncode == 1
    assert "entity_id must be a non-empty string" in done.stderr
