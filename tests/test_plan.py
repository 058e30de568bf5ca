"""okd_scale/plan.py (and tools/plan.py, its command line) against what torch, peft and transformers actually build
and allocate on this machine."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo_out"


from okd_scale import plan  # noqa: E402
from okd_scale.config import OnlineArgs  # noqa: E402

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _gqa_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tokenizer):
    """Saved tiny Llamas: untied and tied (tests/tiny.make_llama), and a GQA one; with their models."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("plan_models")
    out = {"untied": (root / "untied", tiny.make_llama(root / "untied", tokenizer, num_layers=4, tie=False)),
           "tied": (root / "tied", tiny.make_llama(root / "tied", tokenizer, num_layers=2, tie=True))}
    torch.manual_seed(0)
    gqa = LlamaForCausalLM(_gqa_config())
    gqa.save_pretrained(str(root / "gqa"))
    out["gqa"] = (root / "gqa", gqa)
    return out


# --------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("name", ["untied", "tied", "gqa"])
def test_param_count_equals_torch(tiny_dirs, name):
    path, model = tiny_dirs[name]
    shape = plan.read_shape(path)
    assert shape.params == _numel(model)
    assert shape.block_params == _numel(model.model.layers[0])
    assert shape.tied == (name != "untied")
    # a config.json path reads the same as its directory
    assert plan.read_shape(path / "config.json").params == shape.params


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "llama_bias"])
def test_param_count_other_llama_families(tmp_path, family):
    from transformers import MistralConfig, Qwen2Config, Qwen3Config

    sizes = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    cfg = {"mistral": lambda: MistralConfig(**sizes, head_dim=8),
           "qwen2": lambda: Qwen2Config(**sizes),
           "qwen3": lambda: Qwen3Config(**sizes, head_dim=16, tie_word_embeddings=True),
           "llama_bias": lambda: _gqa_config(attention_bias=True, mlp_bias=True, tie_word_embeddings=False)}[family]()
    cfg.save_pretrained(str(tmp_path))
    model = _meta_model(cfg)
    shape = plan.read_shape(tmp_path)
    assert shape.params == _numel(model)
    assert shape.block_params == _numel(model.model.layers[0])


def test_smollm2_135m_count():
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    counted = plan.shape_from_config(cfg).params
    assert counted == _numel(_meta_model(cfg))
    assert counted == 134_515_008  # the published size of SmolLM2-135M


@pytest.mark.parametrize("name", ["teacher", "student_init"])
def test_demo_pair_counts(name):
    path = DEMO / name / "config.json"
    if not path.is_file():
        pytest.skip(f"{path} not built (make demo)")
    from transformers import AutoConfig

    assert plan.read_shape(path.parent).params == _numel(_meta_model(AutoConfig.from_pretrained(str(path.parent))))


