"""Producers: ``apply_async`` with less waste and bounded by the Redis timeout; the bulk path.

Results and typed errors must behave exactly as with plain Celery; a down or hung Redis
must fail a call within ``redis_timeout_s`` with ``BrokerUnavailable``, never block it.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.exceptions import TimeoutError as CeleryTimeoutError
from kombu.exceptions import OperationalError

from gpu_tasks.app import configure
from gpu_tasks.control.shardmap import ShardMap, ShardMapStore
from gpu_tasks.errors import BrokerUnavailable, NoSuchBuffer, RoutingError
from gpu_tasks.local.cluster import LocalCluster
from gpu_tasks.local.redis_server import RedisServer
from gpu_tasks.protocol.envelope import decode
from gpu_tasks.settings import Settings
from gpu_tasks.submit.bulk import submit_many
from gpu_tasks.tasks import alloc, read, write
from tests.conftest import timed, wait_until


def subscribes(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_subscribe", {}).get("calls", 0))


def test_get_and_typed_errors_work_and_only_get_subscribes(
        cluster: LocalCluster, client: redis.Redis) -> None:
    entity = f"prod-{uuid.uuid4().hex[:8]}"
    # Given requests sent and not waited for
    before = subscribes(client)
    sent = [alloc.apply_async(kwargs={"entity_id": entity, "name": f"b{i}", "shape": [2]})
            for i in range(50)]
    # Then sending subscribed to nothing (Celery would have sent 50 SUBSCRIBEs)
    assert subscribes(client) == before
    # And get() still returns each result, whenever it is called
    assert all(r.get(timeout=30)["buffer"]["name"] == f"b{i}" for i, r in enumerate(sent))
    assert subscribes(client) > before
    write.apply_async(kwargs={"entity_id": entity, "name": "b0", "values": [1.5, 2.5]}
                      ).get(timeout=30)
    assert read.apply_async(kwargs={"entity_id": entity, "name": "b0", "as_list": True}
                            ).get(timeout=30)["values"] == [1.5, 2.5]
    # And typed errors come back as themselves
    with pytest.raises(NoSuchBuffer, match="nope"):
        read.apply_async(kwargs={"entity_id": entity, "name": "nope"}).get(timeout=30)
    # And a result stored long before get() is called is found
    late = alloc.apply_async(kwargs={"entity_id": entity, "name": "late", "shape": [1]})
    wait_until(lambda: client.exists(f"celery-task-meta-{late.id}"), timeout=30)
    assert late.get(timeout=5)["buffer"]["name"] == "late"


def test_submit_many_sends_what_apply_async_sends(spare_url: str, settings: Settings) -> None:
    client = redis.Redis.from_url(spare_url)
    ShardMapStore(client).create(ShardMap.balanced(["gpu.idle.0"], 1024))
    configure(settings.replace(redis_url=spare_url))
    try:
        kwargs = {"name": "emb", "shape": [4, 2], "dtype": "float16"}
        alloc.apply_async(kwargs={"entity_id": "user-42", **kwargs})
        [bulk_id] = submit_many([{"entity_id": "user-42", "task": "alloc", "kwargs": kwargs}])
        # user-42 is in shard-129 of 1024 (the routing vectors): both went there, in order
        plain, bulk = (json.loads(m) for m in reversed(client.lrange("shard-129", 0, -1)))
    finally:
        configure(settings)
    assert bulk["headers"]["id"] == bulk_id
    for message in (plain, bulk):
        for volatile in ("id", "root_id", "origin"):
            message["headers"].pop(volatile)
        for volatile in ("correlation_id", "delivery_tag"):
            message["properties"].pop(volatile)
    assert decode(json.dumps(plain)) == decode(json.dumps(bulk))
    assert plain == bulk


@pytest.mark.slow  # 3,000 requests through the four sim GPUs
def test_submit_many_runs_every_request_once_and_returns_results(
        cluster: LocalCluster, client: redis.Redis) -> None:
    log = f"log-{uuid.uuid4().hex}"
    requests = [{"entity_id": f"bulk{i}", "task": "tests.record",
                 "kwargs": {"log": log, "seq": i}} for i in range(3000)]
    results = submit_many(requests, results=True, chunk_size=700)
    assert len(results) == 3000
    assert results[1234].get(timeout=60)["result"] == {"seq": 1234}
    wait_until(lambda: client.llen(log) >= 3000, timeout=120,
               what=lambda: f"{client.llen(log)} ran")
    ran = Counter(v.decode() for v in client.lrange(log, 0, -1))
    assert len(ran) == 3000 and set(ran.values()) == {1}


def test_submit_many_refuses_a_bad_request_by_position(spare_url: str,
                                                       settings: Settings) -> None:
    client = redis.Redis.from_url(spare_url)
    ShardMapStore(client).create(ShardMap.balanced(["gpu.idle.0"], 64))
    configure(settings.replace(redis_url=spare_url))
    try:
        good = {"entity_id": "a", "task": "alloc", "kwargs": {"name": "x", "shape": [1]}}
        with pytest.raises(RoutingError, match=r"request 5: .*takes no argument colour.* "
                                               r"the 4 requests before its chunk were sent"):
            submit_many([good] * 5 + [{**good, "kwargs": {"name": "x", "colour": 1}}],
                        chunk_size=4)
        for bad, why in [({"entity_id": "", "task": "alloc"}, "entity_id"),
                         ({"entity_id": "a", "task": "nope"}, "unknown task"),
                         ({**good, "kwargs": {"name": "x", "shape": [float("nan")]}}, "JSON"),
                         ({**good, "priority": 1}, "unknown field priority"),
                         ({**good, "kwargs": {"name": "x"}}, "needs shape")]:
            with pytest.raises(RoutingError, match=why):
                submit_many([bad])
        queued = sum(client.llen(f"shard-{i}") for i in range(64))
    finally:
        configure(settings)
    assert queued == 4


@pytest.fixture()
def own_redis(tmp_path: Path, settings: Settings) -> Iterator[tuple[RedisServer, Settings]]:
    """A redis-server of this test's own, with a map, and the shared app pointed at it."""
    with RedisServer(tmp_path / "redis") as server:
        ShardMapStore(redis.Redis.from_url(server.url)).create(
            ShardMap.balanced(["gpu.x.0"], 16))
        own = settings.replace(redis_url=server.url, redis_timeout_s=1.0)
        configure(own)
        try:
            yield server, own
        finally:
            if server.process is not None and server.process.poll() is None:
                os.kill(server.process.pid, signal.SIGCONT)
            configure(settings)


