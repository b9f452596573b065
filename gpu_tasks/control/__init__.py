"""The control plane: shard map, leases, fleet, handoff, failover, coordinator."""
