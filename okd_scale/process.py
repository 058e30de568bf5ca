"""The process: joining and leaving the process group, exiting with a status, and sums over ranks."""
from __future__ import annotations

import ctypes
import datetime
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import ConfigError, first_line
from .watchdog import RESUME_HINT, RankFailure


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def set_malloc_mmap_threshold(nbytes: int) -> bool:
    """From now on, host allocations of at least `nbytes` are mapped on their own and unmapped when freed (glibc's
    mallopt M_MMAP_THRESHOLD, which also stops glibc raising the threshold as blocks are freed). False where the
    C library has no such setting."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, nbytes))


def free_port() -> int:
    """A TCP port free on this host now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefer_environment_bin() -> None:
    """Put this interpreter's bin directory first on PATH when it is a virtualenv's, as activating it does: the
    `ninja` that builds DeepSpeed's just-in-time ops is then the environment's own in every rank, however it was
    started. Two ninja versions cannot read each other's build log, so ranks started with and without the environment
    on PATH would each build the ops again (a minute or more per op)."""
    if sys.prefix == sys.base_prefix:
        return
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join(filter(None, [bin_dir, path]))


STALE_LOCK_S = 900  # DeepSpeed's just-in-time op builds take a minute or two; a lock this old is left over


def check_build_locks(root: Optional[Path] = None, max_age_s: float = STALE_LOCK_S) -> None:
    """Refuse to start when a torch extension build lock is older than ``max_age_s``: one left by a process
    killed while DeepSpeed compiled an op just in time, which would make this run wait on it forever."""
    import time

    if root is None:
        from torch.utils.cpp_extension import get_default_build_root
        root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    now = time.time()
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        try:
            age = now - lock.stat().st_mtime
        except OSError:  # the build ended meanwhile
            continue
        if age > max_age_s:
            raise ConfigError(f"{lock}: a build lock of {age / 60:.0f} minutes, left by a process killed while it "
                              f"compiled the DeepSpeed op {lock.parent.name!r}; every run would wait on it. If no "
                              f"other process on this machine is building that op, remove the file and run again")


def init_distributed(timeout_s: Optional[float] = None) -> tuple[int, int, int]:
    """Join (or create) the process group with the accelerator's backend; returns (rank, world_size, local_rank).

    Under `deepspeed`, `torchrun` or srun with the torch variables set, the environment describes the group;
    a plain `python` run becomes a group of one. ``timeout_s``: the collectives' own timeout (DeepSpeed's
    default when None).
    """
    prefer_environment_bin()
    check_build_locks()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(local_rank)
    if not torch.distributed.is_initialized():
        kw = {}
        if timeout_s is not None:
            kw["timeout"] = datetime.timedelta(seconds=timeout_s)
            set_default_timeout(kw["timeout"])
        try:
            deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), auto_mpi_discovery=False,
                                       **kw)
        except RuntimeError as e:  # torch's DistStoreError and the like: a rank never joined
            raise RankFailure(f"the process group of {os.environ.get('WORLD_SIZE', '?')} ranks did not form "
                              f"(rank {os.environ.get('RANK', '?')}, store {os.environ.get('MASTER_ADDR', '?')}:"
                              f"{os.environ.get('MASTER_PORT', '?')}): {first_line(e)}; a rank died before joining "
                              f"or cannot reach rank 0. {RESUME_HINT}") from None
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank


def set_default_timeout(timeout: datetime.timedelta) -> None:
    """Make `timeout` torch's default for every process group created from now on without one of its own (those
    DeepSpeed creates while it builds an engine), for every backend."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if hasattr(distributed_c10d, "default_pg_nccl_timeout"):
        distributed_c10d.default_pg_nccl_timeout = timeout


def remove_shm_segment() -> None:
    """Remove this rank's shared-memory segment of DeepSpeed's CPU all-reduce (shm_comm, set up where the launcher
    sets LOCAL_SIZE to the world size), which DeepSpeed never unlinks: 66 MiB of RAM per rank left in /dev/shm by
    every run. The name is removed only; a rank still mapping it keeps its pages until it exits."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{os.environ.get('RANK', '0')}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except OSError:  # none made (another accelerator, ranks on several nodes) or not a Linux /dev/shm
        pass


def exit_distributed(code: int) -> None:
    """Leave the process group (after a barrier when `code` is 0), remove this rank's shared-memory segment, flush
    and exit the process with `code`.

    os._exit: with gloo, a thread can outlive the interpreter and abort it at normal exit."""
    import sys

    if torch.distributed.is_initialized():
        try:
            if code == 0:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    remove_shm_segment()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_and_exit(fn: Callable, *args) -> None:
    """Run `fn(*args)` as a process's whole job and exit through `exit_distributed`: with its int result
    (None: 0), with a SystemExit's own status, or with 1 after printing the traceback of any other exception."""
    import traceback

    code = 1
    try:
        result = fn(*args)
        code = 0 if result is None else int(result)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported, then the hard exit below
        traceback.print_exc()
    finally:
        exit_distributed(code)


def all_reduce_sum(values: list[float], device) -> list[float]:
    """`values` summed over every rank (float64), as a list."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()
