"""The paper's main comparison, on one shared budget: sft, kd (forward, reverse and skew KL), taid, sgo and
okd (the config's settings, reverse KL for demo.yaml, and forward KL as okd_fkl).

    python tools/reproduce.py --preset cpu-small                 # the demo pair on this machine
    python tools/reproduce.py --preset gpu-paper --teacher T --student S --train-data dolly_train.jsonl
    python tools/reproduce.py --preset cpu-small --methods sft,okd --steps 20 --out results_quick

Every method trains from the same student with the same data order, steps, batch, learning-rate
schedule and seed (only `method` and its own settings differ), on `--nproc` processes; each student,
and the teacher, is then evaluated with okd_scale.evaluate (ROUGE-L, sampling at the preset's
temperature with several generation seeds) on every evaluation set. Results: OUT/TABLE.md and
OUT/table.json (ROUGE-L mean and spread over the generation seeds per set and method, the average over
the sets, training wall time per method and its fraction of sgo's). One finished cell (a method, or
the teacher) is one OUT/cells/<name>.json: a rerun skips finished cells, and a half-trained method
resumes from its last checkpoint (the trainer's `resume: auto`). A progress line is printed per cell.

Evaluation sets: by default ../shared/data/eval/dolly.jsonl and selfinst.jsonl when present (MiniLLM
format), and the demo's held-out split for cpu-small. With `--prompt-format chat` (cpu-small's default:
the demo models are chat models) their instruction and input become one user turn in the teacher's chat
template; `as-is` (gpu-paper: the paper's protocol) uses each row's Alpaca-style `prompt`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
SHARED_EVAL = ROOT.parent / "shared" / "data" / "eval"

# method cells: trainer overrides on top of the preset
METHODS = {
    "sft": ["method=sft"],
    "kd_fkl": ["method=kd", "loss.divergence=fkl"],
    "kd_rkl": ["method=kd", "loss.divergence=rkl"],
    "kd_skl": ["method=kd", "loss.divergence=skl"],  # DistiLLM's skew KL
    "taid": ["method=taid"],  # TAID: its target moves from the student towards the teacher
    "sgo": ["method=sgo", "loss.divergence=fkl"],  # forward KL, whatever the config says
    "okd_fkl": ["method=okd", "loss.divergence=fkl"],  # OKD against kd_fkl at the same divergence
    "okd": ["method=okd"],  # the config's own settings (demo.yaml: reverse KL, as kd_rkl)
}

PRESETS = {
    # the demo pair; about an hour for the whole sweep on 2 cores
    "cpu-small": {
        "config": "configs/demo.yaml", "nproc": 2, "prompt_format": "chat",
        "train": ["train.max_steps=60", "train.per_device_train_batch_size=4", "data.max_length=128",
                  "train.learning_rate=3e-4", "train.lr_scheduler_type=cosine", "train.warmup_steps=10",
                  "sgo.lambda=0.5", "sgo.max_new_tokens=64", "data.eval_file=null"],
        "eval": {"max_examples": 40, "seeds": [1, 2, 3], "max_new_tokens": 48, "do_sample": True,
                 "temperature": 1.0, "top_p": 1.0, "max_prompt_tokens": 192, "batch_size": 8},
        "shared_sets": ["dolly", "selfinst"], "demo_eval": True,
    },
    # the paper's protocol: Dolly training set, sampling at temperature 1, 5 seeds, max length 512
    "gpu-paper": {
        "config": "configs/demo.yaml", "nproc": 8, "prompt_format": "as-is",
        "train": ["train.max_steps=5000", "train.per_device_train_batch_size=8", "data.max_length=512",
                  "train.learning_rate=5e-5", "train.lr_scheduler_type=cosine", "train.warmup_steps=100",
                  "train.bf16=true", "sgo.lambda=0.5", "sgo.max_new_tokens=256", "data.eval_file=null",
                  "train.save_every=500"],
        "eval": {"max_examples": None, "seeds": [10, 20, 30, 40, 50], "max_new_tokens": 256, "do_sample": True,
                 "temperature": 1.0, "top_p": 1.0, "max_prompt_tokens": 512, "batch_size": 32},
        "shared_sets": ["dolly", "selfinst"], "demo_eval": False,
    },
}


def chat_eval_set(src: Path, dst: Path, tokenizer) -> Path:
    """A MiniLLM-format set with each prompt rebuilt as one user turn of the tokenizer's chat template."""
    from okd_scale.evaluate import read_eval_set

    lines = []
    for row in read_eval_set(src):
        user = row["instruction"] or row["prompt"]
        if row["instruction"] and row["input"]:
            user = f"{user}\n\n{row['input']}"
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                               tokenize=False)
        lines.append(json.dumps({"prompt": prompt, "output": row["references"]}))
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("\n".join(lines) + "\n")
    return dst


