"""The GPU worker's pool child: runtime, task bodies, shard state."""
