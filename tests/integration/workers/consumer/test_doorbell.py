"""The idle GPU worker's doorbell, against a real Redis: once armed over its queues, a
producer's push rings it once; the worker's own pops do not, nor further pushes before
it is armed again."""

from __future__ import annotations

import select
from functools import partial

import redis

from gpu_tasks.control.unacked import take
from gpu_tasks.redisurl import parse
from tests.conftest import wait_until
from workers.consumer.doorbell import Doorbell

GPU = "gpu.t.0"


def rings(bell: Doorbell, timeout: float) -> bool:
    fd = bell.fileno()
    assert fd is not None
    readable, _, _ = select.select([fd], [], [], timeout)
    return bool(readable)


def test_a_push_to_a_queue_an_empty_take_read_rings_the_bell(spare_url: str) -> None:
    bell = Doorbell(partial(parse(spare_url).client, 2.0, protocol=2))
    bell.connect()
    assert bell.working
    producer = redis.Redis.from_url(spare_url)
    queues = [f"shard-{i}" for i in range(64)]
    try:
        got = take(producer, GPU, queues, start=0, most=8, most_bytes=1 << 20)
        assert got.messages == []
        assert not bell.arm(queues)
        assert not rings(bell, 0.2)
        producer.lpush("shard-40", b"{}")
        assert wait_until(lambda: rings(bell, 0.1), timeout=5)
        assert bell.drain() == {"shard-40"}
        assert not rings(bell, 0.2)  # drained: one invalidation per armed key
        # Not armed again: further pushes to a queue that rang ring nothing (no flood while
        # the worker is busy); another armed queue rings once.
        producer.lpush("shard-40", b"{}")
        assert not rings(bell, 0.2)
        producer.lpush("shard-41", b"{}")
        assert wait_until(lambda: rings(bell, 0.1), timeout=5)
        assert bell.drain() == {"shard-41"}
        producer.lpush("shard-41", b"{}")
        assert not rings(bell, 0.2)
        assert bell.arm(queues)  # work is waiting: take, do not wait
        assert len(take(producer, GPU, queues, start=0, most=8, most_bytes=1 << 20).messages) == 4
        assert not bell.arm(queues)
        producer.lpush("shard-3", b"{}")
        assert wait_until(lambda: rings(bell, 0.1), timeout=5)
    finally:
        bell.close()


def test_a_bell_whose_connection_died_says_so(spare_url: str) -> None:
    bell = Doorbell(partial(parse(spare_url).client, 2.0, protocol=2))
    bell.connect()
    admin = redis.Redis.from_url(spare_url)
    try:
        admin.client_kill_filter(_id=bell._bell_id)  # only this bell: the Redis is shared
        assert wait_until(lambda: rings(bell, 0.1), timeout=5)
        assert bell.drain() is None
        assert not bell.working
        bell.connect()  # what the worker's idle poll does
        assert bell.working
    finally:
        bell.close()
