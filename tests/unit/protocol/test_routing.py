"""Routing: entity -> shard (the contract's xxh64) -> the shard's queue, with no map, and
entity -> cell (xxh64 seed 1); the routing vectors (tests/data/routing-vectors.json)
reproduced one by one."""

from __future__ import annotations

import json
from typing import Any

import pytest
import xxhash

from gpu_tasks.errors import RoutingError
from gpu_tasks.protocol.routing import (
    cell_index,
    parse_gpu_queue,
    parse_shard_queue,
    shard_index,
    shard_name,
    validate_entity_id,
)
from tests.conftest import VECTORS_FILE

VECTORS: list[dict[str, Any]] = json.loads(VECTORS_FILE.read_text())["vectors"]


def test_the_vector_file_is_the_full_set() -> None:
    assert len(VECTORS) == 40
    assert all({"entity_id", "xxh64", "xxh64_hex", "shard_1024", "shard_256", "shard_7",
                "xxh64_seed1_hex", "cell_2", "cell_3"} <= v.keys() for v in VECTORS)


@pytest.mark.parametrize("vector", VECTORS, ids=[str(i) for i in range(len(VECTORS))])
def test_every_routing_vector(vector: dict[str, Any]) -> None:
    entity = vector["entity_id"]
    assert xxhash.xxh64_intdigest(entity.encode("utf-8")) == vector["xxh64"]
    assert xxhash.xxh64_hexdigest(entity.encode("utf-8")) == vector["xxh64_hex"]
    assert int(vector["xxh64_hex"], 16) == vector["xxh64"]
    for count in (1024, 256, 7):
        assert shard_name(shard_index(entity, count)) == vector[f"shard_{count}"]
    assert xxhash.xxh64_hexdigest(entity.encode("utf-8"), seed=1) == vector["xxh64_seed1_hex"]
    for cells in (2, 3):
        assert cell_index(entity, cells) == vector[f"cell_{cells}"]
    assert cell_index(entity, 1) == 0


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
