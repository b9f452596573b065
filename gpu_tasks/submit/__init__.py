"""Sending many requests at once: bulk publishing and `gpu-tasks batch`."""
