"""Training with real DeepSpeed engines on CPU: okd, kd, sft on 1 and 2 processes, and the launcher path."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tiny

ROOT = Path(__file__).resolve().parents[1]
TORCH_ADAM = {"optimizer": {"params": {"torch_adam": True}}}


@pytest.fixture(scope="session")
def pair(tmp_path_factory, tokenizer):
    """A tiny teacher (4 blocks) and student (2 blocks) with one tokenizer, and train/eval data."""
    d = tmp_path_factory.mktemp("pair")
    tiny.make_llama(d / "teacher", tokenizer, num_layers=4, hidden=32, seed=1)
    tiny.make_llama(d / "student", tokenizer, num_layers=2, hidden=32, seed=2)
    tiny.write_jsonl(d / "train.jsonl", tiny.make_rows(32, seed=3))
    tiny.write_jsonl(d / "eval.jsonl", tiny.make_rows(8, seed=4))
    return d


def write_config(path: Path, pair: Path, method: str, **sections) -> Path:
    cfg = {
        "method": method, "seed": 0, "output_dir": str(path.parent / f"out-{method}"),
        "model": {"teacher": str(pair / "teacher"), "student": str(pair / "student")},
        "data": {"train_file": str(pair / "train.jsonl"), "eval_file": str(pair / "eval.jsonl"), "max_length": 64},
        "train": {"max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 5e-3,
                  "lr_scheduler_type": "constant"},
        "online": {"learning_rate": 5e-3, "num_blocks": 2},
        "deepspeed": {"teacher_overrides": TORCH_ADAM, "student_overrides": TORCH_ADAM},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    path.write_text(yaml.safe_dump(cfg))
    return path


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), **extra)
    return env


def student_ce(model_dir: Path, data_file: Path, tokenizer) -> float:
    """Mean response-token cross-entropy of a saved model over a data file (plain transformers, no DeepSpeed)."""
    from transformers import AutoModelForCausalLM

    from okd_scale.data import collate, load_dataset

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    examples, _ = load_dataset(data_file, tokenizer, 64)
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        return float(model(**batch).loss)


def check_run(out: Path, pair: Path, method: str, tokenizer) -> dict:
    report = json.loads((out / "report.json").read_text())
    history = report["history"]
    assert len(history) == 6 and all(torch.isfinite(torch.tensor(r["student/loss"])) for r in history)
    # the student learned: its loss on the training data fell (exported model, loaded by transformers)
    assert student_ce(out / "student", pair / "train.jsonl", tokenizer) < student_ce(pair / "student",
                                                                                    pair / "train.jsonl", tokenizer)
    if method == "sft":
        assert not (out / "teacher_after.safetensors").exists()
        return report
    before = load_file(str(pair / "teacher" / "model.safetensors"))
    after = load_file(str(out / "teacher_after.safetensors"))
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in after.items() if "lora_" not in k}
    assert set(base) == set(before)
    changed = [k for k in before if not torch.equal(before[k], base[k])]
    assert changed == [], f"teacher base weights changed: {changed[:3]}"
    lora_b = {k: v for k, v in after.items() if "lora_B" in k}
    if method == "okd":
        # zero-initialised B matrices on the last 2 blocks only, and they moved
        assert lora_b and all(".layers.2." in k or ".layers.3." in k for k in lora_b)
        assert max(float(v.abs().max()) for v in lora_b.values()) > 0
        assert "teacher/loss" in history[0] and (out / "online_module" / "adapter_config.json").is_file()
    else:
        assert not lora_b and "teacher/loss" not in history[0]
    return report


@pytest.mark.parametrize("method", ["okd", "kd", "sft"])
def test_one_process(tmp_path, pair, tokenizer, method):
    from dist_worker import run_and_dump

    from okd_scale.config import load_config

    cfg = load_config(write_config(tmp_path / "cfg.yaml", pair, method))
    run_and_dump(cfg)
    report = check_run(Path(cfg.output_dir), pair, method, tokenizer)
    assert report["metrics"]["world_size"] == 1 and report["metrics"]["eval/student_ce"] > 0


def test_same_seed_same_losses(tmp_path, pair):
    from dist_worker import run_and_dump

    from okd_scale.config import load_config

    runs = []
    for i in range(2):
        cfg = load_config(write_config(tmp_path / f"cfg{i}.yaml", pair, "okd"),
                          [f"output_dir={tmp_path / f'run{i}'}", "train.gradient_accumulation_steps=2"])
        runs.append([{k: v for k, v in r.items() if "/" in k and not k.startswith(("time", "tokens_"))}
                     for r in run_and_dump(cfg)["history"]])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("method", ["okd", "kd", "sft"])
def test_two_processes(tmp_path, pair, tokenizer, method):
    cfg = write_config(tmp_path / "cfg.yaml", pair, method)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "dist_worker.py"), str(cfg)]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = check_run(tmp_path / f"out-{method}", pair, method, tokenizer)
    assert report["metrics"]["world_size"] == 2


@pytest.mark.slow
def test_deepspeed_launcher(tmp_path, pair, tokenizer):
    """`deepspeed --num_gpus 2 okd_scale/train.py ...` with the shipped teacher config (DeepSpeedCPUAdam)."""
    cfg = write_config(tmp_path / "cfg.yaml", pair, "okd", deepspeed={"teacher_overrides": {}})
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", "29533", str(ROOT / "okd_scale" / "train.py"),
           "--config", str(cfg), "train.max_steps=3"]
    proc = subprocess.run(cmd, env=clean_env(PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out-okd"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(str(out / "student")).config.num_hidden_layers == 2
    assert (out / "tensorboard").is_dir() and any((out / "tensorboard").iterdir())
