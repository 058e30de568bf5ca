"""Teacher and student from local Hugging Face directories; tokenizer checks; the teacher's online module."""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import OnlineArgs, first_line, zero_stage


class ModelError(ValueError):
    """A model or tokenizer cannot be used as asked."""


def load_tokenizer(path: str, *, trust_remote_code: bool = False, allow_hub: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=not allow_hub)
    except (OSError, ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise ModelError(f"cannot load a tokenizer from {path}: {first_line(e)}") from None
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
                   trust_remote_code: bool = False, allow_hub: bool = False, use_safetensors: bool = True):
    """AutoModelForCausalLM.from_pretrained; under a ZeRO-3 config, built partitioned (deepspeed.zero.Init);
    `use_safetensors`: safetensors weights only (else .bin files too, which transformers reads weights-only)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    from safetensors import SafetensorError

    keep_alive = HfDeepSpeedConfig(ds_config) if ds_config and zero_stage(ds_config) == 3 else None
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                           trust_remote_code=trust_remote_code,
                                                           use_safetensors=True if use_safetensors else None,
                                                           local_files_only=not allow_hub, output_loading_info=True)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        hint = ("; it has PyTorch .bin weights: convert them to safetensors, or set model.use_safetensors=false to "
                "read them weights-only" if use_safetensors and any(Path(path).glob("*.bin")) else "")
        raise ModelError(f"cannot load a causal LM from {path}: {first_line(e)}{hint}") from None
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
    """The last k block indices; k defaults to every block (the paper's LoRA on every block)."""
    k = num_blocks if num_blocks is not None else num_layers
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


def _block_ids(num_layers: int, args: OnlineArgs) -> list[int]:
    return online_block_ids(num_layers, args.num_blocks)


def _no_blocks(num_layers: int, args: OnlineArgs) -> list[int]:
    return []


def _add_blocks(teacher, args: OnlineArgs):
    blocks = _block_ids(teacher.config.num_hidden_layers, args)
    return _lora(teacher, args, target_modules=list(args.target_modules), layers_to_transform=blocks,
                 layers_pattern="layers")


def _target_shapes(shape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of a Llama-layout block, from a model shape (plan.ModelShape)."""
    h, q, kv, i = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
            "up_proj": (h, i), "down_proj": (i, h)}


def _blocks_params(shape, args: OnlineArgs) -> int:
    """A rank-r LoRA on target_modules of each carrying block: r (in + out) per matrix."""
    shapes = _target_shapes(shape)
    unknown = [t for t in args.target_modules if t not in shapes]
    if unknown:
        raise ModelError(f"online.target_modules: {unknown} are not linear layers of a Llama-layout block "
                         f"({', '.join(shapes)}); their size is unknown")
    per_block = sum(args.r * sum(shapes[t]) for t in args.target_modules)
    return len(online_block_ids(shape.layers, args.num_blocks)) * per_block


def _describe_blocks(args: OnlineArgs, layers: int) -> str:
    k = len(_block_ids(layers, args))
    where = f"all {layers} blocks" if k == layers else f"the last {k} of {layers} blocks"
    return f"LoRA r={args.r} on {','.join(args.target_modules)} of {where}"


def _describe_head(args: OnlineArgs, layers: int) -> str:
    return f"LoRA r={args.r} on the lm_head"


def _describe_temperature(args: OnlineArgs, layers: int) -> str:
    return "one learned temperature"


def _output_name(teacher) -> str:
    head = teacher.get_output_embeddings()
    return next(name for name, m in teacher.named_modules() if m is head)


def _add_head(teacher, args: OnlineArgs):
    return _lora(teacher, args, target_modules=[_output_name(teacher)])


def _head_params(shape, args: OnlineArgs) -> int:
    """A rank-r LoRA on the [V, h] lm_head."""
    return args.r * (shape.hidden + shape.vocab)


def _head_rows(model, rows: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """W + (alpha / r) B A, rows [start, end): computed by calling the LoRA's layers (so that ZeRO-3 gathers them)."""
    layer = model.get_output_embeddings()
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    eye = torch.eye(a.in_features, device=rows.device, dtype=a.weight.dtype)
    delta = b(a(eye))[:, start:end].t() * layer.scaling["default"]  # (B A)^T's columns = B A's rows
    return rows + delta.to(rows.dtype)


def _untie_head(base) -> None:
    """Give the lm_head its own copy of tied input embeddings (merging an output-side module must not change them)."""
    head = base.get_output_embeddings()
    head = getattr(head, "base_layer", head)
    if getattr(base.config, "tie_word_embeddings", False):
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        base.config.tie_word_embeddings = False
        if hasattr(base, "_tied_weights_keys"):
            base._tied_weights_keys = None


def _merge_peft(model):
    """W + s B A folded into the base weights (the lm_head untied first when the LoRA is on it)."""
    base = model.get_base_model()
    if hasattr(base.get_output_embeddings(), "base_layer"):
        _untie_head(base)
    return model.merge_and_unload()


def _load_peft(base, directory: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(directory))


def _add_temperature(teacher, args: OnlineArgs):
    freeze(teacher)
    module = OnlineTemperature().to(teacher.get_output_embeddings().weight.dtype)
    teacher.add_module("online_temperature", module)
    teacher.get_output_embeddings().register_forward_hook(lambda m, a, out: out * module().to(out.dtype))
    return teacher


def _temperature_params(shape, args: OnlineArgs) -> int:
    return 1


def _temperature_rows(model, rows: torch.Tensor, start: int, end: int) -> torch.Tensor:
    return rows * model.get_submodule("online_temperature")().to(rows.dtype)


def _merge_temperature(model):
    """A plain model whose lm_head is W / T (untied from the input embeddings), the module and its hook removed."""
    module = model.get_submodule("online_temperature")
    scale = module().detach()
    head = model.get_output_embeddings()
    _untie_head(model)
    with torch.no_grad():
        head.weight.mul_(scale.to(head.weight.dtype))
    head._forward_hooks.clear()
    del model.online_temperature
    return model


TEMPERATURE_FILE = "online_module.safetensors"  # a module that is not a PEFT adapter: its weights ...
ONLINE_CONFIG = "online_config.json"  # ... and what it is ({"placement": ..., its values})


def _load_file_module(placement: str):
    def load(base, directory: Path):
        from safetensors.torch import load_file

        model = ONLINE_MODULES[placement].add(base, OnlineArgs(placement=placement))
        state = load_file(str(Path(directory) / TEMPERATURE_FILE))
        missing = set(state) - {n for n, _ in model.named_parameters()}
        if missing:
            raise ModelError(f"{directory}: {TEMPERATURE_FILE} holds {sorted(missing)}, which the "
                             f"{placement} module does not have")
        model.load_state_dict(state, strict=False)
        return model
    return load


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
    """One online.placement, declared whole.

    add(teacher, args)            the teacher with the module, zero-initialised (step 0's teacher is the given
                                  one), the module's parameters the only trainable ones
    blocks(num_layers, args)      the teacher blocks that carry it: its backward runs from the lowest of them to
                                  the top, and their activations are kept for it ([]: the blocks run without
                                  gradient)
    params(shape, args)           its trainable parameters, from a model shape (hidden, heads, head_dim, kv_heads,
                                  intermediate, vocab, layers), for the plan
    describe(args, layers)        what it is, in words (okd plan)
    head_rows(model, W rows, s, e) the lm_head rows [s, e) as the module changes them (None: in the blocks, the
                                  lm_head is W)
    disabled(model)               a context in which the model is the original teacher
    adapter                       saved, exported and converted as a PEFT adapter (adapter_config.json +
                                  adapter_model.safetensors); else as ONLINE_CONFIG + TEMPERATURE_FILE
    load(base, directory)         the base model with an exported module attached
    merge(model)                  a plain transformers model with the module folded into its weights
    """

    add: Callable
    blocks: Callable
    params: Callable
    describe: Callable
    head_rows: Optional[Callable]
    disabled: Callable
    adapter: bool
    load: Callable
    merge: Callable


ONLINE_MODULES: dict[str, OnlineModule] = {
    "blocks": OnlineModule(_add_blocks, _block_ids, _blocks_params, _describe_blocks, None, _peft_disabled, True,
                           _load_peft, _merge_peft),
    "head": OnlineModule(_add_head, _no_blocks, _head_params, _describe_head, _head_rows, _peft_disabled, True,
                         _load_peft, _merge_peft),
    "temperature": OnlineModule(_add_temperature, _no_blocks, _temperature_params, _describe_temperature,
                                _temperature_rows, _temperature_disabled, False, _load_file_module("temperature"),
                                _merge_temperature),
}


def online_module(args: OnlineArgs) -> OnlineModule:
    """The registry's declaration of args.placement."""
    return ONLINE_MODULES[args.placement]


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
