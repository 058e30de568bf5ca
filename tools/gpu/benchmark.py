"""Stages 2 and 3 of the GPU check: tools/bench/methods.py on pairs built from random weights (PAIRS, or DRY_PAIRS
for the reduced check), one process per method, each run beside okd_scale.plan's memory plan for it."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tools import ROOT
from tools.gpu.machine import accelerator, run_logged
from tools.gpu.report import Clock, Report


@dataclass
class Shape:
    """A Llama shape."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    tie: bool = False


@dataclass
class Pair:
    """A teacher/student pair to benchmark and how: methods, micro-batch x sequence, steps."""

    name: str
    teacher: Shape
    student: Shape
    vocab: int
    methods: str  # comma-separated, most telling first: a spent time budget skips the last ones
    batch: int
    seq: int
    warmup: int
    steps: int
    new_tokens: int = 128
    est_s: float = 40.0  # about how long one method's run takes (start, load, steps, checkpoint, export)


SMOLLM2_135M = Shape(30, 576, 9, 3, 1536, tie=True)
PAIRS = [
    Pair("1B-class", Shape(24, 2048, 16, 4, 5632), Shape(12, 2048, 16, 4, 5632), 32000, "kd,okd,sft",
         batch=8, seq=1024, warmup=2, steps=4, est_s=60.0),
    Pair("demo-size", SMOLLM2_135M, Shape(6, 576, 9, 3, 1536, tie=True), 49152, "okd,kd,sgo,sft,seqkd",
         batch=8, seq=512, warmup=2, steps=4, est_s=40.0),
]
DRY_PAIRS = [
    Pair("1B-class (dry: tiny)", Shape(4, 64, 4, 2, 128), Shape(2, 64, 4, 2, 128), 512, "okd",
         batch=2, seq=64, warmup=1, steps=1, new_tokens=8),
    Pair("demo-size (dry: tiny)", Shape(4, 48, 3, 1, 96, tie=True), Shape(2, 48, 3, 1, 96, tie=True), 384, "kd",
         batch=2, seq=64, warmup=1, steps=1, new_tokens=8),
]
TORCH_ADAM = {"optimizer": {"params": {"torch_adam": True}}}  # no just-in-time build of fused Adam


