"""Producers stay light: importing what a web backend uses pulls in no GPU code."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("first", ["gpu_tasks.tasks.declare", "gpu_tasks.tasks", "gpu_tasks.app",
                                   "gpu_tasks.cli", "gpu_tasks.protocol.routing"])
def test_any_module_can_be_imported_first(first: str) -> None:
    code = f"import {first}\nfrom gpu_tasks.tasks.declare import gpu_task\nimport gpu_tasks.tasks\n"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_producer_modules_import_no_numpy_pycuda_or_workers() -> None:
    code = (
        "import sys\n"
        "import gpu_tasks.tasks, gpu_tasks.task, gpu_tasks.bulk, gpu_tasks.app, gpu_tasks.cli\n"
        "import gpu_tasks.local.demo\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('numpy', 'pycuda', 'workers'))\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == ""
