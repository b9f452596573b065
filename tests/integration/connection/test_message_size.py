"""A request larger than GPU workers take (GPU_TASKS_MAX_MESSAGE) is refused where it is
sent, whichever way (apply_async, send_task): the producer hears at once and nothing is
enqueued. Bulk and batch refuse it too (their own tests)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from gpu_tasks.app import app, configure
from gpu_tasks.control.shardmap import ShardMap, ShardMapStore
from gpu_tasks.errors import RoutingError
from gpu_tasks.settings import Settings
from gpu_tasks.tasks import write

LIMIT = 256 << 10


@pytest.fixture()
def small_limit(spare_url: str, settings: Settings) -> Iterator[redis.Redis]:
    """The shared app on an empty database with a shard map, GPU_TASKS_MAX_MESSAGE 256 KiB."""
    client = redis.Redis.from_url(spare_url)
    ShardMapStore(client).create(ShardMap.balanced(["gpu.size.0"], 16))
    configure(settings.replace(redis_url=spare_url, max_message_bytes=LIMIT))
    try:
        yield client
    finally:
        configure(settings)


def queued(client: redis.Redis) -> int:
    return sum(int(client.llen(f"shard-{i}")) for i in range(16))


def test_an_oversized_request_is_refused_at_submit_and_nothing_is_enqueued(
        small_limit: redis.Redis) -> None:
    values = [1.0] * (LIMIT // 4)  # about 1 MB of JSON, more in base64
    with pytest.raises(RoutingError, match=r"over the 262144-byte limit "
                                           r"\(GPU_TASKS_MAX_MESSAGE\).*nothing was enqueued"):
        write.apply_async(kwargs={"entity_id": "big", "name": "x", "values": values})
    with pytest.raises(RoutingError, match="GPU_TASKS_MAX_MESSAGE"):
        app.send_task("gpu_tasks.write", kwargs={"entity_id": "big", "name": "x",
                                                 "values": values})
    assert queued(small_limit) == 0
    # And one just under the limit goes
    write.apply_async(kwargs={"entity_id": "big", "name": "x", "values": [1.0] * 1000})
    assert queued(small_limit) == 1
