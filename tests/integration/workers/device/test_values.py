"""End to end (real Redis, the session's four sim GPU workers): values a buffer's dtype
cannot hold are refused as BadRequest naming the field and index, reads come in bounded
chunks, a failed replacing alloc keeps the old buffer, odd keyword arguments are answered
with BadRequest, and over-long entity ids are refused at submit time."""

from __future__ import annotations

import base64
import math
import uuid
from typing import Any

import numpy as np
import pytest

from gpu_tasks.app import app
from gpu_tasks.errors import BadRequest, OutOfMemory, RoutingError
from gpu_tasks.local.cluster import LocalCluster
from gpu_tasks.tasks import alloc, read, run, write
from tests.conftest import SIM_MEMORY

TIMEOUT = 30


def call(task: Any, **kwargs: Any) -> Any:
    return task.apply_async(kwargs=kwargs).get(timeout=TIMEOUT)


def entity(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def refused(task: Any, **kwargs: Any) -> BadRequest:
    with pytest.raises(BadRequest) as raised:
        call(task, **kwargs)
    return raised.value


@pytest.mark.parametrize(("dtype", "values", "message"), [
    ("int32", [1e20, math.nan], "values[0] = 1e+20 cannot be stored in int32"),
    ("int32", [1, math.nan], "values[1] = nan cannot be stored in int32"),
    ("uint8", [300], "values[0] = 300 cannot be stored in uint8"),
    ("int64", [2**63 - 1, 1.5], "values[1] = 1.5 cannot be stored in int64"),
    ("int64", [0, 2**70], "values[1] = 1180591620717411303424 cannot be stored in int64"),
    ("float16", [1, 70000], "values[1] = 70000 cannot be stored in float16"),
])
def test_write_refuses_values_the_dtype_cannot_hold(cluster: LocalCluster, dtype: str,
                                                    values: list[Any], message: str) -> None:
    # Given a buffer holding known values
    e = entity("values")
    call(alloc, entity_id=e, name="b", shape=[len(values)], dtype=dtype)
    call(write, entity_id=e, name="b", values=[7] * len(values))
    # When values it cannot hold are written, Then the answer names the field and the index
    error = refused(write, entity_id=e, name="b", values=values)
    assert error.field == "values" and message in str(error), str(error)
    # And nothing was written
    assert call(read, entity_id=e, name="b", as_list=True)["values"] == [7] * len(values)
    # And cast="unsafe" stores numpy's cast instead
    call(write, entity_id=e, name="b", values=values, cast="unsafe")


def test_unsafe_cast_is_numpys_and_cast_is_checked(cluster: LocalCluster) -> None:
    e = entity("cast")
    call(alloc, entity_id=e, name="u", shape=[2], dtype="uint8")
    call(write, entity_id=e, name="u", values=[300, -1], cast="unsafe")
    assert call(read, entity_id=e, name="u", as_list=True)["values"] == [44, 255]
    assert refused(write, entity_id=e, name="u", values=[1], cast="same_kind").field == "cast"
    # data_b64 carries the buffer's own dtype: it needs no cast, and is bounded the same way
    raw = base64.b64encode(np.array([1, 2, 3], np.uint8).tobytes()).decode()
    error = refused(write, entity_id=e, name="u", data_b64=raw)
    assert error.field == "data_b64" and "overruns" in str(error)


@pytest.mark.parametrize(("kernel", "dtype", "params", "field"), [
    ("fill", "uint8", {"out": "x", "value": 300}, "value"),
    ("fill", "int32", {"out": "x", "value": 1e20}, "value"),
    ("fill", "int64", {"out": "x", "value": 2**63}, "value"),
    ("scale", "int32", {"x": "x", "alpha": 1.5}, "alpha"),
    ("axpy", "int64", {"x": "x", "y": "x", "alpha": 0.5}, "alpha"),
])
def test_kernel_scalars_the_dtype_cannot_hold_are_refused(
        cluster: LocalCluster, kernel: str, dtype: str, params: dict[str, Any],
        field: str) -> None:
    e = entity("scalars")
    call(alloc, entity_id=e, name="x", shape=[3], dtype=dtype)
    call(run, entity_id=e, kernel="fill", out="x", value=2)
    error = refused(run, entity_id=e, kernel=kernel, **params)
    assert error.field == field and f"cannot be stored in {dtype}" in str(error), str(error)
    assert call(read, entity_id=e, name="x", as_list=True)["values"] == [2, 2, 2]
    call(run, entity_id=e, kernel=kernel, cast="unsafe", **params)
    if kernel == "fill" and dtype == "uint8":
        assert call(read, entity_id=e, name="x", as_list=True)["values"] == [44, 44, 44]


def test_reads_come_in_chunks(cluster: LocalCluster) -> None:
    # Given a buffer larger than one as_list read may return (1,000,000 elements)
    e = entity("chunks")
    size = 1_000_003
    call(alloc, entity_id=e, name="big", shape=[size], dtype="uint8")
    call(write, entity_id=e, name="big", values=[9, 8, 7], offset=size - 3)
    # When it is read whole as a list, Then the answer says how to read it in parts
    error = refused(read, entity_id=e, name="big", as_list=True)
    assert error.field == "count" and "offset=0, count=1000000" in str(error), str(error)
    # And in parts it reads
    tail = call(read, entity_id=e, name="big", as_list=True, offset=1_000_000)
    assert (tail["offset"], tail["count"], tail["values"]) == (1_000_000, 3, [0, 9, 8, 7][1:])
    assert tail["shape"] == [size]
    part = call(read, entity_id=e, name="big", offset=size - 5, count=4)
    assert list(base64.b64decode(part["data_b64"])) == [0, 0, 9, 8]
    # And the whole buffer still reads as data_b64 (it is under GPU_TASKS_MAX_READ)
    whole = call(read, entity_id=e, name="big")
    assert whole["count"] == size and len(base64.b64decode(whole["data_b64"])) == size
    for kwargs, field in (({"offset": size + 1}, "offset"), ({"count": size + 1}, "count"),
                          ({"offset": "0"}, "offset"), ({"as_list": "yes"}, "as_list")):
        assert refused(read, entity_id=e, name="big", **kwargs).field == field


def test_a_failed_replacing_alloc_keeps_the_old_buffer(cluster: LocalCluster) -> None:
    # Given a buffer with values
    e = entity("replace")
    call(alloc, entity_id=e, name="keep", shape=[4], dtype="int32")
    call(write, entity_id=e, name="keep", values=[1, 2, 3, 4])
    # When it is replaced by one the GPU cannot hold
    with pytest.raises(OutOfMemory):
        call(alloc, entity_id=e, name="keep", shape=[SIM_MEMORY + 1], dtype="uint8")
    # Then the old one reads back as it was
    got = call(read, entity_id=e, name="keep", as_list=True)
    assert (got["dtype"], got["values"]) == ("int32", [1, 2, 3, 4])


@pytest.mark.parametrize(("name", "kwargs", "field"), [
    ("gpu_tasks.write", {"name": "x", "values": [1], "self": 1}, "self"),
    ("gpu_tasks.read", {"name": "x", "self": None}, "self"),
    ("gpu_tasks.run", {"kernel": "fill", "out": "x", "value": 1, "self": "x"}, "self"),
    ("gpu_tasks.alloc", {"name": "x", "shape": [1], "gpu": 0}, "gpu"),
    ("gpu_tasks.read", {"name": "x", "colour": 1}, "colour"),
])
def test_odd_keyword_arguments_are_bad_requests(cluster: LocalCluster, name: str,
                                                kwargs: dict[str, Any], field: str) -> None:
    e = entity("kwargs")
    call(alloc, entity_id=e, name="x", shape=[1], dtype="float32")
    # send_task skips Celery's own submit-time check of the arguments, as other languages do
    with pytest.raises(BadRequest) as raised:
        app.send_task(name, kwargs={"entity_id": e, **kwargs}).get(timeout=TIMEOUT)
    assert raised.value.field == field, str(raised.value)
    assert call(read, entity_id=e, name="x", as_list=True)["values"] == [0.0]


def test_over_long_entity_ids_are_refused_at_submit_time(cluster: LocalCluster) -> None:
    with pytest.raises(RoutingError, match="1025 characters; at most 1024"):
        alloc.apply_async(kwargs={"entity_id": "e" * 1025, "name": "x", "shape": [1]})
    assert call(alloc, entity_id="e" * 1024, name="x", shape=[1])["buffer"]["nbytes"] == 4
