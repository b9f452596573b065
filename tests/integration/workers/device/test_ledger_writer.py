"""The buffer ledger in Redis: the next pool child knows what the last one held and why it
ended (the device layer on the sim backend, the ledger in a real Redis)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import redis

from gpu_tasks.errors import EntityStateLost, NoSuchBuffer, StaleHandle
from tests.unit.workers.device.test_device import CAPACITY, get, put
from workers.device.base import Backend
from workers.device.ledger_writer import BufferLedger
from workers.device.registry import create_backend
from workers.device.store import BufferStore


@pytest.fixture()
def backend() -> Iterator[Backend]:
    """The sim backend of tests/unit/workers/device/test_device.py (``tests/gpu`` runs this
    module's tests on PyCUDA by overriding this fixture)."""
    be = create_backend("sim", node="unit", gpu_index=0, sim_memory_bytes=CAPACITY)
    be.open()
    yield be
    be.close()


def test_the_next_process_knows_what_the_last_one_held_and_why_it_ended(
        backend: Backend, spare_url: str) -> None:
    # Given a pool child that holds two buffers, and ends after a poisoned context
    ledger = BufferLedger(redis.Redis.from_url(spare_url), "gpu.unit.0")
    first = BufferStore(backend, generation=1, ledger=ledger)
    put(first, "x", np.ones(4, np.float32))
    put(first, "y", np.ones(2, np.float32))
    first.free("e", "y")
    ledger.ending("when the device context failed (a test)")
    # When the next child opens its store on the same ledger
    second = BufferStore(backend, generation=2, ledger=ledger)
    # Then x, which the first held, is reported lost with the reason; y was freed: no record
    with pytest.raises(EntityStateLost, match=r"lost when the device context failed \(a test\) "
                                              r"\(generation 1; now generation 2, at ") as lost:
        second.get("e", "x")
    assert (lost.value.entity_id, lost.value.buffer, lost.value.gpu) == ("e", "x", "gpu.unit.0")
    assert lost.value.why == "when the device context failed (a test)"
    with pytest.raises(NoSuchBuffer):
        second.get("e", "y")
    with pytest.raises(StaleHandle, match="generation 1"):
        second.get("e", "z", generation=1)
    # And allocating it again clears the loss, here and for the children after this one
    put(second, "x", np.full(4, 2, np.float32))
    assert get(second, "x").tolist() == [2, 2, 2, 2]
    assert second.get("e", "x").generation == 2
    third = BufferStore(backend, generation=3, ledger=ledger)
    with pytest.raises(EntityStateLost, match="lost when the pool child of generation 2 ended"):
        third.get("e", "x")
    third.free("e")  # freeing all of an entity forgets its losses too
    fourth = BufferStore(backend, generation=4, ledger=ledger)
    with pytest.raises(NoSuchBuffer):
        fourth.get("e", "x")


def test_a_loss_on_another_gpu_names_each_gpus_generation(
        backend: Backend, spare_url: str) -> None:
    # Given a buffer lost on GPU 0 at its generation 10 (its shard then failed over)
    client = redis.Redis.from_url(spare_url)
    old = BufferLedger(client, "gpu.unit.0")
    first = BufferStore(backend, generation=10, ledger=old)
    put(first, "x", np.ones(4, np.float32))
    from gpu_tasks.control import bufferledger

    assert bufferledger.retire(client, "gpu.unit.0", "when the GPU was failed over (a test)")
    # When GPU 1, at its own generation 4, is asked for it
    here = BufferStore(backend, generation=4, ledger=BufferLedger(client, "gpu.unit.1"))
    with pytest.raises(EntityStateLost) as lost:
        here.get("e", "x")
    # Then each generation number is named with its GPU, never "now generation 4" for GPU 0
    text = str(lost.value)
    assert "on gpu.unit.0 was lost when the GPU was failed over (a test)" in text
    assert "(gpu.unit.0's generation 10; gpu.unit.1 is at generation 4, at " in text
    assert "now generation" not in text
