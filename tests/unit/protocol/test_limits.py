"""Time limits and delays a GPU worker cannot honour are refused: at submit (nothing is
enqueued) and in the worker's message check (a raw producer's message is dead-lettered)."""

from __future__ import annotations

import datetime
import json
import math
from typing import Any

import pytest

from gpu_tasks.errors import BadArguments, RoutingError
from gpu_tasks.protocol.checks import check_message
from gpu_tasks.protocol.limits import time_limit_problem
from gpu_tasks.tasks import alloc, run
from tests.support.messages import raw_task_message

VISIBILITY_S = 3600.0


@pytest.mark.parametrize("value", [None, 0, 0.5, 30, 3599.0])
def test_limits_a_worker_can_honour_pass(value: Any) -> None:
    assert time_limit_problem("time_limit", value, VISIBILITY_S) == ""


@pytest.mark.parametrize(("value", "says"), [
    (-1, "at least 0"), (-0.001, "at least 0"), (math.nan, "finite"), (math.inf, "finite"),
    (-math.inf, "finite"), ("30", "a number"), (True, "a number"), ([1], "a number"),
    (3600, "visibility timeout"), (1e9, "visibility timeout"),
])
def test_limits_a_worker_cannot_honour_say_why(value: Any, says: str) -> None:
    assert says in time_limit_problem("time_limit", value, VISIBILITY_S)


@pytest.mark.parametrize("option", ["time_limit", "soft_time_limit"])
@pytest.mark.parametrize("value", [-1, math.nan, math.inf, 7200])
def test_a_producer_is_refused_a_limit_before_anything_is_sent(option: str, value: Any) -> None:
    with pytest.raises(RoutingError, match=f"{option}.*nothing was enqueued"):
        run.apply_async(kwargs={"entity_id": "e", "kernel": "sum", "x": "v"},
                        **{option: value})


@pytest.mark.parametrize("kwargs", [[1, 2], "abc", 42])
def test_kwargs_that_are_not_an_object_are_a_typed_error(kwargs: Any) -> None:
    with pytest.raises(BadArguments, match="kwargs must be an object") as caught:
        alloc.apply_async(kwargs=kwargs)
    assert caught.value.field == "kwargs"
    from gpu_tasks.app import app

    with pytest.raises(BadArguments, match="kwargs must be an object"):
        app.send_task("gpu_tasks.alloc", kwargs=kwargs)


def message(**headers: Any) -> bytes:
    _, raw = raw_task_message("gpu_tasks.alloc", {"entity_id": "e", "name": "x"}, "shard-1")
    payload = json.loads(raw)
    payload["headers"].update(headers)
    return json.dumps(payload).encode()


def checked(raw: bytes) -> str:
    return check_message(raw, max_bytes=1 << 20, max_nesting=64,
                         visibility_timeout_s=VISIBILITY_S).reason


def test_the_worker_refuses_a_raw_message_with_a_negative_or_too_long_limit() -> None:
    assert checked(message(timelimit=[None, 30])) == ""
    assert checked(message(timelimit=[0, 0])) == ""
    # the wire's order is [hard, soft]
    assert checked(message(timelimit=[-1, None])).startswith(
        "headers.timelimit: time_limit must be at least 0")
    assert "soft_time_limit must be at least 0" in checked(message(timelimit=[None, -5]))
    assert "visibility timeout" in checked(message(timelimit=[None, 86400]))
    # NaN and Infinity are not JSON, but Python's and kombu's parsers read them
    raw = message(timelimit=[None, 1]).replace(b"[null, 1]", b"[null, Infinity]")
    assert "finite" in checked(raw)


def test_the_worker_refuses_a_raw_message_due_past_the_visibility_timeout() -> None:
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=2)
    assert checked(message(eta=soon.isoformat())) == ""
    assert "visibility timeout" in checked(message(eta=later.isoformat()))