def eval_sets(args, preset: dict, out: Path) -> dict[str, Path]:
    """name -> evaluation file, in the prompt format the preset asks for."""
    if args.eval_sets:  # given: exactly these
        return _formatted({Path(x).stem: Path(x) for x in args.eval_sets}, args, out)
    sets: dict[str, Path] = {}
    for name in preset["shared_sets"]:
        if (SHARED_EVAL / f"{name}.jsonl").is_file():
            sets[name] = SHARED_EVAL / f"{name}.jsonl"
    if preset["demo_eval"] and (Path(args.demo_dir) / "data" / "eval.jsonl").is_file():
        sets["demo-heldout"] = Path(args.demo_dir) / "data" / "eval.jsonl"
    if not sets:
        raise SystemExit("reproduce: no evaluation set found; pass --eval-sets")
    return _formatted(sets, args, out)


def _formatted(sets: dict[str, Path], args, out: Path) -> dict[str, Path]:
    if args.prompt_format == "chat":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.teacher)
        sets = {name: path if name == "demo-heldout" else chat_eval_set(path, out / "eval_sets" / f"{name}.jsonl", tok)
                for name, path in sets.items()}
    return sets


def train_cell(name: str, args, preset: dict, out: Path) -> float:
    """Train one method into OUT/runs/<name> (resuming a half-finished run); wall seconds of this call."""
    run_dir = out / "runs" / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           str(ROOT / "okd_scale" / "train.py"), "--config", str(ROOT / preset["config"]),
           f"model.teacher={args.teacher}", f"model.student={args.student}", f"data.train_file={args.train_data}",
           f"output_dir={run_dir}", f"seed={args.seed}", *preset["train"], *METHODS[name], *args.overrides]
    if args.steps:
        cmd.append(f"train.max_steps={args.steps}")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    clock = time.perf_counter()
    with open(out / "logs" / f"{name}.log", "a") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"reproduce: training {name} failed (exit {proc.returncode}); see {out / 'logs' / (name + '.log')}")
    return time.perf_counter() - clock


def eval_cell(model_dir: Path, sets: dict, preset: dict, args) -> dict:
    from okd_scale.evaluate import evaluate_model, load_model

    kw = dict(preset["eval"])
    if args.eval_examples is not None:
        kw["max_examples"] = args.eval_examples
    if args.gen_seeds:
        kw["seeds"] = args.gen_seeds
    model, tokenizer = load_model(model_dir)
    result = evaluate_model(model, tokenizer, sets, **kw)
    for s in result["sets"].values():
        s.pop("samples", None)
    return result


