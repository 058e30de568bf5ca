"""The paper's main comparison, on one shared budget: sft, kd (forward, reverse and skew KL), taid, sgo and
okd (the paper's, and with a reverse-KL student as okd_rkl), and the earlier OKD variants by name.

    python -m tools.proof.reproduce --preset cpu-small                 # the demo pair on this machine
    python -m tools.proof.reproduce --preset gpu-paper --teacher T --student S --train-data dolly_train.jsonl
    python -m tools.proof.reproduce --preset cpu-small --methods sft,okd --steps 20 --out results_quick

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
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tools import ROOT

SHARED_EVAL = ROOT.parent / "shared" / "data" / "eval"

# method cells: trainer overrides on top of the preset. `okd` is the paper's OKD (the package's defaults; the
# presets' config, demo.yaml, sets no loss.* or online.* key). The earlier OKD variants pin every setting they ran
# with (reverse KL, kd_ratio 0.5, LT = CE + D_T, a rank-8 LoRA on all seven projections of the last 4 blocks), so
# that their committed cells keep their meaning now that the defaults are the paper's.
EARLIER = ["method=okd", "loss.divergence=rkl", "loss.kd_ratio=0.5", "online.divergence_weight=1.0",
           "online.ce_weight=1.0"]
EARLIER_LORA = ["online.r=8", "online.lora_alpha=16", "online.num_blocks=4",
                "online.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]
METHODS = {
    "sft": ["method=sft"],
    "kd_fkl": ["method=kd", "loss.divergence=fkl"],
    "kd_rkl": ["method=kd", "loss.divergence=rkl"],
    "kd_skl": ["method=kd", "loss.divergence=skl"],  # DistiLLM's skew KL
    "taid": ["method=taid"],  # TAID: its target moves from the student towards the teacher
    "sgo": ["method=sgo", "loss.divergence=fkl"],  # forward KL, whatever the config says
    "okd": ["method=okd"],  # the paper's OKD: forward-KL student, LoRA r=32 on q/v of every block, alpha 0.5
    "okd_rkl": ["method=okd", "loss.divergence=rkl"],  # the paper's second ablation row: a reverse-KL student
    # alpha = 0: the module trained by CE alone (the teacher fine-tuned online, no signal from the student)
    "okd_a0": ["method=okd", "online.divergence_weight=0", "online.ce_weight=1"],
    # the control: kd forward KL from the teacher whose LoRA okd_a0 (same seed) fine-tuned with CE (TEACHER_FROM)
    "kd_fkl_ft": ["method=kd", "loss.divergence=fkl"],
    "okd_blocks_lr1e5": [*EARLIER, *EARLIER_LORA, "online.placement=blocks", "online.learning_rate=1e-5"],
    # the online-module family searched on validation (cpu-okd-search), each as it ran
    "okd_blocks_lr02": [*EARLIER, *EARLIER_LORA, "online.placement=blocks", "online.learning_rate=ratio:0.2"],
    "okd_blocks_joint": [*EARLIER, *EARLIER_LORA, "online.placement=blocks", "online.objective=joint",
                         "online.learning_rate=ratio:0.2"],
    "okd_head": [*EARLIER, *EARLIER_LORA, "online.placement=head", "online.learning_rate=ratio:0.2"],
    "okd_head_joint": [*EARLIER, *EARLIER_LORA, "online.placement=head", "online.objective=joint",
                       "online.learning_rate=ratio:0.2"],
    "okd_head_joint_lr1": [*EARLIER, *EARLIER_LORA, "online.placement=head", "online.objective=joint",
                           "online.learning_rate=ratio:1"],
    "okd_temp": [*EARLIER, "online.placement=temperature", "online.learning_rate=1e-2"],  # demo.yaml's before
    "okd_temp_joint": [*EARLIER, "online.placement=temperature", "online.objective=joint",
                       "online.learning_rate=1e-2"],
}
OKD_CELLS = [m for m in METHODS if m.startswith("okd_") and m not in ("okd_rkl", "okd_a0")]  # the earlier variants
# a method whose teacher is another method's teacher with its trained online module merged (okd_scale.convert
# --model teacher --merge-online-module of that method's run at the same training seed, made when it finishes)
TEACHER_FROM = {"kd_fkl_ft": "okd_a0"}
MERGED_TEACHER = "teacher_merged"  # in OUT/runs/<source cell>/
OKD_VARIANTS = [m for m in OKD_CELLS if m != "okd_blocks_lr1e5"]  # what cpu-okd-search searched

# tools/demo/prepare_data.py settings of the proof presets' data: ShareGPT's first turns in the teacher's chat
# format, English, bounded lengths, never an evaluation prompt; a validation split (model selection) and a
# heal split (the init student) that the method comparison never trains on
SHAREGPT = {"source": "sharegpt", "english": True, "max_prompt_chars": 1000, "max_output_chars": 1500,
            "num_eval": 300, "num_heal": 3000, "seed": 0}

PRESETS = {
    # the demo pair; about an hour for the whole sweep on 2 cores
    "cpu-small": {
        "config": "configs/demo.yaml", "nproc": 2, "prompt_format": "chat",
        "train": ["train.max_steps=60", "train.per_device_train_batch_size=4", "data.max_length=128",
                  "train.learning_rate=3e-4", "train.lr_scheduler_type=cosine", "train.warmup_steps=10",
                  "sgo.lambda=0.5", "sgo.max_new_tokens=64", "data.eval_file=null"],
        "eval": {"max_examples": 40, "seeds": [1, 2, 3], "max_new_tokens": 48, "do_sample": True,
                 "temperature": 1.0, "top_p": 1.0, "max_prompt_tokens": 192, "batch_size": 8},
        "shared_sets": ["dolly", "selfinst"], "demo_eval": True, "train_seeds": [42],
    },
    # the proving ground on this 2-core machine: ShareGPT data, the demo student healed first (about 30 minutes),
    # every method from the healed student, greedy ROUGE-L on all of Dolly and Self-Instruct; about 3 hours
    "cpu-proof": {
        "config": "configs/demo.yaml", "nproc": 2, "prompt_format": "chat",
        "data": SHAREGPT,
        # sft heals faster per second than kd here; past about two epochs of the healing split it overfits
        # (docs/results.md, "Healing"); about 30 minutes
        "heal": {"method": "sft", "steps": 800, "eval_every": 100,
                 "set": ["train.bf16=true", "train.learning_rate=5e-4", "train.per_device_train_batch_size=4",
                         "data.max_length=192", "train.warmup_steps=10"]},
        "train": ["train.max_steps=80", "train.per_device_train_batch_size=4", "data.max_length=192",
                  "train.learning_rate=2e-4", "train.lr_scheduler_type=cosine", "train.warmup_steps=8",
                  "train.bf16=true", "sgo.lambda=0.5", "sgo.max_new_tokens=64", "data.eval_rouge_examples=0"],
        "eval": {"max_examples": None, "seeds": [0], "max_new_tokens": 64, "do_sample": False,
                 "max_prompt_tokens": 256, "batch_size": 16},
        "validation_rows": 100,
        "shared_sets": ["dolly", "selfinst"], "demo_eval": False,
        "train_seeds": [42, 43], "reseed_top": 3,  # the second seed for the 3 best by validation ROUGE-L,
        "reseed": ["okd_temp"],  # and for the OKD that cpu-okd-search chose, outside that ranking
        "methods": ["sft", "kd_fkl", "kd_rkl", "kd_skl", "taid", "sgo", "okd_blocks_lr1e5", "okd_temp"],
    },
    # the same ground at a scale where methods separate, sized (unmeasured: no GPU yet) for about 10 minutes of
    # one H200 over one or two device calls (README "On a GPU"); bf16
    "gpu-proof": {
        "config": "configs/demo.yaml", "nproc": 1, "prompt_format": "chat",
        "data": SHAREGPT,
        "heal": {"method": "sft", "steps": 1000, "eval_every": 250,
                 "set": ["train.bf16=true", "train.learning_rate=5e-4", "train.per_device_train_batch_size=32",
                         "data.max_length=512", "train.warmup_steps=50"]},
        "train": ["train.max_steps=400", "train.per_device_train_batch_size=32", "data.max_length=512",
                  "train.learning_rate=2e-4", "train.lr_scheduler_type=cosine", "train.warmup_steps=20",
                  "train.bf16=true", "train.save_every=100", "sgo.lambda=0.5", "sgo.max_new_tokens=128",
                  "data.eval_rouge_examples=0"],
        "eval": {"max_examples": None, "seeds": [1, 2, 3], "max_new_tokens": 128, "do_sample": True,
                 "temperature": 1.0, "top_p": 1.0, "max_prompt_tokens": 512, "batch_size": 256},
        "greedy": True, "validation_rows": 300,
        "shared_sets": ["dolly", "selfinst"], "demo_eval": False,
        "train_seeds": [42, 43], "reseed_top": 3,
        "methods": ["sft", "kd_fkl", "kd_rkl", "kd_skl", "taid", "sgo", "okd"],
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
        "shared_sets": ["dolly", "selfinst"], "demo_eval": False, "train_seeds": [42],
    },
}
# the search among the OKD variants on the cpu-proof ground, from its healed student (sweeps/cpu-proof/student_init,
# healed there when missing), one seed, scored on the validation rows only: the choice never sees Dolly or
# Self-Instruct; about 10 minutes a variant
PRESETS["cpu-okd-search"] = {**PRESETS["cpu-proof"], "shared_sets": [], "train_seeds": [42], "reseed_top": None,
                             "methods": OKD_VARIANTS, "init_from": "cpu-proof"}
# the paper's comparison on this machine: the cpu-proof ground (its healed student, splits and evaluation) at 5x its
# budget (400 steps: about 1.8 epochs of the training split), in fp32 (this machine's CPU has no AVX-512: bf16 runs
# about 40x slower than fp32 here), the learning rate chosen first on the validation split from the paper's grid for
# small students, two training seeds a method (three for okd and kd_fkl), per-prompt scores, paired intervals
# against kd forward KL, and the teacher-forced analysis on the validation rows; tens of hours, over sessions
PRESETS["cpu-paper"] = {
    **PRESETS["cpu-proof"], "init_from": "cpu-proof",
    "heal": {**PRESETS["cpu-proof"]["heal"],
             "set": [x for x in PRESETS["cpu-proof"]["heal"]["set"] if x != "train.bf16=true"] + ["train.bf16=false"]},
    "train": ["train.max_steps=400", "train.per_device_train_batch_size=4", "data.max_length=192",
              "train.lr_scheduler_type=cosine", "train.warmup_steps=40", "train.bf16=false", "train.save_every=25",
              "sgo.lambda=0.5", "sgo.max_new_tokens=64", "data.eval_rouge_examples=0"],
    # short runs of these methods at each rate, from the healed student; the lowest mean validation CE wins
    "select_lr": {"grid": [5e-4, 1e-4, 5e-5], "methods": ["kd_fkl", "sft"],
                  "set": ["train.max_steps=60", "train.warmup_steps=6"]},
    "methods": ["sft", "kd_fkl", "kd_rkl", "taid", "sgo", "okd", "okd_rkl", "okd_temp", "okd_a0", "kd_fkl_ft"],
    "train_seeds": [42, 43], "seeds_for": {"okd": [44], "kd_fkl": [44]}, "reseed_top": None, "reseed": [],
    "baseline": "kd_fkl", "analysis": True,
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


def named_set(text: str) -> tuple[str, Path]:
    """--eval-set NAME=PATH: (NAME, PATH) of an existing file."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    if name in ("validation", "teacher", "init", "average"):
        raise argparse.ArgumentTypeError(f"{name!r} is a name the tables use already; choose another")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"{path}: no such file")
    return name, Path(path)


