"""Saving what a run produces: the student as a Hugging Face directory, the online module as a PEFT adapter."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import deepspeed
import torch

from .engines import zero_stage


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def full_state_dict(engine) -> dict | None:
    """The whole module's weights on rank 0 (None elsewhere); gathers ZeRO-3 partitions. Call on every rank."""
    if zero_stage(engine.config) == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()} if _is_rank0() else None


class OutputDirError(ValueError):
    """An output directory cannot be written as asked."""


def check_output_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse a non-empty `out_dir` (or a file in its place) unless `overwrite`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"output path {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputDirError(f"output directory {out_dir} is not empty; pass --overwrite to replace it")


@contextlib.contextmanager
def staged_dir(out_dir: str | Path) -> Iterator[Path]:
    """An empty sibling directory to write into. When the block succeeds it replaces `out_dir` by renames,
    so `out_dir` is never half written; when it fails it is removed and `out_dir` is left as it was."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def export_hf(engine, tokenizer, out_dir: str | Path) -> Path | None:
    """Write the engine's model as a Hugging Face directory (config, tokenizer, safetensors)."""
    out_dir = Path(out_dir)
    state = full_state_dict(engine)
    if _is_rank0():
        with staged_dir(out_dir) as tmp:
            engine.module.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out_dir


def online_state_dict(engine) -> dict | None:
    """The online module's (trainable) weights on rank 0, gathered under ZeRO-3. Call on every rank."""
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in named], enabled=zero_stage(engine.config) == 3):
        return {n: p.detach().cpu().clone() for n, p in named} if _is_rank0() else None


def export_online_module(engine, out_dir: str | Path) -> Path:
    """Write the teacher's online module as a PEFT adapter directory (adapter_config.json + safetensors)."""
    out_dir = Path(out_dir)
    state = online_state_dict(engine)
    if _is_rank0():
        with staged_dir(out_dir) as tmp:
            engine.module.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out_dir
