"""Stop requests: SIGTERM and SIGUSR1 (a scheduler's warning before preemption or the time limit) are
remembered from the moment the entry point starts, and acted on by the trainer at the end of a step."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

log = logging.getLogger("okd_scale")
SIGNALS = ("SIGTERM", "SIGUSR1")


class StopRequest:
    """The first stop signal received, if any, while installed."""

    def __init__(self):
        self.signal: Optional[str] = None
        self._previous: dict = {}

    def install(self) -> "StopRequest":
        """Handle SIGNALS from now on (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is threading.main_thread() and not self._previous:
            for name in SIGNALS:
                self._previous[name] = signal.signal(getattr(signal, name), self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name
        log.warning("%s received: stopping after the current step, with a checkpoint", self.signal)

    def uninstall(self) -> None:
        for name, handler in self._previous.items():
            signal.signal(getattr(signal, name), handler)
        self._previous = {}


REQUEST = StopRequest()  # the process's one request: installed by train.py at start, read by the trainer