def eval_sets(args, preset: dict, out: Path) -> dict[str, Path]:
    """name -> evaluation file, in the prompt format the preset asks for: the preset's (or --eval-sets), then each
    --eval-set (args.extra_sets: their names)."""
    args.extra_sets = [name for name, _ in args.eval_set]
    extra = _formatted(dict(args.eval_set), args, out) if args.eval_set else {}
    if args.eval_sets:  # given: exactly these
        return {**_formatted({Path(x).stem: Path(x) for x in args.eval_sets}, args, out), **extra}
    sets: dict[str, Path] = {}
    for name in preset["shared_sets"]:
        if (SHARED_EVAL / f"{name}.jsonl").is_file():
            sets[name] = SHARED_EVAL / f"{name}.jsonl"
    if preset["demo_eval"] and (Path(args.demo_dir) / "data" / "eval.jsonl").is_file():
        sets["demo-heldout"] = Path(args.demo_dir) / "data" / "eval.jsonl"
    if not sets and not extra and "heal" not in preset:  # the proof presets always score their validation rows
        raise SystemExit("reproduce: no evaluation set found; pass --eval-sets")
    return {**_formatted(sets, args, out), **extra}


def _formatted(sets: dict[str, Path], args, out: Path) -> dict[str, Path]:
    if args.prompt_format == "chat":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.teacher)
        sets = {name: path if name == "demo-heldout" else chat_eval_set(path, out / "eval_sets" / f"{name}.jsonl", tok)
                for name, path in sets.items()}
    return sets


