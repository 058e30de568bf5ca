"""Faults a long run meets, triggered for real: the checkpoint disk read-only, or full, while saving (the
run's checkpoints/ directory is a small tmpfs mounted by the test; root only, skipped otherwise); a rank
that dies or hangs; a stale op build lock."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import tiny
from tiny import write_config


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs at tmp_path/run/checkpoints, mounted for the test."""
    mnt = tmp_path / "run" / "checkpoints"
    mnt.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _remount(mnt: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mnt)], check=True)


def test_read_only_disk_fails_the_save_and_keeps_latest(small_disk, pair, monkeypatch):
    """The output directory turns read-only after step 2's checkpoint: step 4's save fails on every
    rank with the path and the reason, `latest` still names step 2, and a rerun resumes from it."""
    from dist_worker import run_and_dump

    from okd_scale import trainer
    from okd_scale.checkpoint import SaveError
    from okd_scale.configure import load_config

    out = small_disk.parent
    cfg = load_config(write_config(out.parent / "cfg.yaml", pair, "kd"),
                      [f"output_dir={out}", "train.max_steps=4", "train.save_every=2", "data.eval_file=null"])
    real_step = trainer._Loop.step

    def step(self, n, stop=None):
        if n == 3:
            _remount(small_disk, "ro")
        return real_step(self, n, stop)

    monkeypatch.setattr(trainer._Loop, "step", step)
    with pytest.raises(SaveError, match=r"cannot write checkpoint .*global_step4 \(the previous checkpoint "
                                        r"\(.*global_step2\) is kept as latest\): rank 0: Read-only file system"):
        trainer.train(cfg)
    assert (out / "checkpoints" / "latest").read_text() == "global_step2"
    _remount(small_disk, "rw")
    monkeypatch.setattr(trainer._Loop, "step", real_step)
    report = run_and_dump(cfg)
    assert [r["step"] for r in report["history"]] == [1, 2, 3, 4]
    assert (out / "checkpoints" / "latest").read_text() == "global_step4"


def test_full_disk_fails_the_save_before_writing(small_disk, pair):
    """No room for another checkpoint: the save is refused before any engine writes, naming the disk."""
    from okd_scale import trainer
    from okd_scale.checkpoint import SaveError
    from okd_scale.configure import load_config

    out = small_disk.parent
    cfg = load_config(write_config(out.parent / "cfg.yaml", pair, "kd"),
                      [f"output_dir={out}", "train.max_steps=2", "train.save_every=1", "data.eval_file=null"])
    filler = small_disk / "filler"
    original = trainer.checkpoint.save_checkpoint

    def save_then_fill(*a, **kw):
        path = original(*a, **kw)
        if not filler.exists():  # after the first checkpoint, leave less room than it took
            free = __import__("shutil").disk_usage(small_disk).free
            filler.write_bytes(b"\0" * max(0, free - 4096))
        return path

    trainer.checkpoint.save_checkpoint = save_then_fill
    try:
        with pytest.raises(SaveError, match=r"global_step2 .*bytes free, the last checkpoint took"):
            trainer.train(cfg)
    finally:
        trainer.checkpoint.save_checkpoint = original
    assert (out / "checkpoints" / "latest").read_text() == "global_step1"
    assert not (out / "checkpoints" / ".global_step2.tmp").exists() or \
        not any((out / "checkpoints" / ".global_step2.tmp").iterdir())


@pytest.mark.parametrize("nproc, when, words", [(2, "before", "bytes free, a checkpoint of this run takes about"),
                                                (1, "during", "No space left on device"),
                                                (2, "during", "No space left on device")])
