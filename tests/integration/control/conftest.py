"""Fixtures of the control-plane tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gpu_tasks.local.cluster import LocalCluster
from gpu_tasks.settings import Settings
from tests.conftest import own_cluster
from tests.support.handoff import S


@pytest.fixture()
def two_gpus(settings: Settings, spare_url: str, tmp_path: Path) -> Iterator[LocalCluster]:
    with own_cluster(settings, spare_url, tmp_path, gpus=2, shard_count=S) as cluster:
        yield cluster
