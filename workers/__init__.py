"""The GPU side of gpu-tasks: pinning and boot, device backends, buffer store, kernels.

Imported only by GPU workers (``gpu-tasks worker``); producers never import it.
"""
