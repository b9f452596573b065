"""A GPU (the source or the target) killed at any step of a handoff: after a re-run and a
failover every request ran once and in order, and state was lost only with the GPU that held
it, and then said so."""

from __future__ import annotations

import signal

import pytest

from gpu_tasks.control.handoff import STEPS
from gpu_tasks.control.shardmap import Shard
from gpu_tasks.local.cluster import LocalCluster
from gpu_tasks.protocol.routing import shard_index
from tests.conftest import gpu_tasks_cli, kill_worker
from tests.support.handoff import GPU, Producer, S, other_gpu, owner_of, start_paused


@pytest.mark.slow  # a kill -9 at each step of both sides, a cluster each
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("victim", ["source", "target"])
def test_a_gpu_killed_at_any_step_of_a_handoff_loses_nothing_silently(
        two_gpus: LocalCluster, victim: str, step: str) -> None:
    cluster = two_gpus
    client = cluster.settings.redis_client()
    entity = f"{victim}-dies-{step}"
    index = shard_index(entity, S)
    producer = Producer([entity])
    producer.round()
    producer.round()
    source = owner_of(client, entity).owner
    target = other_gpu(source)
    dead = source if victim == "source" else target
    # When the GPU dies while the handoff is paused after the step, and the driver too
    driver = start_paused(cluster, step, index, target)
    kill_worker(cluster, GPU.index(dead))
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    producer.round()
    # And the operator runs the move again, then fails the dead GPU over
    gpu_tasks_cli("shards", "move", str(index), target, env=cluster.settings.child_env())
    failed_over = gpu_tasks_cli("shards", "failover", dead, env=cluster.settings.child_env())
    assert failed_over.returncode == 0, failed_over.stdout + failed_over.stderr
    producer.round()
    # Then the shard is on the GPU that lives, every request ran once and in order, and
    # state was lost only where it died with its GPU: and then it was said so
    survivor = target if dead == source else source
    assert owner_of(client, entity) == Shard(survivor, "owned")
    verdict = producer.verdict(client)
    assert verdict.ok and verdict.executions == 4, str(verdict)
    state_died = (victim == "source" and step in ("releasing", "exported")) or (
        victim == "target" and step == "owned")
    assert bool(verdict.reported_losses) == state_died, str(verdict)
