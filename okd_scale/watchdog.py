"""Liveness of the ranks of a multi-rank run, so that a rank that dies or hangs stops the others with
a message naming it instead of leaving them waiting in a collective forever.

Every rank runs a daemon thread that beats into the process group's store: a counter, its training
step, how many collectives it has issued on each process group (the groups' sequence numbers), and
where its main thread is. When this rank's training steps stop advancing for ``train.ddp_timeout``
seconds, or a collective raises, the ranks are looked at twice, a few beats apart: a rank whose beat
did not move died (or is frozen); a live rank that did not move and is behind another one (an earlier
step, or fewer collectives issued on a group they share) is the one that hangs: the others have entered
a collective it never reached. This holds whatever the backend does while it waits (gloo blocks inside
the collective call; under NCCL the call returns and the rank blocks later, in a device sync of its own
code). Where a backend keeps no sequence numbers, the main thread's Python frames stand in (a live rank
outside any torch.distributed/DeepSpeed comm call while others wait in one); ``frames=False`` (or
OKD_SCALE_WATCHDOG_FRAMES=0) turns that off. The verdict goes to the store (so every rank reports the
same one) and the process exits with status 1.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Callable, Optional

log = logging.getLogger("okd_scale")

KEY = "okd_scale/watchdog/"
COLLECTIVE_FILES = (f"torch{os.sep}distributed{os.sep}", f"deepspeed{os.sep}comm{os.sep}")
EXIT_STATUS = 1
STOPPED_STATUS = 75  # as okd_scale/train.py's EXIT_STOPPED: stopped by a signal, run again to resume
RESUME_HINT = "The last checkpoint is intact; run the same command again to resume"


def _default_store():
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    try:
        from torch.distributed.distributed_c10d import _get_default_store
        return _get_default_store()
    except (ImportError, RuntimeError, ValueError):
        return None


def collective_counts() -> dict[str, int]:
    """{process group name: collectives this rank has issued on it} for every group it belongs to whose
    backend keeps sequence numbers (gloo and NCCL do); names agree across ranks (groups are created in
    the same order on every rank)."""
    try:
        from torch.distributed import distributed_c10d as c10d

        groups = list(c10d._world.pg_map)
        names = c10d._world.pg_names
    except (ImportError, AttributeError, RuntimeError):
        return {}
    counts = {}
    for pg in groups:
        try:
            counts[str(names[pg])] = int(pg._get_sequence_number_for_group())
        except (AttributeError, KeyError, RuntimeError, TypeError, ValueError):  # no sequence numbers here
            continue
    return counts


def _ahead(a: dict, b: dict, b_rank: int) -> Optional[str]:
    """How the rank of beat ``a`` is ahead of the rank of beat ``b`` (a later step, or more collectives
    issued on a group they share), in words; None when it is not."""
    if a["step"] != b["step"]:
        return f"is at step {a['step']}" if a["step"] > b["step"] else None
    for group in sorted(set(a.get("seq", {})) & set(b.get("seq", {}))):
        if a["seq"][group] > b["seq"][group]:
            return (f"has issued {a['seq'][group]} collectives on process group {group}, rank {b_rank} only "
                    f"{b['seq'][group]}")
    return None


def _frames_default() -> bool:
    return os.environ.get("OKD_SCALE_WATCHDOG_FRAMES", "1").strip().lower() not in ("0", "false", "no", "off")


def main_thread_location() -> tuple[str, bool]:
    """(where the main thread is, as 'path:line in function', whether it is inside a collective call)."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return "unknown", False
    code = frame.f_code
    where = f"{_short(code.co_filename)}:{frame.f_lineno} in {code.co_name}"
    waiting = False
    while frame is not None:
        if any(part in frame.f_code.co_filename for part in COLLECTIVE_FILES):
            waiting = True
            break
        frame = frame.f_back
    return where, waiting


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _short(path: str) -> str:
    """A source path relative to this repository or to site-packages."""
    if path.startswith(_ROOT + os.sep):
        return os.path.relpath(path, _ROOT)
    i = path.rfind("site-packages" + os.sep)
    return path[i + len("site-packages" + os.sep):] if i >= 0 else path


