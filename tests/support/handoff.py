"""A producer that streams history steps (tests/support/history.py) to entities, and handoff
drivers paused after a step: for the handoff, coordinator and failover tests."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from dataclasses import replace
from typing import Any

import redis
from celery.result import AsyncResult

from gpu_tasks.control.shardmap import Shard, ShardMapStore
from gpu_tasks.local.cluster import LocalCluster
from gpu_tasks.protocol.routing import shard_index
from tests import usertasks
from tests.conftest import NODE, REPO, gpu_tasks_cli
from tests.support.history import check

TIMEOUT = 60
S = 16
GPU = [f"gpu.{NODE}.{i}" for i in range(3)]


class Producer:
    """Sends steps 0, 1, 2, ... to each of ``entities`` from a thread, one round at a
    time, ``pause_s`` apart, until stopped; remembers every request."""

    def __init__(self, entities: list[str], pause_s: float = 0.1) -> None:
        self.entities = entities
        self.log = f"history:{uuid.uuid4().hex[:8]}"
        self.pause_s = pause_s
        self.sent: list[AsyncResult] = []
        self.steps = dict.fromkeys(entities, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="producer")

    def __enter__(self) -> Producer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.round()
            self._stop.wait(self.pause_s)

    def round(self) -> None:
        for e in self.entities:
            self.sent.append(usertasks.step.apply_async(
                kwargs={"entity_id": e, "log": self.log, "seq": self.steps[e]}))
            self.steps[e] += 1

    def verdict(self, client: redis.Redis) -> Any:
        for result in self.sent:
            result.get(timeout=TIMEOUT)
        return check(client.lrange(self.log, 0, -1), self.steps)


def cli(cluster: LocalCluster, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return gpu_tasks_cli(*args, env={**cluster.settings.child_env(), **env}, timeout=180)


def other_gpu(gpu: str | None) -> str:
    """The other of the two GPUs (the target of a move away from ``gpu``)."""
    return GPU[1] if gpu == GPU[0] else GPU[0]


def owner_of(client: redis.Redis, entity: str) -> Shard:
    """The entity's shard's entry, its version left out (it counts moves)."""
    shard_map = ShardMapStore(client).load()
    return replace(shard_map.shards[shard_index(entity, shard_map.shard_count)], version=0)


def start_paused(cluster: LocalCluster, step: str, shard: int, target: str
                 ) -> subprocess.Popen[str]:
    """`shards move` that pauses after ``step``; returns once it is paused there."""
    env = {**cluster.settings.child_env(), "GPU_TASKS_HANDOFF_PAUSE": f"{step}:60"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "gpu_tasks.cli", "shards", "move", f"shard-{shard}", target],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert driver.stderr is not None
    for line in driver.stderr:
        if f"after step {step}" in line:
            return driver
    raise AssertionError(f"the driver never paused at {step}: {driver.wait()}")