@pytest.mark.parametrize("name, args, reached", [
    ("gqa", OnlineArgs(r=4), 2),  # the paper's: q_proj, v_proj of every block
    ("untied", OnlineArgs(r=8, num_blocks=2, target_modules=SEVEN), 2),  # the last 2 of 4 blocks
    ("gqa", OnlineArgs(r=8, num_blocks=1, target_modules=SEVEN), 1),
    ("untied", OnlineArgs(placement="head", r=4), 0),
    ("gqa", OnlineArgs(placement="head", r=4), 0),  # a tied lm_head
    ("gqa", OnlineArgs(placement="temperature"), 0),
], ids=["blocks-paper", "blocks-seven-k2", "blocks-seven-k1-gqa", "head", "head-tied", "temperature"])
def test_online_module_count_equals_the_module_built(tiny_dirs, name, args, reached):
    """The plan's trainable count is that of the module okd_scale.models builds on the teacher, for every placement;
    the blocks its backward reaches are those from its lowest block to the top."""
    from transformers import LlamaForCausalLM

    from okd_scale.models import add_online_module, online_module

    path, _ = tiny_dirs[name]
    shape = plan.read_shape(path)
    model = add_online_module(LlamaForCausalLM.from_pretrained(str(path)), args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert online_module(args).params(shape, args) == trainable
    cfg = plan.Settings(module=args, teacher=plan.EngineSpec(0), cluster=plan.Cluster(1, 1))
    got = plan.make_plan(shape, shape, cfg)
    assert (got.online_params, got.reached_blocks) == (trainable, reached)
    assert got.item("teacher gradients").gpu == 2 * trainable
    frozen = plan.make_plan(shape, shape, dataclasses.replace(cfg, online=False))
    assert (frozen.online_params, frozen.reached_blocks, frozen.item("teacher gradients").gpu) == (0, 0, 0)


# --------------------------------------------------------------------------- model states


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def _states(p: plan.Plan, who: str) -> dict[str, plan.Item]:
    return {kind: p.item(f"{who} {kind}") for kind in ("parameters", "gradients", "optimizer states")}


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_fp32_states_equal_a_real_adamw_step(tiny_dirs, name):
    """ZeRO-0, fp32, 1 GPU: params + grads + exp_avg + exp_avg_sq as torch allocates them for one step."""
    from transformers import LlamaForCausalLM

    path, _ = tiny_dirs[name]
    model = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    params = list(model.parameters())
    assert all(p.grad is not None for p in params)
    state = [v for s in opt.state.values() for key, v in s.items() if key != "step"]  # step: a scalar counter
    assert {key for s in opt.state.values() for key in s} == {"step", "exp_avg", "exp_avg_sq"}
    measured = {"parameters": _storage_bytes(params), "gradients": _storage_bytes(p.grad for p in params),
                "optimizer states": _storage_bytes(state)}

    shape = plan.read_shape(path)
    cfg = plan.Settings(dtype="fp32", student=plan.EngineSpec(0), cluster=plan.Cluster(1, 1))
    planned = {k: it.gpu for k, it in _states(plan.make_plan(shape, shape, cfg), "student").items()}
    print(f"\n[{name}] measured on this machine (bytes): {measured}; planned: {planned}")
    assert planned == measured
    assert sum(measured.values()) == 16 * shape.params

    bf16 = _states(plan.make_plan(shape, shape, plan.Settings(student=plan.EngineSpec(0), cluster=plan.Cluster(1, 1))),
                   "student")
    assert [bf16[k].gpu for k in bf16] == [2 * shape.params, 2 * shape.params, 12 * shape.params]


def test_zero_stages_divide_by_world_size_and_offload_to_cpu():
    teacher, student = plan.shape_from_count(7_000_000_000), plan.shape_from_count(1_000_000_000)
    cluster = plan.Cluster(nodes=2, gpus_per_node=4)  # N = 8

    def states(zero, offload="none"):
        cfg = plan.Settings(cluster=cluster, student=plan.EngineSpec(zero, offload))
        return _states(plan.make_plan(teacher, student, cfg), "student")

    base = {k: it.gpu for k, it in states(0).items()}
    assert all(it.cpu_node == 0 for it in states(0).values())
    split = {1: {"optimizer states"}, 2: {"optimizer states", "gradients"},
             3: {"optimizer states", "gradients", "parameters"}}
    for zero, kinds in split.items():
        got = states(zero)
        for kind, it in got.items():
            assert it.gpu == (math.ceil(base[kind] / 8) if kind in kinds else base[kind]), (zero, kind)
            assert it.cpu_node == 0
        offloaded = states(zero, "cpu")
        for kind, it in offloaded.items():
            if kind in kinds:  # the partition leaves the GPU; each node holds its 4 GPUs' partitions
                assert (it.gpu, it.cpu_node) == (0, 4 * math.ceil(base[kind] / 8)), (zero, kind)
            else:
                assert (it.gpu, it.cpu_node) == (base[kind], 0), (zero, kind)

    # the teacher (ZeRO-3, offload cpu by default): frozen base params only, the online module's grads and Adam states
    p = plan.make_plan(teacher, student, plan.Settings(cluster=cluster))
    t = _states(p, "teacher")
    n_t = teacher.params + p.online_params
    assert (t["parameters"].gpu, t["parameters"].cpu_node) == (0, 4 * math.ceil(2 * n_t / 8))
    assert t["gradients"].cpu_node == 4 * math.ceil(2 * p.online_params / 8)
    assert t["optimizer states"].cpu_node == 4 * math.ceil(12 * p.online_params / 8)
    on_gpu = _states(plan.make_plan(teacher, student, plan.Settings(cluster=cluster,
                                                                    teacher=plan.EngineSpec(3, "none"))), "teacher")
    assert on_gpu["parameters"].gpu * 4 == t["parameters"].cpu_node and on_gpu["parameters"].cpu_node == 0


def test_offload_needs_zero():
    shape = plan.shape_from_count(10 ** 8)
    with pytest.raises(plan.PlanError, match="--student-offload"):
        plan.make_plan(shape, shape, plan.Settings(student=plan.EngineSpec(0, "cpu")))


def test_activation_items_follow_the_settings():
    teacher, student = plan.shape_from_count(7_000_000_000), plan.shape_from_count(1_000_000_000)

    def acts(module=None, **kw):
        p = plan.make_plan(teacher, student, plan.Settings(module=module or OnlineArgs(num_blocks=2), **kw))
        return p.item("teacher activations").gpu, p.item("student activations").gpu

    t, s = acts()
    t_ckpt, s_ckpt = acts(activation_checkpointing=True)
    assert t_ckpt == t and s_ckpt < s / 4  # the student's checkpointing leaves the teacher's alone
    per_block = plan.block_activation_bytes(teacher, 512, 4, "bf16")
    assert t == 3 * per_block  # 2 reached blocks kept + 1 forward block below them
    assert acts(OnlineArgs(num_blocks=4))[0] - t == 2 * per_block  # each extra reached block keeps its activations
    assert acts(OnlineArgs())[0] == teacher.layers * per_block  # the paper's module reaches every block
    t_flash, _ = acts(flash_attention=True)
    assert t_flash < t
    assert acts(seq_len=1024)[1] > 2 * s  # the a*s^2 scores grow faster than s

    # the teacher checkpointed: the reached blocks' inputs (2*s*b*h bytes in bf16) + one block being recomputed
    inputs = 512 * 4 * teacher.hidden * 2
    for k in (2, None):
        kept = acts(OnlineArgs(num_blocks=k, gradient_checkpointing=True))[0]
        reached = k or teacher.layers
        assert kept == plan.activation_bytes(teacher, 512, 4, "bf16", kept_blocks=reached, checkpointing=True)
        assert kept == reached * inputs + per_block
    assert acts(OnlineArgs(gradient_checkpointing=True))[0] < acts(OnlineArgs())[0] / 4

    # a module whose backward reaches no block, or no module: one block's activations while it runs forward
    for module in (OnlineArgs(placement="head"), OnlineArgs(placement="temperature"),
                   OnlineArgs(placement="head", gradient_checkpointing=True)):
        assert acts(module)[0] == per_block
    assert acts(online=False)[0] == per_block


# --------------------------------------------------------------------------- step time and the CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), *args], capture_output=True, text=True,
                          check=False, cwd=str(ROOT), timeout=120)


