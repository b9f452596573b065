"""Shared fixtures: a real redis-server on a free loopback port, and a real cluster of
sim GPU workers started the way the CLI starts them."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

import gpu_tasks.local.cluster
import gpu_tasks.local.redis_server
from gpu_tasks.local.cluster import LocalCluster
from gpu_tasks.local.redis_server import RedisServer
from gpu_tasks.settings import Settings
from tests.support import ports

NODE = "testnode"
GPUS = 4
SIM_MEMORY = 64 << 20
REPO = Path(__file__).resolve().parent.parent
VECTORS_FILE = REPO / "tests" / "data" / "routing-vectors.json"
"""The contract's routing vectors (docs/PROTOCOL.md), checked with the reference C xxhsum."""
DEFAULT_PORT = redis.Redis().connection_pool.connection_kwargs["port"]
"""Redis's standard port, where this machine's own Redis listens: tests must never use it."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first: modules with a test marked ``slow``, then the other integration
    modules, then the unit ones, each module's tests kept together and in order. With
    ``--dist loadfile --no-loadscope-reorder`` (make test) pytest-xdist hands modules out in
    this order, so the long ones start at once rather than last (its default puts the
    modules with the most tests first: the quick, parametrized ones)."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> int:
        if item.path in slow:
            return 0
        return 2 if REPO / "tests" / "unit" in item.path.parents else 1

    items.sort(key=rank)


@pytest.fixture(scope="session", autouse=True)
def _ports_of_this_test_process() -> Iterator[None]:
    """Every server this test process starts (its session Redis, a cluster's Flower, the
    servers of fault tests) takes its port from this process's own range: pytest-xdist
    runs several of them at once (tests/support/ports.py)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpu_tasks.local.redis_server, "free_port", ports.free_port)
        patch.setattr(gpu_tasks.local.cluster, "free_port", ports.free_port)
        yield


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def settings(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings of the session cluster (database 0 of the session Redis)."""
    return Settings(redis_url=redis_server.url, node=NODE, sim_memory_bytes=SIM_MEMORY,
                    heartbeat_s=0.5, lease_ttl_s=3.0, map_poll_s=0.25, fault_injection=True,
                    imports=("tests.usertasks",),
                    data_dir=str(tmp_path_factory.mktemp("gpu-tasks")))


@pytest.fixture(scope="session")
def cluster(settings: Settings) -> Iterator[LocalCluster]:
    """Four sim GPU workers (``gpu-tasks worker --gpu I``) and a balanced shard map."""
    from gpu_tasks.app import configure

    configure(settings)
    with LocalCluster(settings, gpus=GPUS, backend="sim", flower=True) as running:
        yield running


@pytest.fixture(scope="session")
def client(redis_server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


_spare_dbs = itertools.cycle(range(1, 16))


@pytest.fixture()
def spare_url(redis_server: RedisServer) -> Iterator[str]:
    """An empty Redis database of the session server that no worker consumes from."""
    url = f"redis://127.0.0.1:{redis_server.port}/{next(_spare_dbs)}"
    redis.Redis.from_url(url).flushdb()
    yield url


@contextmanager
def own_cluster(settings: Settings, redis_url: str, tmp_path: Path, gpus: int,
                **changes: Any) -> Iterator[LocalCluster]:
    """A cluster of ``gpus`` sim workers of its own, in the database ``redis_url``, with the
    shared app pointed at it meanwhile: for tests that change the map or kill workers."""
    from gpu_tasks.app import configure

    own = settings.replace(redis_url=redis_url, data_dir=str(tmp_path / "gpu-tasks"),
                           **changes)
    cluster = LocalCluster(own, gpus=gpus, backend="sim", flower=False)
    configure(own)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        configure(settings)


@contextmanager
def own_redis_cluster(settings: Settings, tmp_path: Path, gpus: int,
                      **changes: Any) -> Iterator[tuple[RedisServer, LocalCluster]]:
    """A cluster of ``gpus`` sim workers on a redis-server of its own (the shipped durability
    settings), with the shared app pointed at it: for tests that stop, freeze or kill Redis."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        with own_cluster(settings, server.url, tmp_path, gpus, **changes) as cluster:
            yield server, cluster
    finally:
        server.stop()


def timed(call: Callable[[], Any]) -> tuple[BaseException | None, float]:
    """What ``call`` raised (None if nothing) and how long it took, in seconds."""
    started = time.monotonic()
    try:
        call()
    except BaseException as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


def gpu_tasks_cli(*args: str, env: dict[str, str] | None = None,
                  timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the ``gpu-tasks`` CLI in a child process, as a user would."""
    return subprocess.run([sys.executable, "-m", "gpu_tasks.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.05,
               what: str | Callable[[], str] = "") -> T:
    """Poll ``condition`` until it returns something true, and return that; fail with
    ``what`` (or its result) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = what() if callable(what) else what
            raise AssertionError(f"still not so after {timeout}s" + (f": {detail}" if detail
                                                                      else ""))
        time.sleep(interval)


def entity_owned_by(client: redis.Redis, gpu: str, prefix: str, *,
                    not_in: frozenset[int] = frozenset()) -> str:
    """An entity id whose shard ``gpu`` owns now (and is not one of ``not_in``)."""
    from gpu_tasks.control.shardmap import ShardMapStore
    from gpu_tasks.protocol.routing import shard_index

    shard_map = ShardMapStore(client).load()
    for i in range(100_000):
        entity = f"{prefix}-{i}"
        index = shard_index(entity, shard_map.shard_count)
        if shard_map.shards[index].owner == gpu and index not in not_in:
            return entity
    raise AssertionError(f"no entity of {gpu} found")


def entity_on(cluster: LocalCluster, gpu: int, prefix: str) -> str:
    """An entity id whose shard belongs to GPU ``gpu`` of ``cluster`` (node ``NODE``)."""
    from gpu_tasks.control.shardmap import ShardMapStore
    from gpu_tasks.protocol.routing import shard_index

    shard_map = ShardMapStore(cluster.settings.redis_client()).load()
    for i in range(10_000):
        entity = f"{prefix}-{i}"
        if shard_map.shards[shard_index(entity, shard_map.shard_count)].owner == (
                f"gpu.{NODE}.{gpu}"):
            return entity
    raise AssertionError("no entity found")


def kill_worker(cluster: LocalCluster, gpu: int) -> None:
    """SIGKILL GPU ``gpu``'s whole worker (main process and pool child)."""
    import signal

    victim = cluster.workers[gpu]
    victim.signal_group(signal.SIGKILL)
    victim.popen.wait(10)
