"""tools/convert_to_hf.py: checkpoints of 1- and 2-process runs, ZeRO-2 and ZeRO-3 students, become
Hugging Face directories whose logits are the trained model's; the teacher with its online module,
merged or as an adapter; sharded output; and every refusal. The runs train on the accelerator (2-process
runs on the CPU where it has fewer than 2 devices); conversion and the logits compared run on the host."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny
from tiny import ROOT, write_config

TOOL = ROOT / "tools" / "convert_to_hf.py"
RUNS = {"1proc-zero2": (1, "ds_configs/student_zero2.json"), "1proc-zero3": (1, "ds_configs/student_zero3.json"),
        "2proc-zero2": (2, "ds_configs/student_zero2.json"), "2proc-zero3": (2, "ds_configs/student_zero3.json")}


class Runs(dict):
    """okd runs of 4 steps, one per (processes, student ZeRO stage), and one with a tied-embedding student
    under ZeRO-3 ("tied-zero3", 2 processes): run name -> output directory, each trained on first use."""

    def __init__(self, base: Path, pair: Path, tokenizer):
        super().__init__()
        self.base, self.pair = base, pair
        tiny.make_llama(base / "tied_student", tokenizer, num_layers=2, hidden=32, seed=5, tie=True)

    def __missing__(self, name: str) -> Path:
        nproc, student_config = {**RUNS, "tied-zero3": (2, "ds_configs/student_zero3.json")}[name]
        cfg = write_config(self.base / f"{name}.yaml", self.pair, "okd", deepspeed={"student_config": student_config})
        extra = [f"model.student={self.base / 'tied_student'}"] if name.startswith("tied") else []
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(ROOT / "tests" / "dist_worker.py"), str(cfg), f"output_dir={self.base / name}", "train.max_steps=4",
               "data.eval_file=null", *extra]
        proc = subprocess.run(cmd, env=tiny.subprocess_env(nproc), capture_output=True, text=True, timeout=600,
                              cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        self[name] = self.base / name
        return self[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pair, tokenizer):
    return Runs(tmp_path_factory.mktemp("convert_runs"), pair, tokenizer)


def convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], env=tiny.subprocess_env(), capture_output=True,
                          text=True, timeout=600, cwd=ROOT)


def logits(model_dir: Path, dtype=torch.float32, adapter: Path | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    ids = torch.arange(40).reshape(2, 20) % model.config.vocab_size
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


@pytest.mark.parametrize("name", list(RUNS))
def test_student_fp32_equals_the_trained_model(runs, tmp_path, name):
    out = tmp_path / "hf"
    proc = convert(runs[name] / "checkpoints", out, "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reloaded logits max |diff|" in proc.stdout
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors"} <= \
        {p.name for p in out.iterdir()}
    assert json.loads((out / "tokenizer_config.json").read_text()).get("chat_template") or \
        (out / "chat_template.jinja").is_file()
    torch.testing.assert_close(logits(out), logits(runs[name] / "student"), rtol=0, atol=1e-6)


def test_student_bf16_sharded_output_tied_embeddings(runs, tmp_path):
    """bf16 within its rounding of the fp32 model; a tiny --max-shard-size gives several shards and an
    index, which load; tied embeddings stay tied (stored once, tied again on load)."""
    from transformers import AutoModelForCausalLM

    run = runs["tied-zero3"]
    out = tmp_path / "bf16"
    proc = convert(run, out, "--dtype", "bf16", "--max-shard-size", "20KB", "--tag", "global_step4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in index and "model.embed_tokens.weight" in index
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    got, want = logits(out, torch.bfloat16), logits(run / "student")
    assert float((got - want).abs().max()) < 5e-2 * max(1.0, float(want.abs().max()))
    proc = convert(run, tmp_path / "fp32", "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(logits(tmp_path / "fp32"), want, rtol=0, atol=1e-6)


def test_teacher_merged_equals_teacher_with_adapter(runs, pair, tmp_path):
    run = runs["2proc-zero2"]
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    for out, extra in ((merged, ["--merge-online-module"]), (adapter, [])):
        proc = convert(run, out, "--model", "teacher", "--dtype", "fp32", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
    want = logits(pair / "teacher", adapter=run / "online_module")  # the trainer's own adapter export
    assert float((want - logits(pair / "teacher")).abs().max()) > 0  # the online module changed the teacher
    torch.testing.assert_close(logits(merged), want, rtol=0, atol=1e-4)
    torch.testing.assert_close(logits(adapter, adapter=adapter / "online_module"), want, rtol=0, atol=1e-6)


def test_teacher_head_module_on_tied_embeddings(tmp_path, tokenizer):
    """online.placement=head on a teacher whose lm_head is tied to its input embeddings: merged, the lm_head gets
    its own weights and the embeddings stay the original ones; the logits equal the adapter's."""
    from safetensors.torch import load_file

    pair = tmp_path / "pair"
    tiny.make_llama(pair / "teacher", tokenizer, num_layers=2, hidden=32, seed=6, tie=True)
    tiny.make_llama(pair / "student", tokenizer, num_layers=1, hidden=32, seed=7)
    tiny.write_jsonl(pair / "train.jsonl", tiny.make_rows(16, seed=3))
    cfg = write_config(tmp_path / "cfg.yaml", pair, "okd")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(ROOT / "tests" / "dist_worker.py"), str(cfg), f"output_dir={tmp_path / 'run'}", "train.max_steps=3",
           "data.eval_file=null", "online.placement=head"]
    proc = subprocess.run(cmd, env=tiny.subprocess_env(1), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = convert(tmp_path / "run", tmp_path / "merged", "--model", "teacher", "--dtype", "fp32",
                   "--merge-online-module")
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = logits(pair / "teacher", adapter=tmp_path / "run" / "online_module")
    assert float((want - logits(pair / "teacher")).abs().max()) > 0
    torch.testing.assert_close(logits(tmp_path / "merged"), want, rtol=0, atol=1e-4)
    original = load_file(str(pair / "teacher" / "model.safetensors"))["model.embed_tokens.weight"]
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert torch.equal(merged["model.embed_tokens.weight"], original)
    assert not torch.equal(merged["lm_head.weight"], original)


def test_refusals(runs, tmp_path):
    run = runs["2proc-zero2"]
    broken = tmp_path / "broken"
    shutil.copytree(run / "checkpoints", broken)
    for f in (broken / "global_step4" / "student").glob("*zero_pp_rank_1_*optim_states.pt"):
        f.unlink()
    proc = convert(broken, tmp_path / "x")
    assert proc.returncode == 2 and "saved by 2 ranks" in proc.stderr and "rank(s) 1 is missing" in proc.stderr

    proc = convert(run, tmp_path / "y", "--tag", "global_step99")
    assert proc.returncode == 2 and "--tag global_step99: no such tag" in proc.stderr and "global_step4" in proc.stderr

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    proc = convert(run, full)
    assert proc.returncode == 2 and "not empty; pass --overwrite" in proc.stderr
    assert (full / "keep.txt").read_text() == "mine"
    proc = convert(run, full, "--overwrite", "--dtype", "fp32")
    assert proc.returncode == 0 and not (full / "keep.txt").exists()

    proc = convert(runs["1proc-zero2"] / "checkpoints", tmp_path / "z", "--model", "student",
                   "--merge-online-module")
    assert proc.returncode == 2 and "--merge-online-module applies to --model teacher" in proc.stderr
