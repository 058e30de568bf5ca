"""Sequence-level KD's training data: the teacher's responses to the training prompts, generated once
before training (all ranks share the prompts) and cached as jsonl next to a fingerprint of what made
them; a later run with the same teacher, prompts and generation settings reads the cache instead."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from . import faults, models
from .checkpoint import write_atomic
from .config import RunConfig
from .data import IGNORE_INDEX, truncate
from .generation import eos_and_pad, generate_ids, needs_synced_gpus, prompt_ids
from .stop import REQUEST

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


def teacher_examples(cfg: RunConfig, examples: list[dict], tokenizer, rank: int, world: int,
                     build_teacher: Callable[[], object], batch_size: int) -> tuple[list[dict], dict]:
    """(examples of prompt + teacher response, stats {"generated", "cached", "seconds"[, "kept_batches": batches per
    rank kept from a stopped run]}); raises GenerationStopped on a stop signal. ``build_teacher`` returns
    the frozen teacher model and its device; it is only called when the cache cannot be used."""
    path, max_length = cache_path(cfg), cfg.data.max_length
    prompts = [prompt_ids(e["input_ids"], e["labels"]) for e in examples]
    meta = fingerprint(cfg, prompts)
    responses = _read_cache(path, meta)
    stats = {"generated": 0, "cached": len(prompts), "seconds": 0.0}
    if responses is None:
        clock = time.perf_counter()
        responses, kept = _generate(cfg, prompts, tokenizer, rank, world, build_teacher, batch_size, path, meta)
        stats = {"generated": len(prompts), "cached": 0, "seconds": time.perf_counter() - clock, "kept_batches": kept}
    else:
        log.info("seqkd: read %d cached teacher responses from %s (no generation)", len(responses), path)
    out = []
    for p, r in zip(prompts, responses):
        ids, mask, _ = truncate(p + r, [0] * len(p) + [1] * len(r), max_length)
        out.append({"input_ids": ids, "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]})
    return out, stats


def generation_teacher(cfg: RunConfig, tokenizer, engine: Callable[[], object]) -> tuple[object, object]:
    """The frozen teacher SeqKD generates with, as (module, device): a whole copy on this rank's device
    (``seqkd.generate_with: copy``, or ``auto`` when its weights fit in half the free device memory),
    else the ZeRO-3 engine that ``engine()`` builds, whose every generated token all-gathers every layer."""
    import torch
    from deepspeed.accelerator import get_accelerator

    m, sq = cfg.model, cfg.seqkd
    accel = get_accelerator()
    need = models.weight_bytes(m.teacher, cfg.train.bf16)
    free = accel.available_memory()
    copy = sq.generate_with == "copy" or (sq.generate_with == "auto" and need is not None and need <= free / 2)
    log.info("seqkd: generating with %s (teacher weights %s, free device memory %.1f GiB)",
             "a whole copy of the teacher per rank" if copy else "the ZeRO-3 teacher engine",
             "unknown" if need is None else f"{need / 2**30:.2f} GiB", free / 2**30)
    if not copy:
        teacher = engine()
        return teacher.module, teacher.device
    model = models.load_causal_lm(m.teacher, bf16=cfg.train.bf16, trust_remote_code=m.trust_remote_code,
                                  allow_hub=m.allow_hub, use_safetensors=m.use_safetensors)
    models.check_vocab(model, tokenizer, m.teacher, "teacher")
    models.freeze(model)
    device = torch.device(accel.current_device_name())
    return model.to(device), device


class GenerationStopped(Exception):
    """A stop signal arrived while the teacher generated; the responses so far are kept for the next run."""

    def __init__(self, signal: str, done: int, total: int):
        super().__init__(f"{signal} during seqkd generation: {done} of {total} batches kept")
        self.signal = signal


def _read_partial(partial: Path, header: dict) -> dict[int, dict]:
    """{batch position: {prompt index: response ids}} from a part file written for the same ``header``."""
    try:
        lines = partial.read_text().splitlines()
        if not lines or json.loads(lines[0]) != header:
            return {}
    except (OSError, ValueError):
        return {}
    done = {}
    for line in lines[1:]:
        try:  # a line torn by a kill is dropped with what follows it
            row = json.loads(line)
        except ValueError:
            break
        done[row["batch"]] = {int(k): v for k, v in row["ids"].items()}
    return done


def _agreed(value: int, world: int, op) -> int:
    if world == 1:
        return value
    import torch
    from deepspeed.accelerator import get_accelerator

    t = torch.tensor([value], device=get_accelerator().current_device_name())
    dist.all_reduce(t, op=op)
    return int(t.item())


def _generate(cfg: RunConfig, prompts: list[list[int]], tokenizer, rank: int, world: int,
              build_teacher: Callable[[], object], batch_size: int, path: Path, meta: dict) -> tuple[list, int]:
    """(The teacher's responses, the batches per rank kept from a stopped run): rank r generates prompts r, r + W,
    ... a batch at a time, each batch appended to the rank's part file as it is made; a stop signal (SIGTERM,
    SIGUSR1) ends generation after the batch on every rank (GenerationStopped), and the next run with the same
    fingerprint generates only what is missing. Every rank reads every part; rank 0 writes the cache."""
    import gc

    clock = time.perf_counter()
    mine = list(range(rank, len(prompts), world))
    per_rank = -(-len(prompts) // world)
    mine += [mine[-1] if mine else 0] * (per_rank - len(mine))  # the same batches on every rank (ZeRO-3 is collective)
    starts = list(range(0, len(mine), batch_size))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _part_file(path, rank)
    header = {"meta": meta, "world": world, "rank": rank, "batch_size": batch_size}
    done = _read_partial(partial, header)
    first = 0
    while first in done:
        first += 1
    first = _agreed(first, world, dist.ReduceOp.MIN)  # where every rank has all batches before
    partial.write_text("".join(json.dumps(x) + "\n" for x in
                               [header] + [{"batch": b, "ids": done[b]} for b in range(first)]))
    if first:
        log.info("seqkd: %d of %d batches of teacher responses kept from a stopped run", first, len(starts))
    sq, tok, teacher = cfg.seqkd, tokenizer, None
    for b in range(first, len(starts)):
        if teacher is None:
            teacher, device = build_teacher()
            synced = needs_synced_gpus(teacher, world)
            eos, pad = eos_and_pad(teacher, tok)
        chunk = mine[starts[b]:starts[b] + batch_size]
        outs = generate_ids(teacher, [prompts[i] for i in chunk], eos=eos, pad_id=pad,
                            max_new_tokens=sq.max_new_tokens, do_sample=sq.do_sample, temperature=sq.temperature,
                            top_p=sq.top_p, batch_size=batch_size, device=device, synced_gpus=synced)
        done[b] = dict(zip(chunk, outs))
        with open(partial, "a") as f:
            f.write(json.dumps({"batch": b, "ids": {str(i): o for i, o in done[b].items()}}) + "\n")
        faults.signal_point("signal_in_generation", b + 1, rank)
        if _agreed(int(REQUEST.signal is not None), world, dist.ReduceOp.MAX) and b + 1 < len(starts):
            raise GenerationStopped(REQUEST.signal or "a signal on another rank", b + 1, len(starts))
    del teacher
    gc.collect()
    ordered = _write_cache(path, prompts, tok, header, rank, world)
    log.info("seqkd: generated %d teacher responses in %.1f s; cached in %s", len(prompts),
             time.perf_counter() - clock, path)
    return ordered, first


def _part_file(path: Path, rank: int) -> Path:
    """Where rank `rank` appends its batches of responses while it generates the cache `path`."""
    return path.with_name(f".{path.name}.rank{rank}.partial.jsonl")


def _write_cache(path: Path, prompts: list[list[int]], tok, header: dict, rank: int, world: int) -> list:
    """Once every rank's part file is complete: the responses in prompt order, read from every part; rank 0
    writes the cache and its fingerprint, each rank removes its part."""
    if world > 1:
        dist.barrier()  # every rank's part is complete
    responses: dict[int, list[int]] = {}
    for r in range(world):
        for ids in _read_partial(_part_file(path, r), {**header, "rank": r}).values():
            responses.update(ids)
    ordered = [responses[i] for i in range(len(prompts))]
    if world > 1:
        dist.barrier()  # every rank has read every part
    if rank == 0:
        rows = [{"prompt": tok.decode(p), "output": tok.decode(r, skip_special_tokens=True), "prompt_ids": p,
                 "output_ids": r} for p, r in zip(prompts, ordered)]
        write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
        write_atomic(path.with_suffix(path.suffix + ".meta.json"), json.dumps(header["meta"], indent=1))
    _part_file(path, rank).unlink()
    return ordered
