"""The GPU worker's main process: transport, consumption, fencing, requests."""
