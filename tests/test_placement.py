"""deepspeed.teacher_config: auto — the teacher placed by its size (okd_scale.plan.teacher_placement), the same
choice as the plan command line, and every placement training exactly as ZeRO-3 with CPU offload."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from okd_scale import plan
import tiny
from tiny import ROOT, assert_same_runs, write_config

GIB = plan.GIB
OFFLOAD = "ds_configs/teacher_zero3_offload.json"


def _choose(teacher: float, student: float, *, gpus: int, gpu_gib: float, host_gib: float, nvme=None,
            seq=512, micro=1, checkpointed=False) -> str:
    """The placement of the paper's OKD teacher (its module on every block), `checkpointed`: its blocks."""
    from okd_scale.config import OnlineArgs

    t, s = plan.shape_from_count(int(teacher)), plan.shape_from_count(int(student))
    settings = plan.Settings(seq_len=seq, micro_batch=micro, cluster=plan.Cluster(1, gpus), flash_attention=True,
                             module=OnlineArgs(gradient_checkpointing=checkpointed))
    budget = plan.Budget(int(gpu_gib * GIB), int(host_gib * GIB), nvme_path=nvme)
    return plan.teacher_placement(t, s, settings, budget).placement.name


def test_hand_computed_cases():
    # (sequences of 512 tokens, one per GPU) a 7B teacher in bf16 is 14 GB of weights: whole on each 80 GB GPU
    # beside a 1B student
    assert _choose(7e9, 1e9, gpus=8, gpu_gib=80, host_gib=512) == "replica"
    # on 16 GB GPUs 14 GB of weights leave no room for the student: ZeRO-3 puts 1.75 GB on each of 8
    assert _choose(7e9, 1e9, gpus=8, gpu_gib=16, host_gib=512) == "zero3"
    # a 70B teacher (140 GB) on 2 x 24 GB GPUs, its 80 blocks checkpointed: 70 GB per partition does not fit;
    # 140 GB fits 512 GB of host
    assert _choose(70e9, 1e9, gpus=2, gpu_gib=24, host_gib=512, checkpointed=True) == "zero3_offload_cpu"
    # ... nor 64 GB of host: NVMe when there is a path, else refused with the numbers and what to change
    assert _choose(70e9, 1e9, gpus=2, gpu_gib=24, host_gib=64, nvme="/local_nvme",
                   checkpointed=True) == "zero3_offload_nvme"
    with pytest.raises(plan.PlacementError) as err:
        _choose(70e9, 1e9, gpus=2, gpu_gib=24, host_gib=64, checkpointed=True)
    text = str(err.value)
    assert "130.39 GiB of weights" in text and "fits nowhere" in text and "deepspeed.nvme_path" in text
    assert "replica needs" in text and "24.00 GiB free" in text and "64.00 GiB free" in text
    # not checkpointed, the 80 blocks' activations (11 GB) leave no room on a 24 GB GPU, even offloaded (the teacher
    # forward: activations + gathered layers + the student's states + the teacher's lm_head copy, read once)
    with pytest.raises(plan.PlacementError, match=r"zero3_offload_cpu needs 23\.\d\d GiB per device"):
        _choose(70e9, 1e9, gpus=2, gpu_gib=24, host_gib=512)


def _settings(**kw) -> plan.Settings:
    return plan.Settings(seq_len=1024, micro_batch=2, cluster=plan.Cluster(1, 4), **kw)


