"""``python -m gpu_tasks.cli``: the same as ``gpu-tasks``."""

from gpu_tasks.cli import main

main()
