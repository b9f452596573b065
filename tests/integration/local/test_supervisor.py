"""The supervisor ``gpu-tasks up`` runs under: one worker's exit because another worker
took its GPU's lease does not take the rest of the deployment down with it."""

from __future__ import annotations

import threading
from pathlib import Path

from gpu_tasks.local.cluster import LocalCluster
from gpu_tasks.local.supervisor import Silent, Supervisor
from gpu_tasks.settings import Settings
from gpu_tasks.tasks import alloc
from tests.conftest import entity_on, own_cluster, wait_until


class LetGo(Silent):
    def __init__(self) -> None:
        self.names: list[str] = []

    def let_go(self, cluster: LocalCluster, name: str) -> None:
        self.names.append(name)


def test_a_worker_that_lost_its_lease_is_let_go_and_the_rest_stay_up(
        spare_url: str, settings: Settings, tmp_path: Path) -> None:
    with own_cluster(settings, spare_url, tmp_path, gpus=2, shard_count=16) as cluster:
        client = cluster.settings.redis_client()
        first, second = cluster.workers
        told = LetGo()
        stop, failed = threading.Event(), []

        def watch() -> None:
            try:
                Supervisor(cluster, told, poll_s=0.1).watch(stop)
            except Exception as exc:  # what up would have ended the deployment with
                failed.append(exc)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            # When another worker takes GPU 0's lease (its worker then exits with status 3)
            client.hset(f"gpu-tasks:lease:{cluster.queues[0]}", "token", "another-worker")
            assert first.popen.wait(30) == 3
            # Then the supervisor lets it go and watches on: nothing else stops
            wait_until(lambda: told.names == [first.name], timeout=10)
            assert watcher.is_alive() and failed == []
            assert cluster.workers == [second] and second.alive()
            entity = entity_on(cluster, 1, "still-served")
            done = alloc.apply_async(kwargs={"entity_id": entity, "name": "x", "shape": [1]})
            assert done.get(timeout=30)["gpu"] == cluster.queues[1]
        finally:
            stop.set()
            watcher.join(10)
        assert failed == []