def proof_data(args, preset: dict) -> dict[str, Path]:
    """The preset's training, validation and heal splits (tools/demo/prepare_data.py, written once per machine)."""
    from tools.demo.prepare_data import PrepareDataError, prepare_data

    spec = dict(preset["data"])
    where = Path(args.data_dir or Path(args.demo_dir) / spec["source"])
    files = {split: where / f"{split}.jsonl" for split in ("train", "eval", "heal")}
    if not all(f.is_file() for f in files.values()):
        excluded = [SHARED_EVAL / f"{name}.jsonl" for name in preset["shared_sets"]
                    if (SHARED_EVAL / f"{name}.jsonl").is_file()]
        try:
            prepare_data(where, chat_template_from=args.teacher, exclude_prompts_from=excluded, **spec)
        except PrepareDataError as e:
            raise SystemExit(f"reproduce: preparing the {args.preset} data in {where}: {e}")
    return files


def validation_set(src: Path, dst: Path, rows: int) -> Path:
    """The first ``rows`` rows of the validation split, as an evaluation set (ROUGE-L for model selection)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:rows]))
    return dst


def init_cell(args, preset: dict, data: dict[str, Path], out: Path) -> dict:
    """Heal the demo's pruned student once (tools/demo/make_student.py --heal-*) into args.student (OUT/student_init, or
    the init_from preset's); its report."""
    heal, student = preset["heal"], Path(args.student)
    if not (student / "heal_report.json").is_file():
        steps = args.heal_steps or heal["steps"]
        cmd = [sys.executable, "-m", "tools.demo.make_student", args.teacher, str(student), "--overwrite",
               "--heal-train", str(data["heal"]), "--heal-eval", str(data["eval"]), "--heal-method", heal["method"],
               "--heal-steps", str(steps), "--heal-eval-every", str(min(heal["eval_every"], steps)),
               "--heal-nproc", str(args.nproc), *[x for kv in heal["set"] + [f"seed={args.train_seeds[0]}"]
                                                  + args.overrides for x in ("--heal-set", kv)]]
        with open(out / "logs" / "init.log", "a") as log:
            proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(), stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise SystemExit(f"reproduce: healing the student failed (exit {proc.returncode}); "
                             f"see {out / 'logs' / 'init.log'}")
    return json.loads((student / "heal_report.json").read_text())


def _child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def train_cell(name: str, method: str, seed: int, args, preset: dict, out: Path, extra: list[str] = ()) -> float:
    """Train one method into OUT/runs/<name> (resuming a half-finished run), with `extra` overrides after the
    method's; wall seconds of this call."""
    run_dir = out / "runs" / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           str(ROOT / "okd_scale" / "train.py"), "--config", str(ROOT / preset["config"]),
           f"model.teacher={args.teacher}", f"model.student={args.student}", f"data.train_file={args.train_data}",
           f"output_dir={run_dir}", f"seed={seed}", *preset["train"], *METHODS[method], *extra, *args.overrides]
    if args.validation:
        cmd.append(f"data.eval_file={args.validation}")
    if args.steps:
        cmd.append(f"train.max_steps={args.steps}")
    clock = time.perf_counter()
    with open(out / "logs" / f"{name}.log", "a") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(), stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"reproduce: training {name} failed (exit {proc.returncode}); "
                         f"see {out / 'logs' / (name + '.log')}")
    return time.perf_counter() - clock


