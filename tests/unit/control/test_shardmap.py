"""The shard map as a value: a balanced map over GPUs, and the maps that cannot work."""

from __future__ import annotations

import pytest

from gpu_tasks.control.shardmap import ShardMap
from gpu_tasks.errors import ShardMapError


def test_a_balanced_map_gives_every_gpu_within_one_shard_of_even() -> None:
    shard_map = ShardMap.balanced(["gpu.a.0", "gpu.a.1", "gpu.a.2"], 1024)
    counts = {gpu: row["shards"] for gpu, row in shard_map.summary().items()}
    assert sum(counts.values()) == 1024
    assert max(counts.values()) - min(counts.values()) <= 1
    assert shard_map.consumed_by("gpu.a.1") == list(range(1, 1024, 3))
    assert {s.state for s in shard_map.shards} == {"owned"}


@pytest.mark.parametrize(("queues", "count", "message"), [
    ([], 8, "at least one GPU"),
    (["gpu.a.0", "gpu.a.0"], 8, "distinct"),
    (["gpu.a.0", "gpu.a.1", "gpu.a.2"], 2, "cannot cover"),
    (["gpu.a.0", "celery"], 8, "'celery' does not name a GPU"),
    (["gpu.a.0"], 1 << 17, "more than the 65536 supported"),
])
def test_a_map_that_cannot_work_is_refused(queues: list[str], count: int, message: str) -> None:
    with pytest.raises(ShardMapError, match=message):
        ShardMap.balanced(queues, count)
