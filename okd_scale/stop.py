"""Stop requests: SIGTERM and SIGUSR1 (a scheduler's warning before preemption or the time limit) from the moment
the entry point starts. During start-up (before the training loop, nothing to checkpoint yet) a stop ends the
process at once: the handler raises StartupStop in the main thread, and the watchdog ends a rank whose main thread
is blocked in a collective. From the training loop on, the trainer acts on it at the end of a step."""
from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from typing import Optional

log = logging.getLogger("okd_scale")
SIGNALS = ("SIGTERM", "SIGUSR1")


class StartupStop(BaseException):
    """A stop signal during start-up: the process ends now, with the stop recorded (exit 75). A BaseException, as
    KeyboardInterrupt, so that no handler of ordinary errors on the way takes it for one."""

    def __init__(self, signal: str):
        super().__init__(f"{signal} during start-up, before the first step")
        self.signal = signal


class StopRequest:
    """The first stop signal received, if any, while installed; `startup`: whether it ends the process at once."""

    def __init__(self):
        self.signal: Optional[str] = None
        self.startup = True
        self._previous: dict = {}

    def install(self) -> "StopRequest":
        """Handle SIGNALS from now on (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is threading.main_thread() and not self._previous:
            for name in SIGNALS:
                self._previous[name] = signal.signal(getattr(signal, name), self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name
        if self.startup:
            log.warning("%s received during start-up: stopping now (no step taken yet)", self.signal)
            raise StartupStop(self.signal)
        log.warning("%s received: stopping after the current step, with a checkpoint", self.signal)

    @contextmanager
    def deferred(self):
        """Within it a signal is only remembered, for a phase that acts on it itself (the training loop, seqkd's
        generation of the teacher's responses)."""
        before, self.startup = self.startup, False
        try:
            yield self
        finally:
            self.startup = before

    def uninstall(self) -> None:
        for name, handler in self._previous.items():
            signal.signal(getattr(signal, name), handler)
        self._previous = {}


REQUEST = StopRequest()  # the process's one request: installed by train.py at start, read by the trainer
