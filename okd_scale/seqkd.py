"""Sequence-level KD's training data: the teacher's responses to the training prompts, generated once
before training (all ranks share the prompts) and cached as jsonl next to a fingerprint of what made
them; a later run with the same teacher, prompts and generation settings reads the cache instead."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from .config import RunConfig
from .data import IGNORE_INDEX, truncate
from .generation import eos_and_pad, generate_ids, needs_synced_gpus, prompt_ids

log = logging.getLogger("okd_scale")


def cache_path(cfg: RunConfig) -> Path:
    return Path(cfg.seqkd.cache_file or Path(cfg.output_dir) / "seqkd" / "teacher_responses.jsonl")


def fingerprint(cfg: RunConfig, prompts: list[list[int]]) -> dict:
    """What the cached responses depend on: the teacher, the prompts (hashed) and the generation settings."""
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    teacher = Path(cfg.model.teacher).expanduser()
    generation = {k: v for k, v in vars(cfg.seqkd).items() if k not in ("cache_file", "generate_with")}
    return {"teacher": str(teacher.resolve()) if teacher.exists() else cfg.model.teacher, "prompts_sha256": digest,
            "num_prompts": len(prompts), "generation": generation, "seed": cfg.seed}


def _read_cache(path: Path, meta: dict) -> list[list[int]] | None:
    meta_path = path.with_suffix(path.suffix + ".meta.json")
    if not (path.is_file() and meta_path.is_file()):
        return None
    try:
        if json.loads(meta_path.read_text()) != meta:
            log.info("seqkd: %s was made from other prompts, teacher or settings; generating again", path)
            return None
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        log.warning("seqkd: cannot read the cache %s (%s); generating again", path, e)
        return None
    if len(rows) != meta["num_prompts"]:
        return None
    return [row["output_ids"] for row in rows]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def teacher_examples(cfg: RunConfig, examples: list[dict], tokenizer, rank: int, world: int,
                     build_teacher: Callable[[], object], batch_size: int) -> tuple[list[dict], dict]:
    """(examples of prompt + teacher response, stats {"generated", "cached", "seconds"}). ``build_teacher`` returns
    the frozen teacher model and its device; it is only called when the cache cannot be used."""
    path, max_length = cache_path(cfg), cfg.data.max_length
    prompts = [prompt_ids(e["input_ids"], e["labels"]) for e in examples]
    meta = fingerprint(cfg, prompts)
    responses = _read_cache(path, meta)
    stats = {"generated": 0, "cached": len(prompts), "seconds": 0.0}
    if responses is None:
        clock = time.perf_counter()
        responses = _generate(cfg, prompts, tokenizer, rank, world, build_teacher, batch_size, path, meta)
        stats = {"generated": len(prompts), "cached": 0, "seconds": time.perf_counter() - clock}
    else:
        log.info("seqkd: read %d cached teacher responses from %s (no generation)", len(responses), path)
    out = []
    for p, r in zip(prompts, responses):
        ids, mask, _ = truncate(p + r, [0] * len(p) + [1] * len(r), max_length)
        out.append({"input_ids": ids, "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]})
    return out, stats


def _generate(cfg: RunConfig, prompts: list[list[int]], tokenizer, rank: int, world: int,
              build_teacher: Callable[[], object], batch_size: int, path: Path, meta: dict) -> list[list[int]]:
    """The teacher's responses, rank r generating prompts r, r + W, ...; rank 0 writes the cache."""
    import gc

    clock = time.perf_counter()
    teacher, device = build_teacher()
    mine = list(range(rank, len(prompts), world))
    synced = needs_synced_gpus(teacher, world)
    if synced:  # every rank runs the same number of collective forwards
        per_rank = -(-len(prompts) // world)
        mine += [mine[-1] if mine else 0] * (per_rank - len(mine))
    sq = cfg.seqkd
    tok = tokenizer
    eos, pad = eos_and_pad(teacher, tok)
    outs = generate_ids(teacher, [prompts[i] for i in mine], eos=eos, pad_id=pad,
                        max_new_tokens=sq.max_new_tokens, do_sample=sq.do_sample, temperature=sq.temperature,
                        top_p=sq.top_p, batch_size=batch_size, device=device, synced_gpus=synced)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.rank{rank}")
    part.write_text(json.dumps({str(i): o for i, o in zip(mine, outs)}))
    del teacher, outs
    gc.collect()
    if world > 1:
        dist.barrier()
    responses: dict[int, list[int]] = {}
    for r in range(world):
        responses.update({int(k): v for k, v in json.loads(path.with_name(f".{path.name}.rank{r}").read_text()).items()})
    ordered = [responses[i] for i in range(len(prompts))]
    if world > 1:
        dist.barrier()  # every rank has read every part
    part.unlink()
    if rank == 0:
        _write_atomic(path, "".join(json.dumps({"prompt": tok.decode(p), "output": tok.decode(r, skip_special_tokens=True),
                                                "prompt_ids": p, "output_ids": r}) + "\n"
                                    for p, r in zip(prompts, ordered)))
        _write_atomic(path.with_suffix(path.suffix + ".meta.json"), json.dumps(meta, indent=1))
    log.info("seqkd: generated %d teacher responses in %.1f s; cached in %s", len(prompts),
             time.perf_counter() - clock, path)
    return ordered
