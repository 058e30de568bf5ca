"""A checkpoint of a run -> a Hugging Face model directory, checked by its logits.

    python -m okd_scale.convert CHECKPOINT_DIR OUT_DIR [--tag T] [--model student|teacher]
        [--dtype bf16|fp16|fp32] [--merge-online-module] [--max-shard-size 5GB] [--overwrite]

CHECKPOINT_DIR is a run's `output_dir/checkpoints` (or the `output_dir` itself); `--tag` picks a tag
(`global_step<N>`, default the one `latest` names). ZeRO-2 and ZeRO-3 checkpoints of any world size are
consolidated with DeepSpeed's own utility (`deepspeed.utils.zero_to_fp32`), so the world size it was
saved with is not needed.

- `--model student` (default): OUT_DIR gets config.json, generation_config.json, the tokenizer files
  (with the chat template) and safetensors weights, sharded with an index above `--max-shard-size`;
  tied embeddings stay tied. The trainer's final export writes the same way (`checkpoint.write_hf`).
- `--model teacher` (okd runs, any `online.placement`): the teacher base (the run's `model.teacher`
  directory) with the checkpoint's online module, as the run's `online` section (in the tag's
  run_config.yaml) declares it (`models.online_module`): either the base in OUT_DIR with the module in
  OUT_DIR/online_module, in the form the trainer exports it (a PEFT adapter, or online_config.json +
  online_module.safetensors for a module that is no adapter, such as the learned temperature), or, with
  `--merge-online-module`, one plain model with the module folded into its weights (a learned
  temperature: the lm_head becomes W / T, untied from the input embeddings).

Then OUT_DIR is loaded back with `AutoModelForCausalLM.from_pretrained` (offline; the online module
attached by its declaration's `load`) and its logits on a probe batch are compared with the checkpoint's
model (in `--dtype`); the maximum absolute difference is printed and the command fails (exit 1) above
the dtype's tolerance, relative to the largest logit: fp32 1e-5 (1e-4 merged), fp16 1e-2, bf16 5e-2.
Exit 2: an incomplete checkpoint, a tag that does not exist, a non-empty OUT_DIR without `--overwrite`,
a teacher base that is gone, a run config that does not say what the module is; the message says which.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TOLERANCE = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 5e-2}
MERGED_FP32_TOLERANCE = 1e-4


class ConvertError(ValueError):
    """The checkpoint or the output directory cannot be used as asked."""


def consolidated(path: Path, part: str, exclude_frozen: bool = False) -> dict:
    """fp32 state dict of `part` from its ZeRO shards (DeepSpeed's zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # heavy (deepspeed, torch): imported when the command runs, not for --help
    from okd_scale.checkpoint import CheckpointError, safe_loads, verify_manifest

    try:
        verify_manifest(path)
        with safe_loads(path / part):
            return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=part,
                                                            exclude_frozen_parameters=exclude_frozen)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None


def _load_into(model, state: dict, what: str, only: set | None = None) -> None:
    """Load `state` into `model`, refusing any of its weights (those named in `only`, default all; tied ones aside)
    that `state` lacks or mis-shapes, and anything unexpected."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a size mismatch
        raise ConvertError(f"{what}: the checkpoint does not match the model: {str(e)[:500]}") from None
    tied = {k for k in result.missing_keys if k.endswith("lm_head.weight")} \
        if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied and (only is None or k in only)]
    if missing or result.unexpected_keys:
        raise ConvertError(f"{what}: the checkpoint does not match the model: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")


def student_model(path: Path):
    """(the checkpoint's student in fp32, its tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    hf = path / "hf_student"
    if not (hf / "config.json").is_file():
        raise ConvertError(f"{hf}: missing (a checkpoint written before convert_to_hf existed, or incomplete)")
    config = AutoConfig.from_pretrained(str(hf))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _load_into(model, consolidated(path, "student"), str(path / "student"))
    model.generation_config = _generation_config(hf, model.generation_config)
    model.tie_weights()
    return model.eval(), AutoTokenizer.from_pretrained(str(hf))


def _generation_config(hf: Path, default):
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(str(hf)) if (hf / "generation_config.json").is_file() else default


def run_teacher(path: Path):
    """(the run's teacher base directory, its online section) from the tag's run_config.yaml."""
    import yaml

    # heavy (deepspeed, torch): imported when the command runs, not for --help
    from okd_scale.checkpoint import CheckpointError, online_args

    file = path / "run_config.yaml"
    try:
        run_config = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConvertError(f"{file}: unreadable ({e}); expected the run's config, which says what the teacher and "
                           "its online module are") from None
    try:
        base_dir = Path(run_config["model"]["teacher"])
    except (TypeError, KeyError):
        raise ConvertError(f'{file}: expected a run config with "model.teacher" (the teacher base directory)') from None
    if not (base_dir / "config.json").is_file():
        raise ConvertError(f"the run's teacher base {base_dir} (model.teacher in {file}) is gone; "
                           "the checkpoint holds only the online module")
    try:
        return base_dir, online_args(run_config, str(file))
    except CheckpointError as e:
        raise ConvertError(str(e)) from None


def teacher_model(path: Path, base_dir: Path, online):
    """The teacher base (``base_dir``) in fp32 with the online module ``online`` declares, holding the checkpoint's
    module weights."""
    import torch
    from transformers import AutoModelForCausalLM

    # heavy (deepspeed, torch): imported when the command runs, not for --help
    from okd_scale.models import online_module

    model = online_module(online).add(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32), online)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    _load_into(model, consolidated(path, "teacher", exclude_frozen=True), str(path / "teacher"), only=trainable)
    return model.eval()


