"""The device layer without Celery: buffer store, kernels and a backend.

These run against ``sim`` here; ``tests/gpu/test_device_pycuda.py`` runs the very same
tests against the ``pycuda`` backend on a GPU host by overriding the ``backend`` fixture.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from gpu_tasks.errors import BadRequest, EntityStateLost, NoSuchBuffer, OutOfMemory
from workers.device.base import Backend, DevicePoisoned
from workers.device.kernels import launch
from workers.device.registry import create_backend
from workers.device.store import BufferStore

CAPACITY = 8 << 20


@pytest.fixture()
def backend() -> Iterator[Backend]:
    be = create_backend("sim", node="unit", gpu_index=0, sim_memory_bytes=CAPACITY)
    be.open()
    yield be
    be.close()


@pytest.fixture()
def store(backend: Backend) -> BufferStore:
    return BufferStore(backend, generation=1)


def put(store: BufferStore, name: str, array: np.ndarray[Any, Any], entity: str = "e") -> None:
    buf = store.alloc(entity, name, list(array.shape), array.dtype.name)
    store.backend.upload(buf, np.ascontiguousarray(array).reshape(-1), 0)


def get(store: BufferStore, name: str, entity: str = "e") -> np.ndarray[Any, Any]:
    return store.backend.download(store.get(entity, name))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int32", "int64", "uint8"])
def test_alloc_is_zeroed_and_round_trips_every_dtype(store: BufferStore, dtype: str) -> None:
    buf = store.alloc("e", "b", [3, 5], dtype)
    assert buf.nbytes == 15 * np.dtype(dtype).itemsize
    assert not get(store, "b").any()
    data = (np.arange(15) % 7).astype(dtype).reshape(3, 5)
    store.backend.upload(buf, data.reshape(-1)[4:], 4)
    expected = data.copy()
    expected.reshape(-1)[:4] = 0
    np.testing.assert_array_equal(get(store, "b"), expected)


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64"])
def test_elementwise_kernels_and_sum_match_numpy(store: BufferStore, dtype: str) -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(1000) * 10).astype(dtype)
    y = (rng.standard_normal(1000) * 10).astype(dtype)
    put(store, "x", x)
    put(store, "y", y)
    launch(store, "e", "axpy", {"x": "x", "y": "y", "alpha": 3})
    want = y + x * np.dtype(dtype).type(3)
    np.testing.assert_allclose(get(store, "y"), want, rtol=1e-5)
    launch(store, "e", "scale", {"x": "x", "alpha": 2, "out": "y"})
    np.testing.assert_allclose(get(store, "y"), x * np.dtype(dtype).type(2), rtol=1e-5)
    total = launch(store, "e", "sum", {"x": "x"})["value"]
    assert total == pytest.approx(float(x.sum(dtype=dtype)), rel=1e-4)
    launch(store, "e", "fill", {"out": "x", "value": 4})
    assert (get(store, "x") == 4).all()


def test_sgemm_matches_numpy(store: BufferStore) -> None:
    rng = np.random.default_rng(2)
    a, b, c = (rng.standard_normal(s).astype(np.float32) for s in ((33, 17), (17, 45), (33, 45)))
    for name, arr in (("a", a), ("b", b), ("c", c)):
        put(store, name, arr)
    out = launch(store, "e", "sgemm", {"a": "a", "b": "b", "c": "c", "alpha": 1.5, "beta": -1})
    assert out == {"kernel": "sgemm", "outputs": ["c"]}
    np.testing.assert_allclose(get(store, "c"), 1.5 * a @ b - c, rtol=1e-4, atol=1e-4)


def test_memory_is_accounted_per_entity(backend: Backend) -> None:
    quota = 1 << 20
    store = BufferStore(backend, generation=1, entity_quota_bytes=quota)
    store.alloc("a", "x", [quota // 4], "float32")  # the whole quota
    with pytest.raises(OutOfMemory, match="quota") as raised:
        store.alloc("a", "y", [1], "uint8")
    assert raised.value.requested_bytes == 1
    store.alloc("b", "x", [quota // 8], "float64")  # another entity has its own quota
    assert store.totals() == {"entities": 2, "buffers": 2, "used_bytes": 2 * quota,
                              "spilled_bytes": 0, "spills": 0, "restores": 0, "evictions": 0}
    store.alloc("a", "x", [quota // 4], "float32")  # replacing a buffer reuses its room
    store.free("a")
    store.alloc("a", "y", [quota], "uint8")
    assert store.usage("a").bytes == quota and store.usage("b").bytes == quota


def test_an_allocation_beyond_the_gpu_fails_and_the_gpu_keeps_working(
        store: BufferStore) -> None:
    put(store, "pad", np.zeros(256, np.float32))
    free, total = store.backend.mem_info()
    with pytest.raises(OutOfMemory, match="whole GPU") as raised:
        store.alloc("e", "huge", [total + 1], "uint8")
    assert raised.value.requested_bytes == total + 1
    with pytest.raises(OutOfMemory):
        store.alloc("e", "big", [min(free + (64 << 20), total)], "uint8")
    assert store.totals()["buffers"] == 1
    put(store, "ok", np.arange(4, dtype=np.float32))
    assert get(store, "ok").tolist() == [0, 1, 2, 3]
    if store.backend.info.backend == "sim":
        assert store.backend.mem_info()[0] == free - 16


def test_unknown_buffers_and_bad_requests_name_what_was_wrong(store: BufferStore) -> None:
    with pytest.raises(NoSuchBuffer, match="entity 'e' has no buffer 'x'"):
        store.get("e", "x")
    with pytest.raises(NoSuchBuffer):
        store.free("e", "x")
    put(store, "m", np.zeros((2, 3), np.float32))
    put(store, "f16", np.zeros(3, np.float16))
    put(store, "i", np.zeros(6, np.int32))
    for kernel, params, field in [
        ("sum", {"x": "f16"}, "x"),
        ("axpy", {"x": "m", "y": "i"}, "y"),
        ("sgemm", {"a": "m", "b": "m", "c": "m"}, "b"),
        ("sgemm", {"a": "i", "b": "m", "c": "m"}, "a"),
        ("fill", {"out": "m"}, "value"),
        ("fill", {"out": "m", "value": True}, "value"),
        ("scale", {"x": 3, "alpha": 1}, "x"),
    ]:
        with pytest.raises(BadRequest) as raised:
            launch(store, "e", kernel, params)
        assert raised.value.field == field, (kernel, params, raised.value)
    for shape, dtype, field in [([], "float32", "shape"), ([1] * 9, "float32", "shape"),
                                ([2], "bool", "dtype"), ([True], "float32", "shape")]:
        with pytest.raises(BadRequest) as raised:
            store.alloc("e", "z", shape, dtype)
        assert raised.value.field == field


def test_a_poisoned_context_refuses_further_work(backend: Backend, store: BufferStore) -> None:
    put(store, "x", np.ones(4, np.float32))
    with pytest.raises(BadRequest, match="GPU_TASKS_FAULT_INJECTION"):
        launch(store, "e", "fault", {})
    with pytest.raises(DevicePoisoned):
        launch(store, "e", "fault", {}, allow_fault=True)
    # Every later call fails fast (the runtime ends the process: no same-process reopen)
    with pytest.raises(DevicePoisoned):
        launch(store, "e", "sum", {"x": "x"})
    with pytest.raises(DevicePoisoned):
        backend.mem_info()


# -- passivation ---------------------------------------------------------------------------

MiB = 1 << 20


def random_buffer(store: BufferStore, entity: str, name: str, nbytes: int,
                  seed: int) -> np.ndarray[Any, Any]:
    data = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    buf = store.alloc(entity, name, [nbytes], "uint8")
    store.backend.upload(buf, data, 0)
    return data


def test_an_idle_entity_is_spilled_and_restored_bit_for_bit(backend: Backend) -> None:
    store = BufferStore(backend, generation=1, idle_s=60, spill_capacity_bytes=8 * MiB)
    data = random_buffer(store, "idle", "x", MiB, seed=1)
    busy = random_buffer(store, "busy", "x", MiB, seed=2)
    # When an hour passes with only "busy" in use
    later = time.monotonic() + 3600
    store._used_at["busy"] = later  # used just now, an hour later
    assert store.passivate_idle(now=later) == 1
    # Then "idle" left the device for host memory, "busy" did not
    totals = store.totals()
    assert (totals["used_bytes"], totals["spilled_bytes"], totals["spills"]) == (MiB, MiB, 1)
    assert backend.mem_info()[0] == CAPACITY - MiB
    # And its next use brings it back, bit for bit
    assert np.array_equal(get(store, "x", "idle"), data)
    assert np.array_equal(get(store, "x", "busy"), busy)
    totals = store.totals()
    assert (totals["used_bytes"], totals["spilled_bytes"], totals["restores"]) == (
        2 * MiB, 0, 1)


def test_memory_pressure_spills_the_least_recently_used_first(backend: Backend) -> None:
    # Given a GPU of 8 MiB holding three entities of 2 MiB, "a" the least recently used
    store = BufferStore(backend, generation=1, spill_capacity_bytes=16 * MiB)
    kept = {e: random_buffer(store, e, "x", 2 * MiB, seed=i) for i, e in enumerate("abc")}
    store.touch("b")
    store.touch("c")
    # When "d" needs 4 MiB: only what must go goes, least recently used first
    store.alloc("d", "x", [4 * MiB], "uint8")
    assert store.totals()["spills"] == 1
    assert [b.host is not None for b in (store._entity("a")["x"], store._entity("b")["x"],
                                         store._entity("c")["x"])] == [True, False, False]
    # And OutOfMemory means the working set itself does not fit
    with pytest.raises(OutOfMemory):
        store.alloc("e", "x", [CAPACITY + 1], "uint8")
    for e, data in kept.items():
        assert np.array_equal(get(store, "x", e), data)


def test_what_the_spill_space_cannot_take_is_evicted_and_reported(backend: Backend) -> None:
    store = BufferStore(backend, generation=1, spill_capacity_bytes=3 * MiB)
    random_buffer(store, "a", "x", 3 * MiB, seed=1)
    random_buffer(store, "b", "x", 3 * MiB, seed=2)
    store.touch("b")
    store.alloc("c", "x", [4 * MiB], "uint8")  # spills a (3 MiB: the cap is full)
    store.touch("c")
    store.alloc("d", "x", [3 * MiB], "uint8")  # b cannot be spilled: evicted
    totals = store.totals()
    assert (totals["spills"], totals["evictions"]) == (1, 1)
    with pytest.raises(EntityStateLost, match=r"evicted .* spill space .* was full") as lost:
        store.get("b", "x")
    assert (lost.value.entity_id, lost.value.buffer) == ("b", "x")
    store.get("a", "x")  # spilled, not evicted: it comes back
