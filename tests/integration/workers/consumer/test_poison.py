"""No message kills a GPU worker: garbage, wrong protocols, pickle, compression bombs, huge
or deeply nested messages, and requests that kill the pool child are dead-lettered, and
the good requests around them run."""

from __future__ import annotations

import base64
import functools
import gzip
import json
import os
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from celery.result import AsyncResult
from kombu.exceptions import DecodeError

from gpu_tasks.control.deadletter import DeadLetter, DeadLetterStore
from gpu_tasks.errors import DeadLettered
from gpu_tasks.local.cluster import LocalCluster
from gpu_tasks.local.redis_server import RedisServer
from gpu_tasks.protocol.routing import shard_index, shard_name
from gpu_tasks.settings import Settings
from gpu_tasks.tasks import alloc
from tests.conftest import NODE, _spare_dbs, gpu_tasks_cli, own_cluster, wait_until
from tests.support.messages import raw_task_message

TIMEOUT = 30
GPU = f"gpu.{NODE}.0"
MAX_MESSAGE = 4 << 20
"""The private cluster's GPU_TASKS_MAX_MESSAGE: above the zip bomb, below the random blob."""


class Plant:
    """Unpickled, it creates ``path``: proof that a pickle was (never) executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


@pytest.fixture(scope="module")
def poisoned(settings: Settings, redis_server: RedisServer,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One private one-GPU cluster for the whole module: every test leaves it serving (that
    is what they check), and looks only at its own dead letters."""
    url = f"redis://127.0.0.1:{redis_server.port}/{next(_spare_dbs)}"
    redis.Redis.from_url(url).flushdb()
    with own_cluster(settings, url, tmp_path_factory.mktemp("poison"), gpus=1,
                     max_message_bytes=MAX_MESSAGE, max_child_deaths=2) as cluster:
        yield cluster


def client_of(cluster: LocalCluster) -> redis.Redis:
    return redis.Redis.from_url(str(cluster.settings.redis_url))


def envelope(queue: str, **changes: Any) -> dict[str, Any]:
    """A good alloc message for ``queue``'s entity, as a dict to spoil."""
    _task_id, raw = raw_task_message("gpu_tasks.alloc", {"entity_id": "poison", "name": "x",
                                                         "shape": [1]}, queue)
    payload: dict[str, Any] = json.loads(raw)
    for path, value in changes.items():
        *parents, last = path.split("__")
        target = payload
        for p in parents:
            target = target[p]
        if value is _DROP:
            del target[last]
        else:
            target[last] = value
    return payload


