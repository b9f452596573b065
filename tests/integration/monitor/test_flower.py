"""Flower as gpu-tasks runs it: authenticated, REST API on, GPU details on the worker page,
refusals answered with their reason, task history kept across restarts.

Against real Flower processes: the session cluster's (started by ``LocalCluster`` with a
password of its own) and ones started here with ``gpu-tasks flower``."""

from __future__ import annotations

import json
import os
import re
import shelve
from pathlib import Path
from typing import Any

import pytest

from gpu_tasks.app import app
from gpu_tasks.control.shardmap import ShardMap, ShardMapStore
from gpu_tasks.local.cluster import LocalCluster
from gpu_tasks.protocol.routing import shard_index, shard_name
from gpu_tasks.settings import Settings
from gpu_tasks.tasks import alloc, free
from tests.conftest import GPUS, NODE, SIM_MEMORY, gpu_tasks_cli, wait_until
from tests.support.flowerclient import FlowerClient, client_of, own_flower

WORKERS = [f"gpu{i}@{NODE}" for i in range(GPUS)]
ASYNC_ALLOC = "/api/task/async-apply/gpu_tasks.alloc"


def owner_of(cluster: LocalCluster, entity: str) -> tuple[str, str]:
    """The shard queue of ``entity`` and the GPU that owns it now."""
    shard_map = ShardMapStore(cluster.settings.redis_client()).load()
    index = shard_index(entity, shard_map.shard_count)
    owner = shard_map.shards[index].owner
    assert owner is not None
    return shard_name(index), owner


def env_without_flower_credentials(settings: Settings) -> dict[str, str]:
    env = settings.child_env()
    env.pop("GPU_TASKS_FLOWER_BASIC_AUTH", None)
    return env


# -- authentication ---------------------------------------------------------------------


def test_flower_lets_nobody_in_without_its_credentials(cluster: LocalCluster) -> None:
    flower = client_of(cluster)
    assert flower.basic_auth is not None
    user = flower.basic_auth.split(":", 1)[0]
    # Pages, the REST API and its actions: 401 without credentials or with wrong ones.
    # (gpu9 does not exist: were the check ever lost, nothing would be shut down.)
    for path in ("/", "/workers", f"/worker/{WORKERS[0]}", "/tasks", "/broker",
                 "/api/workers", "/api/tasks", "/api/queues/length"):
        assert flower.get(path, basic_auth=None).status == 401, path
        assert flower.get(path, basic_auth=f"{user}:wrong").status == 401, path
    assert flower.post(f"/api/worker/shutdown/gpu9@{NODE}", basic_auth=None).status == 401
    assert flower.post(ASYNC_ALLOC, {"kwargs": {"entity_id": "intruder", "name": "b",
                                                "shape": [1]}}, basic_auth=None).status == 401
    # With them, in
    assert flower.get("/workers").status == 200
    assert flower.get("/api/tasks").status == 200
    # The health check and Prometheus' scrape stay open (Flower serves them unauthenticated).
    assert flower.get("/healthcheck", basic_auth=None).status == 200
    assert flower.get("/metrics", basic_auth=None).status == 200


def test_the_clusters_flower_password_is_in_a_file_only_its_user_can_read(
        cluster: LocalCluster) -> None:
    path = cluster.flower_credentials_file
    assert cluster.flower_auth is not None and path is not None
    assert path.parent == Path(cluster.settings.data_dir).resolve()
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text().strip() == cluster.flower_auth.basic_auth
    assert cluster.flower_auth.basic_auth not in repr(cluster.settings)
    # And nothing Flower logged holds it
    assert cluster.flower is not None
    password = cluster.flower_auth.password
    assert password and password not in cluster.flower.log_tail(1 << 20)


