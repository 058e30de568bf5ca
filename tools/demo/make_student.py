#!/usr/bin/env python
"""Build a student model directory from a teacher directory.

    python -m tools.demo.make_student TEACHER_DIR OUT_DIR [--keep-every 5 | --keep-layers 0,5,10,...]
        [--fresh [--num-layers N] [--hidden-size H] [--intermediate-size I] [--num-heads A] [--num-kv-heads K]]
        [--seed S] [--overwrite]

Layer-dropping (default): the student keeps teacher blocks 0, k, 2k, ... (every k-th block counted
from block 0, k = --keep-every, default 5: 30 blocks -> 0,5,10,15,20,25), or exactly the blocks
given by --keep-layers (strictly increasing, 0-based). Embeddings, the final norm and lm_head are
copied as they are; the kept blocks are copied tensor for tensor and renumbered 0..n-1 (the student
is built from its own config, so every attention module knows its new layer index). The config
gets the new num_hidden_layers (and layer_types, where the config has it, restricted to the kept
blocks).

--fresh: a randomly initialised model of the same architecture (same config class) and the
teacher's vocabulary, with the given sizes (each defaults to the teacher's value); --seed seeds
the initialisation.

Both modes save the teacher's tokenizer (with its chat template), a generation_config and
safetensors weights in the teacher's dtype. Llama-family models (model.model.layers) are supported.

Healing (--heal-train FILE --heal-eval FILE): a pruned student is random text until trained, so the
student built above is then trained with okd_scale itself (`sft`, or `kd` with forward KL from the teacher:
--heal-method) on FILE for --heal-steps steps, its validation loss measured on --heal-eval every
--heal-eval-every steps (every evaluation a checkpoint, `train.keep_best`), and the checkpoint with the
lowest validation loss becomes OUT_DIR (the unhealed student is kept as OUT_DIR.pruned). OUT_DIR/heal_report.json
holds the validation cross-entropy of the pruned student, of every evaluated step and of the teacher, the
best step and the wall time. Use training data the later comparison does not use. Extra trainer settings:
--heal-set key=value (repeatable), e.g. --heal-set train.bf16=true; the method, paths, steps and checkpoint
settings of the healing are its own and a --heal-set of those keys is overridden.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from okd_scale.checkpoint import OutputDirError, check_output_dir, staged_dir
from tools import ROOT

FRESH_KEYS = {  # CLI name -> config attribute
    "num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
}


class MakeStudentError(RuntimeError):
    pass


def default_keep_layers(num_layers: int, keep_every: int = 5) -> list[int]:
    """Blocks 0, k, 2k, ... below num_layers."""
    if keep_every < 1:
        raise MakeStudentError(f"keep_every must be >= 1, got {keep_every}")
    return list(range(0, num_layers, keep_every))


def _check_keep(keep: list[int], num_layers: int) -> list[int]:
    keep = [int(i) for i in keep]
    if not keep:
        raise MakeStudentError("keep_layers is empty: the student needs at least one block")
    bad = [i for i in keep if not 0 <= i < num_layers]
    if bad:
        raise MakeStudentError(f"keep_layers {bad} out of range: the teacher has blocks 0..{num_layers - 1}")
    if any(b <= a for a, b in zip(keep, keep[1:])):
        raise MakeStudentError(f"keep_layers must be strictly increasing (no repeats), got {keep}")
    return keep


def _copy_config(cfg):
    new = cfg.__class__.from_dict(cfg.to_dict())
    if getattr(new, "quantization_config", None) is not None:
        del new.quantization_config
    return new


def _layers(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise MakeStudentError(f"{type(model).__name__} has no model.layers: only Llama-family models are supported")
    return layers


def _fresh_config(tcfg, fresh: dict):
    unknown = set(fresh) - set(FRESH_KEYS) - set(FRESH_KEYS.values())
    if unknown:
        raise MakeStudentError(f"unknown --fresh size keys {sorted(unknown)}; known: {sorted(FRESH_KEYS)}")
    cfg = _copy_config(tcfg)
    for k, v in fresh.items():
        if v is not None:
            setattr(cfg, FRESH_KEYS.get(k, k), int(v))
    h, a = cfg.hidden_size, cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or a
    if h % a:
        raise MakeStudentError(f"hidden_size {h} is not divisible by num_attention_heads {a}")
    if a % kv:
        raise MakeStudentError(f"num_attention_heads {a} is not divisible by num_key_value_heads {kv}")
    if kv > a:
        raise MakeStudentError(f"num_key_value_heads {kv} > num_attention_heads {a}")
    if hasattr(cfg, "head_dim"):
        cfg.head_dim = h // a
    n = cfg.num_hidden_layers
    if getattr(tcfg, "layer_types", None):
        cfg.layer_types = [tcfg.layer_types[i % len(tcfg.layer_types)] for i in range(n)]
    return cfg


def _teacher_files(teacher_dir: Path, log):
    """(tokenizer, config, generation config) of the teacher; the generation config from its config where it has
    none."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig  # heavy: imported when building

    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    if not getattr(tokenizer, "chat_template", None):
        log(f"warning: the teacher tokenizer in {teacher_dir} has no chat template")
    tcfg = AutoConfig.from_pretrained(str(teacher_dir))
    try:
        gen = GenerationConfig.from_pretrained(str(teacher_dir))
    except OSError:
        gen = GenerationConfig(bos_token_id=tcfg.bos_token_id, eos_token_id=tcfg.eos_token_id,
                               pad_token_id=getattr(tcfg, "pad_token_id", None))
    return tokenizer, tcfg, gen