def test_boundaries_each_way():
    teacher, student = plan.shape_from_count(int(3e9)), plan.shape_from_count(int(5e8))
    cfg = _settings()
    need = {p.name: plan.make_plan(teacher, student, _settings(teacher=p.engine)) for p in plan.PLACEMENTS}
    host = 1024 * GIB

    def pick(device: int, host_bytes: int = host, **kw) -> str:
        return plan.teacher_placement(teacher, student, cfg, plan.Budget(device, host_bytes, **kw)).placement.name

    replica = need["replica"].gpu_total
    assert pick(math.ceil(replica / plan.HEADROOM) + 1) == "replica"
    assert pick(math.floor(replica / plan.HEADROOM) - 1) == "zero3"
    zero3 = need["zero3"].gpu_total
    assert pick(math.ceil(zero3 / plan.HEADROOM) + 1) == "zero3"
    assert pick(math.floor(zero3 / plan.HEADROOM) - 1) == "zero3_offload_cpu"
    # CPU offload against host memory per node (4 GPUs' partitions); below it NVMe, if there is a path
    small = math.floor(zero3 / plan.HEADROOM) - 1
    offload = need["zero3_offload_cpu"]
    assert offload.gpu_total <= plan.HEADROOM * small
    cpu = offload.cpu_node_total
    assert pick(small, math.ceil(cpu / plan.HEADROOM) + 1) == "zero3_offload_cpu"
    assert pick(small, math.floor(cpu / plan.HEADROOM) - 1, nvme_path="/nvme") == "zero3_offload_nvme"
    # the CPU accelerator: the 4 ranks' "device" items and the offloaded ones share host memory
    shared = 4 * replica
    assert pick(0, math.ceil(shared / plan.HEADROOM) + 1, device_is_host=True) == "replica"
    assert pick(0, math.floor(shared / plan.HEADROOM) - 1, device_is_host=True) != "replica"


def test_the_trainer_and_the_command_line_agree(tmp_path, pair):
    """The trainer's Settings for a run equal the command line's for the same run (one plan, not two), and
    the command line prints the choice that teacher_placement makes."""
    from deepspeed.accelerator import get_accelerator

    from okd_scale.configure import load_config
    from okd_scale.engines import build_ds_config, teacher_placement

    cfg = load_config(write_config(tmp_path / "cfg.yaml", pair, "okd"), ["loss.chunk_size=64"])
    student_ds = build_ds_config(cfg.deepspeed.student_config, {}, micro_batch_size=4, gradient_accumulation_steps=1,
                                 world_size=1, learning_rate=1e-3, weight_decay=0.0, bf16=False, max_grad_norm=1.0)
    choice = teacher_placement(cfg, student_ds)
    assert choice.placement.name == "replica"  # a tiny pair fits anywhere
    args = plan.build_parser().parse_args(
        ["--teacher", str(pair / "teacher"), "--student", str(pair / "student"), "--seq-len", "64",
         "--micro-batch", "4", "--dtype", "fp32", "--online-blocks", "2", "--chunk-size", "64", "--student-zero", "2",
         "--gpus-per-node", "1", "--gpu-mem-gib", "8", "--cpu-mem-gib", "8",
         "--accelerator", get_accelerator().device_name()])
    settings = plan.settings_from_args(args)
    cli = plan.make_plan(plan.read_shape(pair / "teacher"), plan.read_shape(pair / "student"),
                         plan.dataclasses.replace(settings, teacher=choice.placement.engine))
    assert [(i.key, i.gpu, i.cpu_node) for i in cli.items] == [(i.key, i.gpu, i.cpu_node) for i in choice.plan.items]

    common = ["--teacher-params", "7e9", "--student-params", "1e9", "--seq-len", "512", "--micro-batch", "1",
              "--gpus-per-node", "8", "--flash-attention"]
    for gib, name in (("80", "replica"), ("16", "zero3")):
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), *common, "--gpu-mem-gib", gib],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert f"- teacher placement: {name} (" in proc.stdout
        assert name == _choose(7e9, 1e9, gpus=8, gpu_gib=float(gib), host_gib=512)


