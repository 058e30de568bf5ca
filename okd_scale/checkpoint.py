"""Saving what a run produces: the student as a Hugging Face directory, the online module as a PEFT adapter."""
from __future__ import annotations

import shutil
from pathlib import Path

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


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def export_hf(engine, tokenizer, out_dir: str | Path) -> Path | None:
    """Write the engine's model as a Hugging Face directory (config, tokenizer, safetensors)."""
    out_dir = Path(out_dir)
    state = full_state_dict(engine)
    if _is_rank0():
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        engine.module.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        _replace_dir(tmp, out_dir)
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
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        engine.module.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        _replace_dir(tmp, out_dir)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out_dir
