"""The GPU check: okd_scale on the accelerator in one command, ending with one markdown table.

    python -m tools.gpu.check [--out DIR] [--budget-s 540] [--dry-run] [--work DIR]     # `make gpu-check`

1. the tests that run on the accelerator, on it (suite.py's GROUPS, pytest with a JUnit report): the divergences
   (fp32, bf16, token-chunked, from hidden states) against float64 references, the vocabulary-sharded
   ones at world size 1, a run of every method in process (world size 1: NCCL on a GPU), bitwise resume
   in fp32, conversion of checkpoints to Hugging Face models (their logits), evaluation and generation;
2. tools/bench/methods.py in one process, bf16, on two pairs built here from random weights (benchmark.py's PAIRS;
   weights do not matter for speed): a 1B-class pair (a 24-block teacher, a 12-block student, hidden
   2048, vocabulary 32000) and a pair of the demo's size (SmolLM2-135M's shape, 30 blocks, and its
   6-block student, vocabulary 49152), each with a word-level tokenizer of the same vocabulary: step
   time, tokens/s, peak memory, time per phase and MFU against okd_scale/perf.py's bf16 peak (790 TFLOP/s
   for the H200, the rate measured on this workplace's machines);
3. okd_scale.plan's memory plan of each run against its measured peak (benchmark.py);
4. the table (report.py), written to DIR/gpu_check.md (DIR: --out, else $OUT, else the work folder) with the raw
   numbers in gpu_check.json and the logs beside them, and printed last.

Where the accelerator is the CPU (DS_ACCELERATOR=cpu), or with --dry-run, the same steps run reduced:
a few tests per group, tiny pairs, fp32, two steps. A stage that would outrun --budget-s is skipped and
the table says so. Exit status 0 when every test passed and every run finished, else 1.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from tools.gpu.benchmark import DRY_PAIRS, PAIRS, run_bench
from tools.gpu.machine import carried_packages, environment
from tools.gpu.report import Clock, Report, all_passed, table
from tools.gpu.suite import GROUPS, run_tests


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT"), help="where the table and logs go (default: $OUT)")
    p.add_argument("--work", help="models and runs (default: a temporary folder)")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="the whole check's time (default 540 s: 490 s measured on an H200)")
    p.add_argument("--tests-s", type=float, default=150.0, help="at most this long for the tests (default 150 s)")
    p.add_argument("--dry-run", action="store_true", help="the reduced check (automatic on the CPU accelerator)")
    args = p.parse_args(argv)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    clock = Clock(args.budget_s)
    work = Path(args.work or tempfile.mkdtemp(prefix="okd_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else work
    out.mkdir(parents=True, exist_ok=True)
    report = Report()
    report.carried = carried_packages()
    report.environment = env = environment(args.dry_run)
    dry = args.dry_run or env["accelerator"] == "cpu"
    env["dry_run"] = dry
    print(f"gpu_check: {env['device']} ({env['device_name']}), {'dry run, ' if dry else ''}budget "
          f"{args.budget_s:.0f} s; logs in {out}", flush=True)
    print("gpu_check: 1/2 tests ...", flush=True)
    report.tests, report.tests_run = run_tests(GROUPS, dry, clock, out, args.tests_s)
    print(f"gpu_check: 2/2 bench_methods ({clock.used():.0f} s so far) ...", flush=True)
    try:
        run_bench(DRY_PAIRS if dry else PAIRS, dry, clock, work, out, report)
    except Exception as e:  # noqa: BLE001 - reported in the table
        report.bench.append({"pair": "-", "method": "-", "error": f"{type(e).__name__}: {e}"})
    text = table(report, clock)
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(json.dumps(asdict(report), indent=2, default=str))
    if not args.work and out != work:  # models of billions of parameters: not kept past the check
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + text, flush=True)
    return 0 if all_passed(report) else 1


if __name__ == "__main__":
    sys.exit(main())
