"""Every Redis key gpu-tasks writes, in one place (docs/PROTOCOL.md documents the ones other
languages read). Templates take ``str.format`` fields; the modules that own each record
describe its fields. Shard queues (``shard-<i>``) and GPU queues (``gpu.<node>.<i>``) are
Celery queues, named by :mod:`gpu_tasks.protocol.routing`; kombu's own keys
(``_kombu.binding.*``) and Celery's results (``celery-task-meta-<id>``) are theirs.
"""

from __future__ import annotations

PREFIX = "gpu-tasks:"
"""Every key below starts with it (an ACL user can be limited to ``~gpu-tasks:*``)."""

# The shard map (gpu_tasks.control.shardmap)
MAP_KEY = "gpu-tasks:shardmap"
"""Hash ``shard-<i>`` -> JSON ``{"owner", "state", ...}``: which GPU owns each shard."""
META_KEY = "gpu-tasks:shardmap:meta"
"""Hash ``shard_count`` (S, fixed when the map is created) and ``epoch``."""
DRAINED_KEY = "gpu-tasks:shardmap:drained"
"""Set of GPUs that take no shards (``gpu-tasks drain``)."""

# Leases (gpu_tasks.control.lease)
LEASE_KEY = "gpu-tasks:lease:{gpu}"
"""Hash, expiring: the worker holding ``gpu`` (token, pid, host, ...)."""
LEASES_KEY = "gpu-tasks:leases"
"""Set of every GPU that has held a lease."""
SEEN_KEY = "gpu-tasks:lease-seen"
"""Hash ``<gpu>`` -> when its lease was last renewed (ms, Redis's clock)."""
COORDINATOR_KEY = "gpu-tasks:coordinator"
"""The coordinator lease: of several coordinators, the holder acts (expiring string)."""

# The fleet registry (gpu_tasks.control.fleet)
FLEET_KEY = "gpu-tasks:fleet"
"""Hash ``gpu.<node>.<i>`` -> JSON record of the GPU, its device and its accounting."""
GENERATION_KEY = "gpu-tasks:generation:{queue}"
"""The GPU's device context generation counter."""
TASK_COUNTS_KEY = "gpu-tasks:taskcounts:{queue}"
"""Hash ``<task name>:<outcome>`` -> how many tasks of that name ended so on the GPU."""

# The buffer ledger (gpu_tasks.control.bufferledger)
LIVE_KEY = "gpu-tasks:buffers:{gpu}"
"""Hash ``<entity_id>\\x1f<name>`` -> the buffer's generation, dtype, shape, shard."""
LOST_KEY = "gpu-tasks:lost:{shard}"
"""Hash ``<entity_id>\\x1f<name>`` -> when and why the buffer was lost."""
ENDED_KEY = "gpu-tasks:ended:{gpu}"
"""Why the GPU's last pool child ended, when it knew."""

# Handoffs (gpu_tasks.control.handoff)
HANDOFF_KEYS = "gpu-tasks:handoff:{handoff}:*"
"""Pattern of every key of one handoff (its exported state), dropped together."""
MANIFEST_KEY = "gpu-tasks:handoff:{handoff}:manifest"
"""JSON ``{"handoff", "shard", "source", "generation", "bytes", "buffers": [{"entity_id",
"name", "dtype", "shape", "nbytes", "sha256", "chunks"}]}``, written by the export."""
CHUNK_KEY = "gpu-tasks:handoff:{handoff}:{n}:{chunk}"
"""Chunk ``chunk`` of buffer ``n``'s raw little-endian bytes."""
DRIVER_KEY = "gpu-tasks:handoff:{handoff}:driver"
"""Set (with a short expiry) by whatever is driving the handoff, renewed at each poll."""

# Dead letters (gpu_tasks.control.deadletter)
DLQ_KEY = "gpu-tasks:dlq"
"""Stream, one entry per dead letter."""
DEATHS_KEY = "gpu-tasks:dlq:deaths:{task_id}"
"""How many pool children that request's execution ended."""

# Status (gpu_tasks.control.status)
TAILS_KEY = "gpu-tasks:status:tails"
"""Hash ``<queue>`` -> ``<first seen, Redis ms> <tag>``: when a queue's tail was first seen."""

# Batches (gpu_tasks.submit.batch)
BATCH_KEY_PREFIX = "gpu-tasks:batch:"
"""``<prefix><id>:sent`` (bitmap of the lines sent) and ``<prefix><id>:lock``."""

# What a GPU's worker has taken and not finished (gpu_tasks.control.unacked)
UNACKED_KEY = "gpu-tasks:unacked:{gpu}"
"""Hash delivery tag -> the message taken (kombu's ``unacked`` hash, one per GPU)."""
UNACKED_INDEX_KEY = "gpu-tasks:unacked_index:{gpu}"
"""Sorted set delivery tag -> when it was taken (kombu's ``unacked_index``)."""
UNACKED_MUTEX_KEY = "gpu-tasks:unacked_mutex:{gpu}"
"""kombu's lock over the restore of unacknowledged messages."""