def test_first_save_on_a_full_disk(small_disk, pair, nproc, when, words):
    """The first checkpoint on a disk without room: refused before writing when the estimate does not fit, and a
    write that runs out of space midway (the estimate fits, the files do not) fails on every rank with the reason,
    no hang in DeepSpeed's collectives; no tag, no `latest`, the partial tag removed."""
    import math
    import sys

    from safetensors import safe_open

    from tiny import ROOT

    with safe_open(str(pair / "student" / "model.safetensors"), framework="pt") as f:  # 16 bytes a parameter
        estimate = 16 * sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    free = __import__("shutil").disk_usage(small_disk).free
    leave = estimate // 2 if when == "before" else estimate + 16384  # "during": the estimate fits, the tag does not
    (small_disk / "filler").write_bytes(b"\0" * (free - leave))
    out = small_disk.parent
    cfg = write_config(out.parent / "cfg.yaml", pair, "kd")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "okd_scale" / "train.py"), "--config", str(cfg), f"output_dir={out}", "train.max_steps=2",
           "train.save_every=1", "data.eval_file=null", "train.ddp_timeout=60"]
    proc = subprocess.run(cmd, env=tiny.subprocess_env(nproc), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "exitcode  : 1 " in proc.stderr, proc.stderr[-3000:]
    assert "cannot write checkpoint" in proc.stderr and words in proc.stderr, proc.stderr[-3000:]
    assert "hangs" not in proc.stderr and f'File "{ROOT / "okd_scale"}' not in proc.stderr  # no traceback of ours
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


# --------------------------------------------------------------------------- a rank that dies or hangs


def _two_ranks(cfg: Path, out: Path, *overrides: str, fault: str = "", only: int | None = None,
               **extra_env: str) -> list[subprocess.Popen]:
    """Ranks 0 and 1 of one run as two plain processes (as srun starts them: no launcher that would kill
    the survivor for us), with the fault armed and `extra_env` set; `only`: start that rank alone."""
    import socket
    import sys

    from tiny import ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2) if only is None else [only]:
        env = tiny.subprocess_env(2, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=str(port), **({"OKD_SCALE_FAULT": fault} if fault else {}), **extra_env)
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "okd_scale" / "train.py"), "--config", str(cfg),
                                       f"output_dir={out}", *overrides], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.slow
@pytest.mark.parametrize("fault,survivor,words", [
    ("kill_rank@3@1", 0, "rank 1 stopped answering"),
    ("kill_rank@3@0", 1, "rank 0 is unreachable"),
    ("hang_rank@3@1", 0, "rank 1 hangs at step 3 outside the collective the other ranks wait in (rank 0 has issued"),
])
def test_a_rank_that_dies_or_hangs_is_named_and_the_run_resumes(tmp_path, pair, fault, survivor, words):
    """2 ranks, one SIGKILLed (as an OOM kill would) or blocked for good at step 3: the other stops by
    itself within train.ddp_timeout with a message naming that rank (exit 1; a hung rank is found from
    the heartbeats alone, the frame test off), the checkpoint of step 2 is `latest`, and the same command
    resumes from it to the end."""
    import json
    import time

    from okd_scale.checkpoint import CHECKPOINTS

    timeout = 10
    cfg = write_config(tmp_path / "cfg.yaml", pair, "okd")
    out = tmp_path / "run"
    common = ["data.eval_file=null", "train.max_steps=4", "train.save_every=2", f"train.ddp_timeout={timeout}"]
    procs = _two_ranks(cfg, out, *common, fault=fault, OKD_SCALE_WATCHDOG_FRAMES="0")
    history = out / "log_history.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (history.is_file() and len(history.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    step2_at = time.time()  # step 3, where the fault is, starts now
    stderr = procs[survivor].communicate(timeout=timeout + 60)[1]
    took = time.time() - step2_at
    assert procs[survivor].returncode == 1, stderr[-3000:]
    assert words in stderr and "run the same command again to resume" in stderr, stderr[-3000:]
    assert took < timeout + 15, took  # the timeout, a diagnosis of a few heartbeats, and the exit
    other = procs[1 - survivor]
    try:
        other.communicate(timeout=30)  # a killed rank is gone; a hung one sees the verdict and exits too
    finally:
        other.kill()
    assert (out / CHECKPOINTS / "latest").read_text() == "global_step2"
    resumed = _two_ranks(cfg, out, *common)
    results = [p.communicate(timeout=600) for p in resumed]
    assert [p.returncode for p in resumed] == [0, 0], results[0][1][-3000:]
    assert "at step 2" in results[0][1]
    rows = [json.loads(line) for line in history.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_rank_lost_while_the_engines_are_built(tmp_path, pair):
    """2 plain ranks (as srun starts them); rank 1 is SIGKILLed while the engines are built (rank 0 goes on into
    the student's engine, whose process groups and broadcasts wait for rank 1): rank 0 ends by itself with a line
    naming rank 1 within 3 x train.ddp_timeout, exit 1, no traceback; the same command then runs to the end."""
    import time

    timeout = 10
    cfg = write_config(tmp_path / "cfg.yaml", pair, "okd")
    out = tmp_path / "run"
    common = ["data.eval_file=null", "train.max_steps=2", f"train.ddp_timeout={timeout}"]
    procs = _two_ranks(cfg, out, *common, fault="kill_in_startup@0@1")
    procs[1].wait(timeout=300)
    killed_at = time.time()
    stderr = procs[0].communicate(timeout=3 * timeout + 60)[1]
    took = time.time() - killed_at
    assert procs[0].returncode == 1, stderr[-3000:]
    assert "rank 1 stopped answering (last heard from during start-up" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr and took < 3 * timeout, took
    resumed = _two_ranks(cfg, out, *common)
    results = [p.communicate(timeout=600) for p in resumed]
    assert [p.returncode for p in resumed] == [0, 0], results[0][1][-3000:]


@pytest.mark.slow
def test_a_rank_lost_while_the_engines_are_built_under_torchrun(tmp_path, pair):
    """The same under torchrun: torchrun stops rank 0 (SIGTERM), which ends at once (a stop during start-up, exit
    75), and torchrun's report names rank 1, killed, as the root cause; no traceback from the trainer's code."""
    import sys
    import time

    from tiny import ROOT

    cfg = write_config(tmp_path / "cfg.yaml", pair, "okd")
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "okd_scale" / "train.py"), "--config", str(cfg), f"output_dir={tmp_path / 'run'}",
                           "data.eval_file=null", "train.max_steps=2", "train.ddp_timeout=10"],
                          env=tiny.subprocess_env(2, OKD_SCALE_FAULT="kill_in_startup@0@1"), capture_output=True,
                          text=True, timeout=300)
    err = proc.stderr
    assert proc.returncode == 1 and time.time() - started < 120, err[-3000:]
    cause = err[err.index("Root Cause (first observed failure):"):]
    assert "rank      : 1 (local_rank: 1)" in cause and "(SIGKILL)" in cause, err[-3000:]
    # rank 0 either served torchrun's SIGTERM at once, or found rank 1 gone first
    assert "stopped by SIGTERM during start-up, before the first step" in err or "rank 1 stopped answering" in err
    assert 'okd_scale/' not in "".join(line for line in err.splitlines() if line.strip().startswith('File "'))


