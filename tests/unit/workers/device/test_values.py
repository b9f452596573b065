"""Values into a buffer's dtype: what the dtype cannot hold is refused, never stored wrong.

Against the ``sim`` backend directly (no Celery): :mod:`workers.device.values`, the kernels'
scalars, the store's replacing ``alloc`` and its limits, ranged downloads.
"""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest

from gpu_tasks.errors import BadRequest, DeviceError, OutOfMemory, RoutingError
from gpu_tasks.protocol.routing import EntityRouter, validate_entity_id
from gpu_tasks.settings import Settings
from workers.child import executor, handlers, runtime
from workers.child.completed import Completed
from workers.child.runtime import EntityContext, element_range
from workers.device.base import Backend
from workers.device.kernels import launch
from workers.device.registry import create_backend
from workers.device.store import BufferStore
from workers.device.values import parse_cast, to_dtype, to_scalar

CAPACITY = 8 << 20
NAN, INF = math.nan, math.inf


@pytest.fixture()
def backend() -> Iterator[Backend]:
    be = create_backend("sim", node="unit", gpu_index=0, sim_memory_bytes=CAPACITY)
    be.open()
    yield be
    be.close()


@pytest.fixture()
def store(backend: Backend) -> BufferStore:
    return BufferStore(backend, generation=1)


def read(store: BufferStore, name: str, entity: str = "e") -> list[Any]:
    return list(store.backend.download(store.get(entity, name)).reshape(-1).tolist())


REFUSED: list[tuple[list[Any], str, int, str]] = [
    # values, dtype, first bad index, how it is shown
    ([1e20, NAN], "int32", 0, "1e+20"),
    ([1, NAN], "int32", 1, "nan"),
    ([0, -INF], "int64", 1, "-inf"),
    ([300], "uint8", 0, "300"),
    ([0, -1], "uint8", 1, "-1"),
    ([2**63 - 1, 1.5], "int64", 1, "1.5"),
    ([2**63], "int64", 0, "9223372036854775808"),
    ([-1, 2**63], "int64", 1, "9223372036854775808"),
    ([1.0, 2.0**63], "int64", 1, "9.223372036854776e+18"),
    ([2**31], "int32", 0, "2147483648"),
    ([7, 2**200], "int32", 1, "160693804425899027..."),  # beyond 64 bits: no OverflowError
    ([70000], "float16", 0, "70000"),
    ([1.0, 1e300], "float32", 1, "1e+300"),
    ([0, 10**400], "float64", 1, "100000000000000000..."),  # beyond float64: no OverflowError
]


@pytest.mark.parametrize(("data", "dtype", "index", "shown"), REFUSED)
def test_a_value_the_dtype_cannot_hold_is_refused_naming_its_index(
        data: list[Any], dtype: str, index: int, shown: str) -> None:
    # Given values one of which the dtype cannot hold, when converted the safe way (default)
    with pytest.raises(BadRequest) as raised:
        to_dtype(data, np.dtype(dtype))
    # Then the refusal names the field, the first bad index and the dtype
    assert raised.value.field == "values"
    assert f"values[{index}] = {shown}" in str(raised.value)
    assert f"cannot be stored in {dtype}" in str(raised.value)


@pytest.mark.parametrize(("data", "dtype", "index", "shown"), REFUSED)
def test_cast_unsafe_stores_numpys_cast(data: list[Any], dtype: str, index: int,
                                        shown: str) -> None:
    got = to_dtype(data, np.dtype(dtype), cast="unsafe")
    assert got.dtype == np.dtype(dtype) and got.size == len(data)


def test_unsafe_is_numpys_cast_and_wraps_integers_beyond_64_bits() -> None:
    assert to_dtype([300, -1], np.dtype("uint8"), cast="unsafe").tolist() == [44, 255]
    assert to_dtype([2**64 + 5], np.dtype("int64"), cast="unsafe").tolist() == [5]
    assert to_dtype([70000], np.dtype("float16"), cast="unsafe").tolist() == [INF]


