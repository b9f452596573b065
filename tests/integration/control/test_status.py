"""``gpu-tasks status`` and its snapshot: work that nothing consumes, shards without an owner or
being handed off, a worker's start time, the age of the request at the head of each queue."""

from __future__ import annotations

import json
import os
from typing import Any

import psutil

from gpu_tasks.control.shardmap import ShardMapStore
from gpu_tasks.local.cluster import LocalCluster
from gpu_tasks.protocol.routing import shard_name
from gpu_tasks.settings import Settings
from tests.conftest import gpu_tasks_cli, wait_until


def idle_deployment(url: str, owners: list[str], shard_count: int = 64,
                    unowned: int = 0) -> Any:
    """A shard map over GPUs that have no worker (the first ``unowned`` shards owned by
    nobody) in the spare database ``url``; returns its client."""
    import redis

    from gpu_tasks.control.shardmap import Shard, ShardMap

    client = redis.Redis.from_url(url)
    balanced = ShardMap.balanced(owners, shard_count)
    shards = tuple(Shard(None) if i < unowned else s for i, s in enumerate(balanced.shards))
    ShardMapStore(client).create(ShardMap(shard_count, 0, shards))
    return client


def enqueue(client: Any, gpu: str, count: int) -> list[str]:
    """``count`` requests in the queues of ``gpu``'s shards (LPUSH, as producers send);
    returns the queues used."""
    from tests.support.messages import raw_task_message

    shard_map = ShardMapStore(client).load()
    queues = [shard_name(i) for i in shard_map.by_owner()[gpu]]
    for n in range(count):
        queue = queues[n % 2]
        client.lpush(queue, raw_task_message("gpu_tasks.alloc", {
            "entity_id": f"waiting-{n}", "name": "x", "shape": [4]}, queue)[1])
    return queues[:2]


def test_status_flags_work_that_nothing_consumes_and_shards_without_owner(
        spare_url: str, settings: Settings) -> None:
    from gpu_tasks.control.status import snapshot

    # Given a map over two GPUs with no worker, 3 requests for GPU a, none for GPU b, and
    # 4 shards with no owner at all, 2 requests waiting in one of them
    a, b = "gpu.idle.0", "gpu.idle.1"
    client = idle_deployment(spare_url, [a, b], unowned=4)
    enqueue(client, a, 3)
    from tests.support.messages import raw_task_message

    for n in range(2):
        client.lpush("shard-1", raw_task_message("gpu_tasks.alloc", {"entity_id": f"u{n}"},
                                                 "shard-1")[1])
    env = {**os.environ, **settings.replace(redis_url=spare_url).to_env()}

    # When an operator runs `gpu-tasks status --json`
    done = gpu_tasks_cli("status", "--json", env=env)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    rows = {g["gpu"]: g for g in shown["gpus"]}

    # Then GPU a is stalled: its work waits, nothing consumes it, and that is a problem
    assert rows[a]["queued"] == 3 and not rows[a]["consuming"] and rows[a]["stalled"]
    assert not rows[a]["alive"] and rows[a]["lease_age_s"] is None
    assert rows[a]["oldest_s"] is not None
    assert rows[a]["problem"].startswith(f"{a}: 3 requests wait in its queues and nothing "
                                         "consumes them: no worker holds its lease")
    assert rows[a]["problem"] in shown["problems"]
    # And GPU b, with nothing waiting, is not consuming either but is no problem
    assert rows[b]["queued"] == 0 and not rows[b]["consuming"] and not rows[b]["stalled"]
    assert rows[b]["problem"] is None and rows[b]["oldest_s"] is None
    # And the shards with no owner are named, with what waits in them
    assert shown["unowned_shards"] == [f"shard-{i}" for i in range(4)]
    assert shown["unowned_queued"] == 2
    assert any(p.startswith("4 shards have no owner and 2 requests wait in them")
               for p in shown["problems"])
    assert "shard-1" in shown["waiting_without_consumer"]
    assert len(shown["waiting_without_consumer"]) == 3  # shard-1 and GPU a's two

    # And the oldest request's age grows while it waits (a lower bound: from first sight)
    first = snapshot(client).gpus[0].oldest_s
    assert first is not None
    wait_until(lambda: (snapshot(client).gpus[0].oldest_s or 0) > first + 0.2, timeout=5)

    # And the human output says so in a PROBLEM line, and shows GPU a not consuming
    human = gpu_tasks_cli("status", env=env)
    assert human.returncode == 0, human.stderr
    row = next(line for line in human.stdout.splitlines() if line.startswith(a))
    assert row.split()[:6] == [a, "-", "none", "NO", "30", "3"]
    assert any(line.startswith(f"PROBLEM {a}: 3 requests wait in its queues and nothing "
                               "consumes them") for line in human.stdout.splitlines())
    assert "PROBLEM 4 shards have no owner and 2 requests wait in them" in human.stdout
    assert f"PROBLEM {b}" not in human.stdout


