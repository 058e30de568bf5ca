"""The GPU check's machine: the accelerator and versions it reports, the packages the wheels in .whl carry, and
its child processes (offline, logged, time-limited)."""
from __future__ import annotations

import os
import platform
import subprocess
from typing import Optional

from tools import ROOT

CARRIED = ("deepspeed", "pydantic", "hjson", "rouge_score", "nltk", "datasets")  # what .whl brings there


def accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def environment(dry: bool) -> dict:
    """What runs where: the accelerator and its device, the versions, the peak FLOP/s the MFU uses."""
    import deepspeed
    import torch
    import transformers

    # heavy (torch): imported when the check runs, not for --help
    from okd_scale import perf

    accel = accelerator()
    device = perf.device_name()
    peak = perf.peak_flops(device)
    memory = None
    if accel.device_name() != "cpu":
        memory = accel.total_memory() / 2**30
    return {"accelerator": accel.device_name(), "device": device, "device_name": accel.current_device_name(),
            "device_memory_gib": memory, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "dry_run": dry,
            "peak_flops": peak}


def carried_packages() -> dict:
    """{package: version, or the import error} for what the wheels in .whl bring."""
    import importlib
    import importlib.metadata

    out = {}
    for name in CARRIED:
        try:
            importlib.import_module(name)
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except Exception as e:  # noqa: BLE001 - reported in the table
            out[name] = f"error: {type(e).__name__}: {str(e)[:120]}"
    return out


def child_env() -> dict:
    """The environment of the check's child processes: offline, this accelerator, deterministic cuBLAS."""
    env = dict(os.environ)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.setdefault(key, "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # bitwise-equal reruns of the same matrix products
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(
        os.pathsep))]))
    return env


def run_logged(cmd: list, log, timeout_s: float) -> Optional[int]:
    """Run `cmd` in the repository with its output appended to `log`; its exit status, or None when it
    outran `timeout_s` (then it and every process it started are killed)."""
    import signal

    log.write(" ".join(map(str, cmd)) + "\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        return proc.wait(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None
    finally:
        log.flush()
