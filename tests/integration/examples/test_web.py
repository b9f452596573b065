"""examples/web: a FastAPI backend sends GPU work and answers at once, whatever Redis does.

Against the session cluster (real Redis, real sim GPU workers) for results and typed
errors; against a database without workers for submit-time refusals; and against a
redis-server of the test's own, stopped or frozen, for 503s that come in bounded time."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

import gpu_tasks.app as gpu_app
from examples.web.app import api
from gpu_tasks.app import configure
from gpu_tasks.control.shardmap import ShardMap, ShardMapStore
from gpu_tasks.local.cluster import LocalCluster
from gpu_tasks.local.redis_server import RedisServer
from gpu_tasks.settings import Settings
from tests.conftest import wait_until

TIMEOUT = 60
BOUND_S = 10.0
"""How long the app may take to answer while Redis is down or frozen (timeout 1 s)."""

T = TypeVar("T")


@pytest.fixture()
def web() -> TestClient:
    return TestClient(api)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def settled(web: TestClient, status_url: str) -> httpx.Response:
    """Poll ``status_url`` (GET /tasks/{id}) until it answers anything but 202."""
    def answer() -> httpx.Response | None:
        response = web.get(status_url)
        return None if response.status_code == 202 else response
    response = wait_until(answer, timeout=TIMEOUT, what=f"{status_url} still 202")
    assert response is not None
    return response


def submitted(web: TestClient, entity: str, task: str, **kwargs: Any) -> str:
    """POST one task, check the 202, and return its status URL."""
    response = web.post(f"/entities/{entity}/tasks/{task}", json=kwargs)
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == body["status_url"]
    assert body["status_url"].endswith(f"/tasks/{body['task_id']}")
    assert body["queue"] == gpu_app.router.route(entity).queue
    return str(body["status_url"])


def enqueued(client: redis.Redis) -> dict[str, int]:
    """Every list in the database (kombu queues are lists) and its length."""
    names = [k.decode() if isinstance(k, bytes) else k for k in client.keys("*")]
    return {k: int(client.llen(k)) for k in names if client.type(k) == b"list"}


def within(pool: ThreadPoolExecutor, seconds: float, call: Callable[[], T]) -> tuple[T, float]:
    """``call()`` and how long it took; fail if it has not returned after ``seconds`` (the
    call is left running in ``pool``: whoever unfreezes Redis lets it finish)."""
    start = time.monotonic()
    future: Future[T] = pool.submit(call)
    try:
        return future.result(timeout=seconds), time.monotonic() - start
    except FutureTimeout:
        raise AssertionError(f"no answer within {seconds}s: the request hangs on Redis") from None


# -- results and typed errors, from the session cluster ------------------------------------


def test_alloc_write_read_through_the_web_returns_the_values(
        cluster: LocalCluster, web: TestClient) -> None:
    # Given a new entity
    entity = unique("web")
    # When it allocates, writes and reads through the web app, each answered with 202 at once
    alloc_url = submitted(web, entity, "alloc", name="v", shape=[4], dtype="float32")
    write_url = submitted(web, entity, "write", name="v", values=[1.0, 2.0, 3.0, 4.0])
    read_url = submitted(web, entity, "read", name="v", as_list=True)
    # Then each result comes back with 200, from the GPU owning the entity's shard
    allocated = settled(web, alloc_url)
    assert allocated.status_code == 200, allocated.text
    assert allocated.json()["state"] == "SUCCESS"
    assert allocated.json()["result"]["entity_id"] == entity
    assert settled(web, write_url).status_code == 200
    done = settled(web, read_url)
    assert done.status_code == 200, done.text
    result = done.json()["result"]
    assert result["values"] == [1.0, 2.0, 3.0, 4.0]
    assert (result["dtype"], result["shape"]) == ("float32", [4])
    assert result["queue"] == gpu_app.router.route(entity).queue


def test_reading_a_missing_buffer_is_404_no_such_buffer(
        cluster: LocalCluster, web: TestClient) -> None:
    response = settled(web, submitted(web, unique("web-missing"), "read", name="nothing"))
    assert response.status_code == 404, response.text
    body = response.json()
    assert body["state"] == "FAILURE"
    assert body["error"]["type"] == "NoSuchBuffer"
    assert "nothing" in body["error"]["message"]
    assert isinstance(body["error"]["args"], list)


def test_a_bad_argument_value_is_422_bad_request_naming_the_field(
        cluster: LocalCluster, web: TestClient) -> None:
    url = submitted(web, unique("web-dtype"), "alloc", name="v", shape=[4], dtype="float99")
    response = settled(web, url)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "BadRequest"
    assert error["details"]["field"] == "dtype"
    assert "float99" in error["message"]


def test_an_unknown_task_id_is_pending(cluster: LocalCluster, web: TestClient) -> None:
    response = web.get(f"/tasks/{uuid.uuid4()}")
    assert response.status_code == 202
    assert response.json()["state"] == "PENDING"


# -- submit-time refusals: nothing is enqueued ---------------------------------------------


@pytest.fixture()
def idle(spare_url: str, settings: Settings) -> Iterator[redis.Redis]:
    """The shared app pointed at a database with a map but no workers; restored after."""
    configure(settings.replace(redis_url=spare_url))
    client = redis.Redis.from_url(spare_url)
    ShardMapStore(client).create(ShardMap.balanced(["gpu.idle.0", "gpu.idle.1"], 64))
    try:
        yield client
    finally:
        configure(settings)


@pytest.mark.parametrize(("path", "body", "status", "error_type"), [
    ("/entities//tasks/alloc", {"name": "x", "shape": [4]}, 422, "RoutingError"),
    ("/entities/u1/tasks/explode", {}, 404, "UnknownTask"),
    ("/entities/u1/tasks/stats", {}, 404, "UnknownTask"),  # one GPU's task, not an entity's
    ("/entities/u1/tasks/alloc", {"name": "x", "shap": [4]}, 422, "BadRequest"),
    ("/entities/u1/tasks/alloc", {"name": "x", "shape": [4], "entity_id": "u2"}, 422,
     "BadRequest"),
    ("/entities/u1/tasks/alloc", [1, 2], 422, "BadRequest"),
])
def test_a_request_that_cannot_be_sent_is_refused_and_nothing_is_enqueued(
        idle: redis.Redis, web: TestClient, path: str, body: Any, status: int,
        error_type: str) -> None:
    response = web.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["type"] == error_type
    assert enqueued(idle) == {}


def test_an_accepted_request_lands_on_its_shard_queue(idle: redis.Redis, web: TestClient) -> None:
    # An id with a slash (sent as %2F) is one entity, routed like any other
    response = web.post("/entities/org%2Fuser-1/tasks/alloc", json={"name": "x", "shape": [4]})
    assert response.status_code == 202, response.text
    assert response.json()["entity_id"] == "org/user-1"
    assert enqueued(idle) == {gpu_app.router.route("org/user-1").queue: 1}
    assert web.get(response.headers["location"]).status_code == 202  # no worker: PENDING


# -- Redis down or frozen: 503 with Retry-After, in bounded time --------------------------


@pytest.fixture()
def own_redis(tmp_path: Path, settings: Settings) -> Iterator[RedisServer]:
    """A redis-server of this test's own with a shard map and no workers, the shared app
    pointed at it with a 1 s Redis timeout; the app is restored and the server stopped
    after (resumed first, should the test have frozen it)."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        ShardMapStore(redis.Redis.from_url(server.url)).create(
            ShardMap.balanced(["gpu.x.0"], 64))
        configure(settings.replace(redis_url=server.url, redis_timeout_s=1.0))
        yield server
    finally:
        assert server.process is not None
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGCONT)
        configure(settings)
        server.stop()