def _fresh_student(tcfg, fresh: dict, seed: int):
    """A model of the teacher's architecture at the ``fresh`` sizes, initialised with ``seed``, in the teacher's
    dtype."""
    import torch  # heavy: imported when building
    from transformers import AutoModelForCausalLM

    cfg = _fresh_config(tcfg, fresh)
    torch.manual_seed(seed)
    dtype = getattr(tcfg, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def _renumbered(state: dict, kept: list[int]) -> dict:
    """``state`` without the blocks that are not in ``kept``, the kept ones renumbered 0..n-1."""
    new_index = {old: new for new, old in enumerate(kept)}
    pat = re.compile(r"^(model\.layers\.)(\d+)(\..*)$")
    sd = {}
    for k, v in state.items():
        m = pat.match(k)
        if m:
            old = int(m.group(2))
            if old not in new_index:
                continue
            k = f"{m.group(1)}{new_index[old]}{m.group(3)}"
        sd[k] = v
    return sd


def _pruned_student(teacher_dir: Path, keep_layers: list[int] | None, keep_every: int, seed: int):
    """(student, the teacher blocks it keeps): the teacher with only the blocks ``keep_layers`` (default every
    ``keep_every``-th), renumbered; embeddings, final norm and lm_head as they are."""
    import torch  # heavy: imported when building
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype="auto")
    n_teacher = len(_layers(teacher))
    kept = _check_keep(keep_layers if keep_layers is not None else default_keep_layers(n_teacher, keep_every),
                       n_teacher)
    cfg = _copy_config(teacher.config)
    cfg.num_hidden_layers = len(kept)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [teacher.config.layer_types[i] for i in kept]
    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_config(cfg, dtype=teacher.dtype)
    missing, unexpected = student.load_state_dict(_renumbered(teacher.state_dict(), kept), strict=False)
    tied_ok = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    if set(missing) - tied_ok or set(unexpected) - tied_ok:
        raise MakeStudentError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if getattr(cfg, "tie_word_embeddings", False):
        student.tie_weights()
    return student, kept


def _save_student(student, gen, tokenizer, out_dir: Path) -> None:
    """Run ``student`` once on a few tokens, then write it with ``gen`` and ``tokenizer`` to ``out_dir`` (staged:
    nothing lands there unless everything was written)."""
    import torch  # heavy: imported when building

    student.eval()
    student.generation_config = gen
    with torch.no_grad():  # smoke test before anything lands on disk
        student(input_ids=torch.tensor([[tokenizer.eos_token_id or 0, 1, 2]]))

    with staged_dir(out_dir) as tmp:
        student.save_pretrained(str(tmp), safe_serialization=True)
        gen.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))


