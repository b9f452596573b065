"""Routing: entity -> shard (the contract's xxh64) -> GPU queue."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import xxhash

from gpu_tasks.errors import RoutingError
from gpu_tasks.routing import EntityRouter, shard_index, shard_name, validate_entity_id
from gpu_tasks.shardmap import ShardMap, ShardMapCache, ShardMapStore
from tests.conftest import gpu_tasks_cli

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "data" / "routing-vectors.json").read_text())["vectors"]


def test_the_vector_file_is_the_full_set() -> None:
    assert len(VECTORS) == 40
    assert all({"entity_id", "xxh64", "shard_1024", "shard_256", "shard_7"} <= v.keys()
               for v in VECTORS)


@pytest.mark.parametrize("vector", VECTORS, ids=[str(i) for i in range(len(VECTORS))])
def test_every_routing_vector(vector: dict[str, Any]) -> None:
    entity = vector["entity_id"]
    assert xxhash.xxh64_intdigest(entity.encode("utf-8")) == vector["xxh64"]
    for count in (1024, 256, 7):
        assert shard_name(shard_index(entity, count)) == vector[f"shard_{count}"]


@pytest.mark.parametrize("bad", ["", None, 42, 4.2, b"user-42", ["user-42"], {"id": 1}])
def test_unusable_entity_ids_are_refused_with_a_clear_error(bad: object) -> None:
    with pytest.raises(RoutingError, match="entity_id must be a non-empty string"):
        validate_entity_id(bad)


def test_router_uses_the_shard_map_in_redis(spare_url: str) -> None:
    # Given a 7-shard map over three queues
    import redis

    ShardMapStore(redis.Redis.from_url(spare_url)).create(
        ShardMap.balanced(["gpu.a.0", "gpu.a.1", "gpu.b.0"], 7))
    router = EntityRouter(ShardMapCache(spare_url))
    for vector in VECTORS:
        # When routing each vector's entity
        route = router.route(vector["entity_id"])
        # Then the shard is the vector's and the queue is that shard's owner
        assert route.shard == vector["shard_7"]
        assert route.queue == ["gpu.a.0", "gpu.a.1", "gpu.b.0"][route.shard_index % 3]
        assert router("gpu_tasks.alloc", (), {"entity_id": vector["entity_id"]}, {}) == (
            route.queue)


def test_route_cli_gives_the_same_answer_whatever_the_hash_seed(spare_url: str) -> None:
    # Given a 1024-shard map and the CLI run under different PYTHONHASHSEEDs
    import redis

    ShardMapStore(redis.Redis.from_url(spare_url)).create(
        ShardMap.balanced(["gpu.n.0", "gpu.n.1", "gpu.n.2", "gpu.n.3"], 1024))
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
        assert set(row) == {"entity_id", "shard", "shard_index", "queue"}
        assert row["entity_id"] == vector["entity_id"]
        assert row["shard"] == vector["shard_1024"] == f"shard-{row['shard_index']}"
        assert row["queue"] == f"gpu.n.{row['shard_index'] % 4}"


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
