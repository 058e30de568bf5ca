"""tools/bench/methods.py on the tiny pair: every method runs, and the table has a row and a ratio each."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import TORCH_ADAM_JSON

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_methods_table(tmp_path, pair):
    cmd = [sys.executable, "-m", "tools.bench.methods", "--teacher", str(pair / "teacher"),
           "--student", str(pair / "student"), "--data", str(pair / "train.jsonl"), "--nproc", "1",
           "--methods", "sft,kd,seqkd,sgo,okd_head,okd", "--steps", "2", "--warmup", "1", "--batch-size", "2",
           "--max-length", "48", "--sgo-new-tokens", "8",
           "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "bench.json"),
           "online.num_blocks=2", f"deepspeed.teacher_overrides={TORCH_ADAM_JSON}",
           f"deepspeed.student_overrides={TORCH_ADAM_JSON}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "bench.json").read_text())
    assert [r["method"] for r in results] == ["sft", "kd", "seqkd", "sgo", "okd_head", "okd"]
    for r in results:
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_gib_per_rank"][0] > 0
        row = next(line for line in proc.stdout.splitlines() if line.startswith(f"| {r['method']} |"))
        assert f"{r['step_s'] / results[-1]['step_s']:.2f}" in row  # its ratio to okd
    assert {"teacher_forward", "online_backward"} <= set(results[-1]["phases_s"])
    assert "generation" in results[3]["phases_s"] and results[2]["one_off_s"] > 0
    assert re.search(r"sgo / okd = [\d.]+ \(target >= 4\): (PASS|FAIL)", proc.stdout)
    assert re.search(r"okd_head / kd = [\d.]+ \(target <= 1.15\): (PASS|FAIL)", proc.stdout)
    assert re.search(r"sgo / okd_head = [\d.]+ \(target >= 4\): (PASS|FAIL)", proc.stdout)
    assert "online_backward" in results[4]["phases_s"]  # the variant ran okd's step with its module
    assert re.search(r"okd / kd = [\d.]+ \(target <= 1.3\): (PASS|FAIL)", proc.stdout)  # the paper's


def test_bench_methods_refuses_unknown_methods():
    proc = subprocess.run([sys.executable, "-m", "tools.bench.methods", "--methods", "okd,ppo"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "--methods: unknown ['ppo']" in proc.stderr and "okd_head" in proc.stderr


@pytest.mark.slow
def test_each_run_is_fresh_where_an_earlier_one_finished(tmp_path, pair):
    """A run directory that already holds a finished run (a benchmark invoked again on the same --out) is measured
    anew, not resumed from its last checkpoint with the earlier run's step times."""
    cmd = [sys.executable, "-m", "tools.bench.methods", "--teacher", str(pair / "teacher"),
           "--student", str(pair / "student"), "--data", str(pair / "train.jsonl"), "--nproc", "1",
           "--methods", "sft", "--steps", "2", "--warmup", "0", "--batch-size", "2", "--max-length", "48",
           "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "bench.json"),
           f"deepspeed.student_overrides={TORCH_ADAM_JSON}"]
    for _ in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run = tmp_path / "runs" / "sft"
        rows = [json.loads(line) for line in (run / "log_history.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "time/step_s" in r] == [1, 2]
        assert not (run / "from_the_first_run").exists()
        (run / "from_the_first_run").write_text("")
