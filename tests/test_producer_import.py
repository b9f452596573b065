"""Producers stay light: importing what a web backend uses pulls in no GPU code."""

from __future__ import annotations

import subprocess
import sys


def test_producer_modules_import_no_numpy_pycuda_or_workers() -> None:
    code = (
        "import sys\n"
        "import gpu_tasks.tasks, gpu_tasks.task, gpu_tasks.app, gpu_tasks.cli, gpu_tasks.demo\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('numpy', 'pycuda', 'workers'))\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == ""