def make_student(teacher_dir: str | Path, out_dir: str | Path, keep_layers: list[int] | None = None,
                 keep_every: int = 5, fresh: dict | None = None, seed: int = 0, overwrite: bool = False,
                 verbose: bool = True) -> list[int]:
    """Write a student to ``out_dir``; returns the teacher block indices it keeps ([] for ``fresh``).

    ``fresh``: None for layer dropping, else a dict of sizes (keys num_layers/hidden_size/
    intermediate_size/num_heads/num_kv_heads or the config attribute names; missing = teacher's)."""
    log = print if verbose else (lambda *a, **k: None)
    teacher_dir = Path(teacher_dir)
    if not (teacher_dir / "config.json").is_file():
        raise MakeStudentError(f"teacher directory {teacher_dir} has no config.json (not a Hugging Face model dir)")
    out_dir = Path(out_dir).resolve()
    if out_dir == teacher_dir.resolve():
        raise MakeStudentError("OUT_DIR must differ from TEACHER_DIR")
    if fresh is not None and keep_layers is not None:
        raise MakeStudentError("--fresh and --keep-layers are exclusive")
    check_output_dir(out_dir, overwrite)

    tokenizer, tcfg, gen = _teacher_files(teacher_dir, log)
    if fresh is not None:
        student, kept = _fresh_student(tcfg, fresh, seed), []
    else:
        student, kept = _pruned_student(teacher_dir, keep_layers, keep_every, seed)
    _save_student(student, gen, tokenizer, out_dir)
    cfg = student.config
    n_params = sum(p.numel() for p in student.parameters())
    what = f"fresh (seed {seed})" if fresh is not None else f"kept teacher blocks {kept}"
    log(f"OK {out_dir}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
        f"{n_params} params, {what}")
    return kept


HEAL_METHODS = {"kd": ["method=kd", "loss.divergence=fkl"], "sft": ["method=sft"]}


