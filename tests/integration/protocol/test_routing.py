"""Routing: entity -> shard (the contract's xxh64) -> the shard's queue, with no map."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import xxhash

from gpu_tasks.errors import RoutingError
from gpu_tasks.routing import (
    EntityRouter,
    parse_gpu_queue,
    parse_shard_queue,
    shard_index,
    shard_name,
    validate_entity_id,
)
from gpu_tasks.shardmap import ShardMap, ShardMapStore
from tests.conftest import gpu_tasks_cli

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "data" / "routing-vectors.json").read_text())["vectors"]


def test_the_vector_file_is_the_full_set() -> None:
    assert len(VECTORS) == 40
    assert all({"entity_id", "xxh64", "xxh64_hex", "shard_1024", "shard_256", "shard_7"}
               <= v.keys() for v in VECTORS)


@pytest.mark.parametrize("vector", VECTORS, ids=[str(i) for i in range(len(VECTORS))])
def test_every_routing_vector(vector: dict[str, Any]) -> None:
    entity = vector["entity_id"]
    assert xxhash.xxh64_intdigest(entity.encode("utf-8")) == vector["xxh64"]
    assert xxhash.xxh64_hexdigest(entity.encode("utf-8")) == vector["xxh64_hex"]
    assert int(vector["xxh64_hex"], 16) == vector["xxh64"]
    for count in (1024, 256, 7):
        assert shard_name(shard_index(entity, count)) == vector[f"shard_{count}"]


@pytest.mark.parametrize("bad", ["", None, 42, 4.2, b"user-42", ["user-42"], {"id": 1}])
def test_unusable_entity_ids_are_refused_with_a_clear_error(bad: object) -> None:
    with pytest.raises(RoutingError, match="entity_id must be a non-empty string"):
        validate_entity_id(bad)


def test_an_entity_id_that_is_not_unicode_text_is_refused() -> None:
    with pytest.raises(RoutingError, match=r"valid Unicode text.*surrogates"):
        validate_entity_id("user-\ud800")


def test_queue_names_are_parsed_strictly() -> None:
    assert parse_shard_queue("shard-0") == 0 and parse_shard_queue("shard-1023") == 1023
    assert [parse_shard_queue(q) for q in ("shard-01", "shard-", "shard-1x", "gpu.a.0")] == [
        None] * 4
    assert parse_gpu_queue("gpu.host-a.3") == ("host-a", 3)
    assert [parse_gpu_queue(q) for q in ("gpu.a.b.0", "gpu..0", "gpu.a.-1", "shard-3",
                                         "celery")] == [None] * 5


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
