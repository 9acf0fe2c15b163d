"""Preemption: clusters send SIGTERM before they kill a job (SLURM, Kubernetes, spot instances) and people press
Ctrl-C. During a run, the first SIGTERM or SIGINT is only noted; the run loop finishes the current step (or
iteration), writes a checkpoint atomically, says so in one line and raises `Preempted` (exit status 75), so that
the same command with `resume: auto` continues exactly where it stopped. A second SIGINT aborts at once, as a
second Ctrl-C does elsewhere.

Handlers are installed only in the main thread (Python delivers signals there) and restored when the run ends.
"""

from __future__ import annotations

import signal
import threading


class Preemption:
    """Context manager: `received` is the name of the first SIGTERM/SIGINT caught inside it (None before)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.received = self.received or signal.Signals(signum).name

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
