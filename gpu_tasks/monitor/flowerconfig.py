"""Flower's ``--conf`` file for gpu-tasks (``gpu-tasks flower`` passes its path).

Tornado executes this file inside Flower's process after Flower has read its
command line and before it builds its web application: the one moment to swap
in the handlers of :mod:`gpu_tasks.monitor.flower_api`. Names defined here that match
a Flower option would set it, so this file defines none.
"""

from gpu_tasks.monitor.flower_api import install as _install_gpu_tasks_handlers

_install_gpu_tasks_handlers()