def warm_up(web: TestClient) -> str:
    """One request sent and its status read, so the router knows S and the connections to
    Redis are open; returns the status URL."""
    url = submitted(web, "warm", "alloc", name="x", shape=[4])
    assert web.get(url).status_code == 202
    return url


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert "error" in response.json()


def test_redis_stopped_submit_and_status_answer_503(
        own_redis: RedisServer, web: TestClient) -> None:
    # Given a warm app whose Redis then stops
    url = warm_up(web)
    own_redis.stop()
    with ThreadPoolExecutor(2) as pool:
        # When a request is sent and a result read, Then both answer 503 in bounded time
        response, took = within(pool, BOUND_S, lambda: web.post(
            "/entities/warm/tasks/alloc", json={"name": "y", "shape": [4]}))
        assert_unavailable(response)
        assert took < BOUND_S
        status, took = within(pool, BOUND_S, lambda: web.get(url))
        assert_unavailable(status)
        assert took < BOUND_S


def test_redis_frozen_submit_and_status_answer_503_in_bounded_time(
        own_redis: RedisServer, web: TestClient) -> None:
    # Given a warm app whose Redis then stops answering (SIGSTOP: connections stay open)
    url = warm_up(web)
    assert own_redis.process is not None
    pool = ThreadPoolExecutor(2)
    own_redis.process.send_signal(signal.SIGSTOP)
    try:
        # When a request is sent, Then it answers 503 within the bound instead of hanging
        response, took = within(pool, BOUND_S, lambda: web.post(
            "/entities/warm/tasks/alloc", json={"name": "y", "shape": [4]}))
        assert_unavailable(response)
        assert took < BOUND_S
        # And so does reading a result
        status, took = within(pool, BOUND_S, lambda: web.get(url))
        assert_unavailable(status)
        assert took < BOUND_S
    finally:
        # Resumed, Redis answers the calls left hanging, so they end before the app is reset
        own_redis.process.send_signal(signal.SIGCONT)
        pool.shutdown(wait=True)
