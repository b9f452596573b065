"""Device backends by name, as kombu finds transports by alias: the registry names each
implementation's module and class, so this module imports none of them (and the
backends import only :mod:`workers.device.base`)."""

from __future__ import annotations

import importlib

from gpu_tasks.errors import ConfigError
from workers.device.base import Backend

BACKENDS = {
    "sim": "workers.device.sim:SimBackend",
    "pycuda": "workers.device.cuda:CudaBackend",
}
"""Backend name -> ``module:Class``; ``auto`` is resolved before (gpu_tasks.local.gpus)."""


def create_backend(name: str, *, node: str, gpu_index: int, sim_memory_bytes: int) -> Backend:
    """A closed backend of kind ``name`` (``pycuda`` or ``sim``) for one pinned GPU."""
    try:
        module_name, _, class_name = BACKENDS[name].partition(":")
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}") from None
    cls = getattr(importlib.import_module(module_name), class_name)
    if name == "sim":
        backend: Backend = cls(node=node, gpu_index=gpu_index, capacity_bytes=sim_memory_bytes)
    else:
        backend = cls(gpu_index=gpu_index)
    return backend
