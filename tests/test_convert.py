"""tools/convert_to_hf.py: checkpoints of 1- and 2-process runs, ZeRO-2 and ZeRO-3 students, become
Hugging Face directories whose logits are the trained model's; the teacher with each online module (the
paper's, blocks, head, temperature; on tied embeddings too), merged or beside the base as the trainer
exports it; sharded output; and every refusal. The runs train on the accelerator (2-process runs on the
CPU where it has fewer than 2 devices); conversion and the logits compared run on the host."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny
from okd_scale.config import LLAMA_TARGETS
from tiny import ROOT, write_config

TOOL = ROOT / "tools" / "convert_to_hf.py"
pytestmark = pytest.mark.xdist_group("convert_runs")  # the module's runs are trained once, on one worker
RUNS = {"1proc-zero2": (1, "ds_configs/student_zero2.json"), "1proc-zero3": (1, "ds_configs/student_zero3.json"),
        "2proc-zero2": (2, "ds_configs/student_zero2.json"), "2proc-zero3": (2, "ds_configs/student_zero3.json")}


class Runs(dict):
    """okd runs of 4 steps, one per (processes, student ZeRO stage), and one with a tied-embedding student
    under ZeRO-3 ("tied-zero3", 2 processes): run name -> output directory, trained on first use together with the
    other runs of its number of processes (one launch)."""

    def __init__(self, base: Path, pair: Path, tokenizer):
        super().__init__()
        self.base, self.pair = base, pair
        tiny.make_llama(base / "tied_student", tokenizer, num_layers=2, hidden=32, seed=5, tie=True)

    def __missing__(self, name: str) -> Path:
        every = {**RUNS, "tied-zero3": (2, "ds_configs/student_zero3.json")}
        nproc = every[name][0]
        names = [n for n, (procs, _) in every.items() if procs == nproc and n not in self]
        runs = []
        for n in names:
            cfg = write_config(self.base / f"{n}.yaml", self.pair, "okd", deepspeed={"student_config": every[n][1]})
            extra = [f"model.student={self.base / 'tied_student'}"] if n.startswith("tied") else []
            runs.append([cfg, f"output_dir={self.base / n}", "train.max_steps=4", "data.eval_file=null", *extra])
        proc = tiny.launch_runs(runs, nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        self.update({n: self.base / n for n in names})
        return self[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pair, tokenizer):
    return Runs(tmp_path_factory.mktemp("convert_runs"), pair, tokenizer)


def convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], env=tiny.subprocess_env(), capture_output=True,
                          text=True, timeout=600, cwd=ROOT)


def probe(model) -> torch.Tensor:
    """The model's logits on a fixed batch, in fp32."""
    ids = torch.arange(40).reshape(2, 20) % model.config.vocab_size
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def logits(model_dir: Path, dtype=torch.float32, module: Path | None = None, online=None) -> torch.Tensor:
    """``probe`` of the model in `model_dir`, with the online module exported to `module` attached by the
    declaration of `online` (an OnlineArgs; default the blocks placement's)."""
    from transformers import AutoModelForCausalLM

    from okd_scale.config import OnlineArgs
    from okd_scale.models import online_module

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if module is not None:
        model = online_module(online or OnlineArgs()).load(model, module)
    return probe(model)


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
    want = logits(pair / "teacher", module=run / "online_module")  # the trainer's own adapter export
    assert float((want - logits(pair / "teacher")).abs().max()) > 0  # the online module changed the teacher
    torch.testing.assert_close(logits(merged), want, rtol=0, atol=1e-4)
    torch.testing.assert_close(logits(adapter, module=adapter / "online_module"), want, rtol=0, atol=1e-6)


MODULES = {  # name -> the online.* overrides of write_config's run (whose online section sets num_blocks 2)
    "paper": ["online.num_blocks=null"],  # the defaults: blocks, every block, q_proj + v_proj, r 32, alpha 32
    "blocks-last2-all7": ["online.num_blocks=2", f"online.target_modules={json.dumps(LLAMA_TARGETS)}"],
    "head": ["online.placement=head"],
    "temperature": ["online.placement=temperature"],
}


