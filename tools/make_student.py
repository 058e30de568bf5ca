#!/usr/bin/env python
"""Build a student model directory from a teacher directory.

    python tools/make_student.py TEACHER_DIR OUT_DIR [--keep-every 5 | --keep-layers 0,5,10,...]
        [--fresh [--num-layers N] [--hidden-size H] [--intermediate-size I] [--num-heads A] [--num-kv-heads K]]
        [--seed S] [--overwrite]

Layer-dropping (default): the student keeps teacher blocks 0, k, 2k, ... (every k-th block counted
from block 0, k = --keep-every, default 5: 30 blocks -> 0,5,10,15,20,25), or exactly the blocks
given by --keep-layers (strictly increasing, 0-based). Embeddings, the final norm and lm_head are
copied as they are; the kept blocks are copied tensor for tensor and renumbered 0..n-1 (the student
is built from its own config, so every attention module knows its new layer index). The config
gets the new num_hidden_layers (and layer_types, where the config has it, restricted to the kept
blocks).

--fresh: a randomly initialised model of the same architecture (same config class) and the
teacher's vocabulary, with the given sizes (each defaults to the teacher's value); --seed seeds
the initialisation.

Both modes save the teacher's tokenizer (with its chat template), a generation_config and
safetensors weights in the teacher's dtype. Llama-family models (model.model.layers) are supported.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from okd_scale.checkpoint import OutputDirError, check_output_dir, staged_dir

FRESH_KEYS = {  # CLI name -> config attribute
    "num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
}


class MakeStudentError(RuntimeError):
    pass


def default_keep_layers(num_layers: int, keep_every: int = 5) -> list[int]:
    """Blocks 0, k, 2k, ... below num_layers."""
    if keep_every < 1:
        raise MakeStudentError(f"keep_every must be >= 1, got {keep_every}")
    return list(range(0, num_layers, keep_every))


def _check_keep(keep: list[int], num_layers: int) -> list[int]:
    keep = [int(i) for i in keep]
    if not keep:
        raise MakeStudentError("keep_layers is empty: the student needs at least one block")
    bad = [i for i in keep if not 0 <= i < num_layers]
    if bad:
        raise MakeStudentError(f"keep_layers {bad} out of range: the teacher has blocks 0..{num_layers - 1}")
    if any(b <= a for a, b in zip(keep, keep[1:])):
        raise MakeStudentError(f"keep_layers must be strictly increasing (no repeats), got {keep}")
    return keep


def _copy_config(cfg):
    new = cfg.__class__.from_dict(cfg.to_dict())
    if getattr(new, "quantization_config", None) is not None:
        del new.quantization_config
    return new


def _layers(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise MakeStudentError(f"{type(model).__name__} has no model.layers: only Llama-family models are supported")
    return layers


def _fresh_config(tcfg, fresh: dict):
    unknown = set(fresh) - set(FRESH_KEYS) - set(FRESH_KEYS.values())
    if unknown:
        raise MakeStudentError(f"unknown --fresh size keys {sorted(unknown)}; known: {sorted(FRESH_KEYS)}")
    cfg = _copy_config(tcfg)
    for k, v in fresh.items():
        if v is not None:
            setattr(cfg, FRESH_KEYS.get(k, k), int(v))
    h, a = cfg.hidden_size, cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or a
    if h % a:
        raise MakeStudentError(f"hidden_size {h} is not divisible by num_attention_heads {a}")
    if a % kv:
        raise MakeStudentError(f"num_attention_heads {a} is not divisible by num_key_value_heads {kv}")
    if kv > a:
        raise MakeStudentError(f"num_key_value_heads {kv} > num_attention_heads {a}")
    if hasattr(cfg, "head_dim"):
        cfg.head_dim = h // a
    n = cfg.num_hidden_layers
    if getattr(tcfg, "layer_types", None):
        cfg.layer_types = [tcfg.layer_types[i % len(tcfg.layer_types)] for i in range(n)]
    return cfg


def make_student(teacher_dir: str | Path, out_dir: str | Path, keep_layers: list[int] | None = None,
                 keep_every: int = 5, fresh: dict | None = None, seed: int = 0, overwrite: bool = False,
                 verbose: bool = True) -> list[int]:
    """Write a student to ``out_dir``; returns the teacher block indices it keeps ([] for ``fresh``).

    ``fresh``: None for layer dropping, else a dict of sizes (keys num_layers/hidden_size/
    intermediate_size/num_heads/num_kv_heads or the config attribute names; missing = teacher's)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    log = print if verbose else (lambda *a, **k: None)
    teacher_dir = Path(teacher_dir)
    if not (teacher_dir / "config.json").is_file():
        raise MakeStudentError(f"teacher directory {teacher_dir} has no config.json (not a Hugging Face model dir)")
    out_dir = Path(out_dir).resolve()
    if out_dir == teacher_dir.resolve():
        raise MakeStudentError("OUT_DIR must differ from TEACHER_DIR")
    if fresh is not None and keep_layers is not None:
        raise MakeStudentError("--fresh and --keep-layers are exclusive")
    check_output_dir(out_dir, overwrite)

    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    if not getattr(tokenizer, "chat_template", None):
        log(f"warning: the teacher tokenizer in {teacher_dir} has no chat template")
    tcfg = AutoConfig.from_pretrained(str(teacher_dir))
    try:
        gen = GenerationConfig.from_pretrained(str(teacher_dir))
    except OSError:
        gen = GenerationConfig(bos_token_id=tcfg.bos_token_id, eos_token_id=tcfg.eos_token_id,
                               pad_token_id=getattr(tcfg, "pad_token_id", None))

    if fresh is not None:
        cfg = _fresh_config(tcfg, fresh)
        torch.manual_seed(seed)
        dtype = getattr(tcfg, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        student = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        kept: list[int] = []
    else:
        teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype="auto")
        n_teacher = len(_layers(teacher))
        kept = _check_keep(keep_layers if keep_layers is not None else default_keep_layers(n_teacher, keep_every),
                           n_teacher)
        cfg = _copy_config(teacher.config)
        cfg.num_hidden_layers = len(kept)
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = [teacher.config.layer_types[i] for i in kept]
        torch.manual_seed(seed)
        student = AutoModelForCausalLM.from_config(cfg, dtype=teacher.dtype)
        new_index = {old: new for new, old in enumerate(kept)}
        pat = re.compile(r"^(model\.layers\.)(\d+)(\..*)$")
        sd = {}
        for k, v in teacher.state_dict().items():
            m = pat.match(k)
            if m:
                old = int(m.group(2))
                if old not in new_index:
                    continue
                k = f"{m.group(1)}{new_index[old]}{m.group(3)}"
            sd[k] = v
        missing, unexpected = student.load_state_dict(sd, strict=False)
        tied_ok = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
        if set(missing) - tied_ok or set(unexpected) - tied_ok:
            raise MakeStudentError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
        if getattr(cfg, "tie_word_embeddings", False):
            student.tie_weights()
        del teacher, sd

    student.eval()
    student.generation_config = gen
    with torch.no_grad():  # smoke test before anything lands on disk
        student(input_ids=torch.tensor([[tokenizer.eos_token_id or 0, 1, 2]]))

    with staged_dir(out_dir) as tmp:
        student.save_pretrained(str(tmp), safe_serialization=True)
        gen.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    n_params = sum(p.numel() for p in student.parameters())
    what = f"fresh (seed {seed})" if fresh is not None else f"kept teacher blocks {kept}"
    log(f"OK {out_dir}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
        f"{n_params} params, {what}")
    return kept


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("teacher_dir")
    ap.add_argument("out_dir")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--keep-every", type=int, default=5, help="keep blocks 0, k, 2k, ... (default 5)")
    g.add_argument("--keep-layers", type=_int_list, default=None, help="comma-separated 0-based block indices")
    ap.add_argument("--fresh", action="store_true", help="random init at the sizes below (teacher's by default)")
    ap.add_argument("--num-layers", type=int)
    ap.add_argument("--hidden-size", type=int)
    ap.add_argument("--intermediate-size", type=int)
    ap.add_argument("--num-heads", type=int)
    ap.add_argument("--num-kv-heads", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    sizes = {k: getattr(args, k) for k in FRESH_KEYS}
    if not args.fresh and any(v is not None for v in sizes.values()):
        ap.error("--num-layers/--hidden-size/--intermediate-size/--num-heads/--num-kv-heads need --fresh")
    if args.fresh and args.keep_layers is not None:
        ap.error("--fresh and --keep-layers are exclusive")
    try:
        make_student(args.teacher_dir, args.out_dir, keep_layers=args.keep_layers, keep_every=args.keep_every,
                     fresh={k: v for k, v in sizes.items() if v is not None} if args.fresh else None,
                     seed=args.seed, overwrite=args.overwrite)
    except (MakeStudentError, OutputDirError) as e:
        print(f"make_student: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
