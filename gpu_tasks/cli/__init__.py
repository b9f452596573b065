"""``gpu-tasks``: the command line. It renders; what it shows and does lives in the
packages it calls."""

from gpu_tasks.cli.main import main

__all__ = ["main"]