@pytest.mark.parametrize(("args", "expected"), [
    (["--no-auth", "--address", "0.0.0.0"], "only on a loopback address"),
    (["--no-auth", "--address", "10.1.2.3"], "only on a loopback address"),
    ([], "GPU_TASKS_FLOWER_BASIC_AUTH"),
    (["--basic-auth", "just-a-secret-word"], "must be USER:PASSWORD"),
    (["--basic-auth", "ops:pw", "--no-auth"], "contradict"),
])
def test_flower_command_refuses_to_start_unprotected_or_misconfigured(
        settings: Settings, tmp_path: Path, args: list[str], expected: str) -> None:
    env = env_without_flower_credentials(settings.replace(data_dir=str(tmp_path)))
    done = gpu_tasks_cli("flower", *args, env=env, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert expected in done.stderr
    assert "just-a-secret-word" not in done.stdout + done.stderr


# -- workers and their GPUs ---------------------------------------------------------------


def test_flower_lists_every_gpu_worker_with_its_device(cluster: LocalCluster) -> None:
    # Given an entity with a buffer on its GPU
    entity = "flower-device"
    _, owner = owner_of(cluster, entity)
    alloc.apply_async(kwargs={"entity_id": entity, "name": "b", "shape": [2048],
                              "dtype": "float32"}).get(timeout=30)
    flower = client_of(cluster)
    try:
        # Then Flower's worker list has every GPU worker, each with its device in its stats
        workers = flower.workers(WORKERS)
        for i, name in enumerate(WORKERS):
            stats = workers[name]["stats"]
            assert stats["gpu"] == f"gpu.{NODE}.{i}"
            assert f"SIM-{NODE}-{i}" in stats["gpu_device"]
            assert stats["gpu_memory"].endswith(f" used of {SIM_MEMORY >> 20}.0 MiB")
            assert re.fullmatch(r"\d+ shard queues consumed \(shard map epoch \d+\)",
                                stats["gpu_shards"])
            assert re.fullmatch(r"\d+ spills, \d+ restores, \d+ evictions; "
                                r"[\d.]+ [KMG]?i?B spilled to host memory", stats["gpu_spills"])
            assert stats["gpu_generation"] >= 1
            assert stats["gpu_state"].startswith("running; heard from")
            assert stats["pool"]["max-concurrency"] == 1
        # And the entity's GPU counts it, within a heartbeat
        def counted() -> bool:
            stats = flower.workers(WORKERS)[f"gpu{owner.rsplit('.', 1)[1]}@{NODE}"]["stats"]
            return bool(stats["gpu_entities"] >= 1 and stats["gpu_buffers"] >= 1
                        and not stats["gpu_memory"].startswith("0 B "))

        wait_until(counted, timeout=20, interval=0.5)
    finally:
        free.apply_async(kwargs={"entity_id": entity}).get(timeout=30)


def test_gpu_workers_send_task_events_from_their_first_request(cluster: LocalCluster) -> None:
    # A cluster with Flower starts its workers with task events on: Flower's own
    # enable_events broadcast comes seconds after it starts, after `up`'s demo is over.
    conf = app.control.inspect(destination=WORKERS, timeout=5).conf() or {}
    assert {w: conf[w]["worker_send_task_events"] for w in WORKERS} == dict.fromkeys(
        WORKERS, True)


def test_the_demos_requests_show_in_flower(cluster: LocalCluster) -> None:
    done = gpu_tasks_cli("demo", "--entities", "3", "--json",
                         env={**os.environ, **cluster.settings.to_env()})
    assert done.returncode == 0, done.stderr
    entities = {r["entity_id"] for r in json.loads(done.stdout)["results"]}
    flower = client_of(cluster)

    def shown() -> set[str]:
        tasks = flower.get("/api/tasks").json().values()
        return {e for e in entities for t in tasks
                if t["state"] == "SUCCESS" and repr(e) in (t.get("kwargs") or "")}

    wait_until(lambda: shown() == entities, timeout=20, interval=0.5,
               what=lambda: f"Flower shows {shown()} of {entities}")


# -- the REST API -------------------------------------------------------------------------


def test_a_routed_request_sent_through_flower_runs_on_its_entitys_gpu(
        cluster: LocalCluster) -> None:
    flower = client_of(cluster)
    entity = "via-flower"
    queue, owner = owner_of(cluster, entity)
    # When a request is submitted through Flower's REST API
    reply = flower.post(ASYNC_ALLOC, {"kwargs": {"entity_id": entity, "name": "b",
                                                 "shape": [16], "dtype": "int32"}})
    assert reply.status == 200, reply.body
    task_id = reply.json()["task-id"]
    try:
        # Then its result says it ran on the GPU that owns the entity's shard (Flower's
        # "state" is read before it waits for the result: ask until it says SUCCESS)
        result = wait_until(
            lambda: (r := flower.get(f"/api/task/result/{task_id}?timeout=30").json())[
                "state"] == "SUCCESS" and r, timeout=60, interval=0.2,
            what=lambda: flower.get(f"/api/task/result/{task_id}").body)
        assert result["result"]["queue"] == queue and result["result"]["gpu"] == owner
        # And Flower's task list has it (the workers send task events)
        wait_until(lambda: flower.get("/api/tasks").json().get(task_id, {}).get("state")
                   == "SUCCESS", timeout=20, interval=0.3)
    finally:
        free.apply_async(kwargs={"entity_id": entity}).get(timeout=30)


@pytest.mark.parametrize(("path", "body", "expected"), [
    (ASYNC_ALLOC, {"kwargs": {"name": "b", "shape": [1]}}, "sent without entity_id"),
    (ASYNC_ALLOC, {"kwargs": {"entity_id": "", "name": "b", "shape": [1]}}, "non-empty"),
    (ASYNC_ALLOC, {"kwargs": {"entity_id": "e", "name": "b", "shape": [1]},
                   "queue": "shard-99999"}, "leave queue= out"),
    ("/api/task/apply/gpu_tasks.alloc", {"kwargs": {"name": "b", "shape": [1]}},
     "sent without entity_id"),
    ("/api/task/send-task/gpu_tasks.stats", {}, "runs on one GPU"),
])
def test_a_request_the_router_refuses_gets_a_400_with_the_reason(
        cluster: LocalCluster, path: str, body: dict[str, Any], expected: str) -> None:
    reply = client_of(cluster).post(path, body)
    assert reply.status == 400, (reply.status, reply.body)
    error = reply.json()
    assert error["error"] == "RoutingError"
    assert expected in error["message"] and "nothing was enqueued" in error["message"]


@pytest.mark.parametrize(("action", "query"), [
    ("pool/grow", "?n=1"),
    ("pool/shrink", "?n=1"),
    ("pool/restart", ""),
    ("pool/autoscale", "?min=1&max=2"),
    ("queue/add-consumer", "?queue=shard-0"),
    ("queue/cancel-consumer", "?queue=shard-0"),
])
def test_flowers_worker_actions_that_would_break_a_gpu_worker_are_refused(
        cluster: LocalCluster, action: str, query: str) -> None:
    flower = client_of(cluster)
    worker = WORKERS[0]
    flower.workers([worker])  # Flower acts only on workers it has inspected
    reply = flower.post(f"/api/worker/{action}/{worker}{query}")
    assert reply.status == 403, reply.body
    assert f"refused by GPU worker {worker}: " in reply.body
    # And the worker is as it was: one pool child, still serving
    stats = app.control.inspect(destination=[worker], timeout=5).stats() or {}
    assert stats[worker]["pool"]["max-concurrency"] == 1
    assert len(stats[worker]["pool"]["processes"]) == 1


def test_revoke_with_terminate_through_flower_says_it_was_refused(
        cluster: LocalCluster) -> None:
    flower = client_of(cluster)
    reply = flower.post("/api/task/revoke/no-such-task-id?terminate=true")
    assert reply.status == 403, reply.body
    assert "refused by GPU worker" in reply.json()["message"]
    # Plain revoke is Flower's own
    assert flower.post("/api/task/revoke/no-such-task-id").status == 200


def test_queue_lengths_show_a_shard_queue_with_work_and_no_consumer(
        settings: Settings, spare_url: str, tmp_path: Path) -> None:
    # Given a deployment whose only GPU has no worker, and a Flower started with the flag
    own = settings.replace(redis_url=spare_url, data_dir=str(tmp_path / "gpu-tasks"))
    ShardMapStore(own.redis_client()).create(ShardMap.balanced([f"gpu.{NODE}.7"], 64))
    with own_flower(env_without_flower_credentials(own), tmp_path / "logs",
                    "--basic-auth", "ops:flag-secret-1") as (url, proc):
        flower = FlowerClient(url, "ops:flag-secret-1")
        assert flower.get("/api/workers", basic_auth=None).status == 401
        # When a request is sent for an entity of that GPU
        entity = "nobody-serves-me"
        reply = flower.post(ASYNC_ALLOC, {"kwargs": {"entity_id": entity, "name": "b",
                                                     "shape": [1]}})
        assert reply.status == 200 and reply.json()["state"] == "PENDING", reply.body
        # Then Flower's queue lengths show its shard queue, waiting
        queue = shard_name(shard_index(entity, 64))
        lengths = flower.get("/api/queues/length").json()["active_queues"]
        assert {"name": queue, "messages": 1} in lengths
        page = flower.get("/broker")
        assert page.status == 200 and queue in page.body
    assert "flag-secret-1" not in proc.log_tail(1 << 20)


def test_flower_keeps_its_task_history_across_a_restart(
        cluster: LocalCluster, tmp_path: Path) -> None:
    # Given a Flower of our own on the session cluster, with --no-auth on loopback
    own = cluster.settings.replace(data_dir=str(tmp_path / "gpu-tasks"))
    env = env_without_flower_credentials(own)
    with own_flower(env, tmp_path / "logs", "--no-auth") as (url, _):
        flower = FlowerClient(url)  # no credentials: the REST API is open on loopback
        entity = "remembered"
        sent: list[str] = []

        def seen() -> str | None:
            # Task events are broadcast: those sent before this Flower's receiver is
            # listening are gone. So keep sending until one of ours shows as done.
            tasks = flower.get("/api/tasks").json()
            done = [t for t in sent if tasks.get(t, {}).get("state") == "SUCCESS"]
            if done:
                return done[0]
            sent.append(alloc.apply_async(kwargs={"entity_id": entity, "name": "b",
                                                  "shape": [1]}).id)
            return None

        task_id = wait_until(seen, timeout=30, interval=1.0)
    free.apply_async(kwargs={"entity_id": entity}).get(timeout=30)
    # When it has stopped, its history is on disk
    db = tmp_path / "gpu-tasks" / "flower.db"
    assert list(db.parent.glob("flower.db*"))
    with shelve.open(str(db), flag="r") as state:
        assert task_id in state["events"].tasks
    # Then, started again, it still lists the request
    with own_flower(env, tmp_path / "logs", "--no-auth") as (url, _):
        task = FlowerClient(url).get("/api/tasks").json().get(task_id)
        assert task is not None and task["state"] == "SUCCESS"
