"""A producer in another language: ``examples/node/producer.js``, written only from
``docs/PROTOCOL.md`` and with no npm dependencies, routes, enqueues and reads results
exactly as the Python side does, against real GPU workers.

The Node tests are skipped where ``node`` is not on PATH; the check that the document's
routing-vector table matches ``tests/data/routing-vectors.json`` always runs.
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from gpu_tasks.app import app, configure
from gpu_tasks.control.shardmap import ShardMap, ShardMapStore
from gpu_tasks.errors import NoSuchBuffer
from gpu_tasks.local.cluster import LocalCluster
from gpu_tasks.protocol.routing import shard_index, shard_name
from gpu_tasks.settings import Settings
from tests.conftest import REPO, wait_until

NODE_BIN = shutil.which("node")
PRODUCER = REPO / "examples" / "node" / "producer.js"
VECTORS = REPO / "tests" / "data" / "routing-vectors.json"
PROTOCOL = REPO / "docs" / "PROTOCOL.md"
TABLE_BEGIN = "<!-- routing-vectors:begin -->"
TABLE_END = "<!-- routing-vectors:end -->"
RESULT_FIELDS = {"status", "result", "traceback", "children", "date_done", "task_id"}
WHERE_FIELDS = {"entity_id", "shard", "queue", "gpu", "worker", "device", "generation"}
RESULT_TTL_S = 24 * 3600
PYTHON_ONLY_HEADERS = {"replaced_task_nesting", "stamped_headers", "stamps"}
"""Headers Celery 5.3+ adds that the worker needs from no other producer."""

needs_node = pytest.mark.skipif(
    NODE_BIN is None, reason="node is not on PATH: the Node producer example cannot run"
)


# -- helpers -----------------------------------------------------------------------------


def vectors_table(data: dict[str, Any]) -> str:
    """The Markdown table of the routing vectors in ``docs/PROTOCOL.md`` (generated from
    the vectors file, so it stays exact). Entity ids are shown as JSON strings."""
    vectors = data["vectors"]
    counts = [key.removeprefix("shard_") for key in vectors[0] if key.startswith("shard_")]
    head = ["entity_id (JSON)", "xxh64 (decimal)", "xxh64 (hex)", *(f"S={s}" for s in counts)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for vector in vectors:
        literal = json.dumps(vector["entity_id"], ensure_ascii=False).replace("|", "\\|")
        cells = [f"`{literal}`", str(vector["xxh64"]), f"`{vector['xxh64_hex']}`",
                 *(vector[f"shard_{s}"] for s in counts)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def node(*args: str, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    """Run the Node producer's CLI."""
    assert NODE_BIN is not None
    return subprocess.run([NODE_BIN, str(PRODUCER), *args], capture_output=True, text=True,
                          timeout=timeout_s, cwd=REPO)


def node_json(*args: str) -> tuple[int, dict[str, Any]]:
    """Exit status and the one JSON line the Node producer printed."""
    done = node(*args)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line, got {done.stdout!r} ({done.stderr!r})"
    return done.returncode, json.loads(lines[0])


def node_send(url: str, task: str, entity: str, kwargs: dict[str, Any],
              *extra: str) -> tuple[int, dict[str, Any]]:
    return node_json("--redis-url", url, "--task", task, "--entity", entity,
                     "--kwargs", json.dumps(kwargs), *extra)


def unique_entity(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4()}"


def lists(client: redis.Redis) -> dict[str, int]:
    """Every list in the database (kombu queues are lists) and its length."""
    names = (k.decode() if isinstance(k, bytes) else str(k) for k in client.keys("*"))
    return {k: int(client.llen(k)) for k in names if client.type(k) == b"list"}


@pytest.fixture()
def idle_db(spare_url: str, settings: Settings) -> Iterator[tuple[str, redis.Redis]]:
    """A database with a shard map and no workers, the shared app pointed at it meanwhile:
    messages stay in their lists to be looked at."""
    client = redis.Redis.from_url(spare_url)
    ShardMapStore(client).create(ShardMap.balanced(["gpu.idle.0", "gpu.idle.1"], 1024))
    configure(settings.replace(redis_url=spare_url))
    try:
        yield spare_url, client
    finally:
        configure(settings)


# -- routing -------------------------------------------------------------------------------


def test_the_protocols_vector_table_is_the_vectors_file() -> None:
    # Given the routing vectors and the document other languages read
    data = json.loads(VECTORS.read_text(encoding="utf-8"))
    text = PROTOCOL.read_text(encoding="utf-8")
    # Then its table is exactly the one generated from the file
    assert TABLE_BEGIN in text and TABLE_END in text
    table = text.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0].strip()
    assert table == vectors_table(data)


