"""Faults a long run meets, triggered for real: the checkpoint disk read-only, or full, while saving.
The run's checkpoints/ directory is a small tmpfs mounted by the test (root only; skipped otherwise)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from test_train import write_config


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
    from okd_scale.config import load_config

    out = small_disk.parent
    cfg = load_config(write_config(out.parent / "cfg.yaml", pair, "kd"),
                      [f"output_dir={out}", "train.max_steps=4", "train.save_every=2", "data.eval_file=null"])
    real_step = trainer._Loop.step

    def step(self, n, stop_requested=False):
        if n == 3:
            _remount(small_disk, "ro")
        return real_step(self, n, stop_requested)

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
    from okd_scale.config import load_config

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
