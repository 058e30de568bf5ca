"""A run's output directory: created when missing, writable, and held by one run at a time.

The holder is the run's rank 0: `output_dir/.okd_scale.lock`, created exclusively (O_EXCL) before anything else is
written there, holds its host, PID, the PID's start time and the run's start. A second run finds it and stops
(exit 2) naming the holder. A lock whose process is gone from this host is taken over with a warning; a lock from
another host is reported, never broken (that run may be alive: delete the file once it is not).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from .config import ConfigError

log = logging.getLogger("okd_scale")

LOCK = ".okd_scale.lock"


class RunDirError(ConfigError):
    """The output directory cannot be used: not a directory, not writable, or held by another run."""


@dataclass
class Holder:
    """Who holds a lock: host, PID, when that PID started (so a reused PID is not taken for it) and when the run
    started."""

    host: str
    pid: int
    pid_started: float
    started: str

    @classmethod
    def me(cls) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), _pid_started(os.getpid()) or 0.0,
                   time.strftime("%Y-%m-%d %H:%M:%S %Z"))

    def alive(self) -> bool:
        """Whether the holding process still runs (only answerable on its own host: True elsewhere)."""
        if self.host != socket.gethostname():
            return True
        started = _pid_started(self.pid)
        return started is not None and (not self.pid_started or abs(started - self.pid_started) < 1.0)

    def words(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"


def _pid_started(pid: int) -> Optional[float]:
    """The start time of process `pid` on this host, or None when there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _read(path: Path) -> Optional[Holder]:
    """The holder a lock file names; None when it is unreadable or half written (its writer just created it)."""
    try:
        return Holder(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


@dataclass
class RunLock:
    """The lock this process holds on an output directory; `release()` when the run ends."""

    path: Path
    holder: Holder

    def release(self) -> None:
        """Remove the lock if it is still this process's."""
        if _read(self.path) == self.holder:
            self.path.unlink(missing_ok=True)


def _unusable(out: Path, e: OSError) -> RunDirError:
    return RunDirError(f'"output_dir": cannot write in {out}: {e.strerror or e}; choose a writable directory')


def prepare(out: Path) -> None:
    """Create `out` (and its parents); RunDirError naming the problem when it is a file or cannot be made."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f'"output_dir": {out} is a file, not a directory; choose a directory')
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unusable(out, e) from None


def acquire(out: Path, attempts: int = 50) -> RunLock:
    """Create `out` when missing and take its lock for this process: RunDirError naming the holder when another live
    run has it; a lock left by a dead process of this host (or by this process) is taken over."""
    prepare(out)
    path, me = out / LOCK, Holder.me()
    for _ in range(attempts):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # also the test that `out` is writable
        except FileExistsError:
            holder = _read(path)
            if holder is None:  # being written this instant, or garbage: look again
                time.sleep(0.1)
                holder = _read(path)
                if holder is None and path.exists():
                    raise RunDirError(f'"output_dir": {out} has an unreadable lock {path}; if no run uses this '
                                      "directory, delete the file") from None
                continue
            if holder.alive() and not (holder.host == me.host and holder.pid == me.pid):
                raise RunDirError(f'"output_dir": {out} is in use by another run ({holder.words()}; lock {path}). '
                                  "Wait for it to end or use another output_dir; if that run is gone, delete the "
                                  "lock file") from None
            stale = path.with_name(f"{LOCK}.stale.{holder.pid}.{os.getpid()}")
            try:
                os.rename(path, stale)  # one taker wins the rename; the others look again
            except FileNotFoundError:
                continue
            stale.unlink(missing_ok=True)
            if holder.pid != me.pid:
                log.warning("%s: took over the lock of a run that is gone (%s)", out, holder.words())
            continue
        except OSError as e:  # read-only, no permission
            raise _unusable(out, e) from None
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(me), f)
        return RunLock(path, me)
    raise RunDirError(f'"output_dir": could not take the lock {path} after {attempts} attempts')