@needs_node
def test_the_node_hash_reproduces_every_routing_vector() -> None:
    # Given the vectors checked with the reference C xxhsum
    data = json.loads(VECTORS.read_text(encoding="utf-8"))
    # When the Node producer recomputes all of them
    code, out = node_json("--vectors", str(VECTORS))
    # Then every hash (decimal and hex) and every shard is the same
    assert code == 0 and out["mismatches"] == 0
    assert len(out["vectors"]) == len(data["vectors"])
    for expected, got in zip(data["vectors"], out["vectors"], strict=True):
        assert got["entity_id"] == expected["entity_id"]
        assert got["xxh64"] == str(expected["xxh64"])  # a string: above 2^53
        assert got["xxh64_hex"] == expected["xxh64_hex"]
        for key in (k for k in expected if k.startswith("shard_")):
            assert got[key] == expected[key], (expected["entity_id"], key)


@needs_node
def test_node_route_prints_the_shard_and_refuses_an_empty_id() -> None:
    code, out = node_json("--route", "user-42", "--shards", "1024")
    assert code == 0
    assert out["shard"] == "shard-129" and out["shard_index"] == 129
    assert out["xxh64_hex"] == "397e9d3a76af7c81"
    code, out = node_json("--route", "", "--shards", "1024")
    assert code == 2 and out["error"]["exc_type"] == "RoutingError"


# -- the message -------------------------------------------------------------------------


@needs_node
def test_a_node_message_has_the_envelope_python_sends(
        idle_db: tuple[str, redis.Redis]) -> None:
    url, client = idle_db
    entity = unique_entity("envelope")
    queue = shard_name(shard_index(entity, 1024))
    kwargs = {"name": "emb", "shape": [4], "dtype": "float32"}
    # Given one request sent by Python and the same one sent by Node
    app.send_task("gpu_tasks.alloc", kwargs={"entity_id": entity, **kwargs})
    code, out = node_send(url, "gpu_tasks.alloc", entity, kwargs)
    assert code == 0 and out["queue"] == queue and out["entity_id"] == entity
    # Then both wait in the entity's shard queue, and nowhere else
    assert lists(client) == {queue: 2}
    from_node, from_python = (json.loads(raw) for raw in client.lrange(queue, 0, -1))
    assert from_node["headers"]["id"] == out["task_id"]
    # and the envelopes have the same fields, the same values where the worker reads them
    assert from_node.keys() == from_python.keys()
    assert from_node["properties"].keys() == from_python["properties"].keys()
    assert set(from_python["headers"]) - set(from_node["headers"]) <= PYTHON_ONLY_HEADERS
    assert set(from_node["headers"]) <= set(from_python["headers"])
    for message in (from_node, from_python):
        assert message["content-type"] == "application/json"
        assert message["content-encoding"] == "utf-8"
        headers, props = message["headers"], message["properties"]
        assert headers["task"] == "gpu_tasks.alloc"
        assert headers["id"] == headers["root_id"] == props["correlation_id"]
        assert headers["retries"] == 0 and headers["eta"] is None
        assert props["body_encoding"] == "base64" and props["priority"] == 0
        assert props["delivery_mode"] == 2
        assert props["delivery_info"] == {"exchange": "", "routing_key": queue}
        args, sent_kwargs, embed = json.loads(base64.b64decode(message["body"]))
        assert args == [] and sent_kwargs == {"entity_id": entity, **kwargs}
        assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


@needs_node
def test_node_refuses_what_cannot_be_routed_and_enqueues_nothing(
        idle_db: tuple[str, redis.Redis]) -> None:
    url, client = idle_db
    code, out = node_send(url, "gpu_tasks.alloc", "", {"name": "x", "shape": [1]})
    assert code == 2 and out["error"]["exc_type"] == "RoutingError"
    code, out = node_json("--redis-url", url, "--task", "gpu_tasks.stats")
    assert code == 2 and "neither entity_id" in out["error"]["exc_message"][0]
    code, out = node_json("--redis-url", url, "--task", "gpu_tasks.stats", "--queue", "shard-3")
    assert code == 2
    assert lists(client) == {}


@needs_node
def test_node_gives_up_waiting_after_its_timeout(idle_db: tuple[str, redis.Redis]) -> None:
    url, client = idle_db
    # A GPU queue nobody consumes: the request waits there, and so does its result
    code, out = node_json("--redis-url", url, "--task", "gpu_tasks.stats",
                          "--queue", "gpu.idle.0", "--wait", "--timeout", "0.5")
    assert code == 3 and out["status"] == "TIMEOUT" and out["queue"] == "gpu.idle.0"
    assert lists(client) == {"gpu.idle.0": 1}


# -- against real GPU workers ------------------------------------------------------------


