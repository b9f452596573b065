"""A raw producer's request with a time limit or a delay a GPU worker cannot honour is
answered DeadLettered, and its neighbours on the GPU keep their device state: a negative
hard limit used to make Celery kill the pool child at once, and every entity's buffers on
that GPU with it."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest
import redis

from gpu_tasks.app import app
from gpu_tasks.control.shardmap import ShardMapStore
from gpu_tasks.errors import DeadLettered
from gpu_tasks.local.cluster import LocalCluster
from gpu_tasks.protocol.routing import shard_index, shard_name
from gpu_tasks.tasks import alloc, read, write
from tests.conftest import entity_on
from tests.support.messages import raw_task_message

TIMEOUT = 30


def raw_with(entity: str, client: redis.Redis, **headers: Any) -> str:
    """Push a raw ``read`` of ``entity`` with ``headers`` changed; returns its task id."""
    queue = shard_name(shard_index(entity, ShardMapStore(client).shard_count()))
    task_id, raw = raw_task_message("gpu_tasks.read", {"entity_id": entity, "name": "x"},
                                    queue)
    payload = json.loads(raw)
    payload["headers"].update(headers)
    client.lpush(queue, json.dumps(payload))
    return task_id


@pytest.mark.parametrize("headers", [
    {"timelimit": [-1, None]},  # the wire's order: [hard, soft]
    {"timelimit": [None, -1]},
    {"timelimit": [10 ** 9, None]},
    {"eta": (datetime.datetime.now(datetime.timezone.utc)
             + datetime.timedelta(days=3)).isoformat()},
], ids=["negative-hard", "negative-soft", "past-visibility", "eta-in-3-days"])
def test_a_raw_request_a_worker_cannot_honour_is_answered_and_harms_no_neighbour(
        cluster: LocalCluster, headers: dict[str, Any]) -> None:
    client = cluster.settings.redis_client()
    # Given a neighbour with a buffer on GPU 0, and an entity on the same GPU
    neighbour, entity = entity_on(cluster, 0, "limits-n"), entity_on(cluster, 0, "limits-e")
    alloc.apply_async(kwargs={"entity_id": neighbour, "name": "kept", "shape": [2]}).get(
        timeout=TIMEOUT)
    write.apply_async(kwargs={"entity_id": neighbour, "name": "kept",
                              "values": [1.5, 2.5]}).get(timeout=TIMEOUT)
    # When a raw producer sends a request with such a limit or delay
    task_id = raw_with(entity, client, **headers)
    # Then it is answered DeadLettered, saying why, and never held or run
    with pytest.raises(DeadLettered, match=r"visibility timeout|at least 0"):
        app.AsyncResult(task_id).get(timeout=TIMEOUT)
    # And the neighbour's buffer is still there, with its values
    kept = read.apply_async(kwargs={"entity_id": neighbour, "name": "kept",
                                    "as_list": True}).get(timeout=TIMEOUT)
    assert kept["values"] == [1.5, 2.5]