def test_what_the_dtype_holds_goes_in_exactly() -> None:
    assert to_dtype([2**63 - 1, -(2**63)], np.dtype("int64")).tolist() == [2**63 - 1, -(2**63)]
    # ints mixed with floats become a float64 array in numpy; large ones are kept exact
    assert to_dtype([2**53 + 1, 1.0], np.dtype("int64")).tolist() == [2**53 + 1, 1]
    assert to_dtype([2**63 - 1, 1.0], np.dtype("int64")).tolist() == [2**63 - 1, 1]
    assert to_dtype([255, 0, 3.0], np.dtype("uint8")).tolist() == [255, 0, 3]
    assert to_dtype([65504, -65504.0], np.dtype("float16")).tolist() == [65504, -65504]
    assert to_dtype([0.1, 2**70], np.dtype("float32")).dtype == np.float32  # rounding is fine
    nan, inf = to_dtype([NAN, INF], np.dtype("float32")).tolist()  # floats hold NaN and inf
    assert math.isnan(nan) and inf == INF
    assert to_dtype([], np.dtype("int32")).size == 0


@pytest.mark.parametrize("bad", [[True], [1, "2"], [None], [[1]]])
def test_only_numbers_are_values(bad: list[Any]) -> None:
    with pytest.raises(BadRequest, match=r"values\[\d\] = .* is not a number") as raised:
        to_dtype(bad, np.dtype("float32"))
    assert raised.value.field == "values"


def test_numpy_arrays_are_checked_the_same_way() -> None:
    with pytest.raises(BadRequest, match=r"values\[2\] = 70000"):
        to_dtype(np.array([1.0, 2.0, 70000.0]), np.dtype("float16"))
    with pytest.raises(BadRequest, match=r"values\[0\] = 1.5"):
        to_dtype(np.array([1.5]), np.dtype("int32"))
    assert to_dtype(np.arange(4, dtype=np.int64), np.dtype("uint8")).tolist() == [0, 1, 2, 3]


def test_cast_takes_only_safe_or_unsafe() -> None:
    assert parse_cast("safe") == "safe" and parse_cast("unsafe") == "unsafe"
    for bad in ("same_kind", "", None, 1):
        with pytest.raises(BadRequest) as raised:
            parse_cast(bad)
        assert raised.value.field == "cast"


def test_a_million_values_are_checked_about_as_fast_as_they_convert() -> None:
    floats = np.random.default_rng(0).standard_normal(1_000_000).tolist()
    ints = list(range(1_000_000))
    start = time.perf_counter()
    np.asarray(floats).astype(np.float32)
    np.asarray(ints).astype(np.int32)
    plain = time.perf_counter() - start
    start = time.perf_counter()
    to_dtype(floats, np.dtype("float32"))
    to_dtype(ints, np.dtype("int32"))
    checked = time.perf_counter() - start
    assert checked < max(5 * plain, 0.5), (checked, plain)


def test_scalars_are_values_of_the_buffers_dtype() -> None:
    assert to_scalar(2**62 + 1, np.dtype("int64"), "value") == 2**62 + 1  # not via a float
    with pytest.raises(BadRequest, match=r"^value = 300 cannot be stored in uint8"):
        to_scalar(300, np.dtype("uint8"), "value")
    assert to_scalar(300, np.dtype("uint8"), "value", "unsafe") == 44


# -- the kernels' scalars ---------------------------------------------------------------


@pytest.mark.parametrize(("kernel", "dtype", "params", "field"), [
    ("fill", "uint8", {"value": 300}, "value"),
    ("fill", "int32", {"value": 1e20}, "value"),
    ("fill", "int64", {"value": 2**63}, "value"),
    ("fill", "int64", {"value": 10**400}, "value"),  # no bare OverflowError
    ("fill", "int32", {"value": 1.5}, "value"),
    ("scale", "int32", {"alpha": 1.5}, "alpha"),
    ("scale", "int32", {"alpha": 2**40}, "alpha"),
    ("axpy", "int64", {"alpha": 0.5}, "alpha"),
    ("scale", "float32", {"alpha": 1e300}, "alpha"),
])
def test_kernel_scalars_the_dtype_cannot_hold_are_refused(
        store: BufferStore, kernel: str, dtype: str, params: dict[str, Any], field: str) -> None:
    buffers = {"fill": {"out": "x"}, "scale": {"x": "x"}, "axpy": {"x": "x", "y": "y"}}[kernel]
    for name in ("x", "y"):
        store.alloc("e", name, [4], dtype)
    store.backend.fill(store.get("e", "x"), 3)
    with pytest.raises(BadRequest, match=f"^{field} = .* cannot be stored in {dtype}") as raised:
        launch(store, "e", kernel, {**buffers, **params})
    assert raised.value.field == field
    assert read(store, "x") == [3] * 4  # nothing was computed
    # And with cast="unsafe" numpy's cast is used instead
    launch(store, "e", kernel, {**buffers, **params}, cast="unsafe")