_DROP = object()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def bad_messages(queue: str, planted: Path) -> list[tuple[str, bytes, str]]:
    """``(case, raw bytes, what the dead letter's reason says)`` for ``queue``."""
    good = json.dumps(envelope(queue)).encode()

    def spoiled(**changes: Any) -> bytes:
        return json.dumps(envelope(queue, **changes)).encode()

    body = [[], {"entity_id": "poison", "name": "x", "shape": [1]}, {}]
    bomb = zip_bomb()
    return [
        ("garbage", b"garbage", "not JSON"),
        ("empty list", b"[]", "not a Celery envelope"),
        ("null", b"null", "not a Celery envelope"),
        ("number", b"123", "not a Celery envelope"),
        ("truncated", good[: len(good) // 2], "not JSON"),
        ("not utf-8", b"\xff\xfe\xfa" + good, "not UTF-8"),
        ("body not a 3-list", spoiled(body=b64(b'{"a": 1}')), "[args, kwargs, embed]"),
        ("body not json", spoiled(body=b64(b"\x80\x03}q")), "body is not UTF-8 JSON"),
        ("body not base64", spoiled(body="abcde"), "not base64"),
        ("garbage timelimit", spoiled(headers__timelimit="soon"), "timelimit"),
        ("garbage eta", spoiled(headers__eta=[1, 2]), "headers.eta"),
        ("garbage retries", spoiled(headers__retries="x"), "headers.retries"),
        ("unknown body_encoding", spoiled(properties__body_encoding="rot13"),
         "body_encoding"),
        ("no headers.id", spoiled(headers__id=_DROP), "headers.id"),
        ("no headers.task", spoiled(headers__task=_DROP), "headers.task"),
        ("unknown task", spoiled(headers__task="gpu_tasks.nope"), "unknown task"),
        ("no delivery_tag", spoiled(properties__delivery_tag=_DROP), "delivery_tag"),
        ("no delivery_info", spoiled(properties__delivery_info=_DROP), "delivery_info"),
        ("protocol 1", json.dumps({"body": b64(json.dumps({"task": "gpu_tasks.alloc",
                                                           "id": "p1", "args": [],
                                                           "kwargs": {}}).encode()),
                                   "content-type": "application/json",
                                   "properties": {}}).encode(), "no headers"),
        ("pickle", spoiled(body=b64(pickle.dumps(Plant(planted))),
                           **{"content-type": "application/x-python-serialize",
                              "content-encoding": "binary"}), "content-type"),
        ("yaml", spoiled(body=b64(b"- []\n- {}\n- {}\n"),
                         **{"content-type": "application/x-yaml"}), "content-type"),
        ("msgpack", spoiled(body=b64(b"\x93\x90\x80\x80"),
                            **{"content-type": "application/x-msgpack"}), "content-type"),
        ("gzip content-encoding", spoiled(**{"content-encoding": "gzip"}), "content-encoding"),
        ("zip bomb", spoiled(body=b64(bomb), headers__compression="application/x-gzip"),
         "compress"),
        ("nesting bomb", spoiled(body=b64(json.dumps([[], {"entity_id": "poison",
                                                          "deep": nested(600)}, {}]).encode())),
         "body nests deeper than 64"),
        ("deep headers", spoiled(headers__deep=nested(600)), "message nests deeper than 64"),
        ("too big", os.urandom(MAX_MESSAGE + (1 << 20)), "over the"),
        ("kwargs body ok, wrong embed", spoiled(body=b64(json.dumps([*body[:2], 7]).encode())),
         "[args, kwargs, embed]"),
        # Found by fuzzing (benchmarks/fuzz.py): each ended the worker, was dropped without
        # an answer, or failed the request with a bare error after it ran.
        ("empty eta", spoiled(headers__eta=""), "headers.eta"),
        ("numeric eta", spoiled(headers__eta=5), "headers.eta"),
        ("numeric expires", spoiled(headers__expires=2), "headers.expires"),
        ("unparseable expires", spoiled(headers__expires="soon"), "headers.expires"),
        ("stamped_headers a number", spoiled(headers__stamped_headers=5e-324),
         "stamped_headers"),
        ("stamped_headers of lists", spoiled(headers__stamped_headers=[["a"]],
                                             headers__stamps={"a": 1}), "stamped_headers"),
        ("stamps a list", spoiled(headers__stamped_headers=["a"], headers__stamps=[1]),
         "headers.stamps"),
        ("chain a string", spoiled(body=b64(json.dumps([*body[:2], {"chain": "x"}]).encode())),
         "embed.chain"),
        ("errbacks a number", spoiled(body=b64(json.dumps(
            [*body[:2], {"errbacks": 6.8e16}]).encode())), "embed.errbacks"),
        ("chord a list", spoiled(body=b64(json.dumps([*body[:2], {"chord": []}]).encode())),
         "embed.chord"),
        ("ignore_result a number", spoiled(headers__ignore_result=3.3), "ignore_result"),
    ]


@functools.cache
def zip_bomb() -> bytes:
    """About 200 KB of gzip that would inflate to 200 MiB."""
    return gzip.compress(b" " * (200 << 20), 9)


def entity_of_shard(prefix: str, shard_count: int) -> tuple[str, str]:
    return prefix, shard_name(shard_index(prefix, shard_count))


def test_bad_messages_are_dead_lettered_and_the_worker_serves_on(
        poisoned: LocalCluster, tmp_path: Path) -> None:
    # Given a serving one-GPU worker
    client = client_of(poisoned)
    worker = psutil.Process(poisoned.workers[0].popen.pid)
    planted = tmp_path / "pickle-was-executed"
    entity, shard = entity_of_shard("poison-neighbour", poisoned.settings.shard_count)
    assert alloc.apply_async(kwargs={"entity_id": entity, "name": "warm", "shape": [1]}).get(
        TIMEOUT)
    rss_before = worker.memory_info().rss
    since = f"{client.time()[0] * 1000}-0"
    # When every kind of bad message is pushed raw onto its shard queue and its GPU queue,
    # each followed by a good request
    sent, goods = [], []
    for queue in (shard, GPU):
        for case, raw, reason in bad_messages(queue, planted):
            client.lpush(queue, raw)
            sent.append((case, queue, raw, reason))
            goods.append(alloc.apply_async(kwargs={"entity_id": entity, "name": f"g{len(goods)}",
                                                   "shape": [1]}))
    # Then every good request runs
    for result in goods:
        assert result.get(timeout=TIMEOUT)["gpu"] == GPU
    # And every bad one is a dead letter with the reason, its source queue and its bytes
    store = DeadLetterStore(client)
    letters = wait_until(lambda: [x for x in store.list() if x.id > since] if len(
        [x for x in store.list() if x.id > since]) >= len(sent) else None, timeout=TIMEOUT,
        what=lambda: f"{len(store.list())} dead letters of {len(sent)}")
    for case, queue, raw, reason in sent:
        mine = [x for x in letters if x.queue == queue and x.raw == raw[:len(x.raw)]
                and x.raw_bytes == len(raw)]
        assert mine, f"{case} on {queue} was not dead-lettered"
        assert reason in mine[0].reason, f"{case}: {mine[0].reason}"
    big = next(x for x in letters if "over the" in x.reason)
    assert big.truncated and len(big.raw) == 64 << 10
    # And the worker never died, the zip bomb was never inflated, no pickle ever ran
    assert poisoned.workers[0].alive() and worker.is_running()
    assert worker.memory_info().rss - rss_before < 100 << 20
    assert not planted.exists()
    # And nothing was left on the queues
    assert client.llen(shard) == 0 and client.llen(GPU) == 0


def test_a_fixed_dead_letter_can_be_retried_and_a_truncated_one_cannot(
        poisoned: LocalCluster) -> None:
    client = client_of(poisoned)
    env = {**os.environ, **poisoned.settings.to_env()}
    entity, shard = entity_of_shard("poison-retry", poisoned.settings.shard_count)
    task_id, good = raw_task_message("gpu_tasks.alloc", {"entity_id": entity, "name": "r",
                                                         "shape": [2]}, shard)
    broken = json.loads(good)
    broken["properties"]["body_encoding"] = "rot13"
    # Given a dead-lettered message, and a truncated one
    client.lpush(shard, json.dumps(broken))
    client.lpush(GPU, os.urandom(MAX_MESSAGE + 1))
    store = DeadLetterStore(client)
    letter = wait_until(lambda: next((x for x in store.list() if x.task_id == task_id), None),
                        timeout=TIMEOUT)
    huge = wait_until(lambda: next((x for x in store.list() if x.truncated
                                    and x.raw_bytes == MAX_MESSAGE + 1), None), timeout=TIMEOUT)
    listed = json.loads(gpu_tasks_cli("dlq", "list", "--json", env=env).stdout)
    assert {letter.id, huge.id} <= {x["id"] for x in listed["letters"]}
    shown = json.loads(gpu_tasks_cli("dlq", "show", letter.id, "--json", env=env).stdout)
    assert shown["task_id"] == task_id and "body_encoding" in shown["reason"]
    # When it is retried unchanged, it is refused and kept
    refused = gpu_tasks_cli("dlq", "retry", letter.id, env=env)
    assert refused.returncode == 1 and "still fails" in refused.stderr
    # When it is fixed up and retried, it runs
    fixed = store.replace_raw(letter.id, good.encode())
    done = gpu_tasks_cli("dlq", "retry", fixed.id, env=env)
    assert done.returncode == 0, done.stderr
    from gpu_tasks.app import app

    assert app.AsyncResult(task_id).get(timeout=TIMEOUT)["buffer"]["shape"] == [2]
    assert all(x.id != fixed.id for x in store.list())
    # And a truncated one is refused with the reason
    truncated = gpu_tasks_cli("dlq", "retry", huge.id, env=env)
    assert truncated.returncode == 1 and "truncated" in truncated.stderr
    missing = gpu_tasks_cli("dlq", "show", "1-0", env=env)
    assert missing.returncode == 1 and "no dead letter" in missing.stderr


def test_a_request_that_keeps_killing_its_pool_child_is_dead_lettered(
        poisoned: LocalCluster) -> None:
    from tests import usertasks

    # Given a request whose execution ends the pool child every time
    main_pid = poisoned.workers[0].popen.pid
    entity, _shard = entity_of_shard("poison-killer", poisoned.settings.shard_count)
    killer = usertasks.die.apply_async(kwargs={"entity_id": entity})
    # Then after max_child_deaths (2) children it is a dead letter, not run again
    store = DeadLetterStore(client_of(poisoned))
    letter = wait_until(lambda: next((x for x in store.list() if x.task_id == killer.id), None),
                        timeout=TIMEOUT)
    assert "ended the pool child 2 times" in letter.reason and letter.task == "tests.die"
    # And its producer is answered with the reason instead of waiting out its timeout
    with pytest.raises(DeadLettered, match="ended the pool child 2 times"):
        killer.get(timeout=TIMEOUT)
    # And the worker serves on, the same main process
    done = alloc.apply_async(kwargs={"entity_id": entity, "name": "after", "shape": [1]})
    assert done.get(timeout=TIMEOUT)["gpu"] == GPU
    assert poisoned.workers[0].alive() and poisoned.workers[0].popen.pid == main_pid


def test_a_dead_lettered_request_is_answered_with_the_reason(poisoned: LocalCluster) -> None:
    from gpu_tasks.app import app

    # Given a request whose envelope is fine but whose arguments nest too deep
    entity, shard = entity_of_shard("poison-deep", poisoned.settings.shard_count)
    task_id, raw = raw_task_message("gpu_tasks.run", {"entity_id": entity, "kernel": "sum",
                                                      "x": nested(600)}, shard)
    waiting = app.AsyncResult(task_id)
    # When it is pushed raw onto its shard queue
    client_of(poisoned).lpush(shard, raw)
    # Then get() raises DeadLettered with the reason, well before its own timeout
    with pytest.raises(DeadLettered, match="nest") as caught:
        waiting.get(timeout=TIMEOUT)
    assert "gpu-tasks dlq" in str(caught.value) and caught.value.reason
    # And a request that already has a result is not overwritten by a later dead letter
    done = alloc.apply_async(kwargs={"entity_id": entity, "name": "kept", "shape": [1]})
    assert done.get(timeout=TIMEOUT)["gpu"] == GPU
    again = DeadLetter.of(b"{}", shard, "replayed", {"headers": {"id": done.id,
                                                                "task": "gpu_tasks.alloc"}})
    DeadLetterStore(client_of(poisoned)).add(again)
    assert app.AsyncResult(done.id).state == "SUCCESS"


def test_a_pickled_result_is_never_unpickled(poisoned: LocalCluster, tmp_path: Path) -> None:
    from gpu_tasks.app import app

    # Given a result key holding a pickle that would create a file
    planted = tmp_path / "pickle-was-executed"
    task_id = str(uuid.uuid4())
    client_of(poisoned).set(f"celery-task-meta-{task_id}", pickle.dumps(
        {"status": "SUCCESS", "result": Plant(planted), "task_id": task_id}))
    # When a producer reads it, JSON decoding refuses it (result_accept_content is json
    # only), and the file never appears
    with pytest.raises(DecodeError):
        app.AsyncResult(task_id).get(timeout=5)
    assert not planted.exists()


def test_a_dead_letter_redis_refuses_is_held_and_stored_once_redis_takes_writes(
        settings: Settings, tmp_path: Path) -> None:
    # Given a worker on a Redis of its own, which then refuses to store dead letters (as
    # a Redis at maxmemory refuses writes, while pops still succeed)
    server = RedisServer(tmp_path / "redis").start()
    try:
        with own_cluster(settings, server.url, tmp_path, gpus=1) as cluster:
            client = client_of(cluster)
            e, queue = entity_of_shard("held", cluster.settings.shard_count)
            client.acl_setuser("default", enabled=True, nopass=True, keys=["*"],
                               channels=["*"], commands=["+@all", "-xadd"])
            # When a message the worker refuses arrives, and its dead letter is refused
            task_id, message = raw_task_message("no.such.task", {"entity_id": e}, queue)
            client.lpush(queue, message)
            wait_until(lambda: client.llen(queue) == 0, timeout=TIMEOUT,
                       what="the worker never took the message")
            assert DeadLetterStore(client).count() == 0
            # Then once Redis takes them again, the held letter is stored and answered
            client.acl_setuser("default", enabled=True, nopass=True, keys=["*"],
                               channels=["*"], commands=["+@all"])
            letters = wait_until(lambda: DeadLetterStore(client).list(), timeout=TIMEOUT,
                                 what="the held dead letter was never stored")
            assert letters[0].task_id == task_id and "no.such.task" in letters[0].reason
            with pytest.raises(DeadLettered, match=r"no\.such\.task"):
                AsyncResult(task_id).get(timeout=TIMEOUT)
            assert alloc.apply_async(kwargs={"entity_id": e, "name": "x", "shape": [1]}).get(
                timeout=TIMEOUT)["gpu"] == GPU
    finally:
        server.stop()


def test_an_oversized_request_is_answered_under_its_id(poisoned: LocalCluster) -> None:
    from gpu_tasks.app import app

    # Given a raw producer's write over the worker's GPU_TASKS_MAX_MESSAGE, its headers
    # after megabytes of body (as kombu writes them), so past the 64 KiB a dead letter keeps
    entity, shard = entity_of_shard("poison-big", poisoned.settings.shard_count)
    task_id, raw = raw_task_message("gpu_tasks.write", {
        "entity_id": entity, "name": "x", "values": [1.0] * (MAX_MESSAGE // 4)}, shard)
    assert len(raw) > MAX_MESSAGE and raw.index('"headers"') > 64 << 10
    # When it is pushed onto its shard queue
    client_of(poisoned).lpush(shard, raw)
    # Then its producer hears at once that it was too large, under its own task id
    with pytest.raises(DeadLettered, match=r"over the .*GPU_TASKS_MAX_MESSAGE"):
        app.AsyncResult(task_id).get(timeout=TIMEOUT)
