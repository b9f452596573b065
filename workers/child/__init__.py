"""The GPU worker's pool child: the per-request path, runtime, task bodies, shard state."""
