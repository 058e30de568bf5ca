"""The GPU check: okd_scale on the accelerator in one command, ending with one markdown table.

    python -m tools.gpu.check [--out DIR] [--budget-s 280] [--dry-run] [--work DIR]     # `make gpu-check`

1. the tests that run on the accelerator, on it (GROUPS, pytest with a JUnit report): the divergences
   (fp32, bf16, token-chunked, from hidden states) against float64 references, the vocabulary-sharded
   ones at world size 1, a run of every method in process (world size 1: NCCL on a GPU), bitwise resume
   in fp32, conversion of checkpoints to Hugging Face models (their logits), evaluation and generation;
2. tools/bench/methods.py in one process, bf16, on two pairs built here from random weights (PAIRS;
   weights do not matter for speed): a 1B-class pair (a 24-block teacher, a 12-block student, hidden
   2048, vocabulary 32000) and a pair of the demo's size (SmolLM2-135M's shape, 30 blocks, and its
   6-block student, vocabulary 49152), each with a word-level tokenizer of the same vocabulary: step
   time, tokens/s, peak memory, time per phase and MFU against okd_scale/perf.py's bf16 peak (790 TFLOP/s
   for the H200, the rate measured on this workplace's machines);
3. okd_scale.plan's memory plan of each run against its measured peak;
4. the table, written to DIR/gpu_check.md (DIR: --out, else $OUT, else the work folder) with the raw
   numbers in gpu_check.json and the logs beside them, and printed last.

Where the accelerator is the CPU (DS_ACCELERATOR=cpu), or with --dry-run, the same steps run reduced:
a few tests per group, tiny pairs, fp32, two steps. A stage that would outrun --budget-s is skipped and
the table says so. Exit status 0 when every test passed and every run finished, else 1.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from tools import ROOT

CARRIED = ("deepspeed", "pydantic", "hjson", "rouge_score", "nltk", "datasets")  # what .whl brings there


@dataclass
class Group:
    """Tests that run on the accelerator: pytest node ids, and the dry run's subset (None: the same)."""

    name: str
    tests: list
    dry: Optional[list] = None


GROUPS = [
    Group("divergences vs float64: fp32, bf16, chunked, hidden path", ["tests/test_divergences.py"],
          ["tests/test_divergences.py::test_hidden_path_equals_dense_logits"]),
    Group("vocabulary-sharded divergences, world size 1",
          ["tests/test_sharded.py::test_world_size_one_is_dense_exactly"]),
    Group("every method in process (world size 1), and bf16",
          ["tests/test_train.py::test_one_process", "tests/test_train.py::test_bf16_one_process"],
          ["tests/test_train.py::test_one_process[kd]"]),
    Group("bitwise resume mid-epoch, fp32", ["tests/test_resume.py::test_resume_mid_epoch_is_exact_in_process"]),
    Group("checkpoint -> Hugging Face conversion parity (ZeRO-2, ZeRO-3)",
          ["tests/test_convert.py::test_student_fp32_equals_the_trained_model[1proc-zero2]",
           "tests/test_convert.py::test_student_fp32_equals_the_trained_model[1proc-zero3]"],
          ["tests/test_convert.py::test_student_fp32_equals_the_trained_model[1proc-zero2]"]),
    Group("evaluation and batched generation", ["tests/test_evaluate.py"],
          ["tests/test_evaluate.py::test_left_padding_matches_unbatched",
           "tests/test_evaluate.py::test_cli_outputs_match_evaluate_model"]),
]


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
         batch=8, seq=1024, warmup=2, steps=4, est_s=45.0),
    Pair("demo-size", SMOLLM2_135M, Shape(6, 576, 9, 3, 1536, tie=True), 49152, "okd,kd,sgo,sft,seqkd",
         batch=8, seq=512, warmup=2, steps=4, est_s=25.0),
]
DRY_PAIRS = [
    Pair("1B-class (dry: tiny)", Shape(4, 64, 4, 2, 128), Shape(2, 64, 4, 2, 128), 512, "okd",
         batch=2, seq=64, warmup=1, steps=1, new_tokens=8),
    Pair("demo-size (dry: tiny)", Shape(4, 48, 3, 1, 96, tie=True), Shape(2, 48, 3, 1, 96, tie=True), 384, "kd",
         batch=2, seq=64, warmup=1, steps=1, new_tokens=8),
]
TORCH_ADAM = {"optimizer": {"params": {"torch_adam": True}}}  # no just-in-time build of fused Adam


