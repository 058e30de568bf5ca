"""tools/bench/big_teacher.py's model builder: a sharded random-weight Llama that transformers loads whole."""
from __future__ import annotations

import json

import pytest


def test_built_teacher_loads_with_every_tensor(tmp_path):
    """One safetensors shard per block plus one for the embeddings, final norm and lm_head; transformers loads
    the directory with no tensor missing or left over, with the shape asked for and its exact vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tools.bench.big_teacher import build_llama

    total = build_llama(tmp_path / "t", hidden=64, layers=3, heads=4, inter=160, vocab=500, dtype="bfloat16")
    index = json.loads((tmp_path / "t" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4 and index["metadata"]["total_size"] == total
    model, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "t"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 3
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == total
    assert float(model.model.layers[2].mlp.down_proj.weight.float().std()) == pytest.approx(0.02, rel=0.05)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "t"))
    assert len(tok) == 500 and tok.chat_template
    ids = tok("w1 w2 w497", return_tensors="pt").input_ids
    assert ids.shape == (1, 3) and model(ids).logits.shape == (1, 3, 500)
