"""tools/reproduce.py at a tiny size: two methods and the teacher, a few steps, one small set; the
table files exist with a number in every cell, and a rerun skips finished cells."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_train import ROOT, clean_env

TORCH_ADAM = '{"optimizer": {"params": {"torch_adam": true}}}'


@pytest.mark.slow
def test_sweep_table_and_resume(tmp_path, pair):
    out = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "tools" / "reproduce.py"), "--preset", "cpu-small",
           "--teacher", str(pair / "teacher"), "--student", str(pair / "student"),
           "--train-data", str(pair / "train.jsonl"), "--eval-sets", str(pair / "eval.jsonl"),
           "--prompt-format", "as-is", "--methods", "sft,okd", "--nproc", "1", "--steps", "3",
           "--eval-examples", "4", "--gen-seeds", "1,2", "--out", str(out),
           "data.max_length=64", "online.num_blocks=2", f"deepspeed.teacher_overrides={TORCH_ADAM}",
           f"deepspeed.student_overrides={TORCH_ADAM}"]
    first = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert first.stdout.count("ROUGE-L average") == 3  # teacher, sft, okd
    table = json.loads((out / "table.json").read_text())
    assert table["sets"] == ["eval"] and list(table["rows"]) == ["teacher", "sft", "okd"]
    for name, row in table["rows"].items():
        assert 0 <= row["eval"]["mean"] <= 100 and row["eval"]["std"] >= 0 and row["eval"]["n"] == 4
        assert (row["train_s"] is None) == (name == "teacher")
    md = (out / "TABLE.md").read_text()
    assert all(f"| {name} |" in md for name in ("teacher", "sft", "okd"))
    cell = json.loads((out / "cells" / "okd.json").read_text())
    assert cell["eval"]["sets"]["eval"]["seeds"] == [1, 2]

    logs = {p.name: p.stat().st_mtime for p in (out / "logs").iterdir()}
    (out / "cells" / "sft.json").unlink()  # one unfinished cell: only it runs again
    second = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("done before, skipped") == 2 and second.stdout.count("ROUGE-L average") == 1
    assert (out / "logs" / "okd.log").stat().st_mtime == logs["okd.log"]  # okd was not trained again
    assert "resumed from" in (out / "logs" / "sft.log").read_text()  # sft's finished run: nothing retrained
    assert json.loads((out / "table.json").read_text())["rows"].keys() == table["rows"].keys()
