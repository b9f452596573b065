"""A worker's task counts (workers.child.taskcounts) follow Celery's signals; what could not be
written waits for the next heartbeat."""

from __future__ import annotations

from celery import signals


def test_task_counts_follow_celerys_signals() -> None:
    from workers.child import taskcounts

    class Task:
        name = "tests.counted"

    counts = taskcounts.install("gpu.unit.0")
    try:
        signals.task_success.send(sender=Task(), result=1, runtime=0.1)
        signals.task_success.send(sender=Task(), result=1, runtime=0.1)
        signals.task_failure.send(sender=Task(), task_id="t", exception=ValueError())
        signals.task_retry.send(sender=Task(), request=None, reason="again", einfo=None)
    finally:
        taskcounts.uninstall(counts)
    signals.task_success.send(sender=Task(), result=1, runtime=0.1)  # no longer counted
    taken = counts.take()
    assert taken == {"tests.counted:succeeded": 2, "tests.counted:failed": 1,
                     "tests.counted:retried": 1}
    # What could not be written is kept for the next heartbeat
    counts.put_back(taken)
    counts.add("tests.counted", "failed")
    assert counts.take()["tests.counted:failed"] == 2
    assert counts.take() == {}
