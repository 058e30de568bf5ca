"""The paper's main comparison on one shared budget: a preset's method cells, trained and evaluated alike.

    python -m tools.proof.reproduce --preset cpu-small                 # the demo pair on this machine
    python -m tools.proof.reproduce --preset gpu-paper --teacher T --student S --train-data dolly_train.jsonl
    python -m tools.proof.reproduce --preset cpu-small --methods sft,okd --steps 20 --out results_quick

The presets and the method cells (variants: sft, kd with forward, reverse and skew KL, taid, sgo, the paper's okd
and its ablations, the earlier OKD variants by name) are YAML files under configs/experiments/ (tools/proof/
experiments.py). This module runs them; tools/proof/cells.py trains and evaluates one cell, tools/proof/table.py
writes the tables, tools/proof/stats.py gives the paired intervals.

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
import shutil
import sys
import time
from pathlib import Path

from tools import ROOT
from tools.proof import experiments
from tools.proof.cells import (eval_cell, git_commit, init_cell, max_length, rescore, select_lr, train_method_cell,
                               write_cell)
from tools.proof.table import write_table

SHARED_EVAL = ROOT.parent / "shared" / "data" / "eval"


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


def parser(presets: dict, variants: dict) -> argparse.ArgumentParser:
    """reproduce.py's command line, its choices from the experiment files."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=tuple(presets), default="cpu-small",
                   help="configs/experiments/presets/NAME.yaml: its 'about' says what it runs")
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
    p.add_argument("--methods", help=f"subset of {','.join(variants)} (configs/experiments/variants; default: the "
                        "preset's)")
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
    return p


def settle_args(p: argparse.ArgumentParser, args, preset: dict, variants: dict) -> list[str]:
    """Fill the run's settings the command line left to the preset (methods, reseed, nproc, prompt format, training
    seeds, the demo's teacher, student and data where needed); the methods to run."""
    methods = [m for m in args.methods.split(",") if m] if args.methods else preset["methods"]
    if unknown := [m for m in methods if m not in variants]:
        p.error(f"--methods: unknown {unknown}; expected a subset of {','.join(variants)}")
    if args.reseed is None:  # the preset's, for the methods run
        args.reseed = [m for m in preset.get("reseed") or [] if m in methods]
    if stray := [m for m in args.reseed if m not in methods]:
        p.error(f"--reseed: {stray} not among the methods run ({','.join(methods)})")
    args.nproc = args.nproc or preset["nproc"]
    args.prompt_format = args.prompt_format or preset["prompt_format"]
    args.seeds_given = args.seed is not None or bool(args.train_seeds)  # then no preset's seeds_for either
    args.train_seeds = [args.seed] if args.seed is not None else args.train_seeds or preset["train_seeds"]
    proof = "heal" in preset
    if proof and args.student:
        p.error(f"--student: the {args.preset} preset heals its own student from the teacher")
    if not args.teacher or not (proof or (args.student and args.train_data)):
        if args.preset == "gpu-paper":
            p.error("--teacher, --student and --train-data are required for gpu-paper")
        from tools.demo.run import prepare_assets  # the demo's assets: only when a path is left to them

        demo = Path(args.demo_dir)
        prepare_assets(demo)
        args.teacher = args.teacher or str(demo / "teacher")
        if not proof:
            args.student = args.student or str(demo / "student_init")
            args.train_data = args.train_data or str(demo / "data" / "train.jsonl")
    return methods


def main(argv=None) -> int:
    try:
        presets, variants = experiments.presets(), experiments.variants()
    except experiments.ExperimentError as e:
        print(f"reproduce: {e}", file=sys.stderr)
        return 2
    p = parser(presets, variants)
    args = p.parse_args(argv)
    preset = presets[args.preset]
    methods = settle_args(p, args, preset, variants)
    proof = "heal" in preset
    out = Path(args.out or (ROOT / "sweeps" / args.preset if proof else ROOT / "results"))
    for sub in ("cells", "runs", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    sets = eval_sets(args, preset, out)
    selection, args.validation, data = None, None, None
    if proof:
        # the init_from preset's folder beside this one's (--out's parent; ROOT/sweeps by default)
        args.student = str((out.parent / preset["init_from"] if preset.get("init_from") else out) / "student_init")
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
            length = max_length(preset["train"] + args.overrides) if name == "teacher" and args.validation else None
            cell.update(eval_cell(model_dir, sets, preset, args, validation_length=length, analysis=analysis))
            write_cell(cell, cell_file, args)
            if name in spec:  # the exported student stays; its training state is not needed once the cell is in
                shutil.rmtree(out / "runs" / name / "checkpoints", ignore_errors=True)
            cells[name] = cell
            trained = f", trained in {cell['train_s']:.0f} s" if "train_s" in cell else ""
            print(f"[{i}/{len(names)}] {name}: ROUGE-L average {cell['eval']['average']:.2f}{trained}"
                  f" ({time.perf_counter() - start:.0f} s for the cell, {time.perf_counter() - clock:.0f} s so far)",
                  flush=True)


if __name__ == "__main__":
    sys.exit(main())
