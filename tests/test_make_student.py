"""tools/demo/make_student.py on a tiny 10-block teacher."""
import json
from pathlib import Path

import pytest
import torch

import tiny
from tools.demo import make_student as ms

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("teacher")
    tiny.make_llama(d, tokenizer, num_layers=10, hidden=32, heads=4, intermediate=64, seed=3)
    return d


def _load(d):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(d)).eval()


def _check_copy(teacher, student, kept):
    tsd, ssd = teacher.state_dict(), student.state_dict()
    # every tensor of every kept block, renumbered
    n_checked = 0
    for new, old in enumerate(kept):
        prefix_t, prefix_s = f"model.layers.{old}.", f"model.layers.{new}."
        t_keys = sorted(k[len(prefix_t):] for k in tsd if k.startswith(prefix_t))
        s_keys = sorted(k[len(prefix_s):] for k in ssd if k.startswith(prefix_s))
        assert t_keys == s_keys and t_keys
        for k in t_keys:
            assert torch.equal(tsd[prefix_t + k], ssd[prefix_s + k]), (old, new, k)
            n_checked += 1
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(tsd[k], ssd[k]), k
    # nothing else in the student
    assert not [k for k in ssd if k.startswith(f"model.layers.{len(kept)}.")]
    return n_checked


def test_keep_every_default_convention():
    assert ms.default_keep_layers(30, 5) == [0, 5, 10, 15, 20, 25]
    assert ms.default_keep_layers(10, 5) == [0, 5]
    assert ms.default_keep_layers(4, 1) == [0, 1, 2, 3]


def test_keep_every_copies_blocks(teacher_dir, tmp_path):
    out = tmp_path / "student"
    kept = ms.make_student(teacher_dir, out, keep_every=3, verbose=False)
    assert kept == [0, 3, 6, 9]
    teacher, student = _load(teacher_dir), _load(out)  # reload from disk
    assert student.config.num_hidden_layers == 4 and len(student.model.layers) == 4
    assert _check_copy(teacher, student, kept) == 4 * 9  # 9 tensors per Llama block
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4
    assert (out / "generation_config.json").is_file()
    assert list(out.glob("*.safetensors"))
    assert not (tmp_path / "student.tmp").exists()

    # functional check: the student equals the teacher with the other blocks removed
    x = torch.randint(0, teacher.config.vocab_size, (2, 12))
    with torch.no_grad():
        got = student(input_ids=x, use_cache=False).logits
        teacher.model.layers = torch.nn.ModuleList([teacher.model.layers[i] for i in kept])
        teacher.config.num_hidden_layers = len(kept)
        want = teacher(input_ids=x, use_cache=False).logits
    assert got.shape == (2, 12, teacher.config.vocab_size)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"


def test_keep_layers_and_cli(teacher_dir, tmp_path):
    out = tmp_path / "s"
    assert ms.main([str(teacher_dir), str(out), "--keep-layers", "1,4,9"]) == 0
    teacher, student = _load(teacher_dir), _load(out)
    assert len(student.model.layers) == 3
    _check_copy(teacher, student, [1, 4, 9])
    # generation with a KV cache uses the renumbered layer indices
    out_ids = student.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False,
                               pad_token_id=0)
    assert out_ids.shape[1] <= 7
    # refuses a non-empty output directory, naming it; --overwrite replaces it
    assert ms.main([str(teacher_dir), str(out), "--keep-layers", "0,1"]) == 2
    with pytest.raises(ms.OutputDirError, match=str(out.resolve())):
        ms.make_student(teacher_dir, out, keep_layers=[0, 1], verbose=False)
    assert ms.main([str(teacher_dir), str(out), "--keep-layers", "0,1", "--overwrite"]) == 0
    assert len(_load(out).model.layers) == 2


@pytest.mark.parametrize("bad", [[0, 10], [3, 3], [5, 2], []])
def test_bad_keep_layers(teacher_dir, tmp_path, bad):
    with pytest.raises(ms.MakeStudentError):
        ms.make_student(teacher_dir, tmp_path / "x", keep_layers=bad, verbose=False)
    assert not (tmp_path / "x").exists()


