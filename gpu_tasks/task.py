"""``@gpu_task`` where users have imported it from: :mod:`gpu_tasks.tasks.declare`."""

from gpu_tasks.tasks.declare import GpuQueueTask, GpuTask, gpu_queue_task, gpu_task

__all__ = ["GpuQueueTask", "GpuTask", "gpu_queue_task", "gpu_task"]