def _printed_step_time(out: str) -> float:
    return float(re.search(r"step time: ([0-9.e+-]+) s", out).group(1))


def test_flop_floor_printed_for_configs(tiny_dirs, capsys):
    """Step time printed for two saved models equals the formula on the counts torch reports."""
    (t_path, t_model), (s_path, s_model) = tiny_dirs["untied"], tiny_dirs["tied"]
    k, nodes, gpus, seq, micro, accum, peak, mfu = 2, 2, 4, 64, 3, 5, 1e-6, 0.5
    common = ["--teacher", str(t_path), "--student", str(s_path), "--nodes", str(nodes), "--gpus-per-node", str(gpus),
              "--seq-len", str(seq), "--micro-batch", str(micro), "--grad-accum", str(accum), "--peak-tflops",
              str(peak), "--mfu", str(mfu)]
    tokens = seq * micro * accum * nodes * gpus
    block = _numel(t_model.model.layers[0])
    # the backward through the k reached blocks: input gradients (2 per parameter per token); checkpointed, their
    # forward again (2 more); a module that reaches no block adds nothing to the forwards
    for extra, online in (([], 2 * block * k), (["--teacher-gradient-checkpointing"], 4 * block * k),
                          (["--online-placement", "head"], 0)):
        assert plan.main([*common, "--online-blocks", str(k), *extra]) == 0
        out = capsys.readouterr().out
        flops = (6 * _numel(s_model) + 2 * _numel(t_model) + online) * tokens
        expected = flops / (nodes * gpus * peak * 1e12 * mfu)
        assert _printed_step_time(out) == pytest.approx(expected, rel=1e-5), extra
        assert f"tokens per step: {tokens:,}" in out


