"""Bad input stops a run before any engine starts, with a message naming the key, file or line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tiny
from okd_scale.config import ConfigError
from okd_scale.configure import load_config
from okd_scale.engines import build_ds_config, ds_configs_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("cfg")
    tiny.make_llama(d / "teacher", tokenizer, num_layers=2, hidden=16, heads=2, intermediate=32)
    tiny.make_llama(d / "student", tokenizer, num_layers=1, hidden=16, heads=2, intermediate=32)
    tiny.write_jsonl(d / "train.jsonl", tiny.make_rows(8))
    return d


def base(d: Path) -> dict:
    return {"method": "okd", "output_dir": str(d / "out"),
            "model": {"teacher": str(d / "teacher"), "student": str(d / "student")},
            "data": {"train_file": str(d / "train.jsonl"), "max_length": 32}}


def write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_valid_config_and_overrides(tmp_path, assets):
    cfg = load_config(write(tmp_path, base(assets)),
                      ["train.max_steps=7", "loss.divergence=rkl", "online.target_modules=q_proj,v_proj",
                       "train.learning_rate=5e-5"])
    assert cfg.train.max_steps == 7 and cfg.loss.divergence == "rkl"
    assert cfg.online.target_modules == ["q_proj", "v_proj"] and cfg.train.learning_rate == 5e-5


@pytest.mark.parametrize("mutate, overrides, message", [
    (lambda c: c["train"].update(max_step=3) if "train" in c else c.update(train={"max_step": 3}), [],
     'unknown key "train.max_step" (did you mean "train.max_steps"?)'),
    (lambda c: c.update(methd="okd"), [], 'unknown key "methd"'),
    (lambda c: None, ["train.max_steps=ten"], '"train.max_steps" must be int'),
    (lambda c: None, ["loss.kd_ratio=1.5"], '"loss.kd_ratio" must be in [0, 1]'),
    (lambda c: None, ["loss.divergence=kl"], '"loss.divergence" must be one of fkl, rkl'),
    (lambda c: None, ["method=ppo"], '"method" must be one of okd, kd, sft'),
    (lambda c: None, ["train.per_device_train_batch_size=0"],
     '"train.per_device_train_batch_size" must be an integer >= 1'),
    (lambda c: None, ["train.nope=1"], 'unknown key "train.nope"'),
    (lambda c: None, ["train.max_steps"], "expected key=value"),
    (lambda c: c["model"].update(teacher="/no/such/teacher"), [],
     '"model.teacher": model directory not found: /no/such/teacher'),
    (lambda c: c["model"].update(student="HuggingFaceTB/SmolLM2-135M"), [],
     "is not a local directory. Models load from local directories; set model.allow_hub=true"),
    (lambda c: c["data"].update(train_file="/no/such.jsonl"), [], '"data.train_file": file not found: /no/such.jsonl'),
    (lambda c: None, ["deepspeed.student_config=nope.json"], '"deepspeed.student_config": DeepSpeed config not found'),
    (lambda c: None, ["loss.vocab_shards=0"], '"loss.vocab_shards" must be an integer >= 1'),
    (lambda c: None, ["loss.vocab_shards=2", "loss.from_hidden=false"],
     '"loss.vocab_shards" must be 1 when loss.from_hidden is false'),
    (lambda c: None, ['online.target_modules=["q_proj", "lm_head"]'],
     '"online.target_modules" must be modules of the teacher\'s blocks (for a module on the lm_head use '
     'online.placement=head)'),
    (lambda c: None, ["online.target_modules=[q_proj, v_proj"],
     'the value of "online.target_modules" is not valid YAML (expected \',\' or \']\''),
    (lambda c: None, ['resume_ignore=["train.max_stepz"]'], '"resume_ignore" must be a list of run-config keys'),
    (lambda c: None, ["online.placement=lm_head"], '"online.placement" must be one of blocks, head, temperature'),
    (lambda c: None, ["online.objective=pesf"], '"online.objective" must be one of decoupled, joint'),
    (lambda c: None, ["online.ce_weight=-1"], '"online.ce_weight" must be a number >= 0'),
    (lambda c: None, ["online.drift_every=-1"], '"online.drift_every" must be an integer >= 0'),
    (lambda c: None, ["online.learning_rate=ratio:-1"], '"online.learning_rate" must be a number >= 0, or ratio:R'),
    (lambda c: None, ["online.learning_rate=half"], '"online.learning_rate" must be a number >= 0, or ratio:R'),
    (lambda c: None, ["online.learning_rate=-1e-4"], '"online.learning_rate" must be a number >= 0, or ratio:R'),
    (lambda c: None, ["online.warmup_steps=-1"], '"online.warmup_steps" must be null or an integer >= 0'),
    (lambda c: None, ["train.malloc_mmap_threshold=67108864"],
     '"train.malloc_mmap_threshold" must be null or an integer in [0, 33554432] (bytes), got 67108864'),
])
def test_bad_config_names_the_key(tmp_path, assets, mutate, overrides, message):
    cfg = base(assets)
    mutate(cfg)
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, cfg), overrides)
    assert message in str(e.value)


def test_online_learning_rate_as_a_ratio(tmp_path, assets):
    """online.learning_rate: a number, or ratio:R of train.learning_rate, in the teacher's DeepSpeed optimizer."""
    from okd_scale.config import online_learning_rate

    cfg = load_config(write(tmp_path, base(assets)), ["train.learning_rate=5e-4", "online.learning_rate=ratio:0.2"])
    assert cfg.online.learning_rate == "ratio:0.2" and online_learning_rate(cfg) == pytest.approx(1e-4)
    teacher, _ = ds_configs_for(cfg, world_size=1)
    assert teacher["optimizer"]["params"]["lr"] == pytest.approx(1e-4)
    assert online_learning_rate(load_config(write(tmp_path, base(assets)), ["online.learning_rate=3e-5"])) == 3e-5


