"""ops/crontab and ops/beat_schedule.py: what they send is valid, routed and runs."""

from __future__ import annotations

import importlib.util
import re
import shlex
import uuid

from gpu_tasks.app import app
from gpu_tasks.errors import NoSuchBuffer
from gpu_tasks.local.cluster import LocalCluster
from tests.conftest import REPO, gpu_tasks_cli


def test_beat_schedule_entries_are_routed_requests_that_run(cluster: LocalCluster) -> None:
    # Given the shipped beat schedule, loaded as `celery -A beat_schedule beat` loads it
    spec = importlib.util.spec_from_file_location("beat_schedule", REPO / "ops" /
                                                  "beat_schedule.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    schedule = module.app.conf.beat_schedule
    assert module.app is app and schedule
    for name, entry in schedule.items():
        entity = f"{entry['kwargs']['entity_id']}-{uuid.uuid4().hex[:6]}"
        kwargs = {**entry["kwargs"], "entity_id": entity}
        # When beat sends an entry (send_task, as beat does) for an entity without the buffer
        result = app.send_task(entry["task"], kwargs=kwargs)
        # Then it reached the entity's GPU and ran there: the answer names the buffer
        try:
            result.get(timeout=30)
            raise AssertionError(f"{name}: ran without its buffer")
        except NoSuchBuffer as exc:
            assert kwargs["x"] in str(exc)
        # And with the buffer allocated, it succeeds
        app.send_task("gpu_tasks.alloc", kwargs={"entity_id": entity, "name": kwargs["x"],
                                                 "shape": [4]}).get(timeout=30)
        done = app.send_task(entry["task"], kwargs=kwargs).get(timeout=30)
        assert done["entity_id"] == entity


def test_crontab_batch_line_uses_real_flags() -> None:
    lines = [line for line in (REPO / "ops" / "crontab").read_text().splitlines()
             if "gpu-tasks batch" in line and not line.startswith("#")]
    assert len(lines) == 1
    command = lines[0].split("gpu-tasks batch", 1)[1].split(">>")[0]
    flags = [word for word in shlex.split(command) if word.startswith("--")]
    assert {"--wait", "--json", "--results", "--lock-wait"} <= set(flags)
    helptext = gpu_tasks_cli("batch", "--help").stdout
    for flag in flags:
        assert re.search(rf"{flag}\b", helptext), flag