def test_status_counts_a_shard_being_handed_off_as_waiting_without_consumer(
        spare_url: str) -> None:
    from gpu_tasks.control.shardmap import Shard
    from gpu_tasks.control.status import snapshot

    # Given shard-0 of GPU a in the middle of a handoff to GPU b, with a request waiting
    a, b = "gpu.moving.0", "gpu.moving.1"
    client = idle_deployment(spare_url, [a, b], shard_count=8)
    store = ShardMapStore(client)
    store.transition(0, Shard(a), Shard(a, "releasing", target=b, handoff="h-test"))
    enqueue(client, a, 1)
    # When status looks
    fleet = snapshot(client)
    # Then the shard is listed as handed off, with its request, and counted as waiting
    # with no consumer (its queue has none until the handoff ends)
    (handoff,) = fleet.handoffs
    assert (handoff.shard, handoff.state, handoff.owner, handoff.target, handoff.queued) == (
        "shard-0", "releasing", a, b, 1)
    assert fleet.waiting_without_consumer == ["shard-0"]


def test_status_piped_is_not_cut_and_has_no_colour(spare_url: str, settings: Settings) -> None:
    # Given GPUs with very long names, one of them with work and no consumer
    long_a, long_b = f"gpu.{'a' * 90}.0", f"gpu.{'b' * 90}.1"
    client = idle_deployment(spare_url, [long_a, long_b], shard_count=16)
    enqueue(client, long_a, 1)
    env = {**os.environ, **settings.replace(redis_url=spare_url).to_env(), "COLUMNS": "40"}
    # When status is piped (here: captured), even with a narrow COLUMNS
    done = gpu_tasks_cli("status", env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # Then every GPU's row is one line with its whole name, nothing is cut or wrapped, and
    # there are no terminal escapes
    assert "\x1b" not in done.stdout and "…" not in done.stdout
    for gpu in (long_a, long_b):
        (row,) = [line for line in lines if line.startswith(gpu)]
        assert row.split()[0] == gpu and len(row.split()) == 13
    (problem,) = [line for line in lines if line.startswith("PROBLEM")]
    assert problem.startswith(f"PROBLEM {long_a}: 1 requests wait in its queues and nothing "
                              "consumes them: no worker holds its lease; the oldest has waited "
                              "at least ")


def test_status_started_at_is_the_workers_start_not_its_last_heartbeat(
        cluster: LocalCluster, settings: Settings) -> None:
    from gpu_tasks.control.fleet import FleetRegistry

    fleet = FleetRegistry(cluster.settings.redis_client())
    gpu = cluster.queues[0]
    before = fleet.get(gpu)
    assert before is not None
    # When the worker heartbeats again
    after = wait_until(lambda: (r := fleet.get(gpu)) and r.heartbeat_at > before.heartbeat_at
                       and r, timeout=10 * settings.heartbeat_s)
    # Then started_at has not moved, and it is the worker's (main process's) start
    assert after.started_at == before.started_at < after.heartbeat_at
    worker = psutil.Process(cluster.workers[0].popen.pid)
    assert worker.create_time() - 1 <= after.started_at <= cluster.workers[0].started_at + 60
    assert after.started_at >= cluster.workers[0].started_at  # what wait_ready relies on


def test_status_ages_the_request_at_the_head_of_each_queue(spare_url: str) -> None:
    import redis

    from gpu_tasks.control.status import read_queues
    from gpu_tasks.keys import TAILS_KEY
    from tests.support.messages import raw_task_message

    client = redis.Redis.from_url(spare_url)
    # Given a kombu-style message (its delivery_tag near the end, after a large body), a
    # compact one with the tag first, and one with no tag at all, each first in its queue
    _, kombu = raw_task_message("gpu_tasks.write", {"entity_id": "e", "values": [1] * 3000},
                                "q-kombu")
    client.lpush("q-kombu", kombu)
    client.lpush("q-compact", '{"properties":{"delivery_tag":"tag-1"},"body":"' + "A" * 4000
                 + '"}')
    client.lpush("q-untagged", "not a celery message")
    queues = ["q-kombu", "q-compact", "q-untagged", "q-empty"]
    # When a snapshot first sees them, their age is 0; then it grows while they stay
    _, lengths, ages = read_queues(client, queues)
    assert lengths == [1, 1, 1, 0] and ages == [0.0, 0.0, 0.0, None]
    notes = {k.decode(): v.decode().split(" ", 1)[1] for k, v in
             client.hgetall(TAILS_KEY).items()}
    assert notes["q-kombu"] == json.loads(kombu)["properties"]["delivery_tag"]
    assert notes["q-compact"] == "tag-1" and len(notes["q-untagged"]) == 40  # its SHA-1
    # (newer requests behind the head do not change the head's age)
    client.lpush("q-kombu", raw_task_message("gpu_tasks.read", {"entity_id": "e"},
                                             "q-kombu")[1])
    grown = wait_until(lambda: (a := read_queues(client, queues)[2]) and all(
        x is not None and x >= 0.2 for x in a[:3]) and a, timeout=5)
    # When the head is taken (BRPOP takes the tail), the next one counts from now
    client.rpop("q-kombu")
    client.rpop("q-compact")
    _, lengths, ages = read_queues(client, queues)
    assert lengths == [1, 0, 1, 0]
    assert ages[0] is not None and ages[0] < grown[0] and ages[1] is None
    assert ages[2] is not None and ages[2] >= grown[2]
    # And the notes of queues that emptied are dropped
    assert client.hexists(TAILS_KEY, "q-compact") == 0 and client.ttl(TAILS_KEY) > 3600