def test_flop_floor_for_counts():
    teacher, student = plan.shape_from_count(7_000_000_000), plan.shape_from_count(1_100_000_000)
    tokens = 2048 * 2 * 4 * 16
    for module, online in ((OnlineArgs(num_blocks=3), 2 * teacher.block_params * 3),
                           (OnlineArgs(num_blocks=3, gradient_checkpointing=True), 4 * teacher.block_params * 3),
                           (OnlineArgs(), 2 * teacher.block_params * teacher.layers),
                           (OnlineArgs(placement="temperature", gradient_checkpointing=True), 0)):
        cfg = plan.Settings(seq_len=2048, micro_batch=2, grad_accum=4, cluster=plan.Cluster(2, 8), module=module)
        p = plan.make_plan(teacher, student, cfg)
        flops = (6 * 1_100_000_000 + 2 * 7_000_000_000 + online) * tokens
        assert p.tokens_per_step == tokens
        assert p.flops_per_step == pytest.approx(flops)
        assert p.step_time_s == pytest.approx(flops / (16 * 989e12))
        assert _printed_step_time(plan.render(p)) == pytest.approx(p.step_time_s, rel=1e-5)
    frozen = plan.make_plan(teacher, student, dataclasses.replace(cfg, online=False, module=OnlineArgs()))
    assert frozen.flops_per_step == pytest.approx((6 * 1_100_000_000 + 2 * 7_000_000_000) * tokens)


def test_the_printed_module_says_what_it_is(capsys):
    """The registry's words for each placement; the flags name the config keys."""
    common = ["--teacher-params", "7e9", "--student-params", "1e9"]  # an assumed shape of 32 blocks
    for flags, words in (
            ([], "LoRA r=32 on q_proj,v_proj of all 32 blocks, 16,777,216 trainable parameters; its backward "
                 "reaches 32 of 32 teacher blocks"),
            (["--online-blocks", "4", "--online-targets", "q_proj,o_proj", "--lora-r", "8",
              "--teacher-gradient-checkpointing"],
             "LoRA r=8 on q_proj,o_proj of the last 4 of 32 blocks, 524,288 trainable parameters; its backward "
             "reaches 4 of 32 teacher blocks, checkpointed"),
            (["--online-placement", "head", "--lora-r", "8"],
             "LoRA r=8 on the lm_head, 288,768 trainable parameters; its backward reaches no teacher block"),
            (["--online-placement", "temperature"], "one learned temperature, 1 trainable parameter;"),
            (["--method", "kd"], "online module: none (a frozen teacher)")):
        assert plan.main([*common, *flags]) == 0
        assert words in capsys.readouterr().out, flags


def test_cli_prints_a_table_and_a_verdict(capsys):
    common = ["--teacher-params", "7e9", "--student-params", "1e9", "--seq-len", "2048", "--nodes", "2",
              "--gpus-per-node", "8", "--flash-attention"]
    res = _cli(*common)
    assert res.returncode == 0, res.stderr
    assert "| item | per GPU | CPU per node |" in res.stdout
    assert "| **total** (the largest phase) |" in res.stdout
    assert "overall: FITS" in res.stdout
    assert plan.main([*common, "--gpu-mem-gib", "8"]) == 0
    small = capsys.readouterr().out
    assert re.search(r"GPU per GPU: .* -> DOES NOT FIT \(biggest: ", small)
    assert "overall: DOES NOT FIT" in small


def test_cli_bad_flag_exits_2():
    res = _cli("--teacher-params", "7e9", "--student-params", "1e9", "--seq-len", "-3")
    assert res.returncode == 2
    assert "--seq-len" in res.stderr and "positive integer" in res.stderr