def eval_cell(model_dir: Path, sets: dict, preset: dict, args, validation_length: int | None = None,
              analysis: Path | None = None) -> dict:
    """The preset's evaluation of one model: {"eval": ROUGE-L by its protocol[, "greedy": the same greedily]},
    with each prompt's score and the first three answers of each set, and "answers" (protocol -> set -> every
    answer of the first generation seed, for the cell's answers file); with ``validation_length``, also
    "validation_ce" on args.validation at that length (for a model the trainer does not evaluate: the teacher);
    with ``analysis`` (a data file), "analysis": the teacher-forced analysis against the original teacher on it."""
    from okd_scale.evaluate import evaluate_model, load_model, teacher_forced

    kw = dict(preset["eval"])
    if args.eval_examples is not None:
        kw["max_examples"] = args.eval_examples
    if args.gen_seeds:
        kw["seeds"] = args.gen_seeds
    protocols = {"eval": kw}
    if preset.get("greedy") and kw.get("do_sample"):
        protocols["greedy"] = {**kw, "do_sample": False, "seeds": [0]}
    model, tokenizer = load_model(model_dir)
    cell = {"answers": {}}
    for key, settings in protocols.items():
        result = evaluate_model(model, tokenizer, sets, keep_generations=True, **settings)
        cell["answers"][key] = {name: s.pop("generations") for name, s in result["sets"].items()}
        for s in result["sets"].values():  # the first answers of each set, to read (the prompts are in the set)
            s["samples"] = [{"generation": x["generation"][:400], "rougeL": x["rougeL"]} for x in s["samples"]]
            s["per_prompt"] = [round(x, 4) for x in s["per_prompt"]]
        cell[key] = result
    if validation_length:
        from okd_scale.evaluate import validation_ce

        cell["validation_ce"] = validation_ce(model, tokenizer, args.validation, max_length=validation_length)
    if analysis is not None and Path(model_dir).resolve() != Path(args.teacher).resolve():
        teacher, _ = load_model(args.teacher)
        cell["analysis"] = teacher_forced(model, teacher, tokenizer, analysis,
                                          max_length=_max_length(preset["train"] + args.overrides))
    return cell


def write_cell(cell: dict, cell_file: Path, args) -> dict:
    """Write a cell's JSON, and its answers (if any) beside it as <name>.answers.json.gz, merged into what is there
    (both mirrored); the cell without its answers."""
    answers = cell.pop("answers", None)
    if answers:
        path = cell_file.with_name(cell_file.stem + ".answers.json.gz")
        old = json.loads(gzip.decompress(path.read_bytes())) if path.is_file() else {}
        for key, by_set in answers.items():
            old.setdefault(key, {}).update(by_set)
        path.write_bytes(gzip.compress(json.dumps(old, ensure_ascii=False).encode(), mtime=0))
        _mirror(args, path, "cells")
    cell_file.write_text(json.dumps(cell, indent=1))
    _mirror(args, cell_file, "cells")
    return cell


