"""The built-in tasks end to end: real Redis, four real sim GPU workers, Celery's own
apply_async."""

from __future__ import annotations

import base64
import json
import os
import urllib.request
from collections import defaultdict
from typing import Any

import numpy as np
import psutil
import pytest

from gpu_tasks.control.shardmap import ShardMapStore
from gpu_tasks.errors import (
    BadRequest,
    ContextPoisoned,
    EntityStateLost,
    NoSuchBuffer,
    OutOfMemory,
    StaleHandle,
)
from gpu_tasks.local.cluster import LocalCluster
from gpu_tasks.protocol.routing import shard_index, shard_name
from gpu_tasks.settings import Settings
from gpu_tasks.tasks import alloc, free, read, run, stats, write
from tests import usertasks
from tests.conftest import GPUS, NODE, SIM_MEMORY, entity_on, gpu_tasks_cli, wait_until

TIMEOUT = 30


def call(task: Any, **kwargs: Any) -> Any:
    return task.apply_async(kwargs=kwargs).get(timeout=TIMEOUT)


def owner_of(cluster: LocalCluster, entity: str) -> str:
    """The GPU that owns ``entity``'s shard now, per the shard map."""
    shard_map = ShardMapStore(cluster.settings.redis_client()).load()
    owner = shard_map.shards[shard_index(entity, shard_map.shard_count)].owner
    assert owner is not None
    return owner


def assert_still_serving(entity: str) -> None:
    """The GPU that owns ``entity`` still answers correctly."""
    call(alloc, entity_id=entity, name="alive", shape=[3], dtype="int32")
    call(write, entity_id=entity, name="alive", values=[1, 2, 3])
    assert call(run, entity_id=entity, kernel="sum", x="alive")["value"] == 6
    call(free, entity_id=entity, name="alive")


def test_entities_stick_to_one_gpu_and_every_gpu_is_used(cluster: LocalCluster) -> None:
    # Given 80 entities, when each sends 5 requests, all submitted before any is read
    entities = [f"sticky-{i}" for i in range(80)]
    pending = []
    for e in entities:
        pending.append((e, alloc.apply_async(kwargs={"entity_id": e, "name": "v", "shape": [8]})))
        pending.append((e, write.apply_async(kwargs={"entity_id": e, "name": "v",
                                                     "values": [1.0] * 8})))
        pending += [(e, run.apply_async(kwargs={"entity_id": e, "kernel": "sum", "x": "v"}))
                    for _ in range(2)]
        pending.append((e, free.apply_async(kwargs={"entity_id": e})))
    seen: dict[str, set[tuple[str, str, str]]] = defaultdict(set)
    for e, result in pending:
        value = result.get(timeout=TIMEOUT)
        assert value["entity_id"] == e
        seen[e].add((value["queue"], value["gpu"], value["worker"], value["device"]))
        if "value" in value:
            assert value["value"] == 8.0
    # Then every entity ran on exactly one GPU: the one owning its shard, from its shard's queue
    for e in entities:
        assert len(seen[e]) == 1, f"{e} ran on {seen[e]}"
        (queue, gpu, worker, device), = seen[e]
        assert queue == shard_name(shard_index(e, 1024))
        assert gpu == owner_of(cluster, e)
        index = gpu.rsplit(".", 1)[1]
        assert worker == f"gpu{index}@{NODE}" and device == f"SIM-{NODE}-{index}"
    # And all four GPUs took part
    assert {next(iter(s))[1] for s in seen.values()} == {f"gpu.{NODE}.{i}" for i in range(GPUS)}


def test_state_persists_between_requests(cluster: LocalCluster) -> None:
    e = "state-user"
    made = call(alloc, entity_id=e, name="emb", shape=[2, 3], dtype="float64")
    assert made["buffer"] == {"name": "emb", "dtype": "float64", "shape": [2, 3], "nbytes": 48,
                              "generation": made["generation"]}
    assert {"entity_id", "shard", "queue", "gpu", "worker", "device", "generation"} <= (
        made.keys())
    assert made["queue"] == made["shard"] == shard_name(shard_index(e, 1024))
    data = np.arange(6, dtype="<f8") / 7
    call(write, entity_id=e, name="emb", data_b64=base64.b64encode(data.tobytes()).decode())
    got = call(read, entity_id=e, name="emb")
    assert (got["dtype"], got["shape"]) == ("float64", [2, 3])
    assert np.array_equal(np.frombuffer(base64.b64decode(got["data_b64"]), "<f8"), data)
    assert "values" not in got
    call(write, entity_id=e, name="emb", values=[9, 9], offset=4)
    assert call(read, entity_id=e, name="emb", as_list=True)["values"] == [
        *data[:4].tolist(), 9.0, 9.0]
    call(free, entity_id=e)
    with pytest.raises(NoSuchBuffer):
        call(read, entity_id=e, name="emb")


