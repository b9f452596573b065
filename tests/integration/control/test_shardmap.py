"""The shard map in Redis: ownership per shard, the epoch, the CLI."""

from __future__ import annotations

import json
import os
import re

import pytest
import redis

from gpu_tasks.control.shardmap import Shard, ShardMap, ShardMapStore
from gpu_tasks.errors import ShardMapError
from gpu_tasks.keys import MAP_KEY
from tests.conftest import gpu_tasks_cli


def test_init_refuses_an_existing_map_unless_forced_and_the_epoch_grows(spare_url: str) -> None:
    store = ShardMapStore(redis.Redis.from_url(spare_url))
    first = store.create(ShardMap.balanced(["gpu.a.0"], 16))
    with pytest.raises(ShardMapError, match="already exists"):
        store.create(ShardMap.balanced(["gpu.a.0", "gpu.a.1"], 16))
    assert store.load().consumed_by("gpu.a.0") == list(range(16))  # untouched by the refusal
    second = store.create(ShardMap.balanced(["gpu.a.0", "gpu.a.1"], 16), force=True)
    moved = store.assign({3: "gpu.a.0"})
    assert first < second < moved
    loaded = store.load()
    assert loaded.epoch == moved
    assert loaded.shards[3] == Shard("gpu.a.0", "owned") and loaded.shards[5].owner == "gpu.a.1"
    assert loaded.shards[3].consumer == "gpu.a.0"


def test_assign_refuses_a_shard_outside_the_map(spare_url: str) -> None:
    store = ShardMapStore(redis.Redis.from_url(spare_url))
    store.create(ShardMap.balanced(["gpu.a.0"], 4))
    with pytest.raises(ShardMapError, match=r"outside 0\.\.3"):
        store.assign({4: "gpu.a.0"})


def test_shards_cli_init_and_show(spare_url: str) -> None:
    env = {**os.environ, "GPU_TASKS_REDIS_URL": spare_url, "GPU_TASKS_NODE": "hostx"}
    # Given no map, when `shards init --gpus 3`
    done = gpu_tasks_cli("shards", "init", "--gpus", "3", env=env)
    assert done.returncode == 0, done.stderr
    # Then `shards show --json` prints the contract's form, with a per-GPU summary
    shown = json.loads(gpu_tasks_cli("shards", "show", "--json", env=env).stdout)
    assert shown["shard_count"] == 1024 and shown["epoch"] == 1
    assert len(shown["shards"]) == 1024
    assert shown["shards"]["shard-0"] == {"owner": "gpu.hostx.0", "state": "owned"}
    assert shown["shards"]["shard-1023"] == {"owner": "gpu.hostx.0", "state": "owned"}
    assert {s["owner"] for s in shown["shards"].values()} == {
        "gpu.hostx.0", "gpu.hostx.1", "gpu.hostx.2"}
    assert shown["gpus"] == {
        "gpu.hostx.0": {"shards": 342, "states": {"owned": 342}},
        "gpu.hostx.1": {"shards": 341, "states": {"owned": 341}},
        "gpu.hostx.2": {"shards": 341, "states": {"owned": 341}}}
    # And the human form, piped, is not cut to 80 columns
    human = gpu_tasks_cli("shards", "show", env=env).stdout
    assert "1024 shards, epoch 1" in human and "gpu.hostx.2" in human and "\x1b[" not in human
    # And a second init is refused, naming --force; with --force the epoch moves on
    again = gpu_tasks_cli("shards", "init", "--owners", "gpu.a.0,gpu.b.0", env=env)
    assert again.returncode == 1 and "--force" in again.stderr
    forced = gpu_tasks_cli("shards", "init", "--shards", "8", "--owners", "gpu.a.0,gpu.b.0",
                           "--force", "--json", env=env)
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout) == {
        "shard_count": 8, "epoch": 2,
        "shards": {f"shard-{i}": {"owner": ("gpu.a.0", "gpu.b.0")[i % 2], "state": "owned"}
                   for i in range(8)},
        "gpus": {"gpu.a.0": {"shards": 4, "states": {"owned": 4}},
                 "gpu.b.0": {"shards": 4, "states": {"owned": 4}}}}


def test_shards_cli_rejects_bad_arguments(spare_url: str) -> None:
    env = {**os.environ, "GPU_TASKS_REDIS_URL": spare_url}
    both = gpu_tasks_cli("shards", "init", "--gpus", "2", "--owners", "gpu.a.0", env=env)
    assert both.returncode == 2 and "exactly one of --gpus" in both.stderr
    bad = gpu_tasks_cli("shards", "init", "--owners", "celery", env=env)
    assert bad.returncode == 2 and "'celery' does not name a GPU" in bad.stderr
    missing = gpu_tasks_cli("shards", "show", env=env)
    assert missing.returncode == 1 and "no shard map" in missing.stderr


def test_a_malformed_map_is_reported_not_guessed(spare_url: str) -> None:
    client = redis.Redis.from_url(spare_url)
    store = ShardMapStore(client)
    store.create(ShardMap.balanced(["gpu.a.0"], 4))
    client.hset(MAP_KEY, "shard-2", "gpu.a.0")  # a foundation-era entry: not JSON
    with pytest.raises(ShardMapError, match=re.escape("shard-2 is b'gpu.a.0'")):
        store.load()
    client.hdel(MAP_KEY, "shard-3")
    client.hset(MAP_KEY, "shard-2", json.dumps({"owner": "gpu.a.0", "state": "owned"}))
    with pytest.raises(ShardMapError, match="shard-3 has no entry"):
        store.load()
