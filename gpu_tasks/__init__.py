"""gpu-tasks: entity-sticky GPU work over Celery and Redis.

Producers: ``from gpu_tasks.tasks import alloc`` and call Celery's ``apply_async``
with ``kwargs={"entity_id": ...}``; the router in the app's configuration sends it
to the GPU owning the entity's shard. Custom GPU tasks: ``gpu_tasks.tasks.declare.gpu_task``.
Errors: ``gpu_tasks.errors``. This package never imports numpy or PyCUDA.
"""

__version__ = "0.1.0"