def test_kernels_compute_what_numpy_computes(cluster: LocalCluster) -> None:
    e = "kernels-user"
    rng = np.random.default_rng(7)
    a, b, c = (rng.standard_normal(s).astype(np.float32) for s in ((5, 3), (3, 4), (5, 4)))
    for name, arr in (("a", a), ("b", b), ("c", c)):
        call(alloc, entity_id=e, name=name, shape=list(arr.shape), dtype="float32")
        call(write, entity_id=e, name=name, values=arr.reshape(-1).tolist())
    call(run, entity_id=e, kernel="sgemm", a="a", b="b", c="c", alpha=2.0, beta=0.5)
    got = np.array(call(read, entity_id=e, name="c", as_list=True)["values"]).reshape(5, 4)
    np.testing.assert_allclose(got, 2 * a @ b + 0.5 * c, rtol=1e-5, atol=1e-6)

    call(alloc, entity_id=e, name="x", shape=[10], dtype="float32")
    call(alloc, entity_id=e, name="y", shape=[10], dtype="float32")
    call(run, entity_id=e, kernel="fill", out="x", value=1.5)
    call(run, entity_id=e, kernel="fill", out="y", value=2.0)
    call(run, entity_id=e, kernel="axpy", x="x", y="y", alpha=2.0)
    call(run, entity_id=e, kernel="scale", x="y", alpha=0.5)
    assert call(read, entity_id=e, name="y", as_list=True)["values"] == [2.5] * 10
    assert call(run, entity_id=e, kernel="sum", x="y")["value"] == pytest.approx(25.0)

    call(alloc, entity_id=e, name="i", shape=[4], dtype="int64")
    call(write, entity_id=e, name="i", values=[1, 2, 3, 2**40])
    assert call(run, entity_id=e, kernel="sum", x="i")["value"] == 6 + 2**40
    call(free, entity_id=e)


def test_bad_requests_name_the_field_and_the_worker_keeps_serving(
        cluster: LocalCluster) -> None:
    e = entity_on(cluster, 1, "bad")
    call(alloc, entity_id=e, name="m", shape=[2, 2], dtype="float32")
    cases: list[tuple[Any, dict[str, Any], str]] = [
        (alloc, {"name": "z", "shape": [4], "dtype": "complex64"}, "dtype"),
        (alloc, {"name": "z", "shape": [0, 4]}, "shape"),
        (alloc, {"name": "z", "shape": "big"}, "shape"),
        (alloc, {"name": "", "shape": [4]}, "name"),
        (write, {"name": "m", "values": [1] * 5}, "values"),
        (write, {"name": "m", "values": ["a"]}, "values"),
        (write, {"name": "m"}, "values"),
        (write, {"name": "m", "data_b64": "***"}, "data_b64"),
        (write, {"name": "m", "data_b64": "AAA="}, "data_b64"),
        (write, {"name": "m", "values": [1], "offset": -1}, "offset"),
        (run, {"kernel": "conv3d", "x": "m"}, "kernel"),
        (run, {"kernel": "sum"}, "x"),
        (run, {"kernel": "sum", "x": "m", "colour": 1}, "colour"),
        (run, {"kernel": "scale", "x": "m", "alpha": "two"}, "alpha"),
        (run, {"kernel": "sgemm", "a": "m", "b": "m", "c": "m", "alpha": float("nan")},
         "alpha"),
        (alloc, {"name": "\ud800", "shape": [1]}, "name"),
        (read, {"name": "\udfff"}, "name"),
        (run, {"kernel": "sum", "x": "\ud800"}, "x"),
        # Refused at submit (BadArguments), nothing enqueued
        (alloc, {"name": "z"}, "shape"),
        (free, {"name": "m", "out": 1}, "out"),
        (write, {"name": "m", "values": [1], "self": 1}, "self"),
    ]
    for task, kwargs, field in cases:
        with pytest.raises(BadRequest) as raised:
            call(task, entity_id=e, **kwargs)
        assert raised.value.field == field, (task.name, kwargs, str(raised.value))
        assert field in str(raised.value) or field == "values"
    call(alloc, entity_id=e, name="v3", shape=[3, 1], dtype="float32")
    with pytest.raises(BadRequest, match="b has 3 rows but a has 2 columns"):
        call(run, entity_id=e, kernel="sgemm", a="m", b="v3", c="m")
    with pytest.raises(NoSuchBuffer, match=r"no buffer 'nope'.*it has: m, v3"):
        call(read, entity_id=e, name="nope")
    assert_still_serving(e)
    call(free, entity_id=e)


