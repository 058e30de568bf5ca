"""`sbatch slurm/okd.sh` on a real SLURM cluster started by the test (Debian's slurmctld, slurmd and munge,
tests/slurm/slurm-ci.sh): 1 node x 2 tasks with a preemption (USR1 -> checkpoint -> requeue -> resume ->
the same final weights as an uninterrupted job), and 2 simulated nodes x 1 task."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny import ROOT, write_config

RECIPE = ROOT / "tests" / "slurm" / "slurm-ci.sh"
# one cluster at a time: every cluster binds the recipe's fixed ports (slurmctld 6817, slurmd 6818...), so under
# pytest-xdist both tests run on one worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]


class Cluster:
    """A SLURM cluster on this machine (slurm_up / slurm_down of the recipe), driven from bash."""

    def __init__(self, state_dir: Path, nodes: int):
        # without OMP_NUM_THREADS: `nproc`, which sizes the node, honours it; without this process's
        # torch.distributed variables (an in-process test may have set them): jobs inherit sbatch's environment
        drop = ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                "MASTER_ADDR", "MASTER_PORT")
        self.env = {**{k: v for k, v in os.environ.items() if k not in drop},
                    "SLURM_CI_DIR": str(state_dir), "SLURM_CI_NODES": str(nodes),
                    "SLURM_CONF": str(state_dir / "etc" / "slurm.conf")}

    def bash(self, script: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", f"source {RECIPE}; {script}"], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def sbatch(self, *args: str) -> int:
        proc = subprocess.run(["sbatch", "--parsable", *args], env=self.env, capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout.strip().split(";")[0])

    def state(self, job: int) -> str:
        out = subprocess.run(["scontrol", "-o", "show", "job", str(job)], env=self.env, capture_output=True, text=True)
        return out.stdout.split("JobState=", 1)[1].split()[0] if "JobState=" in out.stdout else ""

    def wait(self, job: int, timeout: int = 300) -> int:
        return self.bash(f"slurm_wait {job} {timeout}", timeout=timeout + 30).returncode


def _start(tmp_path_factory, nodes: int) -> Cluster:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("a local SLURM cluster needs root and apt-get (Debian's slurmctld, slurmd, munge)")
    cluster = Cluster(tmp_path_factory.mktemp(f"slurm{nodes}"), nodes)
    installed = cluster.bash("slurm_install")
    if installed.returncode != 0:
        pytest.skip(f"apt-get could not install SLURM here: {installed.stderr.strip()[-300:]}")
    up = cluster.bash("slurm_up")
    assert up.returncode == 0, up.stdout + up.stderr
    return cluster


@pytest.fixture
def one_node(tmp_path_factory):
    cluster = _start(tmp_path_factory, 1)
    yield cluster
    cluster.bash("slurm_down")


@pytest.fixture
def two_nodes(tmp_path_factory):
    cluster = _start(tmp_path_factory, 2)
    yield cluster
    cluster.bash("slurm_down")


def _job_args(tmp_path: Path, nodes: int, tasks: int) -> list[str]:
    """sbatch options that fit this CPU machine (the script asks for 8 GPUs per node by default)."""
    return [f"--nodes={nodes}", f"--ntasks-per-node={tasks}", "--gpus-per-node=0", "--cpus-per-task=1",
            "--time=10", "--signal=B:USR1@15", f"--output={tmp_path}/%x-%j.out",
            f"--export=ALL,PYTHON={sys.executable},DS_ACCELERATOR=cpu,OMP_NUM_THREADS=1"]


def _rows(out: Path) -> list:
    path = out / "log_history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _losses(out: Path) -> list:
    return [{k: v for k, v in r.items() if k.startswith(("student/", "teacher/"))} for r in _rows(out)]


def test_one_node_two_tasks_preempted_and_requeued(one_node, tmp_path, pair):
    cfg = write_config(tmp_path / "cfg.yaml", pair, "okd")
    steps = "train.max_steps=24"
    straight = one_node.sbatch(*_job_args(tmp_path, 1, 2), "slurm/okd.sh", str(cfg),
                               f"output_dir={tmp_path / 'straight'}", steps)
    assert one_node.wait(straight) == 0, (tmp_path / f"okd-{straight}.out").read_text()[-3000:]

    out = tmp_path / "preempted"
    job = one_node.sbatch(*_job_args(tmp_path, 1, 2), "slurm/okd.sh", str(cfg), f"output_dir={out}", steps)
    deadline = time.time() + 300
    while len(_rows(out)) < 3 and time.time() < deadline:
        time.sleep(0.1)
    signalled = time.time()
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=one_node.env, check=True)
    latest = out / "checkpoints" / "latest"
    while not latest.is_file() and time.time() < deadline:
        time.sleep(0.05)
    saved = time.time()
    while one_node.state(job) != "PENDING" and time.time() < deadline:  # requeued by the script
        time.sleep(0.1)
    stopped_at = int(latest.read_text().removeprefix("global_step"))
    assert 3 <= stopped_at < 24 and len(_rows(out)) == stopped_at
    requeued = time.time()
    # SLURM makes a requeued job eligible 2 minutes later; start it sooner, but only once the old instance
    # is gone from the node (started at once, it is killed: "Job credential revoked")
    while one_node.bash("sinfo -h -N -t idle -o %N").stdout.strip() == "" and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=one_node.env, check=True)
    released = time.time()
    while len(_rows(out)) <= stopped_at and time.time() < deadline:
        time.sleep(0.1)
    resumed = time.time()
    assert one_node.wait(job) == 0
    log = (tmp_path / f"okd-{job}.out").read_text()
    assert "requeueing job" in log and "(restart 1)" in log and f"at step {stopped_at}" in log
    print(f"\nsignal -> checkpoint written: {saved - signalled:.2f} s; requeued -> first resumed step logged: "
          f"{resumed - requeued:.2f} s, of which {resumed - released:.2f} s from the job's release (StartTime=now)")

    assert _losses(out) == _losses(tmp_path / "straight")  # every step, bitwise
    a = load_file(str(tmp_path / "straight" / "student" / "model.safetensors"))
    b = load_file(str(out / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("adapter_model.safetensors",):
        a, b = (load_file(str(d / "online_module" / name)) for d in (tmp_path / "straight", out))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_simulated_nodes_one_task_each(two_nodes, tmp_path, pair):
    cfg = write_config(tmp_path / "cfg.yaml", pair, "okd")
    job = two_nodes.sbatch(*_job_args(tmp_path, 2, 1), "slurm/okd.sh", str(cfg), f"output_dir={tmp_path / 'run'}")
    assert two_nodes.wait(job) == 0, (tmp_path / f"okd-{job}.out").read_text()[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 6
    assert "2 node(s), 2 tasks" in (tmp_path / f"okd-{job}.out").read_text()