def test_fresh(teacher_dir, tmp_path, tokenizer):
    out = tmp_path / "fresh"
    kept = ms.make_student(teacher_dir, out, fresh={"num_layers": 3, "hidden_size": 48, "intermediate_size": 96,
                                                    "num_heads": 6, "num_kv_heads": 2}, seed=7, verbose=False)
    assert kept == []
    s = _load(out)
    c = s.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
            c.num_key_value_heads) == (3, 48, 96, 6, 2)
    assert c.head_dim == 8
    assert c.vocab_size == len(tokenizer) == _load(teacher_dir).config.vocab_size
    assert s.model.embed_tokens.weight.shape == (len(tokenizer), 48)
    with torch.no_grad():
        assert s(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, len(tokenizer))
    # seeded: same seed -> same weights, different seed -> different weights
    out2 = tmp_path / "fresh2"
    assert ms.main([str(teacher_dir), str(out2), "--fresh", "--num-layers", "3", "--hidden-size", "48",
                    "--intermediate-size", "96", "--num-heads", "6", "--num-kv-heads", "2", "--seed", "7"]) == 0
    assert all(torch.equal(a, b) for a, b in zip(s.state_dict().values(), _load(out2).state_dict().values()))
    ms.make_student(teacher_dir, tmp_path / "fresh3", fresh={"num_layers": 3, "hidden_size": 48,
                    "intermediate_size": 96, "num_heads": 6, "num_kv_heads": 2}, seed=8, verbose=False)
    assert not torch.equal(s.model.embed_tokens.weight, _load(tmp_path / "fresh3").model.embed_tokens.weight)
    with pytest.raises(ms.MakeStudentError, match="divisible"):
        ms.make_student(teacher_dir, tmp_path / "bad", fresh={"hidden_size": 50, "num_heads": 4}, verbose=False)


def test_failed_save_leaves_nothing(teacher_dir, tmp_path, monkeypatch):
    from transformers import GenerationConfig

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(GenerationConfig, "save_pretrained", boom)
    out = tmp_path / "s"
    with pytest.raises(RuntimeError, match="disk full"):
        ms.make_student(teacher_dir, out, verbose=False)
    assert not out.exists() and not (tmp_path / "s.tmp").exists()


def test_healing_keeps_the_best_checkpoint(pair, tmp_path):
    """--heal-train/--heal-eval: the pruned student is trained (kd, forward KL), the checkpoint with the lowest
    validation loss becomes OUT_DIR, and its validation loss is below the pruned student's."""
    from okd_scale.evaluate import load_model, validation_ce

    out = tmp_path / "student_init"
    adam = '{"optimizer": {"params": {"torch_adam": true}}}'
    code = ms.main([str(pair / "teacher"), str(out), "--keep-layers", "0,2", "--heal-train", str(pair / "train.jsonl"),
                    "--heal-eval", str(pair / "eval.jsonl"), "--heal-steps", "6", "--heal-eval-every", "2",
                    "--heal-method", "kd",
                    "--heal-set", "train.learning_rate=5e-3", "--heal-set", "data.max_length=64",
                    "--heal-set", f"deepspeed.student_overrides={adam}",
                    "--heal-set", f"deepspeed.teacher_overrides={adam}"])
    assert code == 0
    report = json.loads((out / "heal_report.json").read_text())
    ces = {int(k): v for k, v in report["validation_ce"].items()}
    assert sorted(ces) == [2, 4, 6] and report["best_step"] == min(ces, key=ces.get)
    assert ces[report["best_step"]] < report["pruned_validation_ce"] and report["teacher_validation_ce"] > 0
    model, tokenizer = load_model(out, device="cpu")
    assert validation_ce(model, tokenizer, pair / "eval.jsonl", max_length=64) == pytest.approx(
        ces[report["best_step"]], rel=1e-4)
    assert (tmp_path / "student_init.pruned" / "config.json").is_file()
    assert not (tmp_path / "student_init.heal" / "checkpoints").exists()  # only the chosen weights are kept