def table(cells: dict, sets: list[str]) -> tuple[str, dict]:
    """Markdown table and its JSON: ROUGE-L mean ± spread per set, average, wall time."""
    sgo_time = cells.get("sgo", {}).get("train_s")
    head = ["model", *sets, "average", "train wall s", "x sgo's time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    data = {}
    for name, cell in cells.items():
        ev = cell["eval"]
        row = {s: {"mean": ev["sets"][s]["rougeL"], "std": ev["sets"][s]["std"], "n": ev["sets"][s]["n"]}
               for s in sets}
        row["average"] = ev["average"]
        row["train_s"] = cell.get("train_s")
        data[name] = row
        t = cell.get("train_s")
        lines.append("| " + " | ".join([
            name, *[f"{row[s]['mean']:.2f} ± {row[s]['std']:.2f}" for s in sets], f"{row['average']:.2f}",
            f"{t:.0f}" if t else "-", f"{t / sgo_time:.2f}" if t and sgo_time else "-"]) + " |")
    return "\n".join(lines), data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=tuple(PRESETS), default="cpu-small")
    p.add_argument("--teacher", help="teacher directory (cpu-small: the demo teacher)")
    p.add_argument("--student", help="initial student directory (cpu-small: the demo student)")
    p.add_argument("--train-data", help="training data (cpu-small: the demo train split)")
    p.add_argument("--eval-sets", type=lambda s: [x for x in s.split(",") if x],
                   help="comma-separated evaluation files, instead of the preset's")
    p.add_argument("--prompt-format", choices=("chat", "as-is"), help="default: the preset's")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--no-teacher-eval", action="store_true", help="skip the teacher's own row")
    p.add_argument("--nproc", type=int, help="default: the preset's")
    p.add_argument("--steps", type=int, help="override the preset's train.max_steps")
    p.add_argument("--eval-examples", type=int, help="override the preset's examples per set")
    p.add_argument("--gen-seeds", type=lambda s: [int(x) for x in s.split(",")], help="generation seeds, e.g. 1,2,3")
    p.add_argument("--seed", type=int, default=42, help="training seed, shared by every method")
    p.add_argument("--demo-dir", default=str(ROOT / "demo_out"))
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("overrides", nargs="*", help="more trainer key=value for every method")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    methods = [m for m in args.methods.split(",") if m]
    if unknown := [m for m in methods if m not in METHODS]:
        p.error(f"--methods: unknown {unknown}; expected a subset of {','.join(METHODS)}")
    args.nproc = args.nproc or preset["nproc"]
    args.prompt_format = args.prompt_format or preset["prompt_format"]
    if not (args.teacher and args.student and args.train_data):
        if args.preset != "cpu-small":
            p.error("--teacher, --student and --train-data are required for gpu-paper")
        from demo import prepare_assets

        demo = Path(args.demo_dir)
        prepare_assets(demo)
        args.teacher = args.teacher or str(demo / "teacher")
        args.student = args.student or str(demo / "student_init")
        args.train_data = args.train_data or str(demo / "data" / "train.jsonl")
    out = Path(args.out)
    for sub in ("cells", "runs", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    sets = eval_sets(args, preset, out)
    names = (["teacher"] if not args.no_teacher_eval else []) + methods
    clock = time.perf_counter()
    cells = {}
    for i, name in enumerate(names, 1):
        cell_file = out / "cells" / f"{name}.json"
        if cell_file.is_file():
            cells[name] = json.loads(cell_file.read_text())
            print(f"[{i}/{len(names)}] {name}: done before, skipped", flush=True)
            continue
        start = time.perf_counter()
        cell = {"name": name, "preset": args.preset}
        if name == "teacher":
            model_dir = Path(args.teacher)
        else:
            cell["train_s"] = train_cell(name, args, preset, out)
            model_dir = out / "runs" / name / "student"
        cell["eval"] = eval_cell(model_dir, sets, preset, args)
        cell_file.write_text(json.dumps(cell, indent=1))
        cells[name] = cell
        trained = f", trained in {cell['train_s']:.0f} s" if "train_s" in cell else ""
        print(f"[{i}/{len(names)}] {name}: ROUGE-L average {cell['eval']['average']:.2f}{trained}"
              f" ({time.perf_counter() - start:.0f} s for the cell, {time.perf_counter() - clock:.0f} s so far)",
              flush=True)
    text, data = table(cells, list(sets))
    header = (f"# {args.preset}: ROUGE-L (F x100; mean ± population std over generation seeds "
              f"{preset['eval']['seeds'] if not args.gen_seeds else args.gen_seeds})\n\n"
              f"teacher {args.teacher}, student {args.student}, data {args.train_data}, {args.nproc} processes, "
              f"trainer overrides {' '.join(preset['train'] + args.overrides)}\n\n")
    (out / "TABLE.md").write_text(header + text + "\n")
    (out / "table.json").write_text(json.dumps({"preset": args.preset, "sets": list(sets), "rows": data}, indent=1))
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
