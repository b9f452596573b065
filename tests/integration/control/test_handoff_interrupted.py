"""A handoff interrupted at any step is finished by a re-run of the same move; one whose target
dies while importing is rolled back, the source keeping the shard and its state."""

from __future__ import annotations

import json
import signal

import pytest

from gpu_tasks.control.handoff import STEPS
from gpu_tasks.control.shardmap import Shard
from gpu_tasks.local.cluster import LocalCluster
from gpu_tasks.protocol.routing import shard_index
from tests.support.handoff import GPU, Producer, S, cli, other_gpu, owner_of, start_paused


@pytest.mark.slow  # a kill -9 at each step, a cluster each
@pytest.mark.parametrize("step", STEPS)
def test_a_handoff_whose_driver_is_killed_at_any_step_is_finished_by_a_rerun(
        two_gpus: LocalCluster, step: str) -> None:
    cluster = two_gpus
    client = cluster.settings.redis_client()
    entity = f"interrupted-{step}"
    index = shard_index(entity, S)
    producer = Producer([entity])
    producer.round()
    producer.round()
    source = owner_of(client, entity).owner
    target = other_gpu(source)
    # When the driver is SIGKILLed after the step, with requests sent meanwhile
    driver = start_paused(cluster, step, index, target)
    producer.round()
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    # Then the map says where the handoff stands, and no shard has two consumers
    shown = json.loads(cli(cluster, "shards", "show", "--json").stdout)
    entry = shown["shards"][f"shard-{index}"]
    assert entry["state"] == {"releasing": "releasing", "exported": "releasing",
                              "importing": "importing", "imported": "importing",
                              "owned": "owned"}[step], entry
    # And running the command again finishes it
    again = cli(cluster, "shards", "move", f"shard-{index}", target, "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    assert owner_of(client, entity) == Shard(target, "owned")
    producer.round()
    verdict = producer.verdict(client)
    assert verdict.ok and verdict.executions == 4, str(verdict)


def test_a_target_killed_during_the_import_leaves_the_shard_with_its_source(
        two_gpus: LocalCluster) -> None:
    cluster = two_gpus
    client = cluster.settings.redis_client()
    entity = "target-dies"
    index = shard_index(entity, S)
    producer = Producer([entity])
    producer.round()
    source = owner_of(client, entity).owner
    assert source is not None
    target_index = 1 if source == GPU[0] else 0
    target = GPU[target_index]
    driver = start_paused(cluster, "importing", index, target)
    cluster.workers[target_index].signal_group(signal.SIGKILL)
    cluster.workers[target_index].popen.wait(10)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    again = cli(cluster, "shards", "move", f"shard-{index}", target, "--json")
    assert again.returncode == 1
    assert json.loads(again.stdout)["handoffs"][0]["status"] == "rolled back"
    assert owner_of(client, entity) == Shard(source, "owned")
    producer.round()
    # And the source kept the entity's state: the second step found the first's counter
    verdict = producer.verdict(client)
    assert verdict.ok and verdict.executions == 2, str(verdict)