def probe_logits(model, vocab: int, dtype):
    """Logits on a fixed probe batch (2 x 16 token ids drawn with seed 0), in fp32."""
    import torch

    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.to(dtype)(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def _export_student(path: Path, out_dir: Path, dtype, max_shard_size: str):
    """Write the checkpoint's student to ``out_dir``; (its probe logits, those of ``out_dir`` reloaded), in
    ``dtype``."""
    from transformers import AutoModelForCausalLM

    # heavy (deepspeed, torch): imported when the command runs, not for --help
    from okd_scale.checkpoint import write_hf

    reference, tokenizer = student_model(path)
    vocab = reference.config.vocab_size
    want = probe_logits(reference, vocab, dtype)
    write_hf(reference, tokenizer, out_dir, max_shard_size=max_shard_size)
    got = probe_logits(AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=dtype), vocab, dtype)
    return want, got


def _export_teacher(path: Path, out_dir: Path, dtype, merge_online_module: bool, max_shard_size: str):
    """Write the checkpoint's teacher to ``out_dir``: the run's base with the online module in out_dir/online_module,
    or with ``merge_online_module`` one model with the module folded in; (its probe logits, those of ``out_dir``
    reloaded with its module), in ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # heavy (deepspeed, torch): imported when the command runs, not for --help
    from okd_scale.checkpoint import write_hf, write_online_module
    from okd_scale.models import online_module

    base_dir, online = run_teacher(path)
    module = online_module(online)
    reference, tokenizer = teacher_model(path, base_dir, online), AutoTokenizer.from_pretrained(str(base_dir))
    vocab = reference.config.vocab_size
    want = probe_logits(reference, vocab, dtype)
    if merge_online_module:
        write_hf(module.merge(reference), tokenizer, out_dir, max_shard_size=max_shard_size)
        return want, probe_logits(AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=dtype), vocab, dtype)
    staged = write_online_module(reference, online, out_dir.with_name(out_dir.name + ".online_module"))
    del reference
    try:  # the base as the run's model.teacher holds it, in --dtype
        write_hf(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype), tokenizer, out_dir,
                 max_shard_size=max_shard_size)
        os.rename(staged, out_dir / "online_module")
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    base = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=dtype)
    return want, probe_logits(module.load(base, out_dir / "online_module"), vocab, dtype)


def convert(checkpoint_dir: str | Path, out_dir: str | Path, *, tag: str | None = None, model: str = "student",
            dtype: str = "bf16", merge_online_module: bool = False, max_shard_size: str = "5GB",
            overwrite: bool = False) -> dict:
    """Convert, reload and compare; returns {"out_dir", "max_abs_diff", "tolerance", "seconds", "bytes"}."""
    import torch

    # heavy (deepspeed, torch): imported when the command runs, not for --help
    from okd_scale.checkpoint import CheckpointError, OutputDirError, check_output_dir, check_shards, tag_dir

    clock = time.perf_counter()
    out_dir = Path(out_dir)
    try:
        check_output_dir(out_dir, overwrite)
    except OutputDirError as e:
        raise ConvertError(str(e)) from None
    try:
        path = tag_dir(Path(checkpoint_dir), tag)
        check_shards(path, "student" if model == "student" else "teacher")
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    torch_dtype = getattr(torch, DTYPES[dtype])
    tolerance = TOLERANCE[dtype]
    if model == "student":
        want, got = _export_student(path, out_dir, torch_dtype, max_shard_size)
    else:
        want, got = _export_teacher(path, out_dir, torch_dtype, merge_online_module, max_shard_size)
        if merge_online_module and dtype == "fp32":
            tolerance = MERGED_FP32_TOLERANCE
    diff = float((got - want).abs().max())
    scale = max(1.0, float(want.abs().max()))
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    result = {"out_dir": str(out_dir), "tag": path.name, "max_abs_diff": diff, "tolerance": tolerance * scale,
              "seconds": time.perf_counter() - clock, "bytes": size}
    if diff > tolerance * scale:
        raise RuntimeError(f"{out_dir}: reloaded logits differ from the checkpoint's by {diff:.3g} "
                           f"(tolerance {tolerance * scale:.3g} for {dtype})")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint_dir", help="a run's output_dir/checkpoints, or the output_dir")
    p.add_argument("out_dir")
    p.add_argument("--tag", help="global_step<N> (default: the one `latest` names)")
    p.add_argument("--model", choices=("student", "teacher"), default="student")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--merge-online-module", action="store_true",
                   help="teacher: fold the online module (any online.placement) into the base weights")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (e.g. 5GB, 500MB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = p.parse_args(argv)
    if args.merge_online_module and args.model != "teacher":
        p.error("--merge-online-module applies to --model teacher")
    try:
        r = convert(args.checkpoint_dir, args.out_dir, tag=args.tag, model=args.model, dtype=args.dtype,
                    merge_online_module=args.merge_online_module, max_shard_size=args.max_shard_size,
                    overwrite=args.overwrite)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {r['out_dir']} from {args.checkpoint_dir} {r['tag']} ({args.model}, {args.dtype}): "
          f"{r['bytes'] / 2**20:.1f} MiB in {r['seconds']:.1f} s; reloaded logits max |diff| "
          f"{r['max_abs_diff']:.3g} (tolerance {r['tolerance']:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
