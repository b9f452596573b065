"""Unit tests start no process: no redis-server, no Celery worker, no subprocess. A test that
needs one belongs under tests/integration/; this keeps the line where it is."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

PROCESS_FIXTURES = frozenset({"redis_server", "settings", "client", "spare_url", "cluster"})
"""The session fixtures (tests/conftest.py) that start redis-server and GPU workers."""


@pytest.fixture(autouse=True)
def _no_processes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    used = sorted(PROCESS_FIXTURES & set(request.fixturenames))
    if used:
        pytest.fail(f"a unit test uses {', '.join(used)}, which start processes: "
                    "it belongs under tests/integration/", pytrace=False)

    def refuse(self: subprocess.Popen[Any], args: Any, *_: Any, **__: Any) -> None:
        raise AssertionError(f"a unit test started a process ({args!r}): "
                             "it belongs under tests/integration/")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
