"""The shard map in Redis: creation, the epoch, the CLI, and producers' caches."""

from __future__ import annotations

import json
import os
import time

import pytest
import redis

from gpu_tasks.errors import ShardMapError
from gpu_tasks.routing import EntityRouter, shard_index
from gpu_tasks.shardmap import ShardMap, ShardMapCache, ShardMapStore
from tests.conftest import gpu_tasks_cli


def test_a_balanced_map_gives_every_queue_within_one_shard_of_even() -> None:
    shard_map = ShardMap.balanced(["gpu.a.0", "gpu.a.1", "gpu.a.2"], 1024)
    counts = shard_map.shards_per_queue()
    assert sum(counts.values()) == 1024
    assert max(counts.values()) - min(counts.values()) <= 1


@pytest.mark.parametrize(("queues", "count", "message"), [
    ([], 8, "at least one GPU queue"),
    (["gpu.a.0", "gpu.a.0"], 8, "distinct"),
    (["gpu.a.0", "gpu.a.1", "gpu.a.2"], 2, "cannot cover"),
])
def test_a_map_that_cannot_work_is_refused(queues: list[str], count: int, message: str) -> None:
    with pytest.raises(ShardMapError, match=message):
        ShardMap.balanced(queues, count)


def test_init_refuses_an_existing_map_unless_forced_and_the_epoch_grows(spare_url: str) -> None:
    store = ShardMapStore(redis.Redis.from_url(spare_url))
    first = store.create(ShardMap.balanced(["gpu.a.0"], 16))
    with pytest.raises(ShardMapError, match="already exists"):
        store.create(ShardMap.balanced(["gpu.a.0", "gpu.a.1"], 16))
    assert store.load().queues == ("gpu.a.0",) * 16  # untouched by the refusal
    second = store.create(ShardMap.balanced(["gpu.a.0", "gpu.a.1"], 16), force=True)
    moved = store.assign({3: "gpu.a.0"})
    assert first < second < moved
    loaded = store.load()
    assert loaded.epoch == moved
    assert loaded.queues[3] == "gpu.a.0" and loaded.queues[5] == "gpu.a.1"


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
    # Then `shards show --json` prints the contract's form
    shown = json.loads(gpu_tasks_cli("shards", "show", "--json", env=env).stdout)
    assert shown["shard_count"] == 1024 and shown["epoch"] == 1
    assert len(shown["shards"]) == 1024
    assert shown["shards"]["shard-0"] == "gpu.hostx.0"
    assert shown["shards"]["shard-1023"] == "gpu.hostx.0"
    assert set(shown["shards"].values()) == {"gpu.hostx.0", "gpu.hostx.1", "gpu.hostx.2"}
    # And a second init is refused, naming --force; with --force the epoch moves on
    again = gpu_tasks_cli("shards", "init", "--queues", "gpu.a.0,gpu.b.0", env=env)
    assert again.returncode == 1 and "--force" in again.stderr
    forced = gpu_tasks_cli("shards", "init", "--shards", "8", "--queues", "gpu.a.0,gpu.b.0",
                           "--force", "--json", env=env)
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout) == {
        "shard_count": 8, "epoch": 2,
        "shards": {f"shard-{i}": ("gpu.a.0", "gpu.b.0")[i % 2] for i in range(8)}}


def test_shards_cli_rejects_bad_arguments(spare_url: str) -> None:
    env = {**os.environ, "GPU_TASKS_REDIS_URL": spare_url}
    both = gpu_tasks_cli("shards", "init", "--gpus", "2", "--queues", "gpu.a.0", env=env)
    assert both.returncode == 2 and "exactly one of --gpus" in both.stderr
    bad = gpu_tasks_cli("shards", "init", "--queues", "celery", env=env)
    assert bad.returncode == 2 and "celery" in bad.stderr
    missing = gpu_tasks_cli("shards", "show", env=env)
    assert missing.returncode == 1 and "no shard map" in missing.stderr


def test_producers_pick_up_a_new_epoch_within_one_second(spare_url: str) -> None:
    # Given a router that has cached a two-GPU map
    store = ShardMapStore(redis.Redis.from_url(spare_url))
    store.create(ShardMap.balanced(["gpu.a.0", "gpu.a.1"], 64))
    router = EntityRouter(ShardMapCache(spare_url, refresh_s=1.0))
    entity = "user-42"
    index = shard_index(entity, 64)
    before = router("gpu_tasks.alloc", (), {"entity_id": entity}, {})
    # When the entity's shard moves to another GPU
    target = "gpu.a.1" if before == "gpu.a.0" else "gpu.a.0"
    moved_at = time.monotonic()
    store.assign({index: target})
    # Then the router follows within one second (polling every 50 ms)
    while router("gpu_tasks.alloc", (), {"entity_id": entity}, {}) != target:
        assert time.monotonic() - moved_at <= 1.0, "router still on the old map after 1 s"
        time.sleep(0.05)