def test_kernel_scalars_that_fit_compute_exactly(store: BufferStore) -> None:
    store.alloc("e", "x", [3], "int64")
    launch(store, "e", "fill", {"out": "x", "value": 2**62 + 1})
    assert read(store, "x") == [2**62 + 1] * 3
    store.alloc("e", "u", [2], "uint8")
    launch(store, "e", "fill", {"out": "u", "value": 255.0})
    assert read(store, "u") == [255, 255]
    launch(store, "e", "fill", {"out": "u", "value": 300}, cast="unsafe")
    assert read(store, "u") == [44, 44]
    with pytest.raises(BadRequest) as raised:
        launch(store, "e", "fill", {"out": "u", "value": 1}, cast="lossy")
    assert raised.value.field == "cast"


# -- a replacing alloc that fails leaves the old buffer as it was -----------------------


def test_a_failed_replacing_alloc_keeps_the_old_buffer(store: BufferStore) -> None:
    # Given a buffer with data
    old = store.alloc("e", "b", [4], "int32")
    store.backend.upload(old, np.array([1, 2, 3, 4], np.int32), 0)
    # When it is replaced by one larger than the whole GPU
    with pytest.raises(OutOfMemory):
        store.alloc("e", "b", [CAPACITY], "int32")
    # Then the old one is still there, with its values
    assert read(store, "b") == [1, 2, 3, 4]
    assert store.get("e", "b").dtype == np.int32


def test_a_replacement_that_does_not_fit_beside_others_keeps_the_old_one(
        store: BufferStore) -> None:
    # Given a buffer of the entity and another one filling most of the GPU
    old = store.alloc("e", "b", [1 << 20], "uint8")
    store.backend.upload(old, np.full(1 << 20, 7, np.uint8), 0)
    store.alloc("e", "other", [CAPACITY - (2 << 20)], "uint8")
    # When the buffer is replaced by one that fits neither beside them nor in its place
    with pytest.raises(OutOfMemory):
        store.alloc("e", "b", [3 << 20], "uint8")
    # Then the old one is intact and the accounting is as before
    assert set(read(store, "b")) == {7}
    assert store.used_bytes == CAPACITY - (1 << 20)
    assert store.totals()["spilled_bytes"] == 0


def test_a_replacement_may_use_the_old_buffers_place(store: BufferStore) -> None:
    store.alloc("e", "b", [3 << 20], "uint8")
    store.alloc("e", "other", [CAPACITY - (4 << 20)], "uint8")
    # 4 MiB fit only once the old 3 MiB are gone
    new = store.alloc("e", "b", [4 << 20], "uint8")
    assert new.nbytes == 4 << 20 and store.used_bytes == CAPACITY
    assert store.totals()["spilled_bytes"] == 0
    assert not store.backend.download(new).any()


def test_a_replacement_that_fits_in_place_spills_no_other_entity(store: BufferStore) -> None:
    store.alloc("e", "b", [3 << 20], "uint8")
    store.alloc("other", "b", [4 << 20], "uint8")
    store.alloc("e", "b", [4 << 20], "uint8")
    assert store.totals()["spills"] == 0 and store.used_bytes == CAPACITY


def test_a_replacement_over_the_quota_keeps_the_old_buffer(backend: Backend) -> None:
    store = BufferStore(backend, generation=1, entity_quota_bytes=64)
    old = store.alloc("e", "b", [4], "float32")
    store.backend.upload(old, np.array([1.5, 2.5, 0, 0], np.float32), 0)
    with pytest.raises(OutOfMemory, match="quota"):
        store.alloc("e", "b", [17], "float32")
    assert read(store, "b") == [1.5, 2.5, 0, 0]
    store.alloc("e", "b", [16], "float32")  # the old one's bytes count as reusable