def test_a_teacher_that_fits_nowhere_is_refused_before_any_engine(tmp_path, pair):
    """A 70B-parameter config (no weights needed: the refusal comes first) on this machine, no NVMe path."""
    import shutil

    from okd_scale.config import ConfigError
    from okd_scale.configure import load_config
    from okd_scale.trainer import train

    huge = tmp_path / "huge"
    huge.mkdir()
    config = json.loads((pair / "teacher" / "config.json").read_text())
    config.update(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8)
    (huge / "config.json").write_text(json.dumps(config))
    for f in (pair / "teacher").glob("*token*"):
        shutil.copy(f, huge / f.name)
    cfg = load_config(write_config(tmp_path / "cfg.yaml", pair, "okd"),
                      [f"model.teacher={huge}", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError) as err:
        train(cfg)
    text = str(err.value)
    assert '"deepspeed.teacher_config" is auto, but the teacher' in text and "fits nowhere" in text
    assert "GiB of weights" in text and "deepspeed.nvme_path is not set" in text
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_nvme_offload_needs_a_path():
    from okd_scale.config import ConfigError
    from okd_scale.engines import build_ds_config

    common = dict(micro_batch_size=1, gradient_accumulation_steps=1, world_size=1, learning_rate=1e-4,
                  weight_decay=0.0, bf16=False, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match=r'"deepspeed.nvme_path" is not set'):
        build_ds_config("ds_configs/teacher_zero3_nvme.json", {}, **common)
    cfg = build_ds_config("ds_configs/teacher_zero3_nvme.json", {}, nvme_path="/local_nvme", **common)
    assert cfg["zero_optimization"]["offload_param"] == {"device": "nvme", "nvme_path": "/local_nvme",
                                                         "pin_memory": True}
    # without an optimizer (a frozen teacher) ZeRO-1/2 mean nothing: the replica runs as stage 0
    assert build_ds_config("ds_configs/teacher_replica.json", {}, with_optimizer=False, **common)[
        "zero_optimization"]["stage"] == 0


FREE_HALF = """
import ctypes, sys
from okd_scale import process
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
MIB = 2 ** 20
anon = lambda: next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("RssAnon"))
if sys.argv[1] != "0":
    assert process.set_malloc_mmap_threshold(int(sys.argv[1]))
big = libc.malloc(30 * MIB)
libc.memset(big, 1, 30 * MIB)
libc.free(big)  # glibc raises its own threshold to the largest mapped block freed: 1 MiB blocks now come from the heap
before = anon()
blocks = [libc.malloc(MIB) for _ in range(200)]
for b in blocks:
    libc.memset(b, 1, MIB)
for b in blocks[::2]:  # holes between live blocks: no free top of the heap to give back
    libc.free(b)
print((anon() - before) / MIB)
"""


def test_an_offloaded_run_gives_freed_host_memory_back(tmp_path, pair):
    """train.malloc_mmap_threshold: null is 65536 when a model's parameters are offloaded to CPU or NVMe, else glibc's
    own (0); with it set, 100 of 200 1 MiB host blocks freed between live ones leave the process (glibc's own keeps
    them resident)."""
    from okd_scale.configure import load_config
    from okd_scale.engines import ds_configs_for, malloc_mmap_threshold

    def threshold(teacher_config: str, *more: str) -> int:
        cfg = load_config(write_config(tmp_path / "run.yaml", pair, "okd"),
                          [f"deepspeed.teacher_config={teacher_config}", "deepspeed.nvme_path=/local_nvme", *more])
        return malloc_mmap_threshold(cfg, *ds_configs_for(cfg, world_size=1))

    assert threshold(OFFLOAD) == threshold("ds_configs/teacher_zero3_nvme.json") == 65536
    assert threshold("ds_configs/teacher_zero3.json") == threshold("ds_configs/teacher_replica.json") == 0
    assert threshold(OFFLOAD, "train.malloc_mmap_threshold=0") == 0
    assert threshold("ds_configs/teacher_zero3.json", "train.malloc_mmap_threshold=1048576") == 1048576
    kept = {}
    for setting in (0, 65536):
        proc = subprocess.run([sys.executable, "-c", FREE_HALF, str(setting)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        kept[setting] = float(proc.stdout.split()[-1])
    assert kept[0] > 190 and 90 < kept[65536] < 110, kept


# the paper's OKD (its module on every block, at the student's rate); with checkpointed teacher blocks too
PAPER = {"okd": ["online.num_blocks=null", "online.learning_rate=ratio:1", "loss.kd_ratio=1"], "kd": []}
CHECKPOINTED = ["online.gradient_checkpointing=true"]
ONE_PROCESS = {"offload": (OFFLOAD, []), "replica": ("ds_configs/teacher_replica.json", []),
               "zero3": ("ds_configs/teacher_zero3.json", []), "offload_ckpt": (OFFLOAD, CHECKPOINTED),
               "replica_ckpt": ("ds_configs/teacher_replica.json", CHECKPOINTED)}


@pytest.mark.parametrize("method", ["okd", "kd"])
def test_each_placement_trains_as_zero3_offload_one_process(tmp_path, pair, method):
    """Replica, ZeRO-3 and ZeRO-3 + CPU offload teachers, with and without checkpointed teacher blocks (okd), give
    the same losses and final weights."""
    from dist_worker import run_and_dump

    from okd_scale.configure import load_config

    names = list(ONE_PROCESS) if method == "okd" else ["offload", "replica", "zero3"]
    for name in names:
        path, extra = ONE_PROCESS[name]
        run_and_dump(load_config(write_config(tmp_path / f"{name}.yaml", pair, method),
                                 [f"output_dir={tmp_path / name}", f"deepspeed.teacher_config={path}",
                                  "data.eval_file=null", *PAPER[method], *extra]))
    for name in names[1:]:
        assert_same_runs(tmp_path / "offload", tmp_path / name, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["okd", "kd"])
def test_each_placement_trains_as_zero3_offload_two_processes(tmp_path, pair, method):
    runs = [("offload", OFFLOAD, []), ("auto", "auto", []), ("zero3", "ds_configs/teacher_zero3.json", [])]
    if method == "okd":
        runs.append(("offload_ckpt", OFFLOAD, CHECKPOINTED))
    proc = tiny.launch_runs([[write_config(tmp_path / f"{name}.yaml", pair, method), f"output_dir={tmp_path / name}",
                              f"deepspeed.teacher_config={path}", "data.eval_file=null", *PAPER[method], *extra]
                             for name, path, extra in runs])  # one launch, the runs one after another
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "teacher placement: replica" in proc.stderr  # logged by the auto run only
    for name, *_ in runs[1:]:
        assert_same_runs(tmp_path / "offload", tmp_path / name, rtol=1e-4)


def _nvme_runs(tmp_path, pair, tokenizer, method: str, layers: int, buffer_count: int) -> list:
    """A teacher whose MLP matrices DeepSpeed swaps (it swaps partitions of at least 1 MiB: 256 x 1024 in fp32) run
    under ZeRO-3 + CPU offload, then with its parameters on NVMe (`buffer_count` swap buffers); the NVMe run's
    swapped parameters as (numel, swap file)."""
    import tiny
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
    from dist_worker import run_and_dump

    from okd_scale.configure import load_config

    tiny.make_llama(tmp_path / "teacher", tokenizer, num_layers=layers, hidden=256, intermediate=1024, seed=1)
    common = [f"model.teacher={tmp_path / 'teacher'}", "data.eval_file=null", "train.max_steps=3", *PAPER[method]]
    run_and_dump(load_config(write_config(tmp_path / "offload.yaml", pair, method),
                             [f"output_dir={tmp_path / 'offload'}", f"deepspeed.teacher_config={OFFLOAD}", *common]))
    swapped = []

    def on_nvme(result):
        for p in result.teacher.module.parameters():
            if p.ds_tensor.final_location == OffloadDeviceEnum.nvme:
                swapped.append((p.ds_numel, p.nvme_swapper.get_path(p, must_exist=True)))

    overrides = {**tiny.TORCH_ADAM, "zero_optimization": {"offload_param": {"buffer_count": buffer_count}}}
    cfg = load_config(write_config(tmp_path / "nvme.yaml", pair, method),
                      [f"output_dir={tmp_path / 'nvme'}", f"deepspeed.nvme_path={tmp_path / 'swap'}",
                       "deepspeed.teacher_config=ds_configs/teacher_zero3_nvme.json",
                       f"deepspeed.teacher_overrides={json.dumps(overrides)}",
                       *common])
    run_and_dump(cfg, inspect=on_nvme)
    return swapped


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "okd"])
def test_nvme_offload_trains_as_cpu_offload(tmp_path, pair, tokenizer, method):
    """ZeRO-3 with the teacher's parameters swapped to NVMe by DeepSpeed's async-I/O op (built and used, not only
    configured), with DeepSpeed's default 5 swap buffers for 6 swapped matrices: the losses and final weights of
    ZeRO-3 with CPU offload, 1 process. For the paper's OKD this needs each block's gathered weights released after
    its backward (a teacher forward between the teacher's forward and backward kept them all)."""
    swapped = _nvme_runs(tmp_path, pair, tokenizer, method, layers=2, buffer_count=5)
    assert len(swapped) >= 6, swapped  # each block's three MLP matrices, in files under deepspeed.nvme_path
    for numel, path in swapped:
        assert path.startswith(str(tmp_path / "swap")) and os.path.getsize(path) >= numel * 4, (path, numel)
    assert_same_runs(tmp_path / "offload", tmp_path / "nvme", rtol=1e-4)
