"""What each method's step costs on the same models and batches: a table.

    python -m tools.bench.methods                                  # the demo pair (made when missing)
    python -m tools.bench.methods --teacher T --student S --data train.jsonl --nproc 2 \
        --methods sft,kd,seqkd,sgo,okd,taid --steps 6 --warmup 2 --max-length 128 --batch-size 4 [--bf16]

Each method runs `--warmup + --steps` optimizer steps of okd_scale/train.py under torchrun with
`--nproc` processes, the same data order (seed), micro-batch and sequence length, the same divergence
for kd, sgo and okd, sgo with lambda=1 (every step samples `--sgo-new-tokens` tokens from the student),
and seqkd on the teacher's cached responses (generated once before its run; that one-off time is in
its own column, not in the step time). The runs read the first nproc x batch x (warmup + steps) rows
of the data, so every method sees the same batches. From each run's log_history.jsonl and metrics.json: the
median step time over the measured steps (after the warm-up), tokens/s over them (non-padding
tokens of the global batch, for sgo including the sampled ones), the mean time per phase, the peak
memory per rank (GPU: max allocated; CPU: peak RSS, which includes the offloaded teacher) and each
method's step time over okd's.

`--methods` takes every method of okd_scale's registry (methods.METHODS; all of them by default) and the OKD
variants of configs/experiments/variants (okd_head, okd_temp, okd_head_joint, ...: the online-module family), each a
row of its own.

Targets: sgo (lambda=1, 128 new tokens) at least 4x the step time of okd and of each OKD variant; the paper's
okd (its backward runs through the whole teacher) at most 1.3x kd's, each variant at most 1.15x.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from okd_scale.methods import METHODS
from tools import ROOT
from tools.proof.experiments import earlier_okd

OKD_TARGETS = {"okd": 1.3}  # an OKD step at most this many kd steps: the paper's OKD,
VARIANT_TARGET = 1.15  # and each earlier variant


def has_config_key(key: str) -> bool:
    """Whether okd_scale's run config knows the dotted `key` (keys being added are passed only once they exist)."""
    from okd_scale.config import RunConfig, _all_keys

    return key in _all_keys(RunConfig)