@needs_node
def test_node_alloc_write_read_run_on_the_gpu_that_owns_the_entitys_shard(
        cluster: LocalCluster, settings: Settings, client: redis.Redis) -> None:
    url = str(settings.redis_url)
    entity = unique_entity("node-e2e-Ünïcødé")
    store = ShardMapStore(client)
    index = shard_index(entity, store.shard_count())
    values = [1.5, -2.0, 3.0, 4.25]
    # When Node allocates, writes and reads one entity's buffer
    results = []
    for task, kwargs in (
        ("gpu_tasks.alloc", {"name": "emb", "shape": [4], "dtype": "float32"}),
        ("gpu_tasks.write", {"name": "emb", "values": values}),
        ("gpu_tasks.read", {"name": "emb", "as_list": True}),
    ):
        code, out = node_send(url, task, entity, kwargs, "--wait", "--timeout", "30")
        assert code == 0 and out["status"] == "SUCCESS", out
        assert out["queue"] == shard_name(index)
        results.append(out["result"])
    # Then each ran for the entity, from its shard's queue, on the GPU that owns the shard
    owner = store.load().shards[index].owner
    for result in results:
        assert result.keys() >= WHERE_FIELDS
        assert result["entity_id"] == entity
        assert result["shard"] == result["queue"] == shard_name(index)
        assert result["gpu"] == owner
    alloc, write, read = results
    assert alloc["buffer"] == {"name": "emb", "dtype": "float32", "shape": [4], "nbytes": 16,
                               "generation": alloc["generation"]}
    assert write["written"] == 4 and write["offset"] == 0
    # and the read gives back what was written, as a list and as little-endian bytes
    assert read["values"] == values and read["dtype"] == "float32" and read["shape"] == [4]
    assert list(struct.unpack("<4f", base64.b64decode(read["data_b64"]))) == values


@needs_node
def test_a_typed_error_comes_back_to_node_and_to_python(
        cluster: LocalCluster, settings: Settings) -> None:
    entity = unique_entity("node-error")
    # When Node reads a buffer the entity never allocated
    code, out = node_send(str(settings.redis_url), "gpu_tasks.read", entity,
                          {"name": "missing"}, "--wait", "--timeout", "30")
    # Then it fails with the typed error, and the Node CLI exits non-zero
    assert code == 1 and out["status"] == "FAILURE"
    assert out["error"]["exc_type"] == "NoSuchBuffer"
    assert out["error"]["exc_module"] == "gpu_tasks.errors"
    assert "'missing'" in out["error"]["exc_message"][0]
    # and Python rebuilds the same exception from the same stored result
    with pytest.raises(NoSuchBuffer, match="missing"):
        app.AsyncResult(out["task_id"]).get(timeout=30)


@needs_node
def test_the_worker_cannot_tell_a_node_message_from_a_python_one(
        cluster: LocalCluster, settings: Settings, client: redis.Redis) -> None:
    url = str(settings.redis_url)
    entity = unique_entity("node-same")
    code, out = node_send(url, "gpu_tasks.alloc", entity, {"name": "v", "shape": [3]},
                          "--wait")
    assert code == 0, out
    # Given a result channel subscribed before Node sends (task id chosen up front)
    task_id = str(uuid.uuid4())
    key = f"celery-task-meta-{task_id}"
    pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.subscribe(key)
    try:
        # When Node sends a read without waiting, and Python sends the same read
        code, out = node_send(url, "gpu_tasks.read", entity, {"name": "v", "as_list": True},
                              "--task-id", task_id)
        assert code == 0 and out["task_id"] == task_id
        from_python = app.send_task("gpu_tasks.read",
                                    kwargs={"entity_id": entity, "name": "v", "as_list": True})
        # Then Python's AsyncResult reads Node's result like any other
        node_result = app.AsyncResult(task_id).get(timeout=30)
        assert node_result == from_python.get(timeout=30)
        assert node_result["values"] == [0.0, 0.0, 0.0]
        # and the result was stored as documented: a JSON string with a 24 h expiry,
        published = wait_until(lambda: pubsub.get_message(timeout=0.1), timeout=10,
                               what=f"no PUBLISH on {key}")
    finally:
        pubsub.close()
    raw = client.get(key)
    assert raw is not None
    meta = json.loads(raw)
    assert meta.keys() == RESULT_FIELDS
    assert meta["status"] == "SUCCESS" and meta["task_id"] == task_id
    assert meta["result"] == node_result and meta["traceback"] is None
    assert 0 < int(client.ttl(key)) <= RESULT_TTL_S
    # published on the channel of the same name, with the same JSON
    assert published["channel"] == key.encode() and json.loads(published["data"]) == meta
