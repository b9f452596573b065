"""Submit time: Celery's own apply_async/send_task go to the entity's shard queue, and
requests that say nowhere to go never reach the broker."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
import redis

from gpu_tasks.app import app, configure
from gpu_tasks.control.shardmap import ShardMap, ShardMapStore
from gpu_tasks.errors import ConfigError, RoutingError, ShardMapError
from gpu_tasks.settings import Settings
from gpu_tasks.tasks import alloc, stats
from tests.conftest import gpu_tasks_cli

QUEUES = ["gpu.idle.0", "gpu.idle.1"]


@pytest.fixture()
def idle_app(spare_url: str, settings: Settings) -> Iterator[redis.Redis]:
    """The shared app pointed at a database with a map but no workers; restored after."""
    configure(settings.replace(redis_url=spare_url))
    client = redis.Redis.from_url(spare_url)
    ShardMapStore(client).create(ShardMap.balanced(QUEUES, 1024))
    yield client
    configure(settings)


def enqueued(client: redis.Redis) -> dict[str, int]:
    """Every list in the database (kombu queues are lists) and its length."""
    return {k.decode(): int(client.llen(k)) for k in client.keys("*")
            if client.type(k) == b"list"}


def test_apply_async_lands_on_the_queue_of_the_entitys_shard(idle_app: redis.Redis) -> None:
    # user-42 is in shard-129 of 1024 (the routing vectors)
    alloc.apply_async(kwargs={"entity_id": "user-42", "name": "emb", "shape": [1024],
                              "dtype": "float32"})
    app.send_task("gpu_tasks.alloc", kwargs={"entity_id": "user-42", "name": "b", "shape": 4})
    alloc.apply_async(kwargs={"entity_id": "user-42", "name": "c", "shape": 4},
                      queue="shard-129")  # naming its own shard's queue is fine
    assert enqueued(idle_app) == {"shard-129": 3}
    body = json.loads(idle_app.lindex("shard-129", 0))
    assert body["content-type"] == "application/json"
    assert body["headers"]["task"] == "gpu_tasks.alloc"


def test_send_task_by_name_of_a_task_this_producer_never_imported(
        idle_app: redis.Redis) -> None:
    # With an entity: its shard queue, like any entity request
    app.send_task("myapp.normalize", kwargs={"entity_id": "user-42", "name": "emb"})
    assert enqueued(idle_app) == {"shard-129": 1}
    # Without one: refused, whatever the name; nothing reaches Celery's default queue
    for name in ("myapp.normalize", "celery.backend_cleanup", "gpu_tasks.nonexistent"):
        with pytest.raises(RoutingError, match="neither entity_id"):
            app.send_task(name, kwargs={"name": "emb"})
    assert enqueued(idle_app) == {"shard-129": 1}


@pytest.mark.parametrize(("options", "message"), [
    ({"queue": "gpu.idle.1"}, "goes to its shard's queue shard-129, not queue='gpu.idle.1'"),
    ({"queue": "shard-5"}, "not queue='shard-5'"),
    ({"queue": "celery"}, "not queue='celery'"),
    ({"routing_key": "gpu.idle.1"}, "routing_key= cannot be given"),
    ({"exchange": "shard-129"}, "exchange= cannot be given"),
])
def test_an_entity_request_cannot_be_sent_elsewhere(
        idle_app: redis.Redis, options: dict[str, str], message: str) -> None:
    kwargs = {"entity_id": "user-42", "name": "x", "shape": [4]}
    with pytest.raises(RoutingError, match=message):
        alloc.apply_async(kwargs=kwargs, **options)
    with pytest.raises(RoutingError, match=message):
        app.send_task("gpu_tasks.alloc", kwargs=kwargs, **options)
    assert enqueued(idle_app) == {}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "x", "shape": [4]}, "sent without entity_id"),
    ({"entity_id": "", "name": "x", "shape": [4]}, "non-empty string, got ''"),
    ({"entity_id": 42, "name": "x", "shape": [4]}, "non-empty string, got int 42"),
    ({"entity_id": ["u"], "name": "x", "shape": [4]}, "non-empty string, got list"),
])
def test_a_routed_task_without_a_usable_entity_id_is_refused(
        idle_app: redis.Redis, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(RoutingError, match=message):
        alloc.apply_async(kwargs=kwargs)
    with pytest.raises(RoutingError, match=message):
        app.send_task("gpu_tasks.alloc", kwargs=kwargs)
    assert enqueued(idle_app) == {}


def test_entity_id_given_positionally_is_refused_with_a_hint(idle_app: redis.Redis) -> None:
    with pytest.raises(RoutingError, match="keyword argument"):
        app.send_task("gpu_tasks.free", args=["user-42"])
    assert enqueued(idle_app) == {}


def test_a_misspelled_argument_fails_before_it_is_enqueued(idle_app: redis.Redis) -> None:
    with pytest.raises(TypeError, match="shap"):
        alloc.apply_async(kwargs={"entity_id": "u", "name": "x", "shap": [4]})
    assert enqueued(idle_app) == {}


def test_stats_must_name_a_gpu_queue(idle_app: redis.Redis) -> None:
    with pytest.raises(RoutingError, match="queue='gpu"):
        stats.apply_async()
    with pytest.raises(RoutingError, match="'celery' is not a GPU queue"):
        stats.apply_async(queue="celery")
    with pytest.raises(RoutingError, match="'shard-3' is not a GPU queue"):
        app.send_task("gpu_tasks.stats", queue="shard-3")
    assert enqueued(idle_app) == {}
    stats.apply_async(queue=QUEUES[1])
    app.send_task("anything.at.all", queue=QUEUES[0])  # one GPU's queue: its worker decides
    assert enqueued(idle_app) == {QUEUES[1]: 1, QUEUES[0]: 1}


def test_without_a_shard_map_routed_tasks_are_refused(spare_url: str, settings: Settings) -> None:
    configure(settings.replace(redis_url=spare_url))
    try:
        with pytest.raises(ShardMapError, match=r"no shard map.*shards init"):
            alloc.apply_async(kwargs={"entity_id": "u", "name": "x", "shape": [4]})
        assert enqueued(redis.Redis.from_url(spare_url)) == {}
    finally:
        configure(settings)


def test_without_redis_configured_the_error_says_which_setting(settings: Settings) -> None:
    configure(Settings(node="x"))
    try:
        with pytest.raises(ConfigError, match="GPU_TASKS_REDIS_URL"):
            alloc.apply_async(kwargs={"entity_id": "u", "name": "x", "shape": [4]})
    finally:
        configure(settings)


def test_submit_cli_refuses_bad_input_clearly(spare_url: str) -> None:
    env = {**os.environ, "GPU_TASKS_REDIS_URL": spare_url}
    ShardMapStore(redis.Redis.from_url(spare_url)).create(ShardMap.balanced(QUEUES, 8))
    foreign = gpu_tasks_cli("submit", "alloc", "--entity", "u", "--queue", "gpu.idle.0",
                            "--kwargs", '{"name": "x", "shape": [4]}', env=env)
    assert foreign.returncode == 1 and "leave queue= out" in foreign.stderr
    no_entity = gpu_tasks_cli("submit", "alloc", "--kwargs", '{"name": "x", "shape": [4]}',
                              env=env)
    assert no_entity.returncode == 1 and "without entity_id" in no_entity.stderr
    bad_json = gpu_tasks_cli("submit", "alloc", "--entity", "u", "--kwargs", "{name", env=env)
    assert bad_json.returncode == 2 and "--kwargs" in bad_json.stderr
    assert enqueued(redis.Redis.from_url(spare_url)) == {}


def test_submit_wait_tells_unfinished_from_failed(spare_url: str) -> None:
    # Given a deployment whose GPUs run nothing (no worker consumes this database)
    env = {**os.environ, "GPU_TASKS_REDIS_URL": spare_url}
    ShardMapStore(redis.Redis.from_url(spare_url)).create(ShardMap.balanced(QUEUES, 8))
    # When a caller waits for a request that cannot finish in time
    done = gpu_tasks_cli("submit", "alloc", "--entity", "u", "--kwargs",
                         '{"name": "x", "shape": [4]}', "--wait", "--timeout", "0.5",
                         "--json", env=env)
    # Then the exit code says "unfinished, do not resend" (3), not "failed" (1)
    assert done.returncode == 3, done.stderr
    out = json.loads(done.stdout)
    assert out["unfinished"]["state"] == "PENDING" and "error" not in out
    assert sum(enqueued(redis.Redis.from_url(spare_url)).values()) == 1


def test_a_delay_past_the_visibility_timeout_is_refused(idle_app: redis.Redis) -> None:
    # A countdown or eta the worker would hold longer than the visibility timeout would be
    # handed to a second worker by Redis and run twice: refused, nothing enqueued
    import datetime

    kwargs = {"entity_id": "user-42", "name": "x", "shape": [4]}
    with pytest.raises(RoutingError, match="visibility timeout"):
        alloc.apply_async(kwargs=kwargs, countdown=4000)
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=2)
    with pytest.raises(RoutingError, match="visibility timeout"):
        alloc.apply_async(kwargs=kwargs, eta=later)
    with pytest.raises(RoutingError, match="countdown must be a number"):
        alloc.apply_async(kwargs=kwargs, countdown="soon")
    assert enqueued(idle_app) == {}
    # A delay within it is sent as usual
    alloc.apply_async(kwargs=kwargs, countdown=30)
    assert enqueued(idle_app) == {"shard-129": 1}
