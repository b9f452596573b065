"""The atomic batched take (``lua/unacked_take.lua``) and its settling, against a real
Redis: what is popped is recorded as taken in the same step, in rotation, within bounds,
and goes back to the head of its queue untouched, in order."""

from __future__ import annotations

import base64
import json

import redis

from gpu_tasks.control.unacked import (
    TAKEN,
    forget,
    put_back,
    restore_unacked,
    take,
    unacked_keys,
)
from tests.support.messages import raw_task_message

GPU = "gpu.t.0"


def push(client: redis.Redis, queue: str, n: int, start: int = 0, pad: int = 0) -> list[bytes]:
    sent = []
    for i in range(start, start + n):
        raw = raw_task_message("t", {"i": i, "pad": "x" * pad}, queue)[1].encode()
        client.lpush(queue, raw)
        sent.append(raw)
    return sent


def numbers(messages: list[bytes]) -> list[int]:
    """The ``i`` each message's body carries."""
    return [json.loads(base64.b64decode(json.loads(raw)["body"]))[1]["i"] for raw in messages]


def test_a_take_records_each_message_as_taken_in_the_same_step(spare_url: str) -> None:
    client = redis.Redis.from_url(spare_url)
    sent = push(client, "shard-1", 5)
    got = take(client, GPU, ["shard-1"], start=0, most=3, most_bytes=1 << 20)
    assert [m.raw for m in got.messages] == sent[:3]  # oldest first
    assert {m.queue for m in got.messages} == {"shard-1"}
    assert client.llen("shard-1") == 2
    keys = unacked_keys(GPU)
    held = client.hgetall(keys["unacked_key"])
    assert sorted(held) == sorted(m.tag.encode() for m in got.messages)
    for message in got.messages:
        payload, exchange, queue = json.loads(held[message.tag.encode()])
        assert (exchange, queue) == (TAKEN, "shard-1")
        assert payload["headers"]["id"]  # the message itself, as JSON
    index = client.zrange(keys["unacked_index_key"], 0, -1)
    assert index == [m.tag.encode() for m in got.messages]  # taken order


def test_restore_puts_what_was_taken_back_at_the_head_in_order(spare_url: str) -> None:
    client = redis.Redis.from_url(spare_url)
    push(client, "shard-1", 6)
    take(client, GPU, ["shard-1"], start=0, most=4, most_bytes=1 << 20)
    assert restore_unacked(client, GPU) == 4
    assert numbers(list(reversed(client.lrange("shard-1", 0, -1)))) == [0, 1, 2, 3, 4, 5]
    assert client.hlen(unacked_keys(GPU)["unacked_key"]) == 0


def test_queues_are_served_in_rotation_so_a_flood_does_not_starve_a_trickle(
        spare_url: str) -> None:
    client = redis.Redis.from_url(spare_url)
    queues = [f"shard-{i}" for i in range(8)]
    push(client, "shard-0", 500)
    push(client, "shard-5", 2)
    got = take(client, GPU, queues, start=0, most=6, most_bytes=1 << 20)
    order = [(m.queue, n) for m, n in zip(got.messages, numbers([m.raw for m in got.messages]),
                                         strict=True)]
    assert order == [("shard-0", 0), ("shard-5", 0), ("shard-0", 1), ("shard-5", 1),
                     ("shard-0", 2), ("shard-0", 3)]
    # The next take starts after the last queue its first round served.
    assert got.next_start == 6
    assert got.looked_at_all


def test_a_take_stops_at_its_byte_bound_and_a_huge_message_comes_alone(spare_url: str) -> None:
    client = redis.Redis.from_url(spare_url)
    small = push(client, "shard-1", 3, pad=100)
    got = take(client, GPU, ["shard-1"], start=0, most=10, most_bytes=2 * len(small[0]) + 10)
    assert [m.raw for m in got.messages] == small[:2]
    assert client.llen("shard-1") == 1  # the third stayed, at the head
    client.delete("shard-1")
    huge = push(client, "shard-2", 2, pad=5000)
    got = take(client, GPU, ["shard-2"], start=0, most=10, most_bytes=1000)
    assert [m.raw for m in got.messages] == huge[:1]


def test_an_empty_take_looked_at_every_queue(spare_url: str) -> None:
    client = redis.Redis.from_url(spare_url)
    got = take(client, GPU, [f"shard-{i}" for i in range(50)], start=17, most=8,
               most_bytes=1 << 20)
    assert got.messages == [] and got.looked_at_all


def test_put_back_leaves_untouched_messages_byte_for_byte_and_marks_those_that_ran(
        spare_url: str) -> None:
    client = redis.Redis.from_url(spare_url)
    sent = push(client, "shard-1", 3) + push(client, "shard-2", 2, start=10)
    got = take(client, GPU, ["shard-1", "shard-2"], start=0, most=5, most_bytes=1 << 20)
    tags = [m.tag for m in got.messages]
    ran = {got.messages[0].tag}
    assert put_back(client, GPU, tags, ran) == 5
    one = list(reversed(client.lrange("shard-1", 0, -1)))
    two = list(reversed(client.lrange("shard-2", 0, -1)))
    assert numbers(one) == [0, 1, 2] and numbers(two) == [10, 11]
    first = json.loads(one[0])
    assert first["headers"]["redelivered"] is True
    assert one[1:] == sent[1:3] and two == sent[3:]  # untouched: the very bytes sent
    assert client.hlen(unacked_keys(GPU)["unacked_key"]) == 0


def test_put_back_skips_what_was_settled_meanwhile(spare_url: str) -> None:
    client = redis.Redis.from_url(spare_url)
    push(client, "shard-1", 3)
    got = take(client, GPU, ["shard-1"], start=0, most=3, most_bytes=1 << 20)
    pipe = client.pipeline(transaction=True)
    forget(pipe, GPU, [got.messages[0].tag])
    pipe.execute()
    assert put_back(client, GPU, [m.tag for m in got.messages]) == 2
    assert numbers(list(reversed(client.lrange("shard-1", 0, -1)))) == [1, 2]