def _store_gone() -> str:
    return (f"rank 0 is unreachable (it hosts the process group's store at {os.environ.get('MASTER_ADDR', '?')}:"
            f"{os.environ.get('MASTER_PORT', '?')}): it died, was killed, or its node is down")


def _position(beat: dict) -> tuple:
    """Where a rank's training is: its step and its collectives issued per group."""
    return beat["step"], tuple(sorted(beat.get("seq", {}).items()))


class RankFailure(RuntimeError):
    """Another rank died or hangs (the message names it)."""


def collective_timeout(timeout_s: float) -> float:
    """The process group's own timeout: a backstop behind the watchdog's verdict at ``timeout_s``."""
    return 2 * timeout_s


class Watchdog:
    """One rank's beat thread and the stall check (see the module docstring). ``progress(step)`` marks
    that this rank's training advanced; ``arm()``/``disarm()`` bracket the part of the run where a
    stall of ``timeout_s`` counts (the training loop). ``store``: where the beats go (default: the
    process group's own; none, and no thread, on one rank). ``frames``: whether Python frames may single
    out a hung rank where no sequence numbers can (default: OKD_SCALE_WATCHDOG_FRAMES, on)."""

    def __init__(self, rank: int, world: int, timeout_s: float, interval_s: Optional[float] = None,
                 store=None, frames: Optional[bool] = None, stop=None, on_stop: Optional[Callable[[str], None]] = None):
        self.rank, self.world, self.timeout_s = rank, world, float(timeout_s)
        self.stop, self.on_stop = stop, on_stop  # a StopRequest to act on during start-up, and how to record it
        self.startup, self._stop_seen = False, None
        self.interval_s = interval_s or min(30.0, max(0.5, self.timeout_s / 10))
        self.frames = _frames_default() if frames is None else bool(frames)
        self.store = store if store is not None else _default_store()
        self.step, self.beat = 0, 0
        self._progress_at = time.monotonic()
        self._armed = self.exiting = False
        self._stop = threading.Event()
        self._thread = None
        if self.store is not None:
            self._beat()
            self._thread = threading.Thread(target=self._run, name="okd_scale-watchdog", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ main thread side

    def progress(self, step: int) -> None:
        self.step, self._progress_at = step, time.monotonic()

    def arm(self, startup: bool = False) -> None:
        """Count stalls from now on; `startup`: before the training loop, where only a rank that stopped answering
        is named (start-up phases may take long on one rank while the others wait), and a stop signal that the
        blocked main thread cannot act on ends the process (exit 75)."""
        self._progress_at, self._armed, self.startup = time.monotonic(), True, startup

    def disarm(self) -> None:
        self._armed = False

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s)

    # ------------------------------------------------------------------ beats and verdicts

    def _beat(self) -> None:
        self.beat += 1
        where, waiting = main_thread_location()
        beat = {"beat": self.beat, "step": self.step, "seq": collective_counts(), "where": where, "waiting": waiting}
        self.store.set(f"{KEY}{self.rank}", json.dumps(beat))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
                verdict = self._verdict()
            except Exception:  # noqa: BLE001 - the store is gone: rank 0 (its host) died or the run ended
                if self._armed and not self._stop.is_set():
                    self._exit(_store_gone())
                return
            if verdict is not None and self._armed:  # another rank found who died or hangs
                self._exit(verdict)
                return
            if self._startup_stop():
                return
            stalled = time.monotonic() - self._progress_at
            if self._armed and stalled > self.timeout_s:
                verdict = self.diagnose(stalled)
                if verdict is not None:
                    self._exit(verdict)
                    return
                log.warning("rank %d: no training progress for %.0f s (train.ddp_timeout %.0f s), but every rank "
                            "is alive and none could be singled out; still waiting", self.rank, stalled,
                            self.timeout_s)
                self._progress_at = time.monotonic()  # warn again after another timeout

    def _startup_stop(self) -> bool:
        """During start-up, end this process (exit 75, the stop recorded) when a stop signal has waited a few beats
        for a main thread that is blocked (one that is not raises StartupStop itself)."""
        signal = getattr(self.stop, "signal", None)
        if not (self._armed and self.startup and signal and getattr(self.stop, "startup", False)):
            return False
        now = time.monotonic()
        self._stop_seen = self._stop_seen or now
        if now - self._stop_seen < max(5.0, 2 * self.interval_s):
            return False
        self.exiting = True
        try:
            if self.on_stop is not None:
                self.on_stop(signal)
        finally:
            print(f"rank {self.rank}: stopped by {signal} during start-up, before the first step; run the same "
                  "command again", file=sys.stderr, flush=True)
            os._exit(STOPPED_STATUS)
        return True

    def _read(self) -> dict[int, dict]:
        """Every rank's last beat; a rank that never beat gets beat -1 (a get of a missing key would block)."""
        beats = {}
        for r in range(self.world):
            key = f"{KEY}{r}"
            beats[r] = (json.loads(bytes(self.store.get(key)).decode()) if self.store.check([key])
                        else {"beat": -1, "step": 0, "seq": {}, "where": "never started", "waiting": False})
        return beats

    def _verdict(self) -> Optional[str]:
        key = f"{KEY}verdict"
        return bytes(self.store.get(key)).decode() if self.store.check([key]) else None

    def diagnose(self, stalled_s: Optional[float] = None) -> Optional[str]:
        """A message naming the ranks that died or hang, or None when none can be singled out."""
        try:
            verdict = self._verdict()
            if verdict is not None:
                return verdict
            first = self._read()
            for _ in range(3):  # a window of three beats, beating meanwhile (this rank is alive)
                time.sleep(self.interval_s)
                self._beat()
            verdict = self._verdict()
            if verdict is not None:
                return verdict
            second = self._read()
        except Exception:  # noqa: BLE001 - the store is gone with rank 0
            return _store_gone()
        others = [r for r in range(self.world) if r != self.rank]
        dead = [r for r in others if second[r]["beat"] == first[r]["beat"]]
        alive = [r for r in range(self.world) if r not in dead]
        still = [r for r in alive if _position(first[r]) == _position(second[r])]
        hung = {}  # rank -> how another rank is ahead of it
        for r in still:
            ahead = [(o, _ahead(second[o], second[r], r)) for o in alive if o != r]
            ahead = [(o, how) for o, how in ahead if how]
            if ahead:
                hung[r] = f"rank {ahead[0][0]} {ahead[0][1]}"
        if self.startup:  # phases of unequal length on each rank: only a rank that stopped answering is named
            hung = {}
        elif not hung and self.frames and not any(second[r].get("seq") for r in alive):
            waiting = [r for r in alive if first[r]["waiting"] and second[r]["waiting"]]
            hung = {r: "seen from Python frames: the others are inside a collective call" for r in others
                    if r in still and waiting and not first[r]["waiting"] and first[r]["where"] == second[r]["where"]}
        if not dead and not hung:
            return None
        waited = f" after {stalled_s:.0f} s without progress" if stalled_s is not None else ""
        parts = [f"rank {r} stopped answering (last heard from "
                 + ("during start-up" if self.startup else f"at step {second[r]['step']}") + "; no heartbeat for "
                 f"{3 * self.interval_s:.1f} s: it died, was killed, or is frozen; see its log)" for r in dead]
        parts += [f"rank {r} hangs at step {second[r]['step']} outside the collective the other ranks wait in "
                  f"({how}; its main thread stays at {second[r]['where']})" for r, how in hung.items()]
        message = f"{'; '.join(parts)} (found by rank {self.rank}{waited}; train.ddp_timeout is {self.timeout_s:.0f} s)"
        try:
            self.store.set(f"{KEY}verdict", message)
        except Exception:  # noqa: BLE001
            pass
        return message

    def _exit(self, message: str) -> None:
        """Report and end this process: its main thread is blocked in a collective and cannot raise."""
        self.exiting = True
        print(f"error: {message}. {RESUME_HINT}.", file=sys.stderr, flush=True)
        if self.rank == 0:  # the store lives in this process: give the other ranks a few beats to read the verdict
            time.sleep(3 * self.interval_s)
        os._exit(EXIT_STATUS)