def git_commit() -> str:
    """The checkout's commit, with "+changes" when its tracked files differ from it."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return (git("rev-parse", "--short=12", "HEAD") or "unknown") + (
        "+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def merged_teacher(out: Path, name: str) -> Path:
    """OUT/runs/<name>/teacher_merged: the teacher with cell <name>'s trained online module folded into its weights
    (okd_scale.convert --model teacher --merge-online-module, fp32, checked by logits); made once, from the run's
    last checkpoint."""
    dst = out / "runs" / name / MERGED_TEACHER
    if not (dst / "config.json").is_file():
        cmd = [sys.executable, "-m", "okd_scale.convert", str(out / "runs" / name), str(dst), "--model", "teacher",
               "--merge-online-module", "--dtype", "fp32", "--overwrite"]
        with open(out / "logs" / f"{name}.log", "a") as log:
            proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(), stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise SystemExit(f"reproduce: merging {name}'s online module into the teacher failed (exit "
                             f"{proc.returncode}); see {out / 'logs' / (name + '.log')}")
    return dst


def select_lr(args, preset: dict, out: Path, sets: dict, ensure_init) -> tuple[list[str], dict]:
    """The preset's learning-rate choice on validation (never on the evaluation sets): each method of its
    ``select_lr`` at each rate of the grid, a short run from the healed student (a cell OUT/cells/lr-<method>-<rate>,
    resumable like the others), scored by the trainer's validation CE on the validation split and ROUGE-L on its
    first rows; ([train.learning_rate=R], the choice), R the rate with the lowest mean validation CE over the
    methods. `ensure_init()` heals the student when a run needs it."""
    spec, seed = {**preset["select_lr"], **({"grid": args.lr_grid} if args.lr_grid else {})}, args.train_seeds[0]
    scores = {}
    for rate in spec["grid"]:
        for method in spec["methods"]:
            name = f"lr-{method}-{rate:g}"
            cell_file = out / "cells" / f"{name}.json"
            if not cell_file.is_file():
                ensure_init()
                cell = {"name": name, "preset": args.preset, "method": method, "seed": seed, "learning_rate": rate,
                        "commit": git_commit()}
                cell["train_s"] = train_cell(name, method, seed, args, preset, out,
                                             [*spec["set"], f"train.learning_rate={rate:g}"])
                run_dir = out / "runs" / name
                cell["validation_ce"] = json.loads((run_dir / "metrics.json").read_text())["eval/student_ce"]
                cell.update(eval_cell(run_dir / "student", {"validation": sets["validation"]}, preset, args))
                write_cell(cell, cell_file, args)
                shutil.rmtree(out / "runs" / name / "checkpoints", ignore_errors=True)
                print(f"learning rate {rate:g}, {method}: validation CE {cell['validation_ce']:.4f}, validation "
                      f"ROUGE-L {cell['eval']['sets']['validation']['rougeL']:.2f} ({cell['train_s']:.0f} s)",
                      flush=True)
            scores[name] = json.loads(cell_file.read_text())
    mean_ce = {rate: statistics.fmean(scores[f"lr-{m}-{rate:g}"]["validation_ce"] for m in spec["methods"])
               for rate in spec["grid"]}
    chosen = min(mean_ce, key=mean_ce.get)
    choice = {"grid": spec["grid"], "methods": spec["methods"], "runs": spec["set"], "mean_validation_ce": mean_ce,
              "chosen": chosen, "cells": {n: {"validation_ce": c["validation_ce"],
                                              "validation_rougeL": c["eval"]["sets"]["validation"]["rougeL"],
                                              "train_s": c["train_s"]} for n, c in scores.items()}}
    return [f"train.learning_rate={chosen:g}"], choice


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def table(cells: dict, sets: list[str], selection: str | None = None) -> tuple[str, dict]:
    """Markdown table and its JSON, one row per model: ROUGE-L per set and its average over the sets (mean ±
    population std over training seeds where a method has several, else over generation seeds), ROUGE-L on
    the validation rows, validation cross-entropy, training wall time and its fraction of sgo's (and the average
    of greedy answers where the protocol samples and the preset asks for both)."""
    groups: dict[str, list[dict]] = {}
    for cell in cells.values():
        groups.setdefault(cell.get("method", cell["name"]), []).append(cell)
    data = {}
    for name, group in groups.items():
        evs = [c["eval"] for c in group]
        row = {}
        for s in sets:
            if len(group) > 1:
                mean, std = _mean_std([e["sets"][s]["rougeL"] for e in evs])
            else:
                mean, std = evs[0]["sets"][s]["rougeL"], evs[0]["sets"][s]["std"]
            row[s] = {"mean": mean, "std": std, "n": evs[0]["sets"][s]["n"]}
        per_seed = [statistics.fmean(e["sets"][s]["rougeL"] for s in sets) for e in evs]
        row["average"], row["average_std"] = _mean_std(per_seed)
        row["per_seed_average"] = per_seed
        row["seeds"] = [c.get("seed") for c in group]
        if selection:
            row["validation_rougeL"] = statistics.fmean(e["sets"][selection]["rougeL"] for e in evs)
        if all("greedy" in c for c in group):
            row["greedy_average"] = statistics.fmean(statistics.fmean(c["greedy"]["sets"][s]["rougeL"] for s in sets)
                                                     for c in group)
        ces = [c["validation_ce"] for c in group if c.get("validation_ce") is not None]
        row["validation_ce"] = statistics.fmean(ces) if ces else None
        times = [c["train_s"] for c in group if c.get("train_s")]
        row["train_s"] = statistics.fmean(times) if times else None
        data[name] = row
    sgo_time = data.get("sgo", {}).get("train_s")
    greedy = all("greedy_average" in row for row in data.values())
    head = ["model", *sets, "average", *(["greedy average"] if greedy else []),
            *(["validation ROUGE-L"] if selection else []), "validation CE",
            "train wall s", "x sgo's time", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in data.items():
        t, ce = row["train_s"], row["validation_ce"]
        lines.append("| " + " | ".join([
            name, *[f"{row[s]['mean']:.2f} ± {row[s]['std']:.2f}" for s in sets],
            f"{row['average']:.2f}" + (f" ± {row['average_std']:.2f}" if len(row["seeds"]) > 1 else ""),
            *([f"{row['greedy_average']:.2f}"] if greedy else []),
            *([f"{row['validation_rougeL']:.2f}"] if selection else []), f"{ce:.3f}" if ce is not None else "-",
            f"{t:.0f}" if t else "-", f"{t / sgo_time:.2f}" if t and sgo_time else "-",
            str(len(row["seeds"])) if row["seeds"][0] is not None else "-"]) + " |")
    return "\n".join(lines), data


def verdict(data: dict) -> list[str]:
    """The proof's two questions in words: do the methods separate (best - worst > 3 x the largest training-seed
    std), and what fraction of the teacher's average ROUGE-L the best student reaches."""
    methods = {k: v for k, v in data.items() if k in METHODS}
    if not methods:
        return []
    best = max(methods, key=lambda k: methods[k]["average"])
    worst = min(methods, key=lambda k: methods[k]["average"])
    spread = methods[best]["average"] - methods[worst]["average"]
    seeded = [v["average_std"] for v in methods.values() if len(v["seeds"]) > 1]
    lines = [f"- best method: {best} ({methods[best]['average']:.2f}); "
             f"worst: {worst} ({methods[worst]['average']:.2f}); spread {spread:.2f}"]
    if seeded:
        std = max(seeded)
        apart = spread > 3 * std
        lines.append(f"- largest training-seed std {std:.2f}: the methods {'separate' if apart else 'do not separate'} "
                     f"(spread {'>' if apart else '<='} 3 x {std:.2f})")
    if data.get("teacher", {}).get("average"):
        lines.append(f"- best student / teacher: {methods[best]['average'] / data['teacher']['average']:.0%} of the "
                     f"teacher's {data['teacher']['average']:.2f}")
    return lines