@pytest.mark.parametrize("fault", ["stopped", "hung"])
def test_apply_async_fails_within_the_timeout_when_redis_is_down_or_hung(
        fault: str, own_redis: tuple[RedisServer, Settings]) -> None:
    server, _ = own_redis
    warm = alloc.apply_async(kwargs={"entity_id": "w", "name": "x", "shape": [1]})
    assert server.process is not None
    # When Redis goes away under a warm producer
    if fault == "stopped":
        server.stop()
    else:
        os.kill(server.process.pid, signal.SIGSTOP)
    # Then each call fails within the timeout (1 s here), with one clear error
    for _ in range(2):
        error, took = timed(lambda: alloc.apply_async(
            kwargs={"entity_id": "e", "name": "x", "shape": [1]}))
        assert isinstance(error, BrokerUnavailable), repr(error)
        assert isinstance(error, OperationalError)  # Celery's own, for code that catches it
        assert took < 3.0, took
        assert "cannot send gpu_tasks.alloc" in str(error)
        assert ("did not answer within 1 s" if fault == "hung" else "unavailable") in str(error)
    # And reading a result fails the same way, not with a raw socket error, and waiting
    # for one does not claim the application must be restarted
    error, took = timed(lambda: warm.state)
    assert isinstance(error, BrokerUnavailable), repr(error)
    assert took < 3.0, took
    error, took = timed(lambda: warm.get(timeout=10))
    assert isinstance(error, BrokerUnavailable), repr(error)
    assert took < 5.0, took


def test_a_producer_heals_after_redis_restarts(own_redis: tuple[RedisServer, Settings]) -> None:
    server, own = own_redis
    client = redis.Redis.from_url(own.redis_url or "")
    alloc.apply_async(kwargs={"entity_id": "e", "name": "x", "shape": [1]})
    server.restart()
    # The first call after the restart reconnects by itself
    alloc.apply_async(kwargs={"entity_id": "e", "name": "y", "shape": [1]})
    assert sum(client.llen(f"shard-{i}") for i in range(16)) >= 1


def test_password_is_not_in_the_error(settings: Settings) -> None:
    configure(settings.replace(redis_url="redis://user:s3cret@127.0.0.1:1/0",
                               redis_timeout_s=1.0))
    try:
        error, _ = timed(lambda: alloc.apply_async(
            kwargs={"entity_id": "e", "name": "x", "shape": [1]}))
    finally:
        configure(settings)
    assert isinstance(error, BrokerUnavailable)
    assert "s3cret" not in str(error) and "user:***@127.0.0.1:1" in str(error)


def test_a_result_dropped_while_redis_is_away_goes_quietly(
        own_redis: tuple[RedisServer, Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a producer that waited on results (subscribed to them), with no worker to answer
    server, own = own_redis
    for name in ("x", "y"):
        waited_and_timed_out(alloc.apply_async(
            kwargs={"entity_id": "e", "name": name, "shape": [1]}))
    # When its results are dropped (the app configured again; a web server's at its exit)
    # and collected while Redis is away
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    configure(own)
    server.stop()
    gc.collect()
    # Then nothing is printed from the garbage collector: the subscriptions went with the
    # connection, and the next get() subscribes afresh
    assert [str(u.exc_value) for u in unraisable] == []
    server.start()
    waited_and_timed_out(alloc.apply_async(kwargs={"entity_id": "e", "name": "z",
                                                   "shape": [1]}))


def waited_and_timed_out(pending: Any) -> None:
    """Wait briefly for ``pending`` (subscribing to it); keep no traceback that holds it."""
    try:
        pending.get(timeout=0.2)
    except CeleryTimeoutError:
        return
    raise AssertionError("a result came without a worker")
