"""How a long-running gpu-tasks process on this host stops: on SIGTERM (systemd, ``kill``)
or SIGINT (Ctrl-C), the same way for each.

The coordinator and the exporter wait on an event, which a signal sets; the supervisor
(``gpu-tasks up``) also sits in blocking calls (a worker starting, the demo running), which
only an exception ends, so it asks for ``KeyboardInterrupt`` as well. Only the first
signal interrupts: one that arrives while everything is being stopped must not cut the
stopping short and leave processes running.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def stop_on_signals(*, interrupt: bool = False) -> Iterator[threading.Event]:
    """Within the block, SIGTERM and SIGINT set the event it yields (and, with
    ``interrupt``, the first of them raises ``KeyboardInterrupt`` in the main thread);
    the handlers before it are back afterwards. Main thread only, as for any handler."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        first = not stop.is_set()
        stop.set()
        if interrupt and first:
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
