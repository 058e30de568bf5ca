"""Tiny offline assets for tests: a BPE tokenizer with a ChatML template, small Llama models, jsonl data;
and where tests compute: DeepSpeed's accelerator, and the environment of a child run."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from tools.bench.big_teacher import CHATML, SPECIAL  # noqa: F401 (CHATML: the tests' template too)

ROOT = Path(__file__).resolve().parents[1]

WORDS = (
    "the a an one two three four five red green blue small large quick slow cat dog bird fish tree river "
    "runs jumps sees eats likes finds gives makes is are was were and or but with over under near far "
    "what who where when why how please tell me about write list name answer question because so"
).split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_tokenizer(out_dir: str | Path, vocab_size: int = 320):
    """Train a byte-level BPE on a fixed word list and save it as a PreTrainedTokenizerFast directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [sentence(rng, 12) for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(str(out_dir))
    return fast


def make_word_tokenizer(out_dir: str | Path, vocab_size: int):
    """A word-level tokenizer of exactly ``vocab_size`` entries (the special tokens, then "w0", "w1", ...;
    one token per word of `word_text`) with the ChatML template: a real model's vocabulary size without training
    a tokenizer (tools/bench/big_teacher.py's)."""
    from tools.bench.big_teacher import word_tokenizer

    return word_tokenizer(Path(out_dir), vocab_size)


def word_text(rng: random.Random, n: int, vocab_size: int) -> str:
    """``n`` words of a `make_word_tokenizer` vocabulary: exactly n tokens."""
    return " ".join(f"w{rng.randrange(vocab_size - len(SPECIAL))}" for _ in range(n))


def make_llama(out_dir: str | Path, tokenizer, num_layers: int = 4, hidden: int = 32, heads: int = 4,
               intermediate: int = 64, vocab_size: int | None = None, seed: int = 0, tie: bool = False,
               kv_heads: int | None = None, max_positions: int = 256, dtype=None, device=None):
    """A randomly initialised LlamaForCausalLM saved with its tokenizer (safetensors). ``dtype``: the
    saved weights' dtype (default float32); ``device``: where the weights are initialised (a model of
    billions of parameters initialises much faster on an accelerator)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=tie,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    with torch.device(device or "cpu"):
        model = LlamaForCausalLM(cfg)
    if dtype is not None:
        model.to(dtype)
    model.to("cpu").save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return model


def device():
    """Where tests compute: DeepSpeed's accelerator's current device (the CPU under DS_ACCELERATOR=cpu)."""
    import torch
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def ranks_fit(nproc: int) -> bool:
    """Whether ``nproc`` ranks can run on the accelerator, one device each (the CPU hosts any number)."""
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    return accel.device_name() == "cpu" or accel.device_count() >= nproc


def subprocess_env(nproc: int = 1, **extra) -> dict:
    """The environment of a child run of ``nproc`` ranks: no rank variables, one thread per rank, the
    repository on PYTHONPATH, offline, and this process's accelerator when it has a device for every rank,
    else the CPU (gloo; e.g. 2 ranks on a single GPU, which NCCL cannot run)."""
    from deepspeed.accelerator import get_accelerator

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               DS_ACCELERATOR=get_accelerator().device_name() if ranks_fit(nproc) else "cpu",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(extra)
    return env


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Prompt/output rows in the MiniLLM format; a few with a list of references."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        out = sentence(rng, rng.randint(4, 10))
        rows.append({"prompt": "please " + sentence(rng, rng.randint(3, 8)),
                     "output": [out, sentence(rng, 5)] if i % 5 == 4 else out})
    return rows


def hellinger(logp, logq, params):
    """Squared Hellinger distance H^2(p, q) = 1/2 sum_v (sqrt(p_v) - sqrt(q_v))^2: the toy divergence the tests
    register at run time, to show that a new divergence is one function and one registry line."""
    return 0.5 * ((0.5 * logp).exp() - (0.5 * logq).exp()).square().sum(-1)


def hellinger_divergence():
    """The registry entry of ``hellinger`` (a sum over the vocabulary: its sharded form is derived)."""
    from okd_scale.divergences import Divergence

    return Divergence(hellinger)


# --------------------------------------------------------------------------- runs of the trainer

TORCH_ADAM = {"optimizer": {"params": {"torch_adam": True}}}  # no DeepSpeed op to compile on the CPU
TORCH_ADAM_JSON = json.dumps(TORCH_ADAM)  # the same, as a key=value override


def write_config(path: Path, pair: Path, method: str, **sections) -> Path:
    """A run config for `method` on the tiny pair of conftest's `pair` fixture (6 steps, torch's Adam), with
    `sections` merged in."""
    import yaml

    cfg = {
        "method": method, "seed": 0, "output_dir": str(path.parent / f"out-{method}"),
        "model": {"teacher": str(pair / "teacher"), "student": str(pair / "student")},
        "data": {"train_file": str(pair / "train.jsonl"), "eval_file": str(pair / "eval.jsonl"), "max_length": 64},
        "train": {"max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 5e-3,
                  "lr_scheduler_type": "constant"},
        # CE in every student loss (okd's own default is KL alone): between two tiny near-uniform models a KL alone
        # is about 1e-3, and its float-order noise, magnified by Adam, would be what runs compare
        "loss": {"kd_ratio": 0.5},
        "online": {"learning_rate": 5e-3, "num_blocks": 2},
        "deepspeed": {"teacher_overrides": TORCH_ADAM, "student_overrides": TORCH_ADAM},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    path.write_text(yaml.safe_dump(cfg))
    return path


def worker_command(runs: list[list], nproc: int = 2) -> list[str]:
    """The torchrun command of tests/dist_worker.py on `nproc` processes for `runs` (each a config path and its
    key=value overrides), one after another in one launch."""
    args = [a for i, run in enumerate(runs) for a in (["--then"] if i else []) + [str(x) for x in run]]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(ROOT / "tests" / "dist_worker.py"), *args]


def launch_runs(runs: list[list], nproc: int = 2, timeout: float = 900) -> subprocess.CompletedProcess:
    """`runs` launched once (worker_command), to the end."""
    return subprocess.run(worker_command(runs, nproc), env=subprocess_env(nproc), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def clean_env(**extra) -> dict:
    """A child run's environment (tiny.subprocess_env): up to 2 ranks on this accelerator, else on the CPU."""
    return subprocess_env(2, **extra)


def comparable(history: list) -> list:
    """A run's history rows without the values that differ between equal runs (times, token rates, lr)."""
    return [{k: v for k, v in r.items() if "/" in k and not k.startswith(("time", "tokens_", "lr/"))} for r in history]


def assert_same_runs(a: Path, b: Path, rtol: float) -> None:
    """Two runs' loss histories and final student and teacher weights agree within rtol."""
    import pytest
    import torch
    from safetensors.torch import load_file

    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    for x, y in zip(comparable(ra["history"]), comparable(rb["history"]), strict=True):
        assert x.keys() == y.keys()
        for key in x:
            # abs: a KL near 0 (the drift) moves by about sqrt(KL) x the logits' float32 noise (1e-6) between two paths
            assert x[key] == pytest.approx(y[key], rel=rtol, abs=5e-8), (key, x[key], y[key])
    for name in ("student/model.safetensors", "teacher_after.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=rtol, atol=1e-5, msg=lambda m: f"{name} {key}: {m}")
