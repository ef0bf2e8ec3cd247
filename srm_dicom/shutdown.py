"""How long-running commands (serve, listen, demo) learn that it is time to stop."""

from __future__ import annotations

import signal
import threading


def stop_on_signals() -> threading.Event:
    """An event that Ctrl-C or SIGTERM sets: the command waits on it, then stops what it started
    in order, instead of dying in the middle with a KeyboardInterrupt."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop
