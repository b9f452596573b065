"""The fence's decision, from plain values: who runs a request, and where it goes if not."""

from __future__ import annotations

import time

import pytest

from gpu_tasks.errors import RoutingError, ShardMapError
from gpu_tasks.protocol.routing import shard_index
from workers.consumer.fence import NO_ENTITY, judge
from workers.consumer.ownership import OwnershipTable

GPU = "gpu.n.0"
S = 16
ENTITY = "user-42"
OWN = shard_index(ENTITY, S)


def view(consumed: list[int] | None = None, lease: bool = True,
         shards: int = S) -> OwnershipTable:
    """What the worker owns: by default shard OWN of S, with its lease held."""
    owned = OwnershipTable(GPU, max_shards=S)
    owned.publish(1, [OWN] if consumed is None else consumed, shard_count=shards)
    owned.hold_lease_until(time.monotonic() + (60 if lease else -1))
    return owned


def test_an_entity_request_from_its_own_consumed_shard_queue_runs() -> None:
    assert judge(f"shard-{OWN}", ENTITY, view()).action == "run"


def test_a_request_for_a_shard_this_gpu_does_not_consume_goes_back_to_its_head() -> None:
    verdict = judge(f"shard-{OWN}", ENTITY, view(consumed=[]))
    assert (verdict.action, verdict.queue) == ("return", f"shard-{OWN}")
    assert "does not consume" in verdict.reason


def test_nothing_runs_without_the_lease() -> None:
    for source, entity in ((f"shard-{OWN}", ENTITY), (GPU, NO_ENTITY)):
        verdict = judge(source, entity, view(lease=False))
        assert (verdict.action, verdict.queue) == ("return", source)
        assert "lease" in verdict.reason


@pytest.mark.parametrize("source", [GPU, "gpu.n.3", f"shard-{(OWN + 1) % S}", "celery"])
def test_an_entity_request_on_any_other_queue_moves_to_its_shard(source: str) -> None:
    verdict = judge(source, ENTITY, view())
    assert (verdict.action, verdict.queue) == ("move", f"shard-{OWN}")
    assert f"arrived on {source}" in verdict.reason


def test_a_gpu_request_runs_only_from_this_gpus_own_queue() -> None:
    assert judge(GPU, NO_ENTITY, view()).action == "run"
    elsewhere = judge("gpu.n.3", NO_ENTITY, view())
    assert (elsewhere.action, elsewhere.queue) == ("return", "gpu.n.3")
    on_shard = judge(f"shard-{OWN}", NO_ENTITY, view())
    assert on_shard.action == "fail" and isinstance(on_shard.error, RoutingError)
    assert "without entity_id arrived on shard queue" in str(on_shard.error)


@pytest.mark.parametrize("bad", ["", None, 42, ["u"]])
def test_an_unusable_entity_id_is_answered_not_run(bad: object) -> None:
    verdict = judge(GPU, bad, view())
    assert verdict.action == "fail" and isinstance(verdict.error, RoutingError)


def test_without_a_shard_map_an_entity_request_is_answered_with_the_reason() -> None:
    verdict = judge(GPU, ENTITY, view(shards=0))
    assert verdict.action == "fail" and isinstance(verdict.error, ShardMapError)
    assert "shards init" in str(verdict.error)


def test_a_message_with_no_queue_is_answered() -> None:
    assert judge(None, ENTITY, view()).action == "fail"