def test_sft_needs_no_teacher(tmp_path, assets):
    cfg = base(assets)
    cfg["model"]["teacher"] = ""
    assert load_config(write(tmp_path, {**cfg, "method": "sft"})).method == "sft"
    with pytest.raises(ConfigError, match='"model.teacher" is required'):
        load_config(write(tmp_path, cfg))


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="--config: file not found"):
        load_config(tmp_path / "missing.yaml")


def test_ds_config_auto_filled_and_conflicts_refused(tmp_path, assets):
    cfg = load_config(write(tmp_path, base(assets)), ["train.gradient_accumulation_steps=3", "train.bf16=true",
                                                      "deepspeed.teacher_config=ds_configs/teacher_zero3_offload.json"])
    teacher, student = ds_configs_for(cfg, world_size=2)
    assert student["train_batch_size"] == 4 * 3 * 2 and student["bf16"]["enabled"] is True
    assert teacher["zero_optimization"]["stage"] == 3
    assert teacher["optimizer"]["params"]["lr"] == cfg.train.learning_rate  # the paper: the student's rate (ratio:1)
    assert student["data_types"] == teacher["data_types"] == {"grad_accum_dtype": "fp32"}  # bf16 accumulates in fp32
    auto, _ = ds_configs_for(load_config(write(tmp_path, base(assets))), world_size=1)  # a tiny teacher: a replica
    assert auto["zero_optimization"] == {"stage": 1} and auto["optimizer"]["params"]["lr"] == cfg.train.learning_rate
    assert student["optimizer"]["params"]["lr"] == cfg.train.learning_rate
    kd_teacher, _ = ds_configs_for(load_config(write(tmp_path, {**base(assets), "method": "kd"})), world_size=1)
    assert "optimizer" not in kd_teacher
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r'ds.json: "train_micro_batch_size_per_gpu" is 8 but the run config gives 4'):
        build_ds_config(str(ds), {}, micro_batch_size=4, gradient_accumulation_steps=1, world_size=1,
                        learning_rate=1e-4, weight_decay=0.0, bf16=False, max_grad_norm=1.0)
    ds.write_text(json.dumps({"zero_optimization": {"stage": "auto"}}))
    with pytest.raises(ConfigError, match='"zero_optimization.stage" is "auto" but okd_scale has no value'):
        build_ds_config(str(ds), {}, micro_batch_size=4, gradient_accumulation_steps=1, world_size=1,
                        learning_rate=1e-4, weight_decay=0.0, bf16=False, max_grad_norm=1.0)


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env_drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    import os
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    return subprocess.run([sys.executable, str(ROOT / "okd_scale" / "train.py"), *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=cwd)


def test_cli_bad_config_exits_2_before_any_engine(tmp_path, assets):
    proc = run_cli("--config", str(write(tmp_path, base(assets))), "train.max_stepz=3")
    assert proc.returncode == 2
    assert 'error: ' in proc.stderr and 'unknown key "train.max_stepz"' in proc.stderr
    assert not (assets / "out").exists()  # nothing started, nothing written


@pytest.mark.parametrize("rows, message", [
    ([], "no rows (empty data file"),
    ([{"prompt": "please tell me", "output": "a cat"}, {"prompt": "name a dog"}], 'line 2'),
    ([{"prompt": "please tell me", "output": "a cat"}] * 3,
     "3 usable examples on 1 ranks give 3 per rank, fewer than one batch (train.per_device_train_batch_size 4)"),
])
def test_cli_bad_data_exits_2(tmp_path, assets, rows, message):
    data = tiny.write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = base(assets)
    cfg["data"]["train_file"] = str(data)
    cfg["output_dir"] = str(tmp_path / "out")
    proc = run_cli("--config", str(write(tmp_path, cfg)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: " in proc.stderr and "train.jsonl" in proc.stderr and message.lower() in proc.stderr.lower()
    assert "Traceback" not in proc.stderr


def test_cli_different_tokenizers_refused(tmp_path, assets):
    other = tmp_path / "other_tok"
    tiny.make_tokenizer(other, vocab_size=300)
    from transformers import AutoTokenizer
    tiny.make_llama(tmp_path / "teacher2", AutoTokenizer.from_pretrained(str(other)), num_layers=1, hidden=16,
                    heads=2, intermediate=32)
    cfg = base(assets)
    cfg["model"]["teacher"] = str(tmp_path / "teacher2")
    proc = run_cli("--config", str(write(tmp_path, cfg)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "different tokenizers" in proc.stderr and "teacher2" in proc.stderr and "student" in proc.stderr


def test_cli_malformed_override_value_exits_2(tmp_path, assets):
    proc = run_cli("--config", str(write(tmp_path, base(assets))), "online.target_modules=[q_proj, v_proj")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert 'the value of "online.target_modules" is not valid YAML' in proc.stderr


def test_cli_help_and_unknown_flag_exit_statuses():
    """argparse's own exits pass through the distributed shutdown unchanged: --help 0, a bad flag 2."""
    proc = run_cli("--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout and "Traceback" not in proc.stderr
    proc = run_cli("--bogus")
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr and "Traceback" not in proc.stderr


def _broken_copy(src: Path, dst: Path, how: str) -> Path:
    """A copy of model directory src with one fault: truncated or missing weights, an unknown
    architecture, or a vocabulary smaller than its tokenizer."""
    import json
    import shutil

    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    config = json.loads((dst / "config.json").read_text())
    if how == "partial":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "missing":
        weights.unlink()
    elif how == "lacking":  # a complete file that lacks a tensor (a shard of a sharded checkpoint, say)
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        tensors.pop(next(k for k in tensors if "layers.0" in k))
        save_file(tensors, str(weights), metadata={"format": "pt"})
    elif how == "architecture":
        config.update(model_type="no_such_model", architectures=["NoSuchModelForCausalLM"])
    elif how == "small_vocab":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(src))
        model.resize_token_embeddings(model.config.vocab_size // 2)
        model.save_pretrained(str(dst))
        return dst
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("role, how, message", [
    ("teacher", "partial", "cannot load a causal LM from"),
    ("student", "partial", "cannot load a causal LM from"),
    ("teacher", "missing", "cannot load a causal LM from"),
    ("student", "lacking", "lack or mis-shape 1 tensors"),
    ("teacher", "architecture", "cannot load a causal LM from"),
    ("teacher", "small_vocab", "its vocabulary has"),
])
def test_cli_unusable_model_refused_before_training(tmp_path, assets, role, how, message):
    """A truncated or missing weights file, an architecture transformers cannot build, a vocabulary smaller
    than the tokenizer: refused at start (exit 2) naming the directory, with nothing trained or saved."""
    cfg = base(assets)
    cfg["model"][role] = str(_broken_copy(assets / role, tmp_path / f"bad_{role}", how))
    cfg["output_dir"] = str(tmp_path / "out")
    proc = run_cli("--config", str(write(tmp_path, cfg)), "train.max_steps=2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: " in proc.stderr and message in proc.stderr and f"bad_{role}" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / "student").exists()


def test_readme_key_table_lists_every_key():
    """The README's table of config keys names every key of the run config (sgo.lambda as its config-file name),
    and is the table the config generates (every key's default and help)."""
    import re

    from okd_scale.config import RunConfig, _all_keys
    from okd_scale.configure import key_table

    readme = (ROOT / "README.md").read_text()
    start = readme.index("| key | default | what it is |")
    table = readme[start:readme.index("\n\n", start)]
    listed = {re.split(r"(?<!\\)\|", line)[1].strip().strip("`") for line in table.splitlines()[2:]}
    missing = [key for key in _all_keys(RunConfig) if key.replace("lmbda", "lambda") not in listed]
    assert missing == []
    assert table == key_table()


def test_help_prints_every_key_with_its_default():
    """okd_scale/train.py --help lists every config key with its default and help."""
    from okd_scale.configure import key_help

    proc = subprocess.run([sys.executable, str(ROOT / "okd_scale" / "train.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for key, default, help in key_help():
        assert f"{key} (default {default}): {' '.join(help.split())}" in text, key


def test_readme_layout_names_every_module_and_tool():
    """The README's layout section names every module of the package and every script of tools/ with its folder."""
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):readme.index("## Tests")]
    names = [p.name for p in sorted((ROOT / "okd_scale").glob("*.py")) + sorted((ROOT / "tools").rglob("*.py"))
             if p.name != "__init__.py"]
    folders = [f"{p.name}/" for p in sorted((ROOT / "tools").iterdir()) if (p / "__init__.py").is_file()]
    assert [f for f in names + folders if f not in layout] == []


def test_shipped_ds_configs_resolve_inside_the_package(tmp_path, monkeypatch):
    """The default DeepSpeed configs resolve from any working directory: they ship inside the package."""
    from okd_scale.config import PACKAGE_DIR, RunConfig, resolve_path

    monkeypatch.chdir(tmp_path)
    for name in (RunConfig().deepspeed.student_config, "ds_configs/teacher_zero3.json"):
        path = resolve_path(name)
        assert path.is_file() and path.parent == PACKAGE_DIR / "ds_configs"


def test_okd_command_dispatches_to_each_module():
    """`okd` (python -m okd_scale.cli) runs train, evaluate, convert and plan's own command lines."""
    def okd(*args):
        return subprocess.run([sys.executable, "-m", "okd_scale.cli", *args], capture_output=True, text=True,
                              timeout=300, cwd=ROOT)

    proc = okd("--help")
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("train", "evaluate", "convert", "plan"))
    for command, flag in (("train", "--config"), ("evaluate", "--model"), ("convert", "--merge-online-module"),
                          ("plan", "--teacher-params")):
        proc = okd(command, "--help")
        assert proc.returncode == 0 and flag in proc.stdout, (command, proc.stderr[-2000:])
    proc = okd("distill")
    assert proc.returncode == 2 and "unknown command 'distill'" in proc.stderr


def test_registry_names_in_help_and_readme_are_the_registries(monkeypatch):
    """Every key that takes a registry's names lists exactly that registry in --help and the README's key table
    (both are key_help's rows: the tests above), a name added to a registry included."""
    from okd_scale import configure, divergences, methods, models

    keys = {"method": methods.METHODS, "loss.divergence": divergences.DIVERGENCES,
            "online.divergence": divergences.DIVERGENCES, "online.placement": models.ONLINE_MODULES,
            "online.objective": methods.ONLINE_OBJECTIVES}
    rows = {key: help for key, _, help in configure.key_help()}
    for key, registry in keys.items():
        assert f": {' | '.join(registry)}" in rows[key], key
    monkeypatch.setitem(methods.METHODS, "toy", methods.Method(methods.kd_step, teacher="frozen"))
    assert " | taid | toy" in {key: help for key, _, help in configure.key_help()}["method"]
    with pytest.raises(configure.ConfigError, match='"method" must be one of okd, kd, sft, seqkd, sgo, taid, toy'):
        configure.load_config(None, ["method=ppo"])
