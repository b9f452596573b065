"""The GPU worker's main process: transport, consumption, ownership, fencing, requests."""
