"""Generation + ROUGE-L on instruction-following sets (MiniLLM/DistiLLM format).

    python -m okd_scale.evaluate --model DIR --data FILE [--data FILE2 ...] [--max-examples N]
        [--max-new-tokens 128] [--do-sample --temperature 1.0 --top-p 1.0] [--seeds 1,2,3]
        [--batch-size 8] [--dtype float32|bfloat16] [--device cpu] [--out-json PATH] [--out-md PATH] [--name LABEL]

Data: one JSON object a line with ``prompt`` (used verbatim; rows without it but with ``instruction``
/ ``input`` get the Alpaca-style prompt of those sets) and ``output`` (a reference string or a list
of references). Prompts are tokenized without special tokens, as the trainer does (okd_scale.data),
left-padded, and generated from with ``model.generate`` (greedy by default; sampling uses
temperature / top_p with top_k disabled), seeded with ``transformers.set_seed(seed)`` per seed,
stopping at eos. Only the explicitly given generation settings apply (a fresh GenerationConfig, not
the model's defaults), so models are compared under the same decoding. The model runs on DeepSpeed's
accelerator (its current device: the GPU where there is one; ``--device cpu`` keeps it on the host).

Score: ROUGE-L F-measure x100 from ``rouge-score`` (``RougeScorer(["rougeL"], use_stemmer=True)``),
the best over the references; per set the mean over examples; over seeds the mean and the
population standard deviation (ddof=0).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

from okd_scale.cli import FRACTION, POS_FLOAT, POS_INT
from okd_scale.config import first_line
from okd_scale.data import alpaca_prompt, build_dataloader, load_dataset
from okd_scale.divergences import ce_sum
from okd_scale.generation import GenerationError, eos_and_pad, generate_ids, needs_synced_gpus
from okd_scale.methods import forward_counted, with_counted
from okd_scale.process import all_reduce_sum

log = logging.getLogger("okd_scale")

_SCORER = None


class EvaluateError(RuntimeError):
    pass


def _scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


def rouge_l(prediction: str, references: str | list[str]) -> float:
    """ROUGE-L F-measure x100 (0..100) of ``prediction``, the best over ``references``."""
    if isinstance(references, str):
        references = [references]
    best = 0.0
    for ref in references:
        best = max(best, _scorer().score(str(ref), str(prediction))["rougeL"].fmeasure * 100.0)
    return best


# ----------------------------------------------------------------------------- data

def _references(row: dict, where: str) -> list[str]:
    out = row.get("output", row.get("response", row.get("references")))
    if out is None:
        raise EvaluateError(f'{where}: no "output" field')
    refs = [out] if isinstance(out, str) else list(out) if isinstance(out, (list, tuple)) else None
    if refs is None or not refs or not all(isinstance(r, str) for r in refs):
        raise EvaluateError(f'{where}: "output" must be a string or a non-empty list of strings')
    return refs


def read_eval_set(path, max_examples=None) -> list[dict]:
    """Rows {"prompt": str, "references": list[str], "instruction", "input" (None when absent)} from a
    MiniLLM-format jsonl (or JSON array) file."""
    path = Path(path)
    if not path.is_file():
        raise EvaluateError(f"evaluation file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        items = [(i + 1, r) for i, r in enumerate(json.loads(text))]
    else:
        items = []
        for i, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 etc. may sit inside strings
            if line.strip():
                try:
                    items.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise EvaluateError(f"{path}:{i}: invalid JSON ({e})") from None
    rows = []
    for lineno, r in items:
        where = f"{path}:{lineno}"
        if not isinstance(r, dict):
            raise EvaluateError(f"{where}: expected a JSON object")
        prompt = r.get("prompt")
        if prompt is None:
            if not r.get("instruction"):
                raise EvaluateError(f'{where}: no "prompt" (or "instruction") field')
            inp = r.get("input") or ""
            prompt = alpaca_prompt(r["instruction"], inp)
        if not isinstance(prompt, str):
            raise EvaluateError(f'{where}: "prompt" must be a string')
        rows.append({"prompt": prompt, "references": _references(r, where), "instruction": r.get("instruction"),
                     "input": r.get("input")})
        if max_examples is not None and len(rows) >= max_examples:
            break
    if not rows:
        raise EvaluateError(f"{path}: no examples")
    return rows


# ----------------------------------------------------------------------------- generation

def generate(model, tokenizer, prompts: list[str], *, max_new_tokens=128, do_sample=False, temperature=1.0,
             top_p=1.0, batch_size=8, seed=0, top_k=0, max_prompt_tokens=None) -> list[str]:
    """Continuations of ``prompts`` (prompt tokens excluded, special tokens skipped, stripped).

    Left-padded batches of prompts of similar length (``generation.generate_ids`` on the prompts sorted by
    length, the answers returned in the given order); ``transformers.set_seed(seed)`` once before the first
    batch; stops at eos. ``max_prompt_tokens`` keeps only the last N prompt tokens (None: all)."""
    from transformers import set_seed

    try:
        eos, pad = eos_and_pad(model, tokenizer)
        ids = [list(tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
        if max_prompt_tokens:
            ids = [x[-max_prompt_tokens:] for x in ids]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # stable: equal lengths keep their order
        set_seed(seed)
        rows = generate_ids(model, [ids[i] for i in order], eos=eos, pad_id=pad, max_new_tokens=max_new_tokens,
                            do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                            batch_size=batch_size)
    except GenerationError as e:
        raise EvaluateError(str(e)) from None
    answers = [""] * len(ids)
    for i, row in zip(order, rows):
        answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return answers


# ----------------------------------------------------------------------------- evaluation

def _named_sets(sets) -> dict[str, Path]:
    if isinstance(sets, (str, Path)):
        sets = [sets]
    if isinstance(sets, dict):
        return {str(k): Path(v) for k, v in sets.items()}
    named: dict[str, Path] = {}
    for p in sets:
        name, k = Path(p).stem, 2
        while name in named:
            name, k = f"{Path(p).stem}_{k}", k + 1
        named[name] = Path(p)
    return named


def evaluate_model(model, tokenizer, sets: dict[str, str | Path], *, seeds=(0,), max_examples=None,
                   num_samples: int = 3, keep_generations: bool = False, **gen_kw) -> dict:
    """Generate on each set for each seed and score ROUGE-L.

    Returns {"settings": {...}, "sets": {name: {"path", "n", "rougeL", "std", "seeds", "per_seed",
    "per_prompt": each prompt's ROUGE-L (mean over the seeds), "samples": [{"prompt", "references", "generation",
    "rougeL"}] (the first num_samples)[, "generations": the first seed's answer to every prompt, with
    keep_generations]}}, "average": mean of the set means, "seconds"}. Greedy decoding is seed-independent, so it
    is generated once and reused for every seed."""
    t0 = time.time()
    seeds = [int(s) for s in (seeds if isinstance(seeds, (list, tuple)) else [seeds])]
    if not seeds:
        raise EvaluateError("seeds is empty")
    named = _named_sets(sets)
    settings = {"max_new_tokens": 128, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "batch_size": 8}
    settings.update(gen_kw)
    settings.update(seeds=seeds, max_examples=max_examples)
    out_sets = {}
    for name, path in named.items():
        rows = read_eval_set(path, max_examples=max_examples)
        prompts = [r["prompt"] for r in rows]
        per_seed, samples, greedy_cache, per_prompt, first = [], [], None, [0.0] * len(rows), []
        for i, seed in enumerate(seeds):
            if gen_kw.get("do_sample") or greedy_cache is None:
                gens = generate(model, tokenizer, prompts, seed=seed, **gen_kw)
                if not gen_kw.get("do_sample"):
                    greedy_cache = gens
            else:
                gens = greedy_cache
            scores = [rouge_l(g, r["references"]) for g, r in zip(gens, rows)]
            per_seed.append(sum(scores) / len(scores))
            per_prompt = [total + x / len(seeds) for total, x in zip(per_prompt, scores)]
            if i == 0:
                first = gens
                samples = [{"prompt": r["prompt"], "references": r["references"], "generation": g, "rougeL": s}
                           for r, g, s in list(zip(rows, gens, scores))[:num_samples]]
        out_sets[name] = {
            "path": str(path), "n": len(rows), "rougeL": statistics.fmean(per_seed),
            "std": statistics.pstdev(per_seed) if len(per_seed) > 1 else 0.0,
            "seeds": seeds, "per_seed": per_seed, "per_prompt": per_prompt, "samples": samples,
            **({"generations": first} if keep_generations else {}),
        }
    means = [v["rougeL"] for v in out_sets.values()]
    return {"settings": settings, "sets": out_sets, "average": statistics.fmean(means) if means else math.nan,
            "seconds": round(time.time() - t0, 2)}


def validation_ce(model, tokenizer, data_file, *, max_length: int = 512, batch_size: int = 8) -> float:
    """Mean cross-entropy per response token of a plain ``model`` over a training-format data file
    (okd_scale.data: the loss mask the trainer uses), on the model's device, in this process alone."""
    examples, _ = load_dataset(data_file, tokenizer, max_length)
    loader = build_dataloader(examples, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id, rank=0,
                              world_size=1, seed=0, shuffle=False, drop_last=False)
    return eval_loss(model, loader, model.config.vocab_size, all_ranks=False)