def cell_plan(args, preset: dict, methods: list[str], cells: dict) -> list[tuple[str, str, int]]:
    """(cell name, method, training seed) in running order: every method at the first seed, then the other
    seeds, for every method or (the preset's ``reseed_top`` k) for the k methods whose first-seed cells score
    best on the validation rows, once those cells are all finished (they decide the ranking), and for the
    methods of ``--reseed`` whatever their rank (they are not ranked); last the preset's ``seeds_for`` (method ->
    its further seeds) unless the seeds were given."""
    more = {m: seeds for m, seeds in preset.get("seeds_for", {}).items() if m in methods and not args.seeds_given}
    name = (lambda m, seed: m) if len(args.train_seeds) == 1 and not more else (lambda m, seed: f"{m}-seed{seed}")
    plan = [(name(m, args.train_seeds[0]), m, args.train_seeds[0]) for m in methods]
    extra = [(name(m, seed), m, seed) for m, seeds in more.items() for seed in seeds]
    top = preset.get("reseed_top")
    if top and not args.all_seeds:
        ranked = [m for m in methods if m not in args.reseed]
        first = [cells.get(c[0]) for c in plan]
        if any(c is None or "validation" not in c["eval"]["sets"] for c in first):
            return plan + extra

        def validation(m):
            return cells[name(m, args.train_seeds[0])]["eval"]["sets"]["validation"]["rougeL"]

        methods = sorted(ranked, key=lambda m: -validation(m))[:top] + [m for m in methods if m in args.reseed]
    return plan + [(name(m, seed), m, seed) for seed in args.train_seeds[1:] for m in methods] + extra


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=tuple(PRESETS), default="cpu-small")
    p.add_argument("--teacher", help="teacher directory (default: the demo teacher)")
    p.add_argument("--student", help="initial student directory (cpu-small: the demo student; the proof presets: "
                                     "the healed student, made when missing)")
    p.add_argument("--train-data", help="training data (cpu-small: the demo train split; proof presets: ShareGPT's)")
    p.add_argument("--data-dir",
                   help="proof presets: where their ShareGPT splits are written (default DEMO_DIR/sharegpt)")
    p.add_argument("--eval-sets", type=lambda s: [x for x in s.split(",") if x],
                   help="comma-separated evaluation files, instead of the preset's")
    p.add_argument("--eval-set", action="append", default=[], type=named_set, metavar="NAME=PATH",
                   help="one more evaluation set in the same format, scored beside the preset's (repeatable); finished "
                        "cells are scored on it from their stored models when those are here")
    p.add_argument("--prompt-format", choices=("chat", "as-is"), help="default: the preset's")
    p.add_argument("--methods", help=f"subset of {','.join(METHODS)} (default: the preset's, else all)")
    p.add_argument("--no-teacher-eval", action="store_true", help="skip the teacher's own row")
    p.add_argument("--nproc", type=int, help="default: the preset's")
    p.add_argument("--steps", type=int, help="override the preset's train.max_steps")
    p.add_argument("--heal-steps", type=int, help="override the proof preset's healing steps")
    p.add_argument("--lr-grid", type=lambda s: [float(x) for x in s.split(",") if x],
                   help="presets that choose the learning rate on validation (cpu-paper): the rates to try, e.g. "
                        "1e-4,5e-5 (default: the preset's)")
    p.add_argument("--eval-examples", type=int, help="override the preset's examples per set")
    p.add_argument("--gen-seeds", type=lambda s: [int(x) for x in s.split(",")], help="generation seeds, e.g. 1,2,3")
    p.add_argument("--train-seeds", type=lambda s: [int(x) for x in s.split(",")],
                   help="training seeds, e.g. 42,43 (default: the preset's, and its further seeds for some methods; "
                        "one cell per method and seed)")
    p.add_argument("--all-seeds", action="store_true", help="every training seed for every method (cpu-proof runs "
                                                             "the later seeds for its best 3 by validation only)")
    p.add_argument("--reseed", type=lambda s: [x for x in s.split(",") if x],
                   help="methods that get every training seed whatever their rank, e.g. an OKD variant chosen by "
                        "cpu-okd-search beside cpu-proof's baselines (the ranking of the others stays theirs)")
    p.add_argument("--seed", type=int, help="one training seed (the same as --train-seeds SEED)")
    p.add_argument("--demo-dir", default=str(ROOT / "demo_out"))
    p.add_argument("--out", help="default: results (cpu-small, gpu-paper) or sweeps/<preset> (proof presets, "
                                 "whose cells/*.json are committed)")
    p.add_argument("--mirror",
                   help="also copy each finished cell and the table into this folder (a device call's $OUT)")
    p.add_argument("overrides", nargs="*", help="more trainer key=value for every method")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    methods = [m for m in args.methods.split(",") if m] if args.methods else preset.get("methods", list(METHODS))
    if unknown := [m for m in methods if m not in METHODS]:
        p.error(f"--methods: unknown {unknown}; expected a subset of {','.join(METHODS)}")
    if args.reseed is None:  # the preset's, for the methods run
        args.reseed = [m for m in preset.get("reseed", []) if m in methods]
    if stray := [m for m in args.reseed if m not in methods]:
        p.error(f"--reseed: {stray} not among the methods run ({','.join(methods)})")
    args.nproc = args.nproc or preset["nproc"]
    args.prompt_format = args.prompt_format or preset["prompt_format"]
    args.seeds_given = args.seed is not None or bool(args.train_seeds)  # then no preset's seeds_for either
    args.train_seeds = [args.seed] if args.seed is not None else args.train_seeds or preset["train_seeds"]
    proof = "heal" in preset
    if not args.teacher or not (proof or (args.student and args.train_data)):
        if args.preset == "gpu-paper":
            p.error("--teacher, --student and --train-data are required for gpu-paper")
        from tools.demo.run import prepare_assets

        demo = Path(args.demo_dir)
        prepare_assets(demo)
        args.teacher = args.teacher or str(demo / "teacher")
        if not proof:
            args.student = args.student or str(demo / "student_init")
            args.train_data = args.train_data or str(demo / "data" / "train.jsonl")
    out = Path(args.out or (ROOT / "sweeps" / args.preset if proof else ROOT / "results"))
    for sub in ("cells", "runs", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    sets = eval_sets(args, preset, out)
    selection, args.validation = None, None
    if proof:
        if args.student:
            p.error(f"--student: the {args.preset} preset heals its own student from the teacher")
        # the init_from preset's folder beside this one's (--out's parent; ROOT/sweeps by default)
        init_dir = out.parent / preset["init_from"] if preset.get("init_from") else out
        args.student = str(init_dir / "student_init")
        data = proof_data(args, preset)
        args.train_data = args.train_data or str(data["train"])
        args.validation = str(data["eval"])
        selection = "validation"
        sets[selection] = validation_set(data["eval"], out / "eval_sets" / "validation.jsonl",
                                         preset["validation_rows"])
    report: dict = {}

    def ensure_init() -> dict:
        """The healed student's report (healing it first when it is missing)."""
        if proof and not report:
            report.update(init_cell(args, preset, data, out))
        return report

    extra, choice = [], None
    if preset.get("select_lr"):
        extra, choice = select_lr(args, preset, out, sets, ensure_init)
        print(f"learning rate chosen on validation: {choice['chosen']:g} (mean validation CE "
              + ", ".join(f"{r:g}: {ce:.4f}" for r, ce in choice["mean_validation_ce"].items()) + ")", flush=True)
    cells = run_cells(args, preset, methods, sets, out, ensure_init, extra)
    write_table(args, preset, out, cells, sets, selection, choice)
    return 0


def run_cells(args, preset: dict, methods: list[str], sets: dict, out: Path, ensure_init,
              extra: list[str]) -> dict:
    """Every cell of the plan, the finished ones read back (and scored on any --eval-set they lack), the others
    trained (with `extra` overrides) and evaluated one at a time, each written as it finishes; name -> cell, in the
    plan's order."""
    clock, cells, proof, announced = time.perf_counter(), {}, "heal" in preset, False
    analysis = sets.get("validation") if preset.get("analysis") else None
    while True:  # a second pass when the plan grows (the later seeds, once the first seed's cells are in)
        plan = cell_plan(args, preset, methods, cells)
        names = (["teacher"] if not args.no_teacher_eval else []) + (["init"] if proof else []) + [c[0] for c in plan]
        if all(n in cells for n in names):
            return {n: cells[n] for n in names}
        spec = {c[0]: c[1:] for c in plan}
        for i, name in enumerate(names, 1):
            if name in cells:
                continue
            cell_file = out / "cells" / f"{name}.json"
            if cell_file.is_file():
                cells[name] = rescore(json.loads(cell_file.read_text()), cell_file, sets, preset, args, out)
                print(f"[{i}/{len(names)}] {name}: done before, skipped", flush=True)
                continue
            start = time.perf_counter()
            cell = {"name": name, "preset": args.preset, "commit": git_commit()}
            if name != "teacher" and proof:
                report = ensure_init()
                if not announced:
                    healed = report["validation_ce"][str(report["best_step"])]
                    before = cells.get("init", {}).get("validation_ce")  # a committed init cell, healed elsewhere
                    print(f"healed student {args.student}: validation CE {report['pruned_validation_ce']:.3f} "
                          f"(pruned) -> {healed:.3f} at step {report['best_step']}"
                          + (f"; the committed init cell had {before:.3f}" if before is not None else ""), flush=True)
                    announced = True
            if name == "teacher":
                model_dir = Path(args.teacher)
            elif name == "init":
                cell["heal"] = ensure_init()
                cell["validation_ce"] = cell["heal"]["validation_ce"][str(cell["heal"]["best_step"])]
                model_dir = Path(args.student)
            else:
                model_dir = train_method_cell(name, *spec[name], plan, cell, args, preset, out, extra)
            length = _max_length(preset["train"] + args.overrides) if name == "teacher" and args.validation else None
            cell.update(eval_cell(model_dir, sets, preset, args, validation_length=length, analysis=analysis))
            write_cell(cell, cell_file, args)
            if name in spec:  # the exported student stays; its training state is not needed once the cell is in
                shutil.rmtree(out / "runs" / name / "checkpoints", ignore_errors=True)
            cells[name] = cell
            trained = f", trained in {cell['train_s']:.0f} s" if "train_s" in cell else ""
            print(f"[{i}/{len(names)}] {name}: ROUGE-L average {cell['eval']['average']:.2f}{trained}"
                  f" ({time.perf_counter() - start:.0f} s for the cell, {time.perf_counter() - clock:.0f} s so far)",
                  flush=True)


def train_method_cell(name: str, method: str, seed: int, plan: list, cell: dict, args, preset: dict, out: Path,
                      extra: list[str]) -> Path:
    """Train cell `name` (its teacher merged from its TEACHER_FROM source cell of the same seed, when it has one;
    a source cell's merged teacher made before its checkpoints go) and fill its training entries; its student."""
    cell["method"], cell["seed"] = method, seed
    more = list(extra)
    if method in TEACHER_FROM:
        source = next(n for n, m, s in plan if m == TEACHER_FROM[method] and s == seed)
        teacher = out / "runs" / source / MERGED_TEACHER
        if not (teacher / "config.json").is_file():
            raise SystemExit(f"reproduce: {name} learns from {source}'s teacher, and {teacher} is missing (the cell "
                             f"was made elsewhere): delete {out / 'cells' / (source + '.json')} to train it again")
        more.append(f"model.teacher={teacher}")
        cell["teacher"] = f"{args.teacher} with {source}'s online module merged"
    cell["train_s"] = train_cell(name, method, seed, args, preset, out, more)
    run_dir = out / "runs" / name
    if method in TEACHER_FROM.values():
        merged_teacher(out, name)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cell["validation_ce"] = metrics.get("eval/student_ce")
    cell["steps"] = metrics.get("step")
    return run_dir / "student"


def rescore(cell: dict, cell_file: Path, sets: dict, preset: dict, args, out: Path) -> dict:
    """A finished cell, scored on the --eval-set sets it lacks (from its stored model, rewritten) when that model is
    here; else as it is."""
    missing = {n: sets[n] for n in args.extra_sets if n not in cell["eval"]["sets"]}
    if not missing:
        return cell
    name = cell["name"]
    model_dir = {"teacher": Path(args.teacher), "init": Path(args.student or "")}.get(name,
                                                                                    out / "runs" / name / "student")
    if not (model_dir / "config.json").is_file():
        print(f"{name}: not scored on {', '.join(missing)}: its model {model_dir} is not here", flush=True)
        return cell
    more = eval_cell(model_dir, missing, preset, args)
    cell["answers"] = more.pop("answers")
    for key in ("eval", "greedy"):
        if key in cell and key in more:
            cell[key]["sets"].update(more[key]["sets"])
            cell[key]["average"] = statistics.fmean(v["rougeL"] for v in cell[key]["sets"].values())
    return write_cell(cell, cell_file, args)


def write_table(args, preset: dict, out: Path, cells: dict, sets: dict, selection: str | None,
                choice: dict | None) -> None:
    """OUT/TABLE.md and OUT/table.json: the ROUGE-L table and its verdict; where the preset names a baseline, each
    method's paired difference to it; the teacher-forced analysis, the learning-rate choice, each cell's training
    seconds and the commits the cells ran at, where there are any."""
    test_sets = [s for s in sets if s != selection] or [selection]  # cpu-okd-search: the validation rows alone
    text, rows = table(cells, test_sets, selection)
    findings = verdict(rows)
    seeds = preset["eval"]["seeds"] if not args.gen_seeds else args.gen_seeds
    protocol = ("greedy" if not preset["eval"].get("do_sample")
                else f"sampled at temperature {preset['eval'].get('temperature', 1.0)}, generation seeds {seeds}")
    commits = sorted({c["commit"] for c in cells.values() if c.get("commit")})
    header = (f"# {args.preset}: ROUGE-L (F x100, {protocol}; ± is the population std over training seeds where "
              f"a method has several, else over generation seeds)\n\n"
              f"teacher {args.teacher}, student {args.student}, data {args.train_data}, {args.nproc} processes, "
              f"training seeds {args.train_seeds}, trainer overrides {' '.join(preset['train'] + args.overrides)}"
              + (f", learning rate {choice['chosen']:g} (chosen on validation, below)" if choice else "")
              + (f"; cells run at commit {', '.join(commits)}" if commits else "") + "\n\n")
    sections = [text, "\n".join(findings) if findings else ""]
    extra = {"findings": findings}
    baseline = preset.get("baseline")
    if baseline:
        paired, extra["paired"] = paired_section(cells, test_sets, baseline)
        sections.append(paired)
    if preset.get("analysis"):
        sections.append(analysis_table(cells))
    if choice:
        extra["learning_rate"] = choice
        sections.append(lr_table(choice))
    trained = [f"{n} {c['train_s']:.0f}" for n, c in cells.items() if c.get("train_s")]
    if trained:
        sections.append("Training seconds per cell: " + ", ".join(trained))
    body = "\n\n".join(x for x in sections if x)
    (out / "TABLE.md").write_text(header + body + "\n")
    (out / "table.json").write_text(json.dumps({"preset": args.preset, "sets": test_sets, "selection": selection,
                                                "rows": rows, **extra}, indent=1))
    for name in ("TABLE.md", "table.json"):
        _mirror(args, out / name)
    print("\n" + body)


def paired_section(cells: dict, test_sets: list[str], baseline: str) -> tuple[str, dict]:
    """(markdown, numbers) of each method's paired per-prompt difference to `baseline` (tools/proof/stats.py)."""
    from tools.proof import stats

    groups: dict[str, list[dict]] = {}
    for c in cells.values():
        if c.get("method"):
            groups.setdefault(c["method"], []).append(c)
    if baseline not in groups or len(groups) < 2:
        return "", {}
    try:
        results = stats.compare(groups, baseline, test_sets)
    except ValueError as e:
        return f"No paired comparison: {e}.", {}
    text = (f"## Paired differences to {baseline} (ROUGE-L per prompt, seeds pooled; 95% bootstrap over prompts)\n\n"
            + stats.paired_table(results, baseline, test_sets) + "\n\n"
            + "\n".join(stats.verdict_lines(results, baseline)))
    return text, {m: {s: vars(p) for s, p in r.items()} for m, r in results.items()}


def analysis_table(cells: dict) -> str:
    """Markdown: per model (seeds pooled by the mean), the teacher-forced analysis on the validation rows: CE, and per
    tercile of the original teacher's uncertainty the top-1 agreement with it, KL(pT || pS) and the std of the
    student's logits."""
    from okd_scale.evaluate import TERCILES

    groups: dict[str, list[dict]] = {}
    for c in cells.values():
        if c.get("analysis"):
            groups.setdefault(c.get("method", c["name"]), []).append(c["analysis"])
    if not groups:
        return ""
    head = ["model", "CE", *[f"{t} {k}" for t in TERCILES for k in ("agreement", "KL", "logit std")]]
    lines = ["## Teacher-forced, on the validation rows, against the original teacher (terciles of its uncertainty "
             "1 - pT(y))", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, group in groups.items():
        def mean(f):
            return statistics.fmean(f(a) for a in group)
        lines.append("| " + " | ".join([name, f"{mean(lambda a: a['ce']):.4f}", *[
            f"{mean(lambda a: a['terciles'][t][k]):.4f}" for t in TERCILES for k in ("agreement", "kl", "logit_std")]])
            + " |")
    return "\n".join(lines)


def lr_table(choice: dict) -> str:
    """Markdown: the learning-rate runs and the choice."""
    lines = [f"## Learning rate, chosen on validation ({', '.join(choice['methods'])}; {' '.join(choice['runs'])})",
             "", "| run | validation CE | validation ROUGE-L | train s |", "|---|---|---|---|"]
    lines += [f"| {n} | {c['validation_ce']:.4f} | {c['validation_rougeL']:.2f} | {c['train_s']:.0f} |"
              for n, c in choice["cells"].items()]
    lines += ["", "Mean validation CE per rate: " + ", ".join(f"{r:g} {ce:.4f}" for r, ce in
                                                              choice["mean_validation_ce"].items())
              + f"; chosen {choice['chosen']:g}"]
    return "\n".join(lines)


def _mirror(args, path: Path, sub: str = "") -> None:
    if args.mirror:
        (Path(args.mirror) / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(args.mirror) / sub / path.name)


def _max_length(overrides: list[str]) -> int:
    """The cells' data.max_length: the last such override."""
    return int([x for x in overrides if x.startswith("data.max_length=")][-1].split("=")[1])


if __name__ == "__main__":
    sys.exit(main())
