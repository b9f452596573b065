"""Settings: read once from GPU_TASKS_* variables, checked, never showing a secret."""

from __future__ import annotations

import pytest

from gpu_tasks.errors import ConfigError
from gpu_tasks.settings import Settings


def test_settings_from_the_environment_name_the_bad_variable() -> None:
    with pytest.raises(ConfigError, match="GPU_TASKS_SHARD_COUNT"):
        Settings.from_env({"GPU_TASKS_SHARD_COUNT": "many"})
    with pytest.raises(ConfigError, match="GPU_TASKS_SIM_MEMORY"):
        Settings.from_env({"GPU_TASKS_SIM_MEMORY": "lots"})
    with pytest.raises(ConfigError, match="backend"):
        Settings.from_env({"GPU_TASKS_BACKEND": "opencl"})
    with pytest.raises(ConfigError, match="GPU_TASKS_FAULT_INJECTION"):
        Settings.from_env({"GPU_TASKS_FAULT_INJECTION": "maybe"})
    with pytest.raises(ConfigError, match="visibility_timeout_s"):
        Settings.from_env({"GPU_TASKS_VISIBILITY_TIMEOUT_S": "60"})
    with pytest.raises(ConfigError, match="lease_ttl_s"):
        Settings.from_env({"GPU_TASKS_LEASE_TTL_S": "1", "GPU_TASKS_MAP_POLL_S": "0.5"})
    s = Settings.from_env({"GPU_TASKS_SIM_MEMORY": "512MiB", "GPU_TASKS_NODE": "n1",
                           "GPU_TASKS_IMPORTS": "a.b, c", "GPU_TASKS_FAULT_INJECTION": "true"})
    assert (s.sim_memory_bytes, s.node, s.imports) == (512 << 20, "n1", ("a.b", "c"))
    assert s.fault_injection is True
    assert Settings.from_env(s.to_env()) == s


def test_the_soft_time_limit_must_be_below_the_hard_one() -> None:
    with pytest.raises(ConfigError, match=r"task_soft_time_limit_s .* must be below"):
        Settings(task_time_limit_s=60, task_soft_time_limit_s=60)
    assert Settings.from_env({"GPU_TASKS_TASK_SOFT_TIME_LIMIT_S": "30"}).task_soft_time_limit_s \
        == 30.0


def test_a_flower_setting_never_shows_in_repr() -> None:
    settings = Settings.from_env({"GPU_TASKS_FLOWER_BASIC_AUTH": "ops:hunter2-secret"})
    assert settings.flower_basic_auth == "ops:hunter2-secret"
    assert "hunter2" not in repr(settings)
