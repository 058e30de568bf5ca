"""Tiny offline assets for tests: a BPE tokenizer with a ChatML template, small Llama models, jsonl data."""
from __future__ import annotations

import json
import random
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
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


def make_llama(out_dir: str | Path, tokenizer, num_layers: int = 4, hidden: int = 32, heads: int = 4,
               intermediate: int = 64, vocab_size: int | None = None, seed: int = 0, tie: bool = False):
    """A randomly initialised LlamaForCausalLM saved with its tokenizer (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=256, tie_word_embeddings=tie,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return model


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