class Clock:
    """The check's time budget."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.monotonic(), budget_s

    def used(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.used()


@dataclass
class Report:
    """What the check found, stage by stage (written as gpu_check.json)."""

    environment: dict = field(default_factory=dict)
    carried: dict = field(default_factory=dict)
    tests: list = field(default_factory=list)
    tests_run: dict = field(default_factory=dict)  # the pytest run as a whole: status, seconds
    bench: list = field(default_factory=list)
    notes: list = field(default_factory=list)


# --------------------------------------------------------------------------- environment


def accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def environment(dry: bool) -> dict:
    """What runs where: the accelerator and its device, the versions, the peak FLOP/s the MFU uses."""
    import deepspeed
    import torch
    import transformers

    from okd_scale import perf

    accel = accelerator()
    device = perf.device_name()
    peak = perf.peak_flops(device)
    memory = None
    if accel.device_name() != "cpu":
        memory = accel.total_memory() / 2**30
    return {"accelerator": accel.device_name(), "device": device, "device_name": accel.current_device_name(),
            "device_memory_gib": memory, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "dry_run": dry,
            "peak_flops": peak}


def carried_packages() -> dict:
    """{package: version, or the import error} for what the wheels in .whl bring."""
    import importlib
    import importlib.metadata

    out = {}
    for name in CARRIED:
        try:
            importlib.import_module(name)
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except Exception as e:  # noqa: BLE001 - reported in the table
            out[name] = f"error: {type(e).__name__}: {str(e)[:120]}"
    return out


def child_env() -> dict:
    """The environment of the check's child processes: offline, this accelerator, deterministic cuBLAS."""
    env = dict(os.environ)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.setdefault(key, "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # bitwise-equal reruns of the same matrix products
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(
        os.pathsep))]))
    return env


def run_logged(cmd: list, log, timeout_s: float) -> Optional[int]:
    """Run `cmd` in the repository with its output appended to `log`; its exit status, or None when it
    outran `timeout_s` (then it and every process it started are killed)."""
    import signal

    log.write(" ".join(map(str, cmd)) + "\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        return proc.wait(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None
    finally:
        log.flush()


# --------------------------------------------------------------------------- 1. tests


def run_tests(groups: list, dry: bool, clock: Clock, logs: Path, limit_s: float) -> tuple[list[dict], dict]:
    """One pytest run over every group's tests: per group passed, failed, skipped, seconds; and the run's
    status and seconds."""
    ids = [t for g in groups for t in (g.dry if dry and g.dry else g.tests)]
    xml = logs / "tests.xml"
    timeout = max(10.0, min(limit_s, clock.left()))
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", f"--junitxml={xml}", *ids]
    started = time.perf_counter()
    with open(logs / "tests.log", "w") as log:
        code = run_logged(cmd, log, timeout)
    status = f"pytest exit {code}" if code is not None else f"timed out after {timeout:.0f} s"
    cases = _junit_cases(xml) if xml.is_file() else _log_cases(logs / "tests.log")  # killed: no report
    rows = []
    for g in groups:
        mine = [c for c in cases if any(_matches(c["id"], t) for t in (g.dry if dry and g.dry else g.tests))]
        row = {"group": g.name, "passed": sum(c["outcome"] == "passed" for c in mine),
               "failed": sum(c["outcome"] == "failed" for c in mine),
               "skipped": sum(c["outcome"] == "skipped" for c in mine),
               "seconds": sum(c["seconds"] for c in mine), "failures": [c["id"] for c in mine
                                                                          if c["outcome"] == "failed"]}
        if not mine:
            row["note"] = f"no results ({status})"
        rows.append(row)
    return rows, {"status": status, "seconds": time.perf_counter() - started}


def _junit_cases(xml: Path) -> list[dict]:
    out = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "skipped"
        out.append({"id": f"{module}.py::{case.get('name')}", "outcome": outcome,
                    "seconds": float(case.get("time", 0.0))})
    return out


def _log_cases(log: Path) -> list[dict]:
    """The outcomes pytest -v printed before it was stopped (no times)."""
    import re

    words = {"PASSED": "passed", "FAILED": "failed", "ERROR": "failed", "SKIPPED": "skipped"}
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)\b", line)
        if m:
            out.append({"id": m.group(1), "outcome": words[m.group(2)], "seconds": 0.0})
    return out