TERCILES = ("confident", "middle", "uncertain")


def teacher_forced(student, teacher, tokenizer, data_file, *, max_length: int = 512, max_rows: int | None = None,
                   batch_size: int = 8) -> dict:
    """A student against a teacher (the original, frozen one) at every response token y of a training-format data
    file, teacher-forced, in this process alone: the teacher's uncertainty u = 1 - pT(y); by tercile of u (cut at the
    teacher's own tercile edges, the same tokens for every student): the student's top-1 agreement with the teacher
    (argmax zS = argmax zT), KL(pT || pS) = sum_v pT(v) (log pT(v) - log pS(v)), and the std over the vocabulary of
    the student's logits zS; over all tokens, the student's cross-entropy -log pS(y).

    Returns {"tokens", "ce", "edges": [u at 1/3, u at 2/3], "terciles": {name: {"tokens", "u", "agreement", "kl",
    "logit_std"}}} (each a mean over the tercile's tokens)."""
    import torch

    examples, _ = load_dataset(data_file, tokenizer, max_length)
    loader = build_dataloader(examples[:max_rows] if max_rows else examples, batch_size=batch_size,
                              pad_token_id=tokenizer.pad_token_id, rank=0, world_size=1, seed=0, shuffle=False,
                              drop_last=False)
    vocab = len(tokenizer)
    cols = {k: [] for k in ("u", "agree", "kl", "std", "ce")}
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(student.device) for k, v in with_counted(batch).items()}
            y = batch["counted_labels"]
            zs = forward_counted(student, batch, vocab, hidden=False).float()
            zt = forward_counted(teacher, {k: v.to(teacher.device) for k, v in batch.items()}, vocab,
                                 hidden=False).float().to(zs.device)
            ls, lt = zs.log_softmax(-1), zt.log_softmax(-1)
            cols["u"].append(1 - lt.gather(1, y[:, None]).squeeze(1).exp())
            cols["agree"].append((zs.argmax(-1) == zt.argmax(-1)).float())
            cols["kl"].append((lt.exp() * (lt - ls)).sum(-1))
            cols["std"].append(zs.std(-1))
            cols["ce"].append(-ls.gather(1, y[:, None]).squeeze(1))
    t = {k: torch.cat(v).double().cpu() for k, v in cols.items()}
    if not len(t["u"]):
        raise EvaluateError(f"{data_file}: no response tokens to analyse")
    edges = torch.quantile(t["u"], torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    which = torch.bucketize(t["u"], edges, right=True)  # 0: u < edge 1, 1: between, 2: u >= edge 2
    terciles = {}
    for i, name in enumerate(TERCILES):
        m = which == i
        terciles[name] = {"tokens": int(m.sum()), **{key: float(t[col][m].mean()) if m.any() else math.nan
                                                      for key, col in (("u", "u"), ("agreement", "agree"),
                                                                       ("kl", "kl"), ("logit_std", "std"))}}
    return {"tokens": len(t["u"]), "ce": float(t["ce"].mean()), "edges": edges.tolist(), "terciles": terciles}


def eval_loss(model, loader, vocab_size: int, *, all_ranks: bool = True) -> float:
    """Mean cross-entropy per counted token of ``model`` (a DeepSpeed engine or a plain model) over a loader,
    over every rank's share when ``all_ranks``."""
    import torch

    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=model.device), 0.0
    try:
        with torch.no_grad():
            for batch in loader:
                batch = {k: v.to(model.device, non_blocking=True) for k, v in with_counted(batch).items()}
                logits = forward_counted(model, batch, vocab_size, hidden=False)
                total += ce_sum(logits, batch["counted_labels"]).double()
                count += batch["counted_labels"].numel()
    finally:
        model.train(was_training)
    if all_ranks:
        total, count = all_reduce_sum([float(total), count], model.device)
    return float(total) / max(count, 1.0)


