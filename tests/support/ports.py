"""Loopback ports for the servers the tests start (redis-server, Sentinels, Flower, the
exporter), safe when pytest-xdist runs several test processes at once.

``gpu_tasks.local.redis_server.free_port`` asks the kernel for a free port and releases it: two
test processes doing that at once, or one restarting a server on "its" port after a
60 s outage while another looks for a free one, can end up on the same port. Here each
pytest-xdist worker (``PYTEST_XDIST_WORKER`` = ``gw0``, ``gw1``, ...) takes its ports from
a range of its own, below the kernel's ephemeral range (32768 and up, where ``bind(0)``
and every outgoing connection take theirs), and never hands out a port twice until it
has gone round its whole range. A port something else holds (another checkout's tests,
say) is skipped: each one is checked with a bind first."""

from __future__ import annotations

import os
import random
import socket

FIRST_PORT = 10_000
"""Where the first range starts (the one a run without xdist uses)."""
PORTS_PER_WORKER = 500
EPHEMERAL_START = 32_768


def _worker_index() -> int:
    """0 without xdist; 1 + N for xdist worker ``gwN``."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(name[2:]) + 1 if name.startswith("gw") and name[2:].isdigit() else 0


def _range() -> range:
    slots = (EPHEMERAL_START - FIRST_PORT) // PORTS_PER_WORKER
    start = FIRST_PORT + (_worker_index() % slots) * PORTS_PER_WORKER
    return range(start, start + PORTS_PER_WORKER)


_PORTS = _range()
# Start somewhere in the range, so that two checkouts running at once rarely meet.
_next = random.Random().randrange(len(_PORTS))


def bindable(port: int) -> bool:
    """Whether a listening socket could take 127.0.0.1:``port`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port of this test process's range that nothing listens on now, not handed out
    by this process in its last ``PORTS_PER_WORKER`` calls."""
    global _next
    for _ in range(len(_PORTS)):
        port = _PORTS[_next % len(_PORTS)]
        _next += 1
        if bindable(port):
            return port
    raise RuntimeError(f"no free port in {_PORTS.start}..{_PORTS.stop - 1}")
