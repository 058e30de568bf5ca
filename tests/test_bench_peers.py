"""tools/bench/peers.py on the tiny pair: TRL's GKDTrainer and okd_scale's kd, okd, sgo each get a row, TRL sees
the same rows in the same order as okd_scale, and the target lines print."""
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
def test_bench_peers_table(tmp_path, pair):
    pytest.importorskip("trl", reason="the benchmark extra: pip install -e .[bench]")
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "tools.bench.peers", "--teacher", str(pair / "teacher"),
           "--student", str(pair / "student"), "--data", str(pair / "train.jsonl"), "--nproc", "1",
           "--steps", "2", "--warmup", "1", "--batch-size", "2", "--max-length", "48", "--new-tokens", "8",
           "--out", str(runs), "--json", str(tmp_path / "peers.json"),
           "online.num_blocks=2", f"deepspeed.teacher_overrides={TORCH_ADAM_JSON}",
           f"deepspeed.student_overrides={TORCH_ADAM_JSON}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "peers.json").read_text())
    assert [r["method"] for r in results] == ["trl_gkd", "kd", "okd", "trl_gkd_onpolicy", "sgo"]
    by = {r["method"]: r for r in results}
    for r in results:
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_gib_per_rank"][0] > 0
        assert r["precision"] == "fp32" and r["nproc"] == 1
        row = next(line for line in proc.stdout.splitlines() if line.startswith(f"| {r['label']} | fp32 | 1 |"))
        if r["pairs_with"] is None:
            assert row.endswith("| - |")
        else:
            ratio = r["tokens_per_s"] / by[r["pairs_with"]]["tokens_per_s"]
            assert row.endswith(f"| {ratio:.2f} |")
    # the same rows in the same order: TRL (lmbda=0) and kd see the same tokens at every step
    trl_tokens = json.loads((runs / "trl_gkd" / "rank0.json").read_text())["tokens"]
    kd_rows = (runs / "kd" / "log_history.jsonl").read_text().splitlines()
    kd_tokens = [json.loads(line)["tokens/seen"] for line in kd_rows]
    assert trl_tokens == kd_tokens
    assert re.search(r"okd_scale kd / TRL GKD lmbda=0 tokens/s = [\d.]+ \(target >= 1.2\): (PASS|FAIL)", proc.stdout)
    assert re.search(r"okd_scale sgo / TRL GKD lmbda=1 tokens/s = [\d.]+ \(target >= 1.2\): (PASS|FAIL)", proc.stdout)
    assert re.search(r"okd_scale okd / kd step time = [\d.]+ \(target <= 1.25\): (PASS|FAIL)", proc.stdout)


def test_bench_peers_refuses_bad_flag_values():
    proc = subprocess.run([sys.executable, "-m", "tools.bench.peers", "--new-tokens", "0"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "--new-tokens must be a positive integer, got 0" in proc.stderr


def test_summarise_repeats_gives_medians_ranges_and_paired_ratios():
    from tools.bench.peers import summarise, table

    def row(method, label, step, tps, peak, ratio=None, pair=None):
        return {"method": method, "label": label, "step_s": step, "tokens_per_s": tps, "tokens_per_step": 100.0,
                "peak_gib_per_rank": peak, "ratio": ratio, "pairs_with": pair, "precision": "fp32", "nproc": 2}

    repeats = [[row("trl_gkd", "TRL GKD lmbda=0", 2.0, 50.0, [1.0, 1.5]),
                row("kd", "okd_scale kd", 1.0, 100.0, [0.5, 0.7], 2.0, "trl_gkd"),
                row("okd", "okd_scale okd", 1.5, 80.0, [0.6, 0.6], 1.6, "trl_gkd")],
               [row("trl_gkd", "TRL GKD lmbda=0", 4.0, 25.0, [1.2, 1.4]),
                row("kd", "okd_scale kd", 2.0, 75.0, [0.4, 0.9], 3.0, "trl_gkd"),
                row("okd", "okd_scale okd", 2.0, 60.0, [0.6, 0.6], 2.4, "trl_gkd")],
               [row("trl_gkd", "TRL GKD lmbda=0", 3.0, 40.0, [1.1, 1.1]),
                row("kd", "okd_scale kd", 4.0, 60.0, [0.5, 0.5], 1.5, "trl_gkd"),
                row("okd", "okd_scale okd", 4.4, 50.0, [0.6, 0.6], 1.25, "trl_gkd")]]
    rows = summarise(repeats)
    trl, kd, okd = rows
    assert trl["step_s"] == 3.0 and trl["step_s_range"] == (2.0, 4.0) and trl["ratio"] is None
    assert kd["tokens_per_s"] == 75.0 and kd["tokens_per_s_range"] == (60.0, 100.0)
    assert kd["ratio"] == 2.0 and kd["ratio_range"] == (1.5, 3.0)  # the repeats' own ratios, not 75 / 40
    assert trl["peak_gib_per_rank"] == [1.2, 1.5] and kd["peak_gib_per_rank"] == [0.5, 0.9]
    assert [r["step_s"] for r in kd["repeats"]] == [1.0, 2.0, 4.0]
    text = table(rows)
    kd_row = "| okd_scale kd | fp32 | 2 | 2.000 (1.000-4.000) | 75 (60-100) | 100 | 0.50/0.90 | 2.00 (1.50-3.00) |"
    assert kd_row in text
    # okd / kd step time: 1.5, 1.0, 1.1 within the repeats; their median, not 2.0 / 2.0
    assert "okd_scale okd / kd step time = 1.10 (target <= 1.25): PASS" in text


def test_cells_keep_each_run_and_a_second_invocation_runs_only_the_missing(tmp_path):
    """--cells: a finished run's row is kept as repeat<k>/<run>.json; the same flags read it back instead of running
    again; other flags are refused with the cell's path, not mixed in."""
    import argparse

    from tools.bench.peers import cached_run

    args = argparse.Namespace(cells=str(tmp_path / "cells"), nproc=1, steps=10, warmup=2, batch_size=8,
                              max_length=512, new_tokens=128, bf16=False, teacher_config="auto", overrides=[],
                              teacher="/x/teacher", student="/x/student", data="/y/rows.jsonl")
    calls = []

    def run():
        calls.append(1)
        return {"method": "kd", "step_s": 1.5 * len(calls)}

    assert cached_run(args, "kd", 0, run) == {"method": "kd", "step_s": 1.5}
    cell = json.loads((tmp_path / "cells" / "repeat1" / "kd.json").read_text())
    assert cell["settings"]["max_length"] == 512 and cell["row"]["step_s"] == 1.5 and cell["date"]
    assert cached_run(args, "kd", 0, run) == {"method": "kd", "step_s": 1.5} and len(calls) == 1
    assert cached_run(args, "kd", 1, run) == {"method": "kd", "step_s": 3.0} and len(calls) == 2  # repeat 2: runs
    args.max_length = 128
    with pytest.raises(SystemExit, match=r"repeat1/kd\.json was measured with .*'max_length': 512"):
        cached_run(args, "kd", 0, run)
    assert len(calls) == 2
