"""One cell of a sweep (tools/proof/reproduce.py): a method trained from the preset's student and evaluated, or a
model only evaluated; each written as OUT/cells/<name>.json with its answers beside it."""
from __future__ import annotations

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
from tools.proof import experiments

MERGED_TEACHER = "teacher_merged"  # in OUT/runs/<source cell>/


def git_commit() -> str:
    """The checkout's commit, with "+changes" when its tracked files differ from it."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return (git("rev-parse", "--short=12", "HEAD") or "unknown") + (
        "+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def _child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def train_cell(name: str, method: str, seed: int, args, preset: dict, out: Path, extra: list[str] = ()) -> float:
    """Train one method into OUT/runs/<name> (resuming a half-finished run), with `extra` overrides after the
    method's; wall seconds of this call."""
    run_dir = out / "runs" / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           str(ROOT / "okd_scale" / "train.py"), "--config", str(ROOT / preset["config"]),
           f"model.teacher={args.teacher}", f"model.student={args.student}", f"data.train_file={args.train_data}",
           f"output_dir={run_dir}", f"seed={seed}", *preset["train"], *experiments.variants()[method]["set"], *extra,
           *args.overrides]
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
    from okd_scale.evaluate import evaluate_model, load_model, teacher_forced, validation_ce  # torch: not for --help

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
        cell["validation_ce"] = validation_ce(model, tokenizer, args.validation, max_length=validation_length)
    if analysis is not None and Path(model_dir).resolve() != Path(args.teacher).resolve():
        teacher, _ = load_model(args.teacher)
        cell["analysis"] = teacher_forced(model, teacher, tokenizer, analysis,
                                          max_length=max_length(preset["train"] + args.overrides))
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
        mirror(args, path, "cells")
    cell_file.write_text(json.dumps(cell, indent=1))
    mirror(args, cell_file, "cells")
    return cell


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


def train_method_cell(name: str, method: str, seed: int, plan: list, cell: dict, args, preset: dict, out: Path,
                      extra: list[str]) -> Path:
    """Train cell `name` (its teacher merged from its teacher_from source cell of the same seed, when it has one;
    a source cell's merged teacher made before its checkpoints go) and fill its training entries; its student."""
    cell["method"], cell["seed"] = method, seed
    more = list(extra)
    if source_method := experiments.variants()[method].get("teacher_from"):
        source = next(n for n, m, s in plan if m == source_method and s == seed)
        teacher = out / "runs" / source / MERGED_TEACHER
        if not (teacher / "config.json").is_file():
            raise SystemExit(f"reproduce: {name} learns from {source}'s teacher, and {teacher} is missing (the cell "
                             f"was made elsewhere): delete {out / 'cells' / (source + '.json')} to train it again")
        more.append(f"model.teacher={teacher}")
        cell["teacher"] = f"{args.teacher} with {source}'s online module merged"
    cell["train_s"] = train_cell(name, method, seed, args, preset, out, more)
    run_dir = out / "runs" / name
    if method in experiments.teacher_sources():
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


def mirror(args, path: Path, sub: str = "") -> None:
    if args.mirror:
        (Path(args.mirror) / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(args.mirror) / sub / path.name)


def max_length(overrides: list[str]) -> int:
    """The cells' data.max_length: the last such override."""
    return int([x for x in overrides if x.startswith("data.max_length=")][-1].split("=")[1])