@pytest.mark.parametrize("argv, words", [
    (["--student-params", "1e9"], ["--teacher or --teacher-params"]),
    (["--teacher", "/nonexistent/model", "--student-params", "1e9"], ["--teacher", "no such file"]),
    (["--teacher-params", "7e9", "--student-params=-1e9"], ["--student-params", "positive integer"]),
    (["--teacher-params", "7e9", "--student-params", "1e9", "--nodes", "-2"], ["--nodes", "positive integer"]),
    (["--teacher-params", "7e9", "--student-params", "1e9", "--gpu-mem-gib", "0"], ["--gpu-mem-gib", "positive"]),
    (["--teacher-params", "7e9", "--student-params", "1e9", "--mfu", "1.5"], ["--mfu", "(0, 1]"]),
    (["--teacher-params", "7e9", "--student-params", "1e9", "--student-zero", "0", "--student-offload", "cpu"],
     ["--student-offload", "--student-zero"]),
    (["--teacher-params", "7e9", "--student-params", "1e9", "--online-blocks", "99"], ["--online-blocks", "32"]),
    (["--teacher-params", "7e9", "--student-params", "1e9", "--online-targets", "q_proj,wq"],
     ["--online-targets", "wq"]),
    (["--teacher-params", "7e9", "--student-params", "1e9", "--online-targets", "q_proj,"],
     ["--online-targets", "comma-separated"]),
    (["--teacher-params", "7e9", "--student-params", "1e9", "--online-placement", "prefix"],
     ["--online-placement", "temperature"]),
])
def test_bad_input_names_the_flag(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        plan.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err


def test_config_without_hidden_size(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    with pytest.raises(SystemExit) as e:
        plan.main(["--teacher", str(tmp_path), "--student-params", "1e9"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--teacher" in err and "hidden_size" in err


def test_cli_reads_a_run_config(tmp_path, pair, capsys):
    """--config run.yaml [key=value]: the plan of the run that config describes, the same as the flags it stands for;
    a method without a teacher engine is refused naming the key."""
    import yaml

    cfg = {"method": "okd", "output_dir": str(tmp_path / "out"),
           "model": {"teacher": str(pair / "teacher"), "student": str(pair / "student")},
           "data": {"train_file": str(pair / "train.jsonl"), "max_length": 64},
           "train": {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 2, "bf16": True},
           "online": {"num_blocks": 2, "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "up_proj"],
                      "gradient_checkpointing": True}, "loss": {"chunk_size": 16},
           "deepspeed": {"teacher_config": "ds_configs/teacher_zero3_offload.json",
                         "student_config": "ds_configs/student_zero3.json"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cluster = ["--nodes", "1", "--gpus-per-node", "2"]
    assert plan.main(["--config", str(path), "train.gradient_accumulation_steps=4", *cluster]) == 0
    from_config = capsys.readouterr().out
    flags = ["--teacher", str(pair / "teacher"), "--student", str(pair / "student"), "--method", "okd",
             "--seq-len", "64", "--micro-batch", "3", "--grad-accum", "4", "--dtype", "bf16", "--chunk-size", "16",
             "--online-blocks", "2", "--lora-r", "4", "--online-targets", "q_proj,k_proj,up_proj",
             "--teacher-gradient-checkpointing", "--teacher-zero", "3", "--teacher-offload", "cpu",
             "--student-zero", "3", *cluster]
    assert plan.main(flags) == 0
    assert from_config == capsys.readouterr().out
    assert "LoRA r=4 on q_proj,k_proj,up_proj of the last 2 of" in from_config and "checkpointed" in from_config
    # the run's online section whole (its keys the flags do not name too); a flag given as well wins
    from okd_scale.configure import load_config

    parser = plan.build_parser()
    parser.set_defaults(**plan.defaults_from_config(str(path), []))
    assert plan.settings_from_args(parser.parse_args([])).module == load_config(str(path)).online
    head = plan.settings_from_args(parser.parse_args(["--online-placement", "head", "--lora-r", "16"])).module
    assert (head.placement, head.r, head.lora_alpha, head.num_blocks) == ("head", 16, 8, 2)
    res = _cli("--config", str(path), "method=sft")
    assert res.returncode == 2 and '"method" sft trains without a teacher engine' in res.stderr


def test_zero3_gathered_parameters_follow_max_live_parameters():
    """A ZeRO-3 engine keeps up to stage3_max_live_parameters gathered (DeepSpeed's default 1e9): a small model whole,
    a large one 1e9 parameters, never fewer than two of its largest layers."""
    from okd_scale import plan

    small = plan.shape_from_count(int(135e6), vocab=49152)
    big = plan.shape_from_count(int(70e9))
    assert plan.gathered_params(small) == small.params
    assert plan.gathered_params(big) == max(plan.MAX_LIVE_PARAMETERS, 2 * plan.largest_layer(big))
    cfg = plan.Settings(seq_len=128, micro_batch=1, teacher=plan.EngineSpec(3), dtype="fp32")
    got = plan.make_plan(small, small, cfg).item("teacher gathered layers").gpu
    assert got == small.params * 4


def test_placements_engines_are_their_shipped_configs():
    """Each placement's EngineSpec is what engine_spec reads from its shipped DeepSpeed config, so the plan of a
    placement follows the file the trainer then runs."""
    import json

    from okd_scale import plan
    from okd_scale.config import resolve_path

    for p in plan.PLACEMENTS:
        assert plan.engine_spec(json.loads(resolve_path(p.ds_config).read_text())) == p.engine, p.name


def test_nvme_swap_buffers_and_no_reuse_gathered_parameters():
    """NVMe offload adds DeepSpeed's pinned swap buffers (offload_param buffer_count x buffer_size elements per rank,
    in the compute dtype) to host memory, and a ZeRO-3 engine with stage3_max_reuse_distance 0 keeps only two of
    its largest layers gathered."""
    from okd_scale import plan

    teacher, student = plan.shape_from_count(int(7e9)), plan.shape_from_count(int(135e6))
    nvme = next(p.engine for p in plan.PLACEMENTS if p.name == "zero3_offload_nvme")
    for dtype, size in (("fp32", 4), ("bf16", 2)):
        cfg = plan.Settings(dtype=dtype, teacher=nvme, cluster=plan.Cluster(1, 4))
        p = plan.make_plan(teacher, student, cfg)
        assert p.item("teacher swap buffers").cpu_node == 5 * 10 ** 8 * size * 4
        assert p.item("teacher gathered layers").gpu == 2 * plan.largest_layer(teacher) * size
    own = plan.engine_spec({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "buffer_count": 3,
                                                                               "buffer_size": 2e8}}})
    assert (own.zero, own.offload, own.swap_buffer_numel, own.max_reuse_distance) == (3, "nvme", 6 * 10 ** 8,
                                                                                      plan.MAX_REUSE_DISTANCE)
    p = plan.make_plan(teacher, student, plan.Settings(dtype="fp32", teacher=own, cluster=plan.Cluster(1, 2)))
    assert p.item("teacher swap buffers").cpu_node == 6 * 10 ** 8 * 4 * 2
    assert p.item("teacher gathered layers").gpu == plan.gathered_params(teacher) * 4 == plan.MAX_LIVE_PARAMETERS * 4
    no_nvme = plan.make_plan(teacher, student, plan.Settings(teacher=plan.EngineSpec(3, "cpu")))
    assert all(i.key != "teacher swap buffers" for i in no_nvme.items)


def test_a_run_configs_teacher_config_reaches_the_plan(tmp_path, pair):
    """`okd plan --config` with an explicit teacher DeepSpeed config plans with that file's NVMe buffers and reuse
    distance; the flags alone take the shipped NVMe config's."""
    import json

    from okd_scale import plan

    ds = {"zero_optimization": {"stage": 3, "stage3_max_reuse_distance": 0,
                                "offload_param": {"device": "nvme", "nvme_path": "auto", "buffer_count": 4,
                                                  "buffer_size": 1e8}}}
    (tmp_path / "t.json").write_text(json.dumps(ds))
    parser = plan.build_parser()
    parser.set_defaults(**plan.defaults_from_config(str(ROOT / "configs" / "demo.yaml"), [
        f"model.teacher={pair / 'teacher'}", f"model.student={pair / 'student'}",
        f"data.train_file={pair / 'train.jsonl'}", "data.eval_file=null",
        f"deepspeed.teacher_config={tmp_path / 't.json'}", "deepspeed.nvme_path=/nvme"]))
    engine = plan.settings_from_args(parser.parse_args([])).teacher
    assert (engine.offload, engine.swap_buffer_numel, engine.max_reuse_distance) == ("nvme", 4 * 10 ** 8, 0)
    flags = plan.settings_from_args(plan.build_parser().parse_args(["--teacher-params", "7e9", "--student-params",
                                                                    "1e9", "--teacher-offload", "nvme"])).teacher
    assert flags == next(p.engine for p in plan.PLACEMENTS if p.name == "zero3_offload_nvme")


def test_gradient_buckets_are_what_deepspeed_allocates(tmp_path, pair, monkeypatch):
    """A ZeRO-1/2 engine's gradient buckets in the plan are the buffers its real optimizer allocates for a
    backward (the shipped student_zero2.json: two of reduce_bucket_size with overlap_comm), allocated after the
    loss's last chunk (the plan's "loss" and "student backward" phases do not meet), and engine_spec reads any
    zero_optimization as DeepSpeed's own config does (its defaults where a key is unset)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from okd_scale import divergences
    from okd_scale.configure import load_config
    from okd_scale.methods import StepContext, kd_step, loss_normaliser, targets
    from okd_scale.process import init_distributed
    from okd_scale.scorers import make_scorer
    from okd_scale.trainer import build

    for zero in ({"stage": 2}, {"stage": 1}, {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 3e7},
                 {"stage": 1, "reduce_bucket_size": 2e6}, {"stage": 2, "contiguous_gradients": False}):
        ds = DeepSpeedZeroConfig(**zero)
        expected = ds.reduce_bucket_size * (2 if ds.overlap_comm else 1) if ds.contiguous_gradients else 0
        assert plan.engine_spec({"zero_optimization": zero}).grad_buckets == expected, zero
    assert plan.engine_spec({"zero_optimization": {"stage": 3}}).grad_buckets == 0

    cfg = load_config(tiny.write_config(tmp_path / "cfg.yaml", pair, "kd"), ["train.per_device_train_batch_size=2"])
    init_distributed()
    tokenizer, loader, _, teacher, student = build(cfg, 0, 1)
    optimizer, allocated, events = student.optimizer, [], []
    setup, chunk_pass = optimizer.setup_buckets, divergences._chunk_pass

    def record():  # the buffers setup_buckets allocates for a backward (it is called again for every gradient)
        fresh = not optimizer.ready_for_gradients
        setup()
        if fresh:
            allocated.append([b.numel() for bucket in optimizer.ipg_buckets.values() for b in bucket.buffer])
            events.append("buckets")

    def chunks(*args, **kwargs):  # one pass over the loss's chunks, its [chunk, V] buffers freed on return
        out = chunk_pass(*args, **kwargs)
        events.append("loss chunks")
        return out

    optimizer.setup_buckets = record
    monkeypatch.setattr(divergences, "_chunk_pass", chunks)
    batch = next(iter(loader))
    ctx = StepContext(cfg=cfg, student=student, teacher=teacher,
                      num_tokens=loss_normaliser(float(targets(batch)[1].sum()), 1, 1), vocab_size=len(tokenizer),
                      scorer=make_scorer(cfg, teacher, student, len(tokenizer), 0, 1))
    kd_step(batch, ctx)
    student_ds = json.loads((ROOT / "okd_scale" / "ds_configs" / "student_zero2.json").read_text())
    spec = plan.student_engine(2, "none")
    assert spec == dataclasses.replace(plan.engine_spec(student_ds), offload="none")
    assert allocated == [[5 * 10 ** 8, 5 * 10 ** 8]] and spec.grad_buckets == sum(allocated[0])
    assert "loss chunks" in events and events[-1] == "buckets" and events.count("buckets") == 1, events
    trainable = sum(p.numel() for p in student.module.parameters() if p.requires_grad)
    for host, numel in ((False, spec.grad_buckets), (True, trainable)):  # on the host: the pages its gradients fill
        settings = plan.Settings(dtype="fp32", student=spec, cluster=plan.Cluster(1, 1, device_is_host=host))
        p = plan.make_plan(plan.read_shape(pair / "teacher"), plan.read_shape(pair / "student"), settings)
        assert p.item("student gradient buckets").gpu == numel * 4


def test_totals_are_the_largest_phase():
    """Items live in different phases of the step are not summed: a frozen teacher's gathered layers (its forward),
    the loss buffers (the loss's chunks) and the student's gradient buckets (its backward) never meet, the student's
    activations are live in the last two, and the total is the largest phase's sum; the online module's backward
    gathers the teacher's layers again, beside its activations."""
    teacher, student = plan.shape_from_count(int(7e9)), plan.shape_from_count(int(1e9))
    for online in (False, True):
        p = plan.make_plan(teacher, student, plan.Settings(teacher=plan.EngineSpec(3), online=online))
        totals = p.phase_totals("gpu")
        states = sum(i.gpu for i in p.items if i.phases == plan.PHASES)
        gathered = p.item("teacher gathered layers").gpu
        activations = p.item("student activations").gpu
        assert p.item("teacher lm_head copy").phases == plan.PHASES  # read once, kept for the run
        assert totals["teacher forward"] == states + gathered
        assert totals["loss"] == states + activations + p.item("loss buffers").gpu
        assert totals["student backward"] == states + activations + p.item("student gradient buckets").gpu
        assert totals["online backward"] == states + gathered  # a ZeRO-3 teacher: no gradient buckets
        assert p.gpu_total == max(totals.values()) < sum(i.gpu for i in p.items)
