"""The ``pycuda`` backend on a real GPU, checked against the numpy ``sim`` backend.

Skipped where PyCUDA or an NVIDIA GPU is missing. One CUDA context serves the
whole module (pinned to GPU 0, as a worker's pool child would be); the fault
test runs last because it poisons that context (a fresh process then checks
that the GPU recovers).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pycuda")

from gpu_tasks.errors import OutOfMemory
from gpu_tasks.local.gpus import count_gpus
from workers.device.base import Buffer, DevicePoisoned
from workers.device.sim import SimBackend

if count_gpus() == 0:
    pytest.skip("nvidia-smi lists no GPU", allow_module_level=True)

from workers.device.cuda import CudaBackend

pytestmark = pytest.mark.gpu

ARITHMETIC = ("float32", "float64", "int32", "int64")
FILLABLE = (*ARITHMETIC, "uint8")


@pytest.fixture(scope="module")
def cuda() -> Iterator[CudaBackend]:
    with pytest.MonkeyPatch.context() as env:
        # Pin before the driver starts, as `gpu-tasks worker --gpu 0` does.
        env.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        env.setenv("CUDA_VISIBLE_DEVICES", "0")
        backend = CudaBackend(gpu_index=0)
        backend.open()
        try:
            yield backend
        finally:
            backend.close()


@pytest.fixture(scope="module")
def sim() -> Iterator[SimBackend]:
    backend = SimBackend(node="test", gpu_index=0, capacity_bytes=1 << 30)
    backend.open()
    yield backend
    backend.close()


Pair = tuple[Buffer, Buffer]


@pytest.fixture
def pair(cuda: CudaBackend, sim: SimBackend) -> Iterator[Callable[..., Pair]]:
    """Make (cuda, sim) buffers of one dtype and shape holding the same data."""
    made: list[Pair] = []

    def make(dtype: str, shape: tuple[int, ...], data: np.ndarray[Any, Any] | None = None) -> Pair:
        np_dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * np_dtype.itemsize
        bufs = tuple(Buffer(entity_id="e", name=f"b{len(made)}", dtype=np_dtype, shape=shape,
                            generation=1, allocation=be.alloc(nbytes)) for be in (cuda, sim))
        if data is not None:
            host = np.ascontiguousarray(data, dtype=np_dtype).reshape(-1)
            cuda.upload(bufs[0], host, 0)
            sim.upload(bufs[1], host, 0)
        made.append((bufs[0], bufs[1]))
        return bufs[0], bufs[1]

    yield make
    for cuda_buf, sim_buf in made:
        cuda.release(cuda_buf.allocation)
        sim.release(sim_buf.allocation)


def random(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(-1000, 1000, size=shape).astype(dtype)


def assert_same(cuda: CudaBackend, sim: SimBackend, got: Buffer, want: Buffer,
                rtol: float = 1e-5, atol: float = 0.0) -> None:
    actual, expected = cuda.download(got), sim.download(want)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.dtype.kind == "f":
        tol = rtol if actual.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(actual, expected, rtol=tol, atol=atol)
    else:
        np.testing.assert_array_equal(actual, expected)


def test_open_describes_the_device(cuda: CudaBackend) -> None:
    # Given an open backend, Then it names a real device and its memory
    assert cuda.info.backend == "pycuda"
    assert cuda.info.total_bytes > 0
    assert cuda.info.uuid and cuda.info.name
    free, total = cuda.mem_info()
    assert 0 < free <= total


def test_alloc_is_zeroed_even_when_the_pool_reuses_a_block(cuda: CudaBackend,
                                                           sim: SimBackend) -> None:
    # Given a block that held data and went back to the pool
    nbytes = 1 << 16
    first = Buffer("e", "dirty", np.dtype("uint8"), (nbytes,), 1, cuda.alloc(nbytes))
    cuda.fill(first, 7)
    cuda.release(first.allocation)
    # When a buffer of the same size is allocated
    again = Buffer("e", "clean", np.dtype("uint8"), (nbytes,), 1, cuda.alloc(nbytes))
    # Then it reads as zeros
    try:
        assert not cuda.download(again).any()
    finally:
        cuda.release(again.allocation)


def test_upload_at_offset_then_download(cuda: CudaBackend, sim: SimBackend,
                                        pair: Callable[..., Pair]) -> None:
    got, want = pair("float32", (1000,))
    host = random("float32", (300,))
    cuda.upload(got, host, 200)
    sim.upload(want, host, 200)
    assert_same(cuda, sim, got, want, rtol=0)
    assert not cuda.download(got)[:200].any()


@pytest.mark.parametrize("dtype", FILLABLE)
def test_fill(cuda: CudaBackend, sim: SimBackend, pair: Callable[..., Pair], dtype: str) -> None:
    got, want = pair(dtype, (37, 29))
    cuda.fill(got, 3.75)
    sim.fill(want, 3.75)
    assert_same(cuda, sim, got, want)


@pytest.mark.parametrize("dtype", ARITHMETIC)
@pytest.mark.parametrize("alpha", [2.5, -1.75])
def test_scale(cuda: CudaBackend, sim: SimBackend, pair: Callable[..., Pair], dtype: str,
               alpha: float) -> None:
    data = random(dtype, (4099,))
    x, sx = pair(dtype, (4099,), data)
    out, sout = pair(dtype, (4099,))
    cuda.scale(x, alpha, out)
    sim.scale(sx, alpha, sout)
    assert_same(cuda, sim, out, sout)
    # In place (out is x), as the `scale` kernel does when no out is named.
    cuda.scale(x, alpha, x)
    sim.scale(sx, alpha, sx)
    assert_same(cuda, sim, x, sx)


@pytest.mark.parametrize("dtype", ARITHMETIC)
def test_axpy(cuda: CudaBackend, sim: SimBackend, pair: Callable[..., Pair], dtype: str) -> None:
    x, sx = pair(dtype, (10_007,), random(dtype, (10_007,), seed=1))
    y, sy = pair(dtype, (10_007,), random(dtype, (10_007,), seed=2))
    cuda.axpy(-1.5, x, y)
    sim.axpy(-1.5, sx, sy)
    assert_same(cuda, sim, y, sy)


@pytest.mark.parametrize("dtype", ARITHMETIC)
@pytest.mark.parametrize("n", [1, 2048, 1_000_003])
def test_sum(cuda: CudaBackend, sim: SimBackend, pair: Callable[..., Pair], dtype: str,
             n: int) -> None:
    rng = np.random.default_rng(n)
    # Non-negative values: the sum has no cancellation, so rtol bounds the rounding.
    data = (rng.random(n) if np.dtype(dtype).kind == "f" else rng.integers(0, 100, n))
    x, sx = pair(dtype, (n,), data.astype(dtype))
    got, want = cuda.sum(x), sim.sum(sx)
    assert isinstance(got, float)
    if dtype == "float32":
        np.testing.assert_allclose(got, want, rtol=1e-5)
    elif dtype == "float64":
        np.testing.assert_allclose(got, want, rtol=1e-12)
    else:
        assert got == want


@pytest.mark.parametrize(("m", "k", "n"), [(33, 17, 45), (1, 1, 1), (64, 64, 64), (5, 300, 7)])
def test_sgemm(cuda: CudaBackend, sim: SimBackend, pair: Callable[..., Pair], m: int, k: int,
               n: int) -> None:
    a, sa = pair("float32", (m, k), random("float32", (m, k), seed=3))
    b, sb = pair("float32", (k, n), random("float32", (k, n), seed=4))
    c, sc = pair("float32", (m, n), random("float32", (m, n), seed=5))
    cuda.sgemm(a, b, c, 1.5, 0.5)
    sim.sgemm(sa, sb, sc, 1.5, 0.5)
    # Sums of k products of normals: allow for a different summation order near zero.
    assert_same(cuda, sim, c, sc, rtol=1e-4, atol=1e-5 * np.sqrt(k))


def test_out_of_memory_is_an_answer(cuda: CudaBackend, sim: SimBackend,
                                    pair: Callable[..., Pair]) -> None:
    # Given the device, When a buffer larger than all of its memory is asked for
    too_big = cuda.info.total_bytes + 1
    with pytest.raises(OutOfMemory) as caught:
        cuda.alloc(too_big)
    # Then the error says how much was asked and how much was free
    assert caught.value.requested_bytes == too_big
    assert 0 <= caught.value.free_bytes <= cuda.info.total_bytes
    assert str(too_big) in str(caught.value)
    # And the backend keeps working
    got, want = pair("float32", (100,))
    cuda.fill(got, 1.5)
    sim.fill(want, 1.5)
    assert_same(cuda, sim, got, want)


def test_fault_poisons_and_a_fresh_process_recovers(cuda: CudaBackend) -> None:
    """Last in this module: it breaks the shared context. After a sticky error CUDA wants
    the process relaunched, so the runtime ends the pool child; a fresh process (as the
    worker's parent forks) must find the GPU working."""
    # Given a live buffer, When a kernel stores through an illegal address
    old = Buffer("e", "old", np.dtype("float32"), (16,), 1, cuda.alloc(64))
    with pytest.raises(DevicePoisoned):
        cuda.fault()
    # Then the context refuses further work with the same error
    with pytest.raises(DevicePoisoned):
        cuda.fill(old, 1.0)
    with pytest.raises(DevicePoisoned):
        cuda.mem_info()
    # And a fresh process opens the GPU and computes correctly
    code = (
        "import numpy as np\n"
        "from workers.device.base import Buffer\n"
        "from workers.device.cuda import CudaBackend\n"
        "cuda = CudaBackend(gpu_index=0)\n"
        "cuda.open()\n"
        "shapes = {'a': (33, 17), 'b': (17, 45), 'c': (33, 45)}\n"
        "bufs = {k: Buffer('e', k, np.dtype('float32'), s, 1, cuda.alloc(s[0] * s[1] * 4))\n"
        "        for k, s in shapes.items()}\n"
        "rng = np.random.default_rng(6)\n"
        "ha, hb = (rng.standard_normal(shapes[k]).astype(np.float32) for k in 'ab')\n"
        "cuda.upload(bufs['a'], ha.reshape(-1), 0)\n"
        "cuda.upload(bufs['b'], hb.reshape(-1), 0)\n"
        "cuda.sgemm(bufs['a'], bufs['b'], bufs['c'], 1.0, 0.0)\n"
        "np.testing.assert_allclose(cuda.download(bufs['c']), ha @ hb, rtol=1e-4, atol=1e-4)\n"
        "cuda.close()\n"
        "print('fresh process OK')\n"
    )
    env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fresh process OK" in done.stdout
