"""The device tests of ``tests/unit/workers/device/test_device.py`` and the buffer ledger's of
``tests.integration.workers.device.test_ledger_writer.py``, run on a real GPU via PyCUDA."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

if shutil.which("nvidia-smi") is None:
    pytest.skip("no NVIDIA GPU on this host", allow_module_level=True)
# Pin before PyCUDA is imported, numbering GPUs as nvidia-smi does (the boot check).
os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
pytest.importorskip("pycuda")

from tests.integration.workers.device.test_ledger_writer import *  # noqa: F403  (the same tests)
from tests.unit.workers.device.test_device import *  # noqa: F403  (the same tests, collected here)
from workers.device.base import Backend
from workers.device.registry import create_backend

# A sticky error spoils this process's CUDA for the tests after it: the fault runs last in
# test_cuda_backend.py, and a fresh process is checked there.
del test_a_poisoned_context_refuses_further_work  # noqa: F821

pytestmark = pytest.mark.gpu


@pytest.fixture()
def backend() -> Iterator[Backend]:
    be = create_backend("pycuda", node="unit", gpu_index=0, sim_memory_bytes=1)
    be.open()
    yield be
    be.close()
