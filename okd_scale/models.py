"""Teacher and student from local Hugging Face directories; tokenizer checks; the teacher's online module."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .config import OnlineArgs


class ModelError(ValueError):
    """A model or tokenizer cannot be used as asked."""


def load_tokenizer(path: str, *, trust_remote_code: bool = False, allow_hub: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=not allow_hub)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelError(f"{path}: the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def check_same_tokenizer(teacher_tok, student_tok, teacher_path: str, student_path: str) -> None:
    """Distillation compares distributions token by token: both sides must use one tokenizer."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        differ = sorted(set(tv.items()) ^ set(sv.items()))[:3]
        raise ModelError(f"different tokenizers: teacher {teacher_path} ({len(tv)} tokens) and student "
                         f"{student_path} ({len(sv)} tokens) do not map the same strings to the same ids "
                         f"(e.g. {differ}); distil between models that share a tokenizer")


def check_vocab(model, tokenizer, path: str, role: str) -> None:
    size = int(getattr(model.config, "vocab_size", 0) or 0)
    if size < len(tokenizer):
        raise ModelError(f"{role} {path}: its vocabulary has {size} entries but its tokenizer has {len(tokenizer)}; "
                         "the model cannot score every token")


def load_causal_lm(path: str, *, ds_config: Optional[dict] = None, bf16: bool = False,
                   trust_remote_code: bool = False, allow_hub: bool = False):
    """AutoModelForCausalLM.from_pretrained; under a ZeRO-3 config, built partitioned (deepspeed.zero.Init)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    from safetensors import SafetensorError

    from .engines import zero_stage

    keep_alive = HfDeepSpeedConfig(ds_config) if ds_config and zero_stage(ds_config) == 3 else None
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                           trust_remote_code=trust_remote_code,
                                                           local_files_only=not allow_hub, output_loading_info=True)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise ModelError(f"cannot load a causal LM from {path}: {e}") from None
    finally:
        del keep_alive
        unset_hf_deepspeed_config()
    missing = sorted(info.get("missing_keys") or []) + sorted(k for k, *_ in info.get("mismatched_keys") or [])
    if missing:
        raise ModelError(f"cannot load a causal LM from {path}: its weights files lack or mis-shape {len(missing)} "
                         f"tensors (e.g. {missing[:3]}), which would start from random values; re-download or "
                         "re-export the model")
    model.config.use_cache = False
    return model


def weight_bytes(path: str, bf16: bool) -> Optional[int]:
    """Bytes the model's weights take once loaded (2 per parameter in bf16, else 4), counted from the
    shapes in its safetensors headers; None when the directory has no safetensors files."""
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    files = sorted(Path(path).expanduser().glob("*.safetensors"))
    if not files:
        return None
    count = 0
    try:
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    count += math.prod(st.get_slice(key).get_shape())
    except (OSError, SafetensorError):  # unreadable: the load that follows reports it
        return None
    return count * (2 if bf16 else 4)


def online_block_ids(num_layers: int, num_blocks: Optional[int]) -> list[int]:
    """The last k block indices; k defaults to a quarter of the blocks, at least 1."""
    k = num_blocks if num_blocks is not None else max(1, num_layers // 4)
    if k > num_layers:
        raise ModelError(f'"online.num_blocks" is {k} but the teacher has {num_layers} blocks')
    return list(range(num_layers - k, num_layers))


def add_online_module(teacher, args: OnlineArgs):
    """Freeze the teacher and add a zero-initialised LoRA on its last k blocks; returns the PEFT model."""
    from peft import LoraConfig, get_peft_model

    blocks = online_block_ids(teacher.config.num_hidden_layers, args.num_blocks)
    lora = LoraConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=list(args.target_modules), layers_to_transform=blocks, layers_pattern="layers",
                      bias="none", task_type="CAUSAL_LM")
    try:
        model = get_peft_model(teacher, lora)
    except ValueError as e:
        raise ModelError(f'"online.target_modules" {list(args.target_modules)} on blocks {blocks}: {e}') from None
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def freeze(model) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def frozen_head_rows(model, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of the model's lm_head weight as a detached tensor on its device, gathered (and
    copied) when ZeRO-3 partitions it: for a lm_head that does not train, read once."""
    import deepspeed

    weight = model.get_output_embeddings().weight
    with deepspeed.zero.GatheredParameters([weight]):
        rows = weight[start:end].detach()
        return rows.clone() if is_partitioned(weight) else rows


def is_partitioned(param: torch.nn.Parameter) -> bool:
    """Whether ZeRO-3 partitions this parameter (its full data exists only inside the module's forward)."""
    return hasattr(param, "ds_id")


def block_parameter_count(model, blocks: list[int]) -> int:
    """Parameters (ZeRO-3 partitioned ones included) of the decoder blocks with these indices."""
    import re

    pattern = re.compile(r"\.layers\.(\d+)\.")
    total = 0
    for name, p in model.named_parameters():
        match = pattern.search(name)
        if match and int(match.group(1)) in blocks:
            total += getattr(p, "ds_numel", p.numel())
    return total
