"""Teacher and student from local Hugging Face directories; tokenizer checks; the teacher's online module."""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

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


class OnlineTemperature(torch.nn.Module):
    """One learnable teacher temperature T = exp(s), s = 0 at the start; called, it gives the factor 1 / T that
    the teacher's logits are multiplied by (1 while ``enabled`` is false: the original teacher)."""

    def __init__(self):
        super().__init__()
        self.log_temperature = torch.nn.Parameter(torch.zeros(1))
        self.enabled = True

    def forward(self) -> torch.Tensor:
        return torch.exp(-self.log_temperature) if self.enabled else torch.ones_like(self.log_temperature)


def _lora(teacher, args: OnlineArgs, **where):
    """The teacher as a PEFT model with a zero-initialised LoRA (r, alpha, dropout of ``args``) at ``where``,
    its LoRA parameters the only trainable ones."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias="none",
                      task_type="CAUSAL_LM", **where)
    try:
        model = get_peft_model(teacher, lora)
    except ValueError as e:
        raise ModelError(f"online module {where}: {e}") from None
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def _add_blocks(teacher, args: OnlineArgs):
    blocks = online_block_ids(teacher.config.num_hidden_layers, args.num_blocks)
    return _lora(teacher, args, target_modules=list(args.target_modules), layers_to_transform=blocks,
                 layers_pattern="layers")


def _output_name(teacher) -> str:
    head = teacher.get_output_embeddings()
    return next(name for name, m in teacher.named_modules() if m is head)


def _add_head(teacher, args: OnlineArgs):
    return _lora(teacher, args, target_modules=[_output_name(teacher)])


def _head_rows(model, rows: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """W + (alpha / r) B A, rows [start, end): computed by calling the LoRA's layers (so that ZeRO-3 gathers them)."""
    layer = model.get_output_embeddings()
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    eye = torch.eye(a.in_features, device=rows.device, dtype=a.weight.dtype)
    delta = b(a(eye))[:, start:end].t() * layer.scaling["default"]  # (B A)^T's columns = B A's rows
    return rows + delta.to(rows.dtype)


def _add_temperature(teacher, args: OnlineArgs):
    freeze(teacher)
    module = OnlineTemperature().to(teacher.get_output_embeddings().weight.dtype)
    teacher.add_module("online_temperature", module)
    teacher.get_output_embeddings().register_forward_hook(lambda m, a, out: out * module().to(out.dtype))
    return teacher


def _temperature_rows(model, rows: torch.Tensor, start: int, end: int) -> torch.Tensor:
    return rows * model.get_submodule("online_temperature")().to(rows.dtype)


@contextmanager
def _peft_disabled(model):
    with model.disable_adapter():
        yield


@contextmanager
def _temperature_disabled(model):
    module = model.get_submodule("online_temperature")
    module.enabled = False
    try:
        yield
    finally:
        module.enabled = True


@dataclass(frozen=True)
class OnlineModule:
    """One online.placement: ``add(teacher, args)`` gives the teacher with the module (all else frozen);
    ``head_rows(model, W rows, start, end)`` the lm_head rows as the module changes them (None: the module is in
    the blocks, the lm_head is W); ``disabled(model)`` a context in which the model is the original teacher."""

    add: Callable
    head_rows: Optional[Callable]
    disabled: Callable


ONLINE_MODULES: dict[str, OnlineModule] = {
    "blocks": OnlineModule(_add_blocks, None, _peft_disabled),
    "head": OnlineModule(_add_head, _head_rows, _peft_disabled),
    "temperature": OnlineModule(_add_temperature, _temperature_rows, _temperature_disabled),
}


def add_online_module(teacher, args: OnlineArgs):
    """The teacher, frozen, with its zero-initialised online module (online.placement) as the only trainable part."""
    return ONLINE_MODULES[args.placement].add(teacher, args)


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