def _matches(case_id: str, selector: str) -> bool:
    """Whether a test (path.py::name[param]) is selected by a node id (a file, a function, or one case)."""
    if "::" not in selector:
        return case_id.startswith(selector + "::")
    return case_id == selector or case_id.startswith(selector + "[")


# --------------------------------------------------------------------------- 2. the benchmark


def build_pair(pair: Pair, work: Path, dtype, device) -> tuple[Path, Path, Path]:
    """(teacher, student, data) for `pair` under `work`, made once: random Llama weights and a word-level
    tokenizer of the pair's vocabulary; rows of exactly `pair.seq` tokens (a 64-token prompt)."""
    import random

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


# --------------------------------------------------------------------------- 3. the plan


def plan_row(pair: Pair, method: str, teacher: Path, student: Path, row: dict, t_cfg: str, bf16: bool) -> dict:
    """The memory plan of this run (okd_scale.plan) and its ratio to the measured peak, in percent."""
    if "error" in row or method in ("sft", "seqkd"):
        return {}  # the plan models a run with a teacher
    try:
        from okd_scale import plan
        from okd_scale.config import offload_device, zero_stage

        if t_cfg == "auto" or "replica" in Path(t_cfg).name:
            spec = plan.EngineSpec(1)
        else:
            teacher_ds = json.loads(Path(t_cfg).read_text())
            spec = plan.EngineSpec(zero_stage(teacher_ds), offload_device(teacher_ds, "offload_param"))
        accel = accelerator()
        gpu_gib = accel.total_memory() / 2**30 if accel.device_name() != "cpu" else 1e6
        settings = plan.Settings(seq_len=pair.seq, micro_batch=pair.batch, cluster=plan.Cluster(1, 1, gpu_gib, 1e6),
                                 teacher=spec, student=plan.EngineSpec(2), online=method == "okd",
                                 dtype="bf16" if bf16 else "fp32",
                                 flash_attention=accel.device_name() != "cpu")  # SDPA's fused kernels on a GPU
        p = plan.make_plan(plan.read_shape(teacher), plan.read_shape(student), settings)
        planned = p.gpu_total / 2**30
        return {"plan_gib": planned, "plan_pct": 100.0 * planned / row["peak_gib"] if row.get("peak_gib") else None}
    except Exception as e:  # noqa: BLE001 - reported in the table
        return {"plan_error": f"{type(e).__name__}: {e}"}


# --------------------------------------------------------------------------- 4. the table


def _f(x, fmt: str, unit: str = "") -> str:
    return "-" if x is None else format(x, fmt) + unit


def table(report: Report, clock: Clock) -> str:
    """The whole report as markdown: the set-up, the tests per group, the methods' costs with their plans."""
    return "\n".join(_header(report, clock) + _tests_section(report) + _bench_section(report)) + "\n"


def _header(report: Report, clock: Clock) -> list[str]:
    env = report.environment
    memory = f", {env['device_memory_gib']:.0f} GiB" if env.get("device_memory_gib") else ""
    lines = ["# okd_scale GPU check" + (" (dry run)" if env.get("dry_run") else ""), "",
             f"{env.get('device')} ({env.get('device_name')}{memory}); torch {env.get('torch')}, deepspeed "
             f"{env.get('deepspeed')}, transformers {env.get('transformers')}, python {env.get('python')}; "
             f"{clock.used():.0f} s of a {clock.budget_s:.0f} s budget.", ""]
    peak = env.get("peak_flops")
    if peak:
        lines.append(f"MFU = FLOPs per step (okd_scale/perf.py) / (median step time x {peak / 1e12:.0f} TFLOP/s, "
                     f"the bf16 peak of okd_scale/perf.py's PEAK_BF16_FLOPS).")
    else:
        lines.append("MFU: no peak FLOP/s known for this device (okd_scale/perf.py PEAK_BF16_FLOPS).")
    bad = {k: v for k, v in report.carried.items() if str(v).startswith("error")}
    good = ", ".join(f"{k} {v}" for k, v in report.carried.items() if k not in bad)
    lines += ["", "Carried packages: " + good + ("; FAILED: " + "; ".join(f"{k}: {v}" for k, v in bad.items())
                                                 if bad else ""), ""]
    return lines


