"""The wire protocol: entity -> shard -> queue, the envelope, what is taken."""