def test_a_rank_that_never_joins(tmp_path, pair):
    """Rank 0 of 2 started alone (rank 1 lost before the process group forms): it ends after twice
    train.ddp_timeout with one line saying the process group did not form, exit 1, no traceback."""
    import time

    cfg = write_config(tmp_path / "cfg.yaml", pair, "kd")
    started = time.time()
    rank0 = _two_ranks(cfg, tmp_path / "run", "train.ddp_timeout=5", only=0)[0]
    stderr = rank0.communicate(timeout=120)[1]
    assert rank0.returncode == 1, stderr[-3000:]
    assert "error: the process group of 2 ranks did not form (rank 0, store 127.0.0.1:" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr and time.time() - started < 3 * 5 + 30


@pytest.mark.slow
def test_a_stop_signal_during_start_up_ends_the_run_at_once(tmp_path, pair):
    """SIGTERM to both ranks while rank 0 waits in the student engine's collectives for rank 1, which is still
    loading (held there by the fault): both end within seconds with exit 75 and stopped.json (step 0), and the same
    command then runs to the end."""
    import json
    import signal
    import time

    cfg = write_config(tmp_path / "cfg.yaml", pair, "okd")
    out = tmp_path / "run"
    common = ["data.eval_file=null", "train.max_steps=2", "train.ddp_timeout=60"]
    procs = _two_ranks(cfg, out, *common, fault="hang_in_startup@0@1")
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "run_config.yaml").is_file():
        time.sleep(0.1)
    time.sleep(5)  # rank 0 into the student's engine, rank 1 held before it
    sent = time.time()
    for p in procs:
        p.send_signal(signal.SIGTERM)
    results = [p.communicate(timeout=120) for p in procs]
    took = time.time() - sent
    assert [p.returncode for p in procs] == [75, 75], [r[1][-2000:] for r in results]
    assert took < 30, took
    assert all("during start-up, before the first step" in r[1] and "Traceback" not in r[1] for r in results)
    assert json.loads((out / "stopped.json").read_text())["step"] == 0
    again = _two_ranks(cfg, out, *common)
    results = [p.communicate(timeout=600) for p in again]
    assert [p.returncode for p in again] == [0, 0], results[0][1][-3000:]
    assert not (out / "stopped.json").exists()


