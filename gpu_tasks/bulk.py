"""``submit_many`` where users have imported it from: :mod:`gpu_tasks.submit.bulk`."""

from gpu_tasks.submit.bulk import submit_many

__all__ = ["submit_many"]
