"""Failover: a dead GPU's shards go to live GPUs, the requests it had taken run first there,
the state it held is reported lost; a GPU with a live worker is not failed over. The
coordinator, which fails over by itself, is in test_coordinator.py."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from gpu_tasks.control.shardmap import ShardMapStore
from gpu_tasks.errors import EntityStateLost
from gpu_tasks.settings import Settings
from gpu_tasks.tasks import alloc, read, write
from tests import usertasks
from tests.conftest import (
    NODE,
    entity_owned_by,
    gpu_tasks_cli,
    kill_worker,
    own_cluster,
    wait_until,
)

TIMEOUT = 60
S = 16
GPU0, GPU1 = f"gpu.{NODE}.0", f"gpu.{NODE}.1"


@pytest.mark.slow  # a GPU killed under a 30 s request
def test_a_killed_gpus_shards_go_to_a_live_one_with_its_unfinished_work_first(
        settings: Settings, spare_url: str, tmp_path: Path) -> None:
    with own_cluster(settings, spare_url, tmp_path, gpus=2, shard_count=S) as cluster:
        client = cluster.settings.redis_client()
        env = cluster.settings.child_env()
        # Given an entity with state on GPU 0, whose worker is running a slow request of it
        # with more queued behind
        entity = entity_owned_by(client, GPU0, "dies")
        alloc.apply_async(kwargs={"entity_id": entity, "name": "x", "shape": [2]}).get(TIMEOUT)
        write.apply_async(kwargs={"entity_id": entity, "name": "x", "values": [5, 6]}).get(
            TIMEOUT)
        log = f"executions:{uuid.uuid4().hex[:8]}"
        slow = usertasks.record.apply_async(kwargs={"entity_id": entity, "log": log,
                                                    "seq": 0, "seconds": 30})
        queued = [usertasks.record.apply_async(kwargs={"entity_id": entity, "log": log,
                                                       "seq": n}) for n in range(1, 6)]
        wait_until(lambda: client.get(f"{log}:running"), timeout=TIMEOUT)
        # When GPU 0's whole worker is SIGKILLed, and the operator fails it over by hand
        kill_worker(cluster, 0)
        done = gpu_tasks_cli("shards", "failover", GPU0, "--json", env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        assert report["requeued"] == 1 and report["lost_buffers"] == 1
        assert set(report["moved"].values()) == {GPU1}
        # Then GPU 1 owns every shard, and runs the request GPU 0 had taken first
        assert ShardMapStore(client).load().consumed_by(GPU1) == list(range(S))
        for result in [slow, *queued]:
            assert result.get(timeout=TIMEOUT)["gpu"] == GPU1
        assert [x.decode() for x in client.lrange(log, 0, -1)] == [
            f"{entity}:{n}" for n in range(6)]
        # And the state that died with GPU 0 is reported, not hidden
        with pytest.raises(EntityStateLost, match=f"when {GPU0} died") as lost:
            read.apply_async(kwargs={"entity_id": entity, "name": "x"}).get(TIMEOUT)
        assert (lost.value.entity_id, lost.value.buffer, lost.value.gpu) == (entity, "x", GPU0)
        alloc.apply_async(kwargs={"entity_id": entity, "name": "x", "shape": [2]}).get(TIMEOUT)
        assert read.apply_async(kwargs={"entity_id": entity, "name": "x", "as_list": True}
                                ).get(TIMEOUT)["values"] == [0.0, 0.0]


def test_failover_is_refused_while_the_gpu_has_a_live_worker(
        settings: Settings, spare_url: str, tmp_path: Path) -> None:
    with own_cluster(settings, spare_url, tmp_path, gpus=2, shard_count=S) as cluster:
        done = gpu_tasks_cli("shards", "failover", GPU0, env=cluster.settings.child_env())
        assert done.returncode == 1 and "has a live worker" in done.stderr
        assert "drain it instead" in done.stderr