def launch_env(nproc: int) -> dict:
    """The environment of a launched run: the cores shared out among `nproc` processes, no hub access."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, os.cpu_count() // nproc)))}
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.setdefault(key, "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def demo_pair(args) -> None:
    """Fill in whichever of args.teacher, args.student, args.data is unset from the demo pair (made when missing)."""
    if args.teacher and args.student and args.data:
        return
    from tools.demo.run import prepare_assets

    demo = Path(args.demo_dir).resolve()
    prepare_assets(demo)
    args.teacher = args.teacher or str(demo / "teacher")
    args.student = args.student or str(demo / "student_init")
    args.data = args.data or str(demo / "data" / "train.jsonl")


def bench_rows(data: str, needed: int, out: Path, parser) -> str:
    """A copy of the first `needed` rows of `data` in `out` (every run reads exactly these); its path."""
    lines = [line for line in Path(data).read_text().splitlines() if line.strip()]
    if len(lines) < needed:
        parser.error(f"--data {data}: {len(lines)} rows, fewer than the {needed} the runs need")
    path = out / "bench_train.jsonl"
    path.write_text("\n".join(lines[:needed]) + "\n")
    return str(path)


def run_method(method: str, args, out: Path, extra: list[str] = ()) -> dict:
    """One method's fresh run in `out/method` (whatever is there is removed first: the trainer would resume it), with
    `extra` overrides after args.overrides; its measured rows and metrics."""
    shutil.rmtree(out / method, ignore_errors=True)
    variant = earlier_okd().get(method, [])
    overrides = [f"method={'okd' if variant else method}", f"model.teacher={args.teacher}",
                 f"model.student={args.student}", f"data.train_file={args.data}", "data.eval_file=null",
                 f"output_dir={out / method}",
                 f"train.max_steps={args.warmup + args.steps}", f"train.per_device_train_batch_size={args.batch_size}",
                 f"data.max_length={args.max_length}", "train.lr_scheduler_type=constant", "train.warmup_steps=0",
                 f"loss.divergence={args.divergence}", f"online.divergence={args.divergence}",
                 "sgo.lambda=1", f"sgo.max_new_tokens={args.sgo_new_tokens}",
                 f"seqkd.cache_file={out / 'seqkd_cache.jsonl'}", f"seqkd.max_new_tokens={args.sgo_new_tokens}",
                 *(["train.bf16=true"] if getattr(args, "bf16", False) else []),
                 *([f"deepspeed.teacher_config={args.teacher_config}"]
                   if getattr(args, "teacher_config", None) else []),
                 *args.overrides, *variant, *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           str(ROOT / "okd_scale" / "train.py"), "--config", str(args.config), *overrides]
    clock = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(args.nproc), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_methods: {method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / method / "log_history.jsonl").read_text().splitlines()]
    metrics = json.loads((out / method / "metrics.json").read_text())
    measured = rows[args.warmup:]
    step = statistics.median(r["time/step_s"] for r in measured)
    phases = sorted({k for r in measured for k in r if k.startswith("time/") and k != "time/step_s"})
    seqkd = metrics["data"].get("seqkd") or {}
    return {"method": method, "step_s": step,
            "tokens_per_s": sum(r["tokens/seen"] for r in measured) / sum(r["time/step_s"] for r in measured),
            "tokens_per_step": statistics.mean(r["tokens/seen"] for r in measured),
            "peak_gib_per_rank": metrics["peak_memory_gib_per_rank"], "device": metrics["device"],
            "phases_s": {k[5:-2]: statistics.mean(r.get(k, 0.0) for r in measured) for k in phases},
            "mfu": metrics.get("mfu"), "run_s": time.perf_counter() - clock,
            "one_off_s": seqkd.get("seconds", 0.0)}


def table(results: list[dict]) -> str:
    okd = next((r["step_s"] for r in results if r["method"] == "okd"), None)
    kd = next((r["step_s"] for r in results if r["method"] == "kd"), None)
    phases = sorted({p for r in results for p in r["phases_s"]})
    head = ["method", "step s (median)", "tokens/s", "peak GiB/rank", "x okd", "one-off s",
            *[f"{p} s" for p in phases]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        ratio = f"{r['step_s'] / okd:.2f}" if okd else "-"
        peak = "/".join(f"{g:.2f}" for g in r["peak_gib_per_rank"])
        cells = [r["method"], f"{r['step_s']:.3f}", f"{r['tokens_per_s']:.0f}", peak, ratio, f"{r['one_off_s']:.0f}",
                 *[f"{r['phases_s'].get(p, 0.0):.3f}" for p in phases]]
        lines.append("| " + " | ".join(cells) + " |")
    checks = []
    sgo = next((r["step_s"] for r in results if r["method"] == "sgo"), None)
    if sgo and okd:
        checks.append(f"sgo / okd = {sgo / okd:.2f} (target >= 4): {'PASS' if sgo >= 4 * okd else 'FAIL'}")
    for r in results:
        if r["method"] == "okd" or r["method"].startswith("okd_"):
            t, name = r["step_s"], r["method"]
            if kd:
                target = OKD_TARGETS.get(name, VARIANT_TARGET)
                checks.append(f"{name} / kd = {t / kd:.2f} (target <= {target}): "
                              f"{'PASS' if t <= target * kd else 'FAIL'}")
            if sgo and name != "okd":
                checks.append(f"sgo / {name} = {sgo / t:.2f} (target >= 4): {'PASS' if sgo >= 4 * t else 'FAIL'}")
    return "\n".join(lines + [""] + checks)


def pair_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that name the models, the data and the base run config."""
    p.add_argument("--teacher", help="teacher model directory (default: the demo teacher)")
    p.add_argument("--student", help="student model directory (default: the demo student)")
    p.add_argument("--data", help="training data (default: the demo train split)")
    p.add_argument("--demo-dir", default=str(ROOT / "demo_out"), help="where the demo pair is (made when missing)")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="okd_scale's base run config")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pair_arguments(p)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="measured steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4, help="per process")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--divergence", default="fkl")
    p.add_argument("--sgo-new-tokens", type=int, default=128)
    p.add_argument("--bf16", action="store_true", help="train in bf16 (train.bf16=true)")
    p.add_argument("--teacher-config", help="deepspeed.teacher_config for every run (default: the base config's)")
    p.add_argument("--out", help="run directory (default: a temporary one)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("overrides", nargs="*", help="more key=value for every run")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS and m not in earlier_okd()]
    if bad:
        p.error(f"--methods: unknown {bad}; expected a comma-separated subset of {','.join(METHODS)} and of the "
                f"OKD variants {','.join(earlier_okd())}")
    for flag in ("steps", "warmup", "nproc", "batch_size", "max_length", "sgo_new_tokens"):
        if getattr(args, flag) < (0 if flag == "warmup" else 1):
            p.error(f"--{flag.replace('_', '-')} must be a positive integer")
    demo_pair(args)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_methods_"))
    out.mkdir(parents=True, exist_ok=True)
    # exactly the examples the runs consume, so seqkd's one-off generation covers just those
    args.data = bench_rows(args.data, args.nproc * args.batch_size * (args.warmup + args.steps), out, p)
    extra = ["train.profile_phases=true"] if has_config_key("train.profile_phases") else []  # the phase columns
    results = []
    for method in methods:
        print(f"bench_methods: {method} ...", file=sys.stderr, flush=True)
        results.append(run_method(method, args, out, extra))
    print(f"\n{args.nproc} processes, {args.batch_size} sequences/process of at most {args.max_length} tokens, "
          f"{args.steps} measured steps after {args.warmup}, divergence {args.divergence}, "
          f"sgo lambda=1 with {args.sgo_new_tokens} new tokens, {'bf16' if args.bf16 else 'fp32'}; "
          f"device {results[0]['device']}\n")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