class Evaluator:
    """Evaluation on data.eval_file during and after training: mean cross-entropy per response token, and
    ROUGE-L (F x100) of greedy generations on its first data.eval_rouge_examples rows (rows with a
    `prompt` and `output`; other formats get the loss only). Every rank takes its share of both."""

    def __init__(self, cfg, tokenizer, rank: int, world: int):
        d = cfg.data
        examples, _ = load_dataset(d.eval_file, tokenizer, d.max_length, on_error=d.on_error)
        self.loader = build_dataloader(examples, batch_size=cfg.train.per_device_train_batch_size,
                                            pad_token_id=tokenizer.pad_token_id, rank=rank, world_size=world,
                                            seed=cfg.seed, shuffle=False, drop_last=False)
        self.tokenizer, self.rank, self.world, self.max_new_tokens = tokenizer, rank, world, d.eval_max_new_tokens
        self.rows = []
        if d.eval_rouge_examples:
            try:
                self.rows = read_eval_set(d.eval_file, max_examples=d.eval_rouge_examples)
            except EvaluateError as e:
                log.info("eval: no ROUGE-L on %s (%s); the loss only", d.eval_file, e)

    def __call__(self, student, teacher=None) -> dict:
        vocab = len(self.tokenizer)
        scores = {"eval/student_ce": eval_loss(student, self.loader, vocab)}
        if teacher is not None:
            scores["eval/teacher_ce"] = eval_loss(teacher, self.loader, vocab)
        if self.rows:
            scores["eval/student_rougeL"] = self.rouge(student)
        return scores

    def rouge(self, engine) -> float:
        tok = self.tokenizer
        mine = self.rows[self.rank::self.world]
        real = len(mine)
        synced = needs_synced_gpus(engine.module, self.world)
        if synced:  # ZeRO-3: every rank runs the same number of collective forwards
            mine += [self.rows[0]] * (-(-len(self.rows) // self.world) - real)
        eos, pad = eos_and_pad(engine.module, tok)
        outs = generate_ids(engine.module, [tok.encode(r["prompt"], add_special_tokens=False) for r in mine],
                            eos=eos, pad_id=pad, max_new_tokens=self.max_new_tokens, batch_size=8,
                            device=engine.device, synced_gpus=synced)
        total = sum(rouge_l(tok.decode(o, skip_special_tokens=True).strip(), r["references"])
                    for o, r in zip(outs[:real], mine[:real]))
        total, count = all_reduce_sum([total, float(real)], engine.device)
        return total / max(count, 1.0)


def format_table(results: dict[str, dict]) -> str:
    """Markdown table: one row per label (a result of :func:`evaluate_model`), one column per set + average.
    Cells are ROUGE-L mean, with "± std" when a set was scored over more than one seed."""
    columns: list[str] = []
    n_of: dict[str, int] = {}
    for res in results.values():
        for name, v in res["sets"].items():
            if name not in columns:
                columns.append(name)
                n_of[name] = v["n"]
    head = "| model | " + " | ".join(f"{c} (n={n_of[c]})" for c in columns) + " | average |"
    sep = "|---|" + "---:|" * (len(columns) + 1)
    lines = [head, sep]
    for label, res in results.items():
        cells = []
        for c in columns:
            v = res["sets"].get(c)
            if v is None:
                cells.append("-")
            elif len(v.get("per_seed", [])) > 1:
                cells.append(f"{v['rougeL']:.2f} ± {v['std']:.2f}")
            else:
                cells.append(f"{v['rougeL']:.2f}")
        avg = statistics.fmean(v["rougeL"] for v in res["sets"].values()) if res["sets"] else math.nan
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {avg:.2f} |")
    return "\n".join(lines) + "\n"


def default_device() -> str:
    """DeepSpeed's accelerator's current device, e.g. "cuda:0" (or "cpu")."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device_name()


def load_model(model_dir, dtype: str = "float32", device: str | None = None, *, use_safetensors: bool = True):
    """(model in eval mode on ``device``, tokenizer) from a local Hugging Face directory, its own code never run;
    ``device`` defaults to the accelerator's current device (`default_device`), "cpu" keeps the model on the host;
    ``use_safetensors``: safetensors weights only (else .bin files too, read weights-only)."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise EvaluateError(f"model directory not found: {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise EvaluateError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise EvaluateError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    try:
        where = torch.device(device or default_device())
    except RuntimeError as e:
        raise EvaluateError(f"device must be a torch device such as cpu or cuda:0, got {device!r} ({e})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype),
                                                     trust_remote_code=False,
                                                     use_safetensors=True if use_safetensors else None)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        hint = ("; it has PyTorch .bin weights: convert them to safetensors, or pass --no-use-safetensors to read "
                "them weights-only" if use_safetensors and any(model_dir.glob("*.bin")) else "")
        raise EvaluateError(f"cannot load a causal LM from {model_dir}: {first_line(e)}{hint}") from None
    model.to(where).eval()
    return model, tokenizer


def _int_list(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")
    if not vals:
        raise argparse.ArgumentTypeError("no seeds given")
    return vals


def main(argv=None) -> int:
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(k, "1")
    ap = argparse.ArgumentParser(prog="python -m okd_scale.evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", required=True, help="local Hugging Face model directory")
    ap.add_argument("--data", required=True, action="append", help="eval jsonl file (repeatable)")
    ap.add_argument("--max-examples", type=POS_INT, default=None, help="the first N rows of each set")
    ap.add_argument("--max-new-tokens", type=POS_INT, default=128)
    ap.add_argument("--do-sample", action="store_true")
    ap.add_argument("--temperature", type=POS_FLOAT, default=1.0)
    ap.add_argument("--top-p", type=FRACTION, default=1.0, help="in (0, 1]")
    ap.add_argument("--seeds", type=_int_list, default=[0], help="comma-separated, e.g. 1,2,3 (default 0)")
    ap.add_argument("--batch-size", type=POS_INT, default=8)
    ap.add_argument("--use-safetensors", action=argparse.BooleanOptionalAction, default=True,
                    help="read safetensors weights only; --no-use-safetensors also reads .bin files (weights-only)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--device", default=None,
                    help="where the model runs (default: the accelerator's current device; cpu keeps it on the host)")
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--out-md", default=None)
    ap.add_argument("--name", default=None, help="label of the model in the table (default: the dir name)")
    args = ap.parse_args(argv)
    try:
        for p in args.data:
            if not Path(p).is_file():
                raise EvaluateError(f"evaluation file not found: {p}")
        model, tokenizer = load_model(args.model, args.dtype, args.device, use_safetensors=args.use_safetensors)
        label = args.name or Path(args.model).resolve().name
        res = evaluate_model(model, tokenizer, _named_sets(args.data), seeds=args.seeds,
                             max_examples=args.max_examples, max_new_tokens=args.max_new_tokens,
                             do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
                             batch_size=args.batch_size)
    except EvaluateError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    res = {"name": label, "model": str(Path(args.model).resolve()), "dtype": args.dtype,
           "device": str(next(model.parameters()).device), **res}
    table = format_table({label: res})
    print(table, end="")
    if args.out_json:
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if args.out_md:
        Path(args.out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_md).write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