def okd_run(cfg_file: Path, out: Path, overrides: list) -> tuple:
    """A 3-step okd run (in this process) to `out`: (its config, its teacher's logits as the run left it: the base
    with the module its declaration adds, holding the trained weights)."""
    from dist_worker import run_and_dump
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from okd_scale.configure import load_config
    from okd_scale.models import online_module

    cfg = load_config(cfg_file, [f"output_dir={out}", "train.max_steps=3", "data.eval_file=null", *overrides])
    run_and_dump(cfg)
    teacher = online_module(cfg.online).add(AutoModelForCausalLM.from_pretrained(cfg.model.teacher,
                                                                                dtype=torch.float32), cfg.online)
    teacher.load_state_dict(load_file(str(out / "teacher_after.safetensors")))
    want = probe(teacher)
    assert float((want - logits(Path(cfg.model.teacher))).abs().max()) > 1e-3  # the module changed the teacher
    return cfg, want


def assert_round_trips(cfg, want: torch.Tensor, tmp_path: Path) -> dict:
    """The run's exported online_module/ on the base, `okd convert --model teacher` (the base with online_module/
    beside it) and `okd convert --model teacher --merge-online-module` (one plain model) give the trained teacher's
    logits; each module directory is in the form its declaration names. Returns {"module", "merged"}: the outputs."""
    from okd_scale.convert import main
    from okd_scale.models import ONLINE_CONFIG, TEMPERATURE_FILE, online_module

    out, base = Path(cfg.output_dir), Path(cfg.model.teacher)
    converted = {"module": tmp_path / "module", "merged": tmp_path / "merged"}
    for kind, extra in (("module", []), ("merged", ["--merge-online-module"])):
        assert main([str(out), str(converted[kind]), "--model", "teacher", "--dtype", "fp32", *extra]) == 0
    for module in (out / "online_module", converted["module"] / "online_module"):
        files = {p.name for p in module.iterdir()}
        if online_module(cfg.online).adapter:
            assert {"adapter_config.json", "adapter_model.safetensors"} <= files
        else:
            assert {ONLINE_CONFIG, TEMPERATURE_FILE} <= files
            assert json.loads((module / ONLINE_CONFIG).read_text())["placement"] == cfg.online.placement
    torch.testing.assert_close(logits(base, module=out / "online_module", online=cfg.online), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(converted["module"], module=converted["module"] / "online_module",
                                      online=cfg.online), want, rtol=0, atol=1e-6)
    assert not (converted["merged"] / "online_module").exists()
    torch.testing.assert_close(logits(converted["merged"]), want, rtol=0, atol=1e-4)
    return converted


@pytest.mark.parametrize("name", list(MODULES))
def test_teacher_module_round_trips(tmp_path, pair, name):
    """Each online module: exported by the trainer and converted (beside the base or merged), reloaded, it gives the
    trained teacher's logits; the adapter says where the module is."""
    cfg, want = okd_run(write_config(tmp_path / "cfg.yaml", pair, "okd"), tmp_path / "run", MODULES[name])
    assert_round_trips(cfg, want, tmp_path)
    if cfg.online.placement == "blocks":
        adapter = json.loads((tmp_path / "module" / "online_module" / "adapter_config.json").read_text())
        blocks = list(range(4)) if name == "paper" else [2, 3]
        assert (adapter["r"], adapter["lora_alpha"], adapter["layers_to_transform"]) == (32, 32, blocks)
        assert set(adapter["target_modules"]) == set(cfg.online.target_modules)
    if cfg.online.placement == "temperature":
        exported = json.loads((tmp_path / "run" / "online_module" / "online_config.json").read_text())
        assert exported["temperature"] != 1.0


@pytest.mark.parametrize("placement", ["head", "temperature"])
def test_teacher_output_module_on_tied_embeddings(tmp_path, tokenizer, placement):
    """A module on the output side of a teacher whose lm_head is tied to its input embeddings: merged, the lm_head
    gets its own weights and the embeddings stay the original ones; the logits equal the trained teacher's."""
    from safetensors.torch import load_file

    pair = tmp_path / "pair"
    tiny.make_llama(pair / "teacher", tokenizer, num_layers=2, hidden=32, seed=6, tie=True)
    tiny.make_llama(pair / "student", tokenizer, num_layers=1, hidden=32, seed=7)
    tiny.write_jsonl(pair / "train.jsonl", tiny.make_rows(16, seed=3))
    cfg, want = okd_run(write_config(tmp_path / "cfg.yaml", pair, "okd"), tmp_path / "run",
                        [f"online.placement={placement}"])
    converted = assert_round_trips(cfg, want, tmp_path)
    original = load_file(str(pair / "teacher" / "model.safetensors"))["model.embed_tokens.weight"]
    merged = load_file(str(converted["merged"] / "model.safetensors"))
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
