"""A Celery beat schedule for recurring per-entity work: the alternative to ops/crontab.

Beat sends each entry with Celery's ``send_task``, so the entity router of
``gpu_tasks.app`` routes it like any other request (an entry without ``entity_id`` in
its kwargs is refused when beat sends it, and beat logs the error). Run one beat per
deployment, as the gpu-tasks user, with the services' settings::

    set -a; . /etc/gpu-tasks/env; set +a
    PYTHONPATH=/opt/gpu-tasks/ops celery -A beat_schedule beat \
        --schedule /var/lib/gpu-tasks/beat-schedule --loglevel INFO

Beat suits a handful of recurring requests. For a nightly batch of thousands to
millions of requests use ``gpu-tasks batch`` from cron (ops/crontab): it checks the
whole file first, sends exactly once and waits with back-pressure, which beat does not.
"""

from __future__ import annotations

from celery.schedules import crontab

from gpu_tasks.app import app

app.conf.beat_schedule = {
    # Every 10 minutes: sum the buffer "totals" of entity report-totals on its GPU.
    "report-totals-sum": {
        "task": "gpu_tasks.run",
        "schedule": crontab(minute="*/10"),
        "kwargs": {"entity_id": "report-totals", "kernel": "sum", "x": "totals"},
    },
    # Nightly at 02:00: halve the decayed scores of model-a (scale in place).
    "model-a-decay": {
        "task": "gpu_tasks.run",
        "schedule": crontab(hour=2, minute=0),
        "kwargs": {"entity_id": "model-a", "kernel": "scale", "x": "scores", "alpha": 0.5},
    },
}
app.conf.timezone = "UTC"

__all__ = ["app"]
