"""``gpu-tasks exporter`` as a real process, and what Prometheus would read from it."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client.parser import text_string_to_metric_families

from gpu_tasks.settings import Settings
from tests.conftest import REPO, wait_until
from tests.support.ports import free_port

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@contextmanager
def exporter(settings: Settings) -> Iterator[str]:
    """``gpu-tasks exporter`` on a free port for ``settings``' Redis; yields its metrics URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpu_tasks.cli", "exporter", "--port", str(port)],
        env={**os.environ, **settings.to_env()}, cwd=REPO, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/metrics"

    def answers() -> bool:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except OSError:
            return False

    try:
        wait_until(answers, timeout=20)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def scrape(url: str) -> Samples:
    """Every sample: (name, labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))