def build_pair(pair: Pair, work: Path, dtype, device) -> tuple[Path, Path, Path]:
    """(teacher, student, data) for `pair` under `work`, made once: random Llama weights and a word-level
    tokenizer of the pair's vocabulary; rows of exactly `pair.seq` tokens (a 64-token prompt)."""
    import random

    # heavy (torch, transformers): imported when the stage runs
    from transformers.utils import logging as hf_logging

    from tests import tiny

    hf_logging.disable_progress_bar()
    d = work / pair.name.split(" ")[0]
    teacher, student, data = d / "teacher", d / "student", d / "train.jsonl"
    if not all((p / "config.json").is_file() for p in (teacher, student)) or not data.is_file():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        tok = tiny.make_word_tokenizer(d / "tokenizer", pair.vocab)
        for path, shape, seed in ((teacher, pair.teacher, 1), (student, pair.student, 2)):
            tiny.make_llama(path, tok, num_layers=shape.layers, hidden=shape.hidden, heads=shape.heads,
                            kv_heads=shape.kv_heads, intermediate=shape.intermediate, tie=shape.tie, seed=seed,
                            max_positions=max(2048, 2 * pair.seq), dtype=dtype, device=device)
        rng = random.Random(0)
        prompt = min(64, pair.seq // 4)
        rows = [{"prompt": tiny.word_text(rng, prompt, pair.vocab),
                 "output": tiny.word_text(rng, pair.seq - prompt - 1, pair.vocab)}  # + eos: seq tokens
                for _ in range(pair.batch * (pair.warmup + pair.steps))]
        tiny.write_jsonl(data, rows)
    return teacher, student, data


def teacher_config(cfg_dir: Path, base: dict, teacher: Path, student: Path, data: Path) -> tuple[str, str]:
    """(deepspeed.teacher_config, what it is): `auto` (okd_scale.plan's placement) where the run config
    takes it, else the shipped whole-replica config."""
    import yaml

    # heavy (torch): imported when the stage runs
    from okd_scale.config import ConfigError
    from okd_scale.configure import load_config

    probe = cfg_dir / "probe.yaml"
    probe.write_text(yaml.safe_dump(base))
    try:
        load_config(probe, [f"model.teacher={teacher}", f"model.student={student}", f"data.train_file={data}",
                            "deepspeed.teacher_config=auto"])
        return "auto", "deepspeed.teacher_config=auto (okd_scale.plan's placement: a whole replica where it fits)"
    except ConfigError:
        path = ROOT / "okd_scale" / "ds_configs" / "teacher_replica.json"
        return str(path), f"{path.relative_to(ROOT)} (a whole replica; this run config takes no `auto`)"


def run_bench(pairs: list, dry: bool, clock: Clock, work: Path, logs: Path, report: Report) -> None:
    """tools/bench/methods.py for each pair and method (one process each), with its plan beside it."""
    import torch

    accel = accelerator()
    bf16 = not dry and accel.device_name() != "cpu"
    peak = report.environment.get("peak_flops")
    runs = runs_dir(work)
    try:
        with open(logs / "bench.log", "a") as log:
            for pair in pairs:
                if clock.left() < pair.est_s:
                    report.bench += [{"pair": pair.name, "method": m, "error": "skipped: the time budget is spent"}
                                     for m in pair.methods.split(",")]
                    continue
                started = time.perf_counter()
                try:
                    teacher, student, data = build_pair(pair, work, torch.bfloat16 if bf16 else torch.float32,
                                                        accel.current_device_name())
                except Exception as e:  # noqa: BLE001 - reported in the table
                    report.bench.append({"pair": pair.name, "method": "-", "error": f"building the pair: {e}"})
                    continue
                if accel.device_name() != "cpu":
                    accel.empty_cache()
                cfg, t_cfg, t_what = run_config(work / "configs", pair, teacher, student, data, bf16)
                report.notes.append(f"{pair.name}: pair built in {time.perf_counter() - started:.0f} s; "
                                    f"teacher: {t_what}")
                for method in pair.methods.split(","):
                    row = {"pair": pair.name, "method": method, "batch": pair.batch, "seq": pair.seq,
                           "dtype": "bf16" if bf16 else "fp32", "teacher_config": t_cfg}
                    if clock.left() < pair.est_s:
                        report.bench.append({**row, "error": "skipped: the time budget is spent"})
                        continue
                    row.update(bench_one(pair, method, teacher, student, data, cfg, runs, log, clock, peak))
                    row.update(plan_row(pair, method, teacher, student, row, t_cfg, bf16))
                    report.bench.append(row)
    finally:
        shutil.rmtree(runs, ignore_errors=True)


def run_config(cfg_dir: Path, pair: Pair, teacher: Path, student: Path, data: Path, bf16: bool) -> tuple:
    """(the base run config for bench_methods' --config, deepspeed.teacher_config, what that is): every
    method's settings but those bench_methods sets; both engines on torch's Adam."""
    import yaml

    cfg_dir.mkdir(parents=True, exist_ok=True)
    base = {"method": "okd", "seed": 0, "output_dir": str(cfg_dir / "unused"), "data": {"max_length": pair.seq},
            "train": {"bf16": bf16, "learning_rate": 1e-5, "logging_steps": 1}, "online": {"learning_rate": 1e-5},
            "deepspeed": {"student_config": "ds_configs/student_zero2.json", "teacher_overrides": TORCH_ADAM,
                          "student_overrides": TORCH_ADAM}}
    t_cfg, t_what = teacher_config(cfg_dir, base, teacher, student, data)
    cfg = cfg_dir / f"{pair.name.split(' ')[0]}.yaml"
    cfg.write_text(yaml.safe_dump({**base, "deepspeed": {**base["deepspeed"], "teacher_config": t_cfg}}))
    return cfg, t_cfg, t_what


def runs_dir(work: Path) -> Path:
    """Where runs write: memory-backed /dev/shm when it has room for a 1B student's checkpoint (~10 GB of
    optimizer states, written at every run's end), else the work folder."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > RUN_ROOM_BYTES:
        return shm / f"okd_gpu_check_runs_{os.getpid()}"
    return work / "runs"


RUN_ROOM_BYTES = 24 * 2**30


def bench_one(pair: Pair, method: str, teacher: Path, student: Path, data: Path, cfg: Path, runs: Path, log,
              clock: Clock, peak: Optional[float]) -> dict:
    """One method's bench_methods run in `runs`: its step time, tokens/s, peak memory, phases, FLOPs and
    MFU against `peak` FLOP/s."""
    out = runs / pair.name.split(" ")[0]
    shutil.rmtree(out, ignore_errors=True)
    result = out / "result.json"
    cmd = [sys.executable, "-m", "tools.bench.methods", "--teacher", str(teacher), "--student",
           str(student), "--data", str(data), "--config", str(cfg), "--methods", method, "--nproc", "1",
           "--steps", str(pair.steps), "--warmup", str(pair.warmup), "--batch-size", str(pair.batch),
           "--max-length", str(pair.seq), "--sgo-new-tokens", str(pair.new_tokens), "--out", str(out),
           "--json", str(result)]
    log.write(f"\n=== {pair.name} {method}\n")
    started = time.perf_counter()
    code = run_logged(cmd, log, clock.left())
    if code is None:
        shutil.rmtree(out, ignore_errors=True)
        return {"error": f"timed out after {time.perf_counter() - started:.0f} s (the time budget)"}
    if code != 0 or not result.is_file():
        shutil.rmtree(out, ignore_errors=True)
        return {"error": f"bench_methods exit {code} (see bench.log)"}
    r = json.loads(result.read_text())[0]
    metrics = json.loads((out / method / "metrics.json").read_text())
    flops = metrics.get("flops_per_step")
    row = {"step_s": r["step_s"], "tokens_per_s": r["tokens_per_s"], "peak_gib": max(r["peak_gib_per_rank"]),
           "phases_s": r["phases_s"], "one_off_s": r.get("one_off_s", 0.0), "run_s": time.perf_counter() - started,
           "flops_per_step": flops, "params": metrics.get("params"), "device": r.get("device")}
    if flops and peak:
        row["mfu"] = flops / (r["step_s"] * peak)
    shutil.rmtree(out, ignore_errors=True)  # checkpoints of a 1B student are ~10 GB
    return row


def plan_row(pair: Pair, method: str, teacher: Path, student: Path, row: dict, t_cfg: str, bf16: bool) -> dict:
    """The memory plan of this run (okd_scale.plan) and its ratio to the measured peak, in percent."""
    if "error" in row or method in ("sft", "seqkd"):
        return {}  # the plan models a run with a teacher
    try:
        # heavy (torch): imported when the stage runs
        from okd_scale import plan

        if t_cfg == "auto" or "replica" in Path(t_cfg).name:
            spec = plan.EngineSpec(1)
        else:
            teacher_ds = json.loads(Path(t_cfg).read_text())
            spec = plan.engine_spec(teacher_ds)
        accel = accelerator()
        on_host = accel.device_name() == "cpu"
        gpu_gib = 1e6 if on_host else accel.total_memory() / 2**30
        settings = plan.Settings(seq_len=pair.seq, micro_batch=pair.batch,
                                 cluster=plan.Cluster(1, 1, gpu_gib, 1e6, device_is_host=on_host),
                                 teacher=spec, student=plan.student_engine(2, "none"), online=method == "okd",
                                 dtype="bf16" if bf16 else "fp32",
                                 flash_attention=not on_host)  # SDPA's fused kernels on a GPU
        p = plan.make_plan(plan.read_shape(teacher), plan.read_shape(student), settings)
        planned = p.gpu_total / 2**30
        return {"plan_gib": planned, "plan_pct": 100.0 * planned / row["peak_gib"] if row.get("peak_gib") else None}
    except Exception as e:  # noqa: BLE001 - reported in the table
        return {"plan_error": f"{type(e).__name__}: {e}"}
