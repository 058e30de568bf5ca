"""Test hooks for fault injection: OKD_SCALE_FAULT="name@step[@rank],..." arms a named fault at an
optimizer step (on every rank, or one). Unset, every check is False. Used by the fault-injection tests."""
from __future__ import annotations

import os
import signal
import time


def armed(name: str, step: int, rank: int = 0) -> bool:
    """Whether fault `name` is armed for this step and rank."""
    for item in filter(None, os.environ.get("OKD_SCALE_FAULT", "").split(",")):
        parts = item.strip().split("@")
        if parts[0] == name and len(parts) >= 2 and int(parts[1]) == step and (len(parts) < 3 or int(parts[2]) == rank):
            return True
    return False


def crash_point(name: str, step: int, rank: int = 0) -> None:
    """Die here (SIGKILL, as a crash or an OOM kill would) when `name` is armed."""
    if armed(name, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def hang_point(name: str, step: int, rank: int = 0) -> None:
    """Block here for good (as a deadlock or a stuck filesystem would) when `name` is armed."""
    if armed(name, step, rank):
        while True:
            time.sleep(3600)


def signal_point(name: str, step: int, rank: int = 0) -> None:
    """Send this process SIGUSR1 here (a scheduler's warning arriving in the middle of a step) when `name` is
    armed."""
    if armed(name, step, rank):
        os.kill(os.getpid(), signal.SIGUSR1)