def test_out_of_memory_is_an_answer_not_a_crash(cluster: LocalCluster) -> None:
    e1, e2 = entity_on(cluster, 2, "oom-a"), entity_on(cluster, 2, "oom-b")
    with pytest.raises(OutOfMemory, match="whole GPU") as raised:
        call(alloc, entity_id=e1, name="huge", shape=[SIM_MEMORY + 1], dtype="uint8")
    assert raised.value.requested_bytes == SIM_MEMORY + 1
    # Two entities on one GPU share its memory: the second's big buffer fits by spilling
    # the first, least recently used, to host memory
    call(alloc, entity_id=e1, name="big", shape=[(SIM_MEMORY * 3 // 4) // 4], dtype="float32")
    call(write, entity_id=e1, name="big", values=[1.5, 2.5])
    call(alloc, entity_id=e2, name="big", shape=[(SIM_MEMORY // 2) // 4], dtype="float32")
    # But one entity's own working set beyond the GPU is an answer, not a crash
    with pytest.raises(OutOfMemory, match="free"):
        call(alloc, entity_id=e2, name="big2", shape=[(SIM_MEMORY * 5 // 8) // 4],
             dtype="float32")
    assert_still_serving(e2)
    # And the spilled entity comes back as it was on its next request
    got = call(read, entity_id=e1, name="big", as_list=True, count=3)["values"]
    assert got == [1.5, 2.5, 0.0]
    spilled = stats.apply_async(queue=f"gpu.{NODE}.2").get(timeout=TIMEOUT)
    assert spilled["spills"] >= 2 and spilled["restores"] >= 1  # e1 out, e1 back (e2 out)
    # And an operator sees the same counts in `gpu-tasks status` once a heartbeat carries them
    env = {**os.environ, **cluster.settings.to_env()}

    def status_row() -> str:
        done = gpu_tasks_cli("status", env={**env, "COLUMNS": "250"})
        assert done.returncode == 0, done.stderr
        return next(line for line in done.stdout.splitlines() if f"gpu.{NODE}.2" in line)

    counts = f"{spilled['spills']}/{spilled['restores']}/{spilled['evictions']}"
    wait_until(lambda: counts in status_row().split(), timeout=10 * cluster.settings.heartbeat_s,
               what=lambda: f"status row {status_row()!r} without {counts}")
    call(free, entity_id=e1)
    call(free, entity_id=e2)


def test_a_poisoned_context_ends_the_pool_child_and_old_handles_are_stale(
        cluster: LocalCluster) -> None:
    e = entity_on(cluster, 3, "poison")
    old = call(alloc, entity_id=e, name="keep", shape=[4])["generation"]
    worker = psutil.Process(cluster.workers[3].popen.pid)
    (child,) = worker.children()
    with pytest.raises(ContextPoisoned, match=f"generation {old} -> {old + 1}") as raised:
        call(run, entity_id=e, kernel="fault")
    assert raised.value.generation == old + 1
    # The poisoned child ended (CUDA: the process must be relaunched); a fresh one serves
    wait_until(lambda: [c.pid for c in worker.children()] not in ([], [child.pid]), timeout=30)
    with pytest.raises(EntityStateLost, match="lost when the device context failed") as stale:
        call(read, entity_id=e, name="keep")
    assert (stale.value.handle_generation, stale.value.generation) == (old, old + 1)
    assert (stale.value.entity_id, stale.value.buffer, stale.value.gpu) == (e, "keep",
                                                                           f"gpu.{NODE}.3")
    assert "simulated illegal memory access" in stale.value.why
    assert_still_serving(e)
    made = call(alloc, entity_id=e, name="keep", shape=[4])
    assert made["generation"] == old + 1
    with pytest.raises(StaleHandle, match=f"generation {old}"):
        call(read, entity_id=e, name="keep", generation=old)
    assert call(read, entity_id=e, name="keep", generation=old + 1)["shape"] == [4]
    call(free, entity_id=e)


def test_users_own_gpu_task_works_on_the_entitys_buffers(cluster: LocalCluster) -> None:
    e = "custom-user"
    call(alloc, entity_id=e, name="w", shape=[4])
    call(write, entity_id=e, name="w", values=[1, 1, 2, 4])
    out = usertasks.normalize.apply_async(kwargs={"entity_id": e, "name": "w"}).get(TIMEOUT)
    assert out["result"]["total"] == 8.0 and out["result"]["names"] == ["w"]
    assert out["result"]["shard"] == out["shard"]
    assert out["gpu"] == owner_of(cluster, e) and out["queue"] == out["shard"]
    assert call(read, entity_id=e, name="w", as_list=True)["values"] == [
        0.125, 0.125, 0.25, 0.5]
    assert usertasks.whoami.name == "tests.usertasks.whoami"
    assert usertasks.whoami.apply_async(kwargs={"entity_id": e}).get(TIMEOUT)["result"] >= 1
    with pytest.raises(BadRequest, match="colour") as raised:
        usertasks.normalize.app.send_task("tests.normalize",
                                          kwargs={"entity_id": e, "name": "w", "colour": 1}
                                          ).get(TIMEOUT)
    assert raised.value.field == "colour"
    call(free, entity_id=e)


def test_stats_and_status_report_each_gpu(cluster: LocalCluster, settings: Settings) -> None:
    e = entity_on(cluster, 0, "stats")
    call(alloc, entity_id=e, name="s", shape=[1000], dtype="float64")
    queue = f"gpu.{NODE}.0"
    got = stats.apply_async(queue=queue).get(timeout=TIMEOUT)
    assert got["queue"] == got["gpu"] == queue and got["total_bytes"] == SIM_MEMORY
    assert got["used_bytes"] >= 8000 and got["free_bytes"] == SIM_MEMORY - got["used_bytes"]
    assert got["entities"] >= 1 and got["buffers"] >= 1
    assert got["shards"] == 1024 // GPUS
    env = {**os.environ, **settings.to_env()}

    def shown() -> dict[str, Any]:
        done = gpu_tasks_cli("status", "--json", env=env)
        assert done.returncode == 0, done.stderr
        return {g["gpu"]: g for g in json.loads(done.stdout)["gpus"]}

    # A heartbeat carries the new buffer (8000 bytes) within heartbeat_s
    rows = wait_until(lambda: (r := shown())[queue]["device"]["used_bytes"] >= 8000 and r,
                      timeout=10 * settings.heartbeat_s)
    assert set(rows) == {f"gpu.{NODE}.{i}" for i in range(GPUS)}
    for i in range(GPUS):
        row = rows[f"gpu.{NODE}.{i}"]
        assert row["alive"] and row["consuming"] and row["problem"] is None
        assert row["lease_age_s"] < settings.lease_ttl_s
        assert row["worker"] == f"gpu{i}@{NODE}"
        assert row["device"]["device_uuid"] == f"SIM-{NODE}-{i}"
        assert row["device"]["total_bytes"] == SIM_MEMORY and row["shards"] == 1024 // GPUS
    assert rows[queue]["device"]["entities"] >= 1
    call(free, entity_id=e)


def test_flower_sees_every_gpu_worker(cluster: LocalCluster) -> None:
    def all_online() -> bool:
        with urllib.request.urlopen(f"{cluster.flower_url}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        return all(f'flower_worker_online{{worker="gpu{i}@{NODE}"}} 1.0' in metrics
                   for i in range(GPUS))

    wait_until(all_online, timeout=20)


def test_a_gpu_worker_gives_its_pool_child_time_to_open_the_device(
        cluster: LocalCluster) -> None:
    # Celery kills and reforks a pool child that is not up within 4 s by default; cuInit
    # and the context can take longer than that on a GPU without persistence mode.
    from gpu_tasks.app import app

    worker = f"gpu0@{NODE}"
    conf = app.control.inspect(destination=[worker], timeout=5).conf()[worker]
    assert conf["worker_proc_alive_timeout"] == cluster.settings.device_open_timeout_s >= 60