def _tests_section(report: Report) -> list[str]:
    lines = [f"## Tests on {report.environment.get('device_name')}", "", "| group | passed | failed | skipped | s |",
             "|---|---:|---:|---:|---:|"]
    for r in report.tests:
        name = r["group"] + (f" ({r['note']})" if r.get("note") else "")
        lines.append(f"| {name} | {r['passed']} | {r['failed']} | {r['skipped']} | {r['seconds']:.1f} |")
    if report.tests_run:
        total = {k: sum(r[k] for r in report.tests) for k in ("passed", "failed", "skipped")}
        lines.append(f"| **all** ({report.tests_run['status']}) | {total['passed']} | {total['failed']} | "
                     f"{total['skipped']} | {report.tests_run['seconds']:.1f} |")
    failures = [f for r in report.tests for f in r.get("failures", [])]
    return lines + (["", "Failed: " + ", ".join(failures) + " (tests.log)"] if failures else [])


def _bench_section(report: Report) -> list[str]:
    dtypes = "/".join(sorted({r["dtype"] for r in report.bench if "dtype" in r})) or "-"
    lines = ["", f"## Methods: tools/bench/methods.py, 1 process, {dtypes}, both engines on torch's Adam (no "
                 "fused-Adam build)", "",
             "| pair | method | batch x seq | step s | tokens/s | peak GiB | MFU | plan GiB | plan / peak | "
             "one-off s | run s | phases s/step |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report.bench:
        head = f"| {r['pair']} | {r['method']} | {r.get('batch', '-')} x {r.get('seq', '-')} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | | | | | |")
            continue
        phases = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["phases_s"].items(), key=lambda kv: -kv[1])
                           if v >= 5e-4)
        plan_gib = "error" if "plan_error" in r else _f(r.get("plan_gib"), ".2f")
        mfu = _f(100 * r["mfu"] if r.get("mfu") else None, ".1f", "%")
        lines.append(f"{head} {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_gib']:.2f} | {mfu} | {plan_gib} | "
                     f"{_f(r.get('plan_pct'), '.0f', '%')} | {r['one_off_s']:.1f} | {r['run_s']:.0f} | {phases} |")
    lines += ["", "step s: the median over the measured steps; peak GiB: the accelerator's max allocated bytes (on CPU "
                  "the peak RSS); plan GiB: okd_scale.plan's per-device total for the run's shapes, micro-batch, "
                  "sequence, ZeRO stages and dtype (kd, sgo, okd; sft and seqkd have no teacher); plan / peak: that "
                  "total over the measured peak; one-off s: seqkd's teacher generation; run s: the whole run (start, "
                  "loading, steps, checkpoint, export)."]
    plan_errors = [f"{r['pair']} {r['method']}: plan: {r['plan_error']}" for r in report.bench if "plan_error" in r]
    return lines + [f"- {n}" for n in report.notes + plan_errors]


def all_passed(report: Report) -> bool:
    """Every test passed (and ran), every run finished, every carried package imports."""
    return (all(r["failed"] == 0 and not r.get("note") for r in report.tests)
            and all("error" not in r for r in report.bench)
            and not any(str(v).startswith("error") for v in report.carried.values()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT"), help="where the table and logs go (default: $OUT)")
    p.add_argument("--work", help="models and runs (default: a temporary folder)")
    p.add_argument("--budget-s", type=float, default=280.0, help="the whole check's time (default 280 s)")
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