def heal(student_dir: str | Path, out_dir: str | Path, *, teacher_dir: str | Path, train_file: str | Path,
         eval_file: str | Path, method: str = "sft", steps: int = 240, eval_every: int = 40, nproc: int = 1,
         config: str | Path = ROOT / "configs" / "demo.yaml", overrides: list[str] = (),
         work_dir: str | Path | None = None, overwrite: bool = False) -> dict:
    """Train the student at ``student_dir`` with okd_scale (``method``: kd with forward KL, or sft) and write
    the checkpoint with the lowest validation loss on ``eval_file`` to ``out_dir`` (a Hugging Face directory);
    returns the report also written to out_dir/heal_report.json."""
    # heavy (torch): imported when healing
    from okd_scale.convert import convert
    from okd_scale.evaluate import load_model, validation_ce

    if method not in HEAL_METHODS:
        raise MakeStudentError(f"--heal-method must be one of {', '.join(HEAL_METHODS)}, got {method!r}")
    if eval_every < 1 or steps < eval_every:
        raise MakeStudentError(f"--heal-eval-every must be in [1, --heal-steps], got {eval_every} for {steps} steps")
    for flag, path in (("--heal-train", train_file), ("--heal-eval", eval_file)):
        if not Path(path).is_file():
            raise MakeStudentError(f"{flag}: file not found: {path}")
    try:
        check_output_dir(out_dir, overwrite)
    except OutputDirError as e:
        raise MakeStudentError(str(e)) from None
    work = Path(work_dir or f"{out_dir}.heal")
    clock = time.perf_counter()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "okd_scale" / "train.py"), "--config", str(config), *overrides, *HEAL_METHODS[method],
           f"model.teacher={teacher_dir}", f"model.student={student_dir}", f"data.train_file={train_file}",
           f"data.eval_file={eval_file}", "data.eval_rouge_examples=0", f"output_dir={work}",
           f"train.max_steps={steps}", f"train.eval_every={eval_every}", f"train.save_every={eval_every}",
           "train.keep_best=true", "train.keep_last=1"]  # the healing's own settings win over ``overrides``
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    if subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0:
        raise MakeStudentError(f"healing failed: the training run in {work} exited non-zero (its log is above)")
    rows = [json.loads(line) for line in (work / "log_history.jsonl").read_text().splitlines()]
    metrics = json.loads((work / "metrics.json").read_text())
    evaluated = {r["step"]: r["eval/student_ce"] for r in rows if "eval/student_ce" in r}
    evaluated[steps] = metrics["eval/student_ce"]
    best = min(evaluated, key=lambda s: (evaluated[s], s))
    convert(work / "checkpoints", out_dir, tag=f"global_step{best}", dtype="fp32", overwrite=overwrite)
    import yaml

    max_length = yaml.safe_load((work / "run_config.yaml").read_text())["data"]["max_length"]
    model, tokenizer = load_model(student_dir)
    pruned_ce = validation_ce(model, tokenizer, eval_file, max_length=max_length)
    teacher_ce = metrics.get("eval/teacher_ce")
    if teacher_ce is None:  # sft never loads the teacher
        model, tokenizer = load_model(teacher_dir)
        teacher_ce = validation_ce(model, tokenizer, eval_file, max_length=max_length)
    del model
    report = {"method": method, "steps": steps, "best_step": best, "validation_ce": evaluated,
              "pruned_validation_ce": pruned_ce, "teacher_validation_ce": teacher_ce,
              "seconds": time.perf_counter() - clock, "train_file": str(train_file), "eval_file": str(eval_file),
              "command": cmd}
    (Path(out_dir) / "heal_report.json").write_text(json.dumps(report, indent=1))
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    return report


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("teacher_dir")
    ap.add_argument("out_dir")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--keep-every", type=int, default=5, help="keep blocks 0, k, 2k, ... (default 5)")
    g.add_argument("--keep-layers", type=_int_list, default=None, help="comma-separated 0-based block indices")
    ap.add_argument("--fresh", action="store_true", help="random init at the sizes below (teacher's by default)")
    ap.add_argument("--num-layers", type=int)
    ap.add_argument("--hidden-size", type=int)
    ap.add_argument("--intermediate-size", type=int)
    ap.add_argument("--num-heads", type=int)
    ap.add_argument("--num-kv-heads", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    h = ap.add_argument_group("healing (train the built student before use; see above)")
    h.add_argument("--heal-train", help="training data for healing (not the comparison's)")
    h.add_argument("--heal-eval", help="validation data: the best checkpoint by its loss is kept")
    h.add_argument("--heal-method", choices=tuple(HEAL_METHODS), default="sft",
                   help="sft (default: faster per second on the demo pair, docs/results.md) or kd (forward KL)")
    h.add_argument("--heal-steps", type=int, default=240)
    h.add_argument("--heal-eval-every", type=int, default=40)
    h.add_argument("--heal-nproc", type=int, default=1)
    h.add_argument("--heal-set", action="append", default=[], metavar="KEY=VALUE", help="a trainer setting")
    args = ap.parse_args(argv)
    if bool(args.heal_train) != bool(args.heal_eval):
        ap.error("--heal-train and --heal-eval go together")
    sizes = {k: getattr(args, k) for k in FRESH_KEYS}
    if not args.fresh and any(v is not None for v in sizes.values()):
        ap.error("--num-layers/--hidden-size/--intermediate-size/--num-heads/--num-kv-heads need --fresh")
    if args.fresh and args.keep_layers is not None:
        ap.error("--fresh and --keep-layers are exclusive")
    built = f"{args.out_dir}.pruned" if args.heal_train else args.out_dir
    try:
        make_student(args.teacher_dir, built, keep_layers=args.keep_layers, keep_every=args.keep_every,
                     fresh={k: v for k, v in sizes.items() if v is not None} if args.fresh else None,
                     seed=args.seed, overwrite=args.overwrite)
        if args.heal_train:
            report = heal(built, args.out_dir, teacher_dir=args.teacher_dir, train_file=args.heal_train,
                          eval_file=args.heal_eval, method=args.heal_method, steps=args.heal_steps,
                          eval_every=args.heal_eval_every, nproc=args.heal_nproc, overrides=args.heal_set,
                          overwrite=args.overwrite)
            print(f"make_student: healed: validation CE {report['pruned_validation_ce']:.3f} (pruned) -> "
                  f"{report['validation_ce'][report['best_step']]:.3f} at step {report['best_step']} (teacher "
                  f"{report['teacher_validation_ce']:.3f}); {args.out_dir}")
    except (MakeStudentError, OutputDirError) as e:
        print(f"make_student: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