def test_buffers_per_entity_are_limited(backend: Backend) -> None:
    store = BufferStore(backend, generation=1, max_buffers=3)
    for name in ("a", "b", "c"):
        store.alloc("e", name, [1], "uint8")
    with pytest.raises(BadRequest, match="holds 3 buffers") as raised:
        store.alloc("e", "d", [1], "uint8")
    assert raised.value.field == "name"
    store.alloc("e", "c", [2], "uint8")  # replacing one is fine
    store.alloc("other", "d", [1], "uint8")  # the limit is per entity
    store.free("e", "a")
    store.alloc("e", "d", [1], "uint8")


# -- ranged reads -------------------------------------------------------------------------


def test_a_range_of_a_buffer_downloads_alone(store: BufferStore) -> None:
    buf = store.alloc("e", "m", [4, 5], "int32")
    store.backend.upload(buf, np.arange(20, dtype=np.int32), 0)
    assert store.backend.download_range(buf, 7, 6).tolist() == list(range(7, 13))
    assert element_range(buf, 18, None) == (18, 2)
    assert element_range(buf, 20, 0) == (20, 0)
    for offset, count, field in ((21, None, "offset"), (-1, 1, "offset"), (True, 1, "offset"),
                                 (0, 21, "count"), (5, 16, "count"), (0, -1, "count"),
                                 (0, 1.0, "count")):
        with pytest.raises(BadRequest) as raised:
            element_range(buf, offset, count)
        assert raised.value.field == field


# -- limits -------------------------------------------------------------------------------


def test_the_limits_are_settings() -> None:
    settings = Settings.from_env({"GPU_TASKS_MAX_READ": "1MiB", "GPU_TASKS_MAX_READ_VALUES": "10",
                                  "GPU_TASKS_MAX_BUFFERS_PER_ENTITY": "7",
                                  "GPU_TASKS_MAX_ENTITY_ID_CHARS": "64"})
    assert (settings.max_read_bytes, settings.max_read_values, settings.max_buffers_per_entity,
            settings.max_entity_id_chars) == (1 << 20, 10, 7, 64)
    assert Settings.from_env(settings.to_env()) == settings
    defaults = Settings()
    assert (defaults.max_read_bytes, defaults.max_read_values, defaults.max_buffers_per_entity,
            defaults.max_entity_id_chars) == (64 << 20, 1_000_000, 1024, 1024)


def test_long_entity_ids_are_refused_on_both_paths() -> None:
    assert validate_entity_id("x" * 16, max_chars=16) == "x" * 16
    with pytest.raises(RoutingError, match="17 characters; at most 16"):
        validate_entity_id("x" * 17, max_chars=16)
    router = EntityRouter(lambda: 8, max_entity_id_chars=16)
    assert router("t", (), {"entity_id": "x" * 16}, {}).startswith("shard-")  # reads S
    # the fast path (S known) sends a too-long id to the slow path, which refuses it
    with pytest.raises(RoutingError, match=r"at most 16.*nothing was enqueued"):
        router("t", (), {"entity_id": "y" * 17}, {})
    with pytest.raises(RoutingError, match=r"\(100002 characters\)"):  # not echoed whole
        validate_entity_id("z" * 100_000, max_chars=16)


# -- the built-in task bodies on an entity's context -------------------------------------


def context(store: BufferStore, **limits: Any) -> EntityContext:
    """An entity's context over ``store``, without a worker around it."""
    runtime = SimpleNamespace(backend=store.backend, store=store, settings=Settings(**limits))
    return EntityContext(cast(Any, runtime), "e", 0)


def test_a_read_beyond_the_limits_says_how_to_read_in_parts(store: BufferStore) -> None:
    gpu = context(store, max_read_bytes=64, max_read_values=10)
    handlers.alloc(gpu, "f", [20], "float64")  # 160 bytes
    handlers.write(gpu, "f", values=list(range(20)))
    with pytest.raises(BadRequest, match=r"offset=0, count=8, then offset=8") as raised:
        handlers.read(gpu, "f")
    assert raised.value.field == "count"
    with pytest.raises(BadRequest, match=r"offset=4, count=8, then offset=12"):
        handlers.read(gpu, "f", offset=4)
    part = handlers.read(gpu, "f", offset=16)
    assert (part["offset"], part["count"], part["shape"]) == (16, 4, [20])
    assert np.frombuffer(base64.b64decode(part["data_b64"]), "<f8").tolist() == [16, 17, 18, 19]
    handlers.alloc(gpu, "u", [12], "uint8")
    with pytest.raises(BadRequest, match=r"GPU_TASKS_MAX_READ_VALUES.*count=10,") as raised:
        handlers.read(gpu, "u", as_list=True)
    assert handlers.read(gpu, "u", as_list=True, count=10)["values"] == [0] * 10
    assert handlers.read(gpu, "u")["count"] == 12  # as data_b64 it is under the bytes limit


