"""Declaring GPU tasks (:mod:`gpu_tasks.tasks.declare`), and the built-in ones
(:mod:`gpu_tasks.tasks.builtin`), which producers import from here:
``from gpu_tasks.tasks import alloc, write, read, free, run, stats``."""

from gpu_tasks.tasks.builtin import (
    alloc,
    export_shard,
    free,
    import_shard,
    read,
    release_shard,
    run,
    stats,
    write,
)

__all__ = ["alloc", "export_shard", "free", "import_shard", "read", "release_shard", "run",
           "stats", "write"]