def _watchdog_worker(rank: int, world: int, port: int, out: str, fault: str, wait: str) -> None:
    """A rank of a 2-rank gloo group doing three steps of one all_reduce each, with the watchdog armed
    (frames off) and `fault` armed through okd_scale.faults; writes the verdict its watchdog reaches to
    OUT/rank{r}.txt. `wait`: "call" waits inside the collective call (gloo's way), "poll" issues it
    asynchronously and waits in its own code (NCCL's way: the call returns, a device sync blocks),
    "frames" waits in the call with no sequence numbers to read and the frame test on (the fallback)."""
    import datetime
    import os
    import time

    import torch
    import torch.distributed as dist

    from okd_scale import faults
    from okd_scale.watchdog import Watchdog

    os.environ["OKD_SCALE_FAULT"] = fault
    if wait == "frames":
        from okd_scale import watchdog

        watchdog.collective_counts = lambda: {}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    dog = Watchdog(rank, world, timeout_s=1.0, interval_s=0.1, frames=wait == "frames")
    mine = Path(out) / f"rank{rank}.txt"

    def report(message: str) -> None:  # instead of printing and exiting with status 1
        mine.write_text(message)
        deadline = time.time() + 20  # rank 0 hosts the store: stay until the other rank has its verdict too
        while time.time() < deadline and not all((Path(out) / f"rank{r}.txt").exists() for r in range(world)):
            time.sleep(0.05)
        os._exit(0)

    dog._exit = report
    dog.arm()
    t = torch.ones(1)
    for step in (1, 2, 3):
        faults.hang_point("hang_before_step", step, rank)  # not yet at this step
        dog.progress(step)
        faults.hang_point("hang_rank", step, rank)  # at this step, before its collective
        if wait in ("call", "frames"):
            dist.all_reduce(t)
        else:
            work = dist.all_reduce(t, async_op=True)
            while not work.is_completed():
                time.sleep(0.01)
    dog.close()
    mine.write_text("no verdict")
    dist.barrier()
    os._exit(0)


@pytest.mark.parametrize("fault,wait,words", [
    ("hang_rank@3@1", "call", "rank 1 hangs at step 3 outside the collective the other ranks wait in (rank 0 has "
                              "issued 3 collectives on process group 0, rank 1 only 2"),
    ("hang_rank@3@1", "poll", "rank 1 hangs at step 3 outside the collective the other ranks wait in (rank 0 has "
                              "issued 3 collectives on process group 0, rank 1 only 2"),
    ("hang_before_step@3@0", "poll", "rank 0 hangs at step 2 outside the collective the other ranks wait in "
                                     "(rank 1 is at step 3"),
    ("hang_rank@3@1", "frames", "rank 1 hangs at step 3 outside the collective the other ranks wait in (seen from "
                                "Python frames: the others are inside a collective call; its main thread stays at "
                                "okd_scale/faults.py"),
])
def test_the_rank_behind_is_named_without_python_frames(tmp_path, fault, wait, words):
    """2 gloo ranks, one blocked for good before its step's collective (or before the step itself):
    with the frame test off, both watchdogs name that rank from the heartbeats' steps and collective
    counts, also when the waiting rank is not inside a collective call (as under NCCL). Without
    sequence numbers (another backend), the frame test finds it where the others wait in the call."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [mp.get_context("spawn").Process(target=_watchdog_worker, args=(r, 2, port, str(tmp_path), fault, wait))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    for p in procs:
        if p.is_alive():
            p.kill()
    verdicts = [(tmp_path / f"rank{r}.txt").read_text() if (tmp_path / f"rank{r}.txt").exists() else "nothing"
                for r in range(2)]
    for r, verdict in enumerate(verdicts):
        assert words in verdict, f"rank {r}: {verdict}"
        assert verdict.count(" hangs at ") == 1 and "stopped answering" not in verdict, verdict


def test_a_rank_runs_its_environment_s_ninja(monkeypatch):
    """A rank of a virtualenv's python puts the environment's bin first on PATH (once), so that DeepSpeed's op builds
    always run its `ninja`; a system interpreter's PATH is left alone."""
    import os
    import sys

    from okd_scale.process import prefer_environment_bin

    bin_dir = os.path.dirname(sys.executable)
    monkeypatch.setattr(sys, "prefix", "/env")
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    prefer_environment_bin()
    prefer_environment_bin()
    assert os.environ["PATH"] == os.pathsep.join([bin_dir, "/usr/bin", "/bin"])
    monkeypatch.setattr(sys, "prefix", "/usr")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    prefer_environment_bin()
    assert os.environ["PATH"] == "/usr/bin:/bin"


def test_a_stale_op_build_lock_is_named_at_start(tmp_path, pair):
    """A torch-extension build lock left by a rank killed during DeepSpeed's just-in-time op build: the run
    stops at start (exit 2) naming the lock, instead of waiting on it forever; a fresh lock is left alone."""
    import os
    import sys
    import time

    from okd_scale.config import ConfigError
    from okd_scale.process import check_build_locks
    from tiny import ROOT

    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    check_build_locks(tmp_path / "ext")  # a build under way elsewhere: not refused
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    with pytest.raises(ConfigError, match="deepspeed_shm_comm"):
        check_build_locks(tmp_path / "ext")
    cfg = write_config(tmp_path / "cfg.yaml", pair, "kd")
    proc = subprocess.run([sys.executable, str(ROOT / "okd_scale" / "train.py"), "--config", str(cfg)],
                          env=tiny.subprocess_env(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext")), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: {lock}: a build lock of 60 minutes" in proc.stderr and "remove the file" in proc.stderr
    assert lock.exists()  # never removed for the user: another machine's build might share the directory