def test_write_refuses_before_writing_anything(store: BufferStore) -> None:
    gpu = context(store)
    handlers.alloc(gpu, "i", [3], "int32")
    handlers.write(gpu, "i", values=[5, 5, 5])
    with pytest.raises(BadRequest, match=r"values\[2\] = nan cannot be stored in int32"):
        handlers.write(gpu, "i", values=[1, 2, NAN])
    assert read(store, "i") == [5, 5, 5]
    handlers.write(gpu, "i", values=[1, 2, NAN], cast="unsafe")
    assert read(store, "i")[:2] == [1, 2]
    with pytest.raises(BadRequest) as raised:
        handlers.write(gpu, "i", values=[1], cast="maybe")
    assert raised.value.field == "cast"
    raw = base64.b64encode(np.array([7, 8, 9, 10], "<i4").tobytes()).decode()
    with pytest.raises(BadRequest, match="overruns") as raised:
        handlers.write(gpu, "i", data_b64=raw)
    assert raised.value.field == "data_b64"
    handlers.write(gpu, "i", data_b64=base64.b64encode(np.array([7, 8], "<i4").tobytes()).decode())
    assert read(store, "i")[:2] == [7, 8]


def test_kernel_cast_reaches_the_kernels(store: BufferStore) -> None:
    gpu = context(store)
    handlers.alloc(gpu, "u", [2], "uint8")
    with pytest.raises(BadRequest, match="value = 256 cannot be stored in uint8"):
        handlers.run(gpu, "fill", out="u", value=256)
    handlers.run(gpu, "fill", out="u", value=256, cast="unsafe")
    assert read(store, "u") == [0, 0]


class _Runtime:
    """Just enough of a DeviceRuntime for :func:`workers.child.executor.execute`."""

    def __init__(self, store: BufferStore) -> None:
        self.backend, self.store, self.settings = store.backend, store, Settings(
            max_entity_id_chars=32)
        self.completed = Completed()

    def sync_ownership(self) -> None:
        pass

    def served_shard(self, entity_id: str, task_name: str) -> int:
        return 0

    @contextmanager
    def guard(self) -> Iterator[None]:
        yield

    def where(self, entity_id: str | None, shard: int | None) -> dict[str, Any]:
        return {"entity_id": entity_id}


@pytest.fixture()
def executing(store: BufferStore) -> Iterator[Callable[..., Any]]:
    runtime.install(cast(Any, _Runtime(store)))
    task = SimpleNamespace(name="gpu_tasks.test", flat_result=True,
                           request=SimpleNamespace(id="t1", delivery_info={}, timelimit=None))

    def run(body: Callable[..., Any], entity_id: object = "e", **kwargs: Any) -> Any:
        return executor.execute(task, body, entity_id, (), kwargs)

    yield run
    runtime.install(None)


def test_untyped_errors_of_built_ins_become_device_errors_and_are_logged(
        executing: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    def broken(gpu: Any, name: str) -> dict[str, Any]:
        return {"n": {}[name]}

    broken.__module__ = "workers.child.handlers"  # a built-in's body
    with pytest.raises(DeviceError, match=r"gpu_tasks\.test failed inside the GPU worker: "
                                          r"KeyError") as raised:
        executing(broken, name="x")
    assert type(raised.value) is DeviceError
    assert "untyped error" in caplog.text and "KeyError" in caplog.text  # with its traceback
    # A user's task keeps its own exceptions
    broken.__module__ = "myapp.tasks"
    with pytest.raises(KeyError):
        executing(broken, name="x")
    # Arguments the body does not take are a BadRequest naming them
    with pytest.raises(BadRequest) as bad:
        executing(handlers.alloc, name="x", shape=[1], colour=1)
    assert bad.value.field == "colour"
    with pytest.raises(BadRequest, match="at most 32") as bad:
        executing(handlers.alloc, entity_id="e" * 33, name="x", shape=[1])
    assert bad.value.field == "entity_id"
    assert executing(handlers.alloc, name="x", shape=[1])["buffer"]["nbytes"] == 4
