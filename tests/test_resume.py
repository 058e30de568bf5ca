"""Checkpoints and exact resume: a stop by signal, a crash in the middle of a save, pruning, refusals; on the
accelerator (2-process runs on the CPU where it has fewer than 2 devices)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny
from tiny import ROOT, comparable, write_config


def _rows(out: Path) -> list:
    return [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]


def _children(pid: int) -> list[int]:
    """Direct child processes of pid (from /proc)."""
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _assert_same(a: Path, b: Path) -> None:
    """Bitwise: the same losses at every step, the same student and teacher weights at the end."""
    assert comparable(_rows(a)) == comparable(_rows(b))
    for name in ("student/model.safetensors", "teacher_after.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{name}: {k}"


def test_stop_by_signal_then_resume_equals_uninterrupted_two_processes(tmp_path, pair):
    """okd, 2 processes, gradient accumulation: SIGUSR1 mid-run makes every rank finish its step,
    checkpoint and exit 75; the same command resumes and ends bitwise where an uninterrupted run ends."""
    cfg = write_config(tmp_path / "cfg.yaml", pair, "okd")
    common = ["train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=2", "train.max_steps=8",
              "data.eval_file=null"]
    straight = subprocess.run(tiny.worker_command([[cfg, f"output_dir={tmp_path / 'straight'}", *common]]),
                              env=tiny.subprocess_env(2), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "stopped"
    cmd = tiny.worker_command([[cfg, f"output_dir={out}", *common]])
    proc = subprocess.Popen(cmd, env=tiny.subprocess_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "log_history.jsonl").is_file() and len(_rows(out)) >= 2):
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    for pid in workers:
        os.kill(pid, signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "exitcode  : 75" in err, err[-3000:]  # torchrun reports the workers' 75
    stopped_at = len(_rows(out))
    assert 2 <= stopped_at < 8
    assert (out / "checkpoints" / "latest").read_text() == f"global_step{stopped_at}"
    assert not (out / "student").exists()  # no export before the end

    resumed = subprocess.run(cmd, env=tiny.subprocess_env(2), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped_at}" in resumed.stderr
    _assert_same(tmp_path / "straight", out)


@pytest.fixture
def deterministic(device):
    """On a GPU, torch's deterministic kernels where it has them (attention and embedding backward use atomics
    otherwise; cuBLAS also needs CUBLAS_WORKSPACE_CONFIG=:4096:8 set before the process starts, as
    tools/gpu/check.py does); nothing changes on the CPU."""
    if device.type == "cpu":
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_resume_mid_epoch_is_exact_in_process(tmp_path, pair, monkeypatch, deterministic):
    """A SIGUSR1 to this process in the middle of step 3 (mid-epoch) checkpoints step 3 itself, not step 4; then,
    with a torn last line in log_history.jsonl, resume into the next epoch: the same losses and weights as a
    straight run (on a GPU, with deterministic kernels)."""
    from dist_worker import run_and_dump

    from okd_scale import trainer
    from okd_scale.configure import load_config

    common = ["train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=2", "train.max_steps=10",
              "data.eval_file=null", "loss.divergence=js"]  # 20 batches: into the second epoch
    run_and_dump(load_config(write_config(tmp_path / "a.yaml", pair, "okd"), [f"output_dir={tmp_path / 'a'}", *common]))

    cfg = load_config(write_config(tmp_path / "b.yaml", pair, "okd"), [f"output_dir={tmp_path / 'b'}", *common])
    monkeypatch.setenv("OKD_SCALE_FAULT", "signal_in_step@3")  # arrives after step 3's backward, before its end
    result = trainer.train(cfg)
    assert result.stopped_by == "SIGUSR1" and len(result.history) == 3
    state = json.loads((tmp_path / "b" / "checkpoints" / "global_step3" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches_in_epoch"]) == (0, 6)  # of 32 rows / 2 per batch = 16: mid-epoch
    monkeypatch.delenv("OKD_SCALE_FAULT")
    with open(tmp_path / "b" / "log_history.jsonl", "a") as f:
        f.write('{"step": 4, "student/lo')  # a row torn by a kill in the middle of its write
    run_and_dump(cfg)
    _assert_same(tmp_path / "a", tmp_path / "b")


def test_pruning_follows_write_order(tmp_path, pair):
    """A `resume: none` rerun in an old output directory with keep_last=1 keeps the tags it writes (the old run's
    higher steps go), re-saving an existing step replaces it, and `latest` always names a tag that exists."""
    from dist_worker import run_and_dump

    from okd_scale.configure import load_config

    out = tmp_path / "out"
    common = [f"output_dir={out}", "data.eval_file=null", "train.max_steps=4"]
    run_and_dump(load_config(write_config(tmp_path / "a.yaml", pair, "kd"), [*common, "train.save_every=2"]))
    assert sorted(p.name for p in (out / "checkpoints").glob("global_step*")) == ["global_step2", "global_step4"]
    run_and_dump(load_config(write_config(tmp_path / "b.yaml", pair, "kd"),
                             [*common, "train.max_steps=2", "train.save_every=1", "train.keep_last=1", "resume=none"]))
    tags = sorted(p.name for p in (out / "checkpoints").glob("*step*"))
    assert tags == ["global_step2"] and (out / "checkpoints" / "latest").read_text() == "global_step2"
    state = json.loads((out / "checkpoints" / "global_step2" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["written"] == 4  # after the old run's 2 and 4 and the new run's 1


def test_crash_during_save_leaves_the_previous_checkpoint(tmp_path, pair):
    """A process killed in the middle of writing step 4's checkpoint: `latest` still names step 2,
    which loads, and the rerun resumes from it and ends as an uninterrupted run does."""
    cfg = write_config(tmp_path / "cfg.yaml", pair, "okd")
    common = ["train.max_steps=6", "train.save_every=2", "data.eval_file=null"]
    script = [sys.executable, str(ROOT / "tests" / "dist_worker.py"), str(cfg)]
    straight = subprocess.run(script + [f"output_dir={tmp_path / 'straight'}", *common], env=tiny.subprocess_env(),
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "crashed"
    crashed = subprocess.run(script + [f"output_dir={out}", *common],
                             env=tiny.subprocess_env(OKD_SCALE_FAULT="crash_in_save@4"),
                             capture_output=True, text=True, timeout=600)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == "global_step2"
    assert (out / "checkpoints" / ".global_step4.tmp").is_dir() and not (out / "checkpoints" / "global_step4").exists()
    rerun = subprocess.run(script + [f"output_dir={out}", *common], env=tiny.subprocess_env(), capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "at step 2" in rerun.stderr
    _assert_same(tmp_path / "straight", out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["global_step4", "global_step6", "latest"]


def test_resume_refusals(tmp_path, pair):
    """Another world size, another method, a path that is no checkpoint, a changed batch, data file or online
    setting: errors that say what to do; resume_ignore resumes through a deliberate change."""
    from dist_worker import run_and_dump

    from okd_scale.checkpoint import CheckpointError
    from okd_scale.configure import load_config
    from okd_scale.trainer import train

    out = tmp_path / "run"
    run_and_dump(load_config(write_config(tmp_path / "cfg.yaml", pair, "kd"),
                             [f"output_dir={out}", "train.max_steps=2", "data.eval_file=null"]))
    state_file = out / "checkpoints" / "global_step2" / "trainer_state.json"
    original = state_file.read_text()
    state_file.write_text(json.dumps({**json.loads(original), "world_size": 2}))
    cfg = load_config(write_config(tmp_path / "cfg.yaml", pair, "kd"), [f"output_dir={out}", "train.max_steps=4"])
    with pytest.raises(CheckpointError, match="saved by 2 processes and this run has 1.*okd_scale.convert"):
        train(cfg)
    state_file.write_text(original)  # as written: the manifest checks it
    cfg = load_config(write_config(tmp_path / "cfg.yaml", pair, "sft"), [f"output_dir={out}"])
    with pytest.raises(CheckpointError, match="is a kd checkpoint; this run's method is sft"):
        train(cfg)
    cfg = load_config(write_config(tmp_path / "cfg.yaml", pair, "kd"), [f"resume={tmp_path}"])
    with pytest.raises(CheckpointError, match='"resume": .* is not a checkpoint'):
        train(cfg)
    changed = ["train.per_device_train_batch_size=2", "online.r=4", f"data.train_file={pair / 'eval.jsonl'}"]
    cfg = load_config(write_config(tmp_path / "cfg.yaml", pair, "kd"), [f"output_dir={out}", *changed])
    with pytest.raises(CheckpointError, match=r"saved with another data.train_file, online.r, "
                                              r"train.per_device_train_batch_size \(.*online.r: 32 -> 4"
                                              r".*resume_ignore"):
        train(cfg)
    cfg = load_config(write_config(tmp_path / "cfg.yaml", pair, "kd"),
                      [f"output_dir={out}", "train.max_steps=3", "data.eval_file=null", *changed[1:],
                       'resume_ignore=["online.r", "data.train_file"]'])
    assert [r["step"] for r in train(cfg).history] == [1, 2, 3]  # resumed at step 2, deliberately changed

    okd = tmp_path / "okd"  # the teacher's module state is loaded strictly, even through resume_ignore
    run_and_dump(load_config(write_config(tmp_path / "okd.yaml", pair, "okd"),
                             [f"output_dir={okd}", "train.max_steps=2", "data.eval_file=null"]))
    cfg = load_config(write_config(tmp_path / "okd.yaml", pair, "okd"),
                      [f"output_dir={okd}", "train.max_steps=3", "online.num_blocks=1",
                       'resume_ignore=["online.num_blocks"]'])
    with pytest.raises(CheckpointError, match=r"the saved online module does not match this run's: missing \[\], "
                                              r"unexpected \['base_model.model.model.layers.2"):
        train(cfg)


class _Payload:
    """Unpickling this runs a shell command (what a hostile checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_untrusted_checkpoint_files_are_checked_and_never_unpickled(tmp_path, pair):
    """Resume and conversion check the tag's manifest (a truncated or altered file is named), and a file whose
    pickle would run code is refused with a clear message (exit 2 for the converter) and runs nothing."""
    from dist_worker import run_and_dump

    from okd_scale.checkpoint import CheckpointError, write_manifest
    from okd_scale.configure import load_config
    from okd_scale.trainer import train

    out = tmp_path / "run"
    overrides = [f"output_dir={out}", "train.max_steps=2", "data.eval_file=null"]
    run_and_dump(load_config(write_config(tmp_path / "cfg.yaml", pair, "okd"), overrides))
    tag = out / "checkpoints" / "global_step2"
    states = tag / "student" / "mp_rank_00_model_states.pt"
    good = states.read_bytes()
    cfg = load_config(write_config(tmp_path / "cfg.yaml", pair, "okd"), [*overrides[:1], "train.max_steps=3"])
    states.write_bytes(good[:-10])
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt: \d+ bytes, the manifest says \d+"):
        train(cfg)
    states.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt: its sha256 differs"):
        train(cfg)

    marker = tmp_path / "pwned"
    torch.save({"module": _Payload(marker)}, states)
    write_manifest(tag)  # a hostile checkpoint comes with a manifest that matches
    with pytest.raises(CheckpointError, match=r"refused to load: .*(posix|os)\.system"):
        train(cfg)
    assert not marker.exists()
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_to_hf.py"), str(out), str(tmp_path / "hf")],
                          env=tiny.subprocess_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 2 and "refused to load" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not marker.exists()


def test_nonfinite_step_is_skipped_on_every_rank(tmp_path, pair):
    """A NaN injected into rank 1's batch (test hook): that step changes no weight on any rank and in
    neither engine, is counted and logged, and training goes on; more than train.max_bad_steps in a
    row stops the run (exit 1) with the last good checkpoint as `latest`, from which it resumes."""
    from okd_scale.checkpoint import CHECKPOINTS

    cfg = write_config(tmp_path / "cfg.yaml", pair, "okd")
    common = ["data.eval_file=null", "train.max_grad_norm=0"]

    def run(out: Path, *extra: str, fault: str = "") -> subprocess.CompletedProcess:
        env = tiny.subprocess_env(2, **({"OKD_SCALE_FAULT": fault} if fault else {}))
        return subprocess.run(tiny.worker_command([[cfg, f"output_dir={out}", *common, *extra]]), env=env,
                              capture_output=True, text=True, timeout=600)

    clean, nan = run(tmp_path / "clean", "train.max_steps=2"), run(tmp_path / "nan", "train.max_steps=3",
                                                                     fault="nan_batch@3@1")
    assert clean.returncode == 0 and nan.returncode == 0, nan.stderr[-3000:]
    assert [r["skipped"] for r in _rows(tmp_path / "nan")] == [0, 0, 1]
    assert "step 3: non-finite loss or gradients" in nan.stderr
    for name in ("student/model.safetensors", "online_module/adapter_model.safetensors"):  # step 3 changed nothing
        a, b = load_file(str(tmp_path / "clean" / name)), load_file(str(tmp_path / "nan" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name

    goes_on = run(tmp_path / "goes_on", "train.max_steps=4", fault="nan_batch@2@0")
    assert goes_on.returncode == 0, goes_on.stderr[-3000:]
    rows = _rows(tmp_path / "goes_on")
    assert [r["skipped"] for r in rows] == [0, 1, 0, 0] and all(math.isfinite(r["student/loss"]) for r in rows[2:])

    diverged = tmp_path / "diverged"
    proc = run(diverged, "train.max_steps=6", "train.save_every=2", "train.max_bad_steps=2",
               fault="nan_batch@3,nan_batch@4,nan_batch@5")
    assert proc.returncode != 0 and "3 steps in a row had non-finite losses" in proc.stderr
    assert (diverged / CHECKPOINTS / "latest").read_text() == "global_step2"
    resumed = run(diverged, "train.max_steps=6", "train.save_every=2")
    assert resumed.returncode == 0 and "at step 2" in resumed.stderr, resumed.stderr[-3000:]


# the slow stop tests below share one uninterrupted run (torchrun, okd/train.py itself) to compare with
SLOW_RUN = ["train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=2", "train.max_steps=12",
            "train.save_every=2", "data.eval_file=null", "train.ddp_timeout=30"]


def _train_py(launcher: str, cfg: Path, out: Path) -> list[str]:
    """The trainer under torchrun (told to forward USR1 too, with a long grace) or the `deepspeed` launcher."""
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", "300"]
    else:
        from okd_scale.process import free_port

        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())]
    return cmd + [str(ROOT / "okd_scale" / "train.py"), "--config", str(cfg), f"output_dir={out}", *SLOW_RUN]


def _launch_env(**extra) -> dict:
    return tiny.subprocess_env(2, **extra)  # PATH leads to this interpreter's bin (conftest): its `deepspeed`


@pytest.fixture(scope="module")
def straight_okd(tmp_path_factory, pair):
    """(config, output directory) of an uninterrupted 2-process okd run with SLOW_RUN's settings."""
    base = tmp_path_factory.mktemp("straight_okd")
    cfg = write_config(base / "cfg.yaml", pair, "okd")
    proc = subprocess.run(_train_py("torchrun", cfg, base / "out"), env=_launch_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cfg, base / "out"


def _assert_same_outputs(a: Path, b: Path, what: str = "") -> None:
    """Bitwise: the same losses at every step, the same exported student and online module."""
    assert comparable(_rows(a)) == comparable(_rows(b)), what
    for name in ("student/model.safetensors", "online_module/adapter_model.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f"{what} {name}"


@pytest.mark.slow
@pytest.mark.xdist_group("straight_okd")  # one worker computes the shared run
def test_chaos_three_kills_then_the_same_weights(straight_okd, tmp_path):
    """okd on 2 processes, a rank killed (SIGKILL) three times at random moments (at a step's start, after its
    backward, after its optimizer step, in the middle of writing a checkpoint), the same command run again after
    each: the final student and online module equal an uninterrupted run's bitwise (fp32, CPU)."""
    import random

    cfg, straight = straight_okd
    rng, out, step, faults = random.Random(19), tmp_path / "chaos", 0, []
    for point in rng.sample(["kill_rank", "kill_after_backward", "kill_after_optimizer", "crash_in_save"], 3):
        step += rng.randint(1, 3)
        step += step % 2 if point == "crash_in_save" else 0  # a save step
        faults.append(f"{point}@{step}@{rng.randint(0, 1)}")
    print("faults:", faults)
    for fault in faults:
        proc = subprocess.run(_train_py("torchrun", cfg, out), env=_launch_env(OKD_SCALE_FAULT=fault),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode != 0, f"{fault} did not stop the run: {proc.stderr[-2000:]}"
        assert not (out / "student").exists()
    final = subprocess.run(_train_py("torchrun", cfg, out), env=_launch_env(), capture_output=True, text=True,
                           timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    _assert_same_outputs(straight, out)
    print(f"faults survived: {len(faults)}")


@pytest.mark.slow
@pytest.mark.xdist_group("straight_okd")  # one worker computes the shared run
def test_sigterm_to_the_launcher(straight_okd, tmp_path):
    """A job runs the trainer under torchrun or under the `deepspeed` launcher, and maps the launcher's status to 75
    when output_dir/stopped.json says the run stopped on a signal (README). SIGTERM to torchrun, or to `deepspeed`'s
    launching process (deepspeed.launcher.launch; the outer `deepspeed` process forwards nothing): the workers
    finish their step and checkpoint, the job exits 75, and the same job run again ends bitwise where an
    uninterrupted run ends."""
    cfg, straight = straight_okd

    def job(launcher: str, out: Path) -> list[str]:
        script = (f"trap 'echo job: TERM' TERM\n{' '.join(_train_py(launcher, cfg, out))}\nrc=$?\n"
                  f"[ -f {out}/stopped.json ] && rc=75\nexit $rc\n")
        return ["bash", "-c", script]

    for launcher in ("torchrun", "deepspeed"):
        out = tmp_path / launcher
        proc = subprocess.Popen(job(launcher, out), env=_launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline and not ((out / "log_history.jsonl").is_file() and len(_rows(out)) >= 2):
            time.sleep(0.1)
        launcher_pid = _children(proc.pid)[0]  # torchrun; for deepspeed, its runner, whose child launches
        if launcher == "deepspeed":
            launcher_pid = _children(launcher_pid)[0]  # deepspeed.launcher.launch: the one that forwards
        os.kill(launcher_pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 75, f"{launcher}: {proc.returncode}\n{err[-3000:]}"
        stopped = json.loads((out / "stopped.json").read_text())
        assert stopped["signal"] == "SIGTERM" and 2 <= stopped["step"] < 12
        assert (out / "checkpoints" / "latest").read_text() == f"global_step{stopped['step']}"
        again = subprocess.run(job(launcher, out), env=_launch_env(), capture_output=True, text=True, timeout=900)
        assert again.returncode == 0 and not (out / "stopped.json").exists(), again.stderr[-3000:]
        _assert_same_outputs(straight, out, launcher)
