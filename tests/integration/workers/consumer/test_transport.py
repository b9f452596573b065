"""The GPU worker's kombu transport, against a real Redis: one prepacked BRPOP that rotates,
deliveries stamped with their source queue, requeues and recovery at the queue's head."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Queue

from gpu_tasks.control.unacked import SOURCE, restore_unacked, unacked_keys
from tests.support.messages import raw_task_message
from workers.consumer.transport import GpuChannel, GpuTransport

GPU = "gpu.t.0"


@pytest.fixture()
def conn(spare_url: str) -> Iterator[Connection]:
    with Connection(spare_url, transport=GpuTransport,
                    transport_options={**unacked_keys(GPU), "priority_steps": [0]}) as c:
        yield c


def consume(conn: Connection, names: list[str], prefetch: int = 1) -> tuple[Consumer, list[Any]]:
    got: list[Any] = []
    queues = [Queue(n, Exchange(n, "direct"), n) for n in names]
    consumer = Consumer(conn.default_channel, queues, callbacks=[lambda _b, m: got.append(m)],
                        accept=["json"])
    consumer.qos(prefetch_count=prefetch)
    consumer.consume()
    return consumer, got


def test_one_brpop_over_every_queue_starting_after_the_one_served_last(
        conn: Connection) -> None:
    names = [f"shard-{i}" for i in range(5)]
    consume(conn, names)
    channel: GpuChannel = conn.default_channel
    assert channel.active_queues == names

    def packed(keys: list[str]) -> bytes:
        return b"".join(redis.Connection()._command_packer.pack("BRPOP", *keys, 1))

    assert channel.brpop_command(1) == packed(names)
    channel._queue_cycle.rotate("shard-2")  # what a delivery from shard-2 does
    assert channel.brpop_command(1) == packed([*names[3:], *names[:3]])
    channel._queue_cycle.rotate("shard-4")
    assert channel.brpop_command(1) == packed(names)


def test_a_flooded_queue_does_not_starve_the_others(conn: Connection, spare_url: str) -> None:
    client = redis.Redis.from_url(spare_url)
    for i in range(30):
        client.lpush("shard-0", raw_task_message("t", {"i": i}, "shard-0")[1])
    for i in range(3):
        client.lpush("shard-3", raw_task_message("t", {"i": i}, "shard-3")[1])
    _, got = consume(conn, ["shard-0", "shard-1", "shard-2", "shard-3"])
    order = []
    while len(order) < 8:
        conn.drain_events(timeout=5)
        message = got.pop()
        order.append(message.delivery_info[SOURCE])
        message.ack()
    assert order.count("shard-3") == 3 and order.index("shard-3") <= 1, order


def test_deliveries_are_stamped_with_the_list_they_came_from(
        conn: Connection, spare_url: str) -> None:
    client = redis.Redis.from_url(spare_url)
    client.lpush("shard-1", raw_task_message("t", {}, "gpu.other.7")[1])  # routing key lies
    _, got = consume(conn, ["shard-1"])
    conn.drain_events(timeout=5)
    assert got[0].delivery_info[SOURCE] == "shard-1"
    assert got[0].delivery_info["routing_key"] == "gpu.other.7"


def test_a_requeued_message_goes_back_to_the_head_of_its_queue(
        conn: Connection, spare_url: str) -> None:
    client = redis.Redis.from_url(spare_url)
    for i in range(2):
        client.lpush("shard-1", raw_task_message("t", {"i": i}, "shard-1")[1])
    _, got = consume(conn, ["shard-1"])
    conn.drain_events(timeout=5)
    first = got.pop()
    assert first.decode()[1] == {"i": 0}
    first.reject(requeue=True)
    assert client.hlen(unacked_keys(GPU)["unacked_key"]) == 0
    conn.drain_events(timeout=5)
    again = got.pop()
    assert again.decode()[1] == {"i": 0} and again.delivery_info["redelivered"]


def test_what_a_dead_worker_had_taken_goes_back_to_the_head_in_the_order_it_was_taken(
        spare_url: str) -> None:
    # Given GPU's unacked entries as kombu writes them: two from shard-1 (taken in the
    # order a then b), one from shard-2, and requests still waiting behind them
    client = redis.Redis.from_url(spare_url)
    keys = unacked_keys(GPU)
    entries = [("a", "shard-1"), ("c", "shard-2"), ("b", "shard-1")]
    for when, (name, queue) in enumerate(entries):
        payload = json.loads(raw_task_message("t", {"name": name}, queue)[1])
        payload["properties"]["delivery_info"][SOURCE] = queue
        tag = payload["properties"]["delivery_tag"]
        client.hset(keys["unacked_key"], tag, json.dumps([payload, queue, queue]))
        client.zadd(keys["unacked_index_key"], {tag: 1000 + when})
    client.lpush("shard-1", raw_task_message("t", {"name": "waiting"}, "shard-1")[1])
    # When its worker boots, then they are back at their queues' heads, earliest first
    assert restore_unacked(client, GPU) == 3
    assert not client.exists(keys["unacked_key"], keys["unacked_index_key"])

    def heads(queue: str) -> list[tuple[str, bool]]:
        out = []
        for raw in reversed(client.lrange(queue, 0, -1)):  # BRPOP takes from the right
            payload = json.loads(raw)
            body = json.loads(base64.b64decode(payload["body"]))
            out.append((body[1]["name"], bool(payload["headers"].get("redelivered"))))
        return out

    assert heads("shard-1") == [("a", True), ("b", True), ("waiting", False)]
    assert heads("shard-2") == [("c", True)]
