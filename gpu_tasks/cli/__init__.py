"""``gpu-tasks``: the command line. It renders; what it shows and does lives in the
packages it calls.

One module per command group, as ``celery/bin/`` has: :mod:`~gpu_tasks.cli.root` is the
root group and only adds the commands; :mod:`~gpu_tasks.cli.base` has what they share
(the settings on the context, error handling, output, parameter types).
"""

from gpu_tasks.cli.root import main

__all__ = ["main"]
