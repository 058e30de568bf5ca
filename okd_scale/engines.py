"""DeepSpeed set-up: the filled DeepSpeed configs, the teacher's placement, and the teacher and student engines."""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import socket
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import models, plan
from .config import (OFFLOAD_MMAP_THRESHOLD, ConfigError, RunConfig, offload_device, online_learning_rate, resolve_path,
                     zero_stage)
from .methods import method_of

log = logging.getLogger("okd_scale")


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _fill(cfg: dict, dotted: str, value: Any, run_key: str, origin: str) -> None:
    """Set cfg[dotted] to value where it is missing or "auto"; refuse an explicit different value."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
    current = node.get(leaf, "auto")
    if current == "auto":
        node[leaf] = value
    elif current != value and not (isinstance(value, float) and isinstance(current, (int, float))
                                   and abs(current - value) <= 1e-12 * max(1.0, abs(value))):
        raise ConfigError(f'{origin}: "{dotted}" is {current!r} but the run config gives {value!r} ({run_key}); '
                          'set it to "auto" or make the two equal')


def _no_auto_left(node: Any, origin: str, path: str = "") -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _no_auto_left(v, origin, f"{path}.{k}" if path else k)
    elif node == "auto":
        raise ConfigError(f'{origin}: "{path}" is "auto" but okd_scale has no value to fill it with; set it')


def build_ds_config(path: str, overrides: dict, *, micro_batch_size: int, gradient_accumulation_steps: int,
                    world_size: int, learning_rate: float, weight_decay: float, bf16: bool, max_grad_norm: float,
                    with_optimizer: bool = True, nvme_path: Optional[str] = None,
                    origin_key: str = "deepspeed") -> dict:
    """A DeepSpeed config from a JSON file plus overrides, its "auto" values filled from the run config.
    Without an optimizer, ZeRO stages 1 and 2 (which partition optimizer states and gradients) become 0."""
    file = resolve_path(path)
    try:
        cfg = json.loads(Path(file).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{origin_key}: cannot read DeepSpeed config {file}: {e}") from None
    cfg = _merge(cfg, overrides or {})
    origin = str(file)
    _fill(cfg, "train_micro_batch_size_per_gpu", micro_batch_size, "train.per_device_train_batch_size", origin)
    _fill(cfg, "gradient_accumulation_steps", gradient_accumulation_steps, "train.gradient_accumulation_steps", origin)
    _fill(cfg, "train_batch_size", micro_batch_size * gradient_accumulation_steps * world_size,
          "per_device_train_batch_size x gradient_accumulation_steps x world size", origin)
    _fill(cfg, "gradient_clipping", max_grad_norm, "train.max_grad_norm", origin)
    _fill(cfg, "bf16.enabled", bf16, "train.bf16", origin)
    if with_optimizer and "optimizer" in cfg:
        _fill(cfg, "optimizer.params.lr", learning_rate, f"{origin_key} learning_rate", origin)
        _fill(cfg, "optimizer.params.weight_decay", weight_decay, f"{origin_key} weight_decay", origin)
    offload = cfg.get("zero_optimization", {}).get("offload_param", {})
    if offload.get("device") == "nvme" and offload.get("nvme_path", "auto") == "auto":
        if not nvme_path:
            raise ConfigError(f'{origin}: "zero_optimization.offload_param.nvme_path" is "auto" but '
                              '"deepspeed.nvme_path" is not set; set it to a directory on a fast local disk')
        offload["nvme_path"] = nvme_path
    if "nvme" in (offload_device(cfg, "offload_param"), offload_device(cfg, "offload_optimizer")):
        require_async_io(origin)
    if not with_optimizer:
        cfg.pop("optimizer", None)
        cfg.pop("scheduler", None)
        if zero_stage(cfg) in (1, 2):
            cfg["zero_optimization"]["stage"] = 0
    _no_auto_left(cfg, origin)
    return cfg


def require_async_io(origin: str) -> None:
    """NVMe offload runs on DeepSpeed's async-I/O op, which links libaio: a ConfigError naming the package where
    the op cannot be built."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("AsyncIOBuilder")
    if builder is None or not builder.is_compatible(verbose=False):
        raise ConfigError(f"{origin}: NVMe offload needs DeepSpeed's async-I/O op, which cannot be built here: "
                          "install libaio's headers (Debian/Ubuntu: apt-get install libaio-dev; RHEL: libaio-devel; "
                          "`make test` installs it as root), or choose a placement without NVMe")


def make_scheduler(kind: str, warmup_steps: int, total_steps: int) -> Callable:
    """A callable optimizer -> transformers LR schedule, for DeepSpeed to step at each boundary."""
    from transformers import get_scheduler

    def build(optimizer):
        return get_scheduler(kind, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)

    return build


def init_engine(model: torch.nn.Module, ds_config: dict, parameters: Optional[list] = None,
                lr_scheduler: Optional[Callable] = None):
    """deepspeed.initialize over `parameters` (None: a frozen engine with no optimizer)."""
    import deepspeed

    kwargs = dict(model=model, config=copy.deepcopy(ds_config))
    if parameters is not None:
        kwargs["model_parameters"] = parameters
        if lr_scheduler is not None and "scheduler" not in ds_config:
            kwargs["lr_scheduler"] = lr_scheduler
    engine, *_ = deepspeed.initialize(**kwargs)
    if hasattr(engine.optimizer, "check_grad_overflow"):
        # ZeRO-1/2 checks for inf/NaN gradients only in fp16/bf16 or when clipping; always check, so that a
        # non-finite step is skipped on every rank in fp32 too (ZeRO-3 always does)
        engine.optimizer.check_grad_overflow = True
    return engine


def teacher_engine(cfg: RunConfig, ds_teacher: dict, tokenizer, *, online: bool):
    """The teacher's DeepSpeed engine: frozen, with the online module (its only trainable part) when `online`."""
    m, t = cfg.model, cfg.train
    tmodel = models.load_causal_lm(m.teacher, ds_config=ds_teacher, bf16=t.bf16, trust_remote_code=m.trust_remote_code,
                                   allow_hub=m.allow_hub, use_safetensors=m.use_safetensors)
    models.check_vocab(tmodel, tokenizer, m.teacher, "teacher")
    if online:
        tmodel = models.add_online_module(tmodel, cfg.online)
        if cfg.online.gradient_checkpointing and models.online_module(cfg.online).blocks(
                tmodel.config.num_hidden_layers, cfg.online):
            tmodel.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        every = cfg.online.update_every
        warmup = t.warmup_steps if cfg.online.warmup_steps is None else cfg.online.warmup_steps
        sched = make_scheduler(t.lr_scheduler_type, warmup // every, max(1, math.ceil(t.max_steps / every)))
        teacher = init_engine(tmodel, ds_teacher, models.trainable_parameters(tmodel), sched)
    else:
        models.freeze(tmodel)
        teacher = init_engine(tmodel, ds_teacher)
    teacher.train(online)
    return teacher


def student_engine(cfg: RunConfig, ds_student: dict, tokenizer):
    """The student's DeepSpeed engine, with its optimizer and learning-rate schedule, in training mode."""
    m, t = cfg.model, cfg.train
    smodel = models.load_causal_lm(m.student, ds_config=ds_student, bf16=t.bf16, trust_remote_code=m.trust_remote_code,
                                   allow_hub=m.allow_hub, use_safetensors=m.use_safetensors)
    models.check_vocab(smodel, tokenizer, m.student, "student")
    if t.gradient_checkpointing:
        smodel.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student = init_engine(smodel, ds_student, models.trainable_parameters(smodel),
                          make_scheduler(t.lr_scheduler_type, t.warmup_steps, t.max_steps))
    student.train()
    return student


def _memory_budget(nvme_path: Optional[str]) -> tuple[plan.Budget, int, int]:
    """(the minimum over ranks of free device and host memory, nodes, most ranks on one node)."""
    import psutil
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    host = psutil.virtual_memory().available
    on_host = accel.device_name() == "cpu"
    free = torch.tensor([float(host if on_host else accel.available_memory()), float(host)], dtype=torch.float64,
                        device=accel.current_device_name())
    hosts = [socket.gethostname()]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(free, op=dist.ReduceOp.MIN)
        hosts = [None] * dist.get_world_size()
        dist.all_gather_object(hosts, socket.gethostname())
    per_node = max(hosts.count(h) for h in hosts)
    device, host = (int(x) for x in free.tolist())
    return plan.Budget(device, host, device_is_host=on_host, nvme_path=nvme_path), len(set(hosts)), per_node


def teacher_placement(cfg: RunConfig, student_ds: dict) -> plan.PlacementChoice:
    """deepspeed.teacher_config auto: the placement okd_scale.plan chooses for the run's teacher, student and
    batch with the free memory of every rank (the same numbers on every rank)."""
    from deepspeed.accelerator import get_accelerator

    def shape(path: str) -> plan.ModelShape:
        try:
            return plan.read_shape(path)
        except (OSError, ValueError) as e:
            raise models.ModelError(f"cannot load a causal LM from {path}: {e}") from None

    t = cfg.train
    budget, nodes, per_node = _memory_budget(cfg.deepspeed.nvme_path)
    teacher = shape(cfg.model.teacher)
    stored = models.weight_bytes(cfg.model.teacher, t.bf16)  # what the safetensors headers hold, when they can be read
    if stored is not None:
        teacher = dataclasses.replace(teacher, params=stored // (2 if t.bf16 else 4))
    cluster = plan.Cluster(nodes, per_node, budget.device_bytes / plan.GIB, budget.host_bytes / plan.GIB,
                           device_is_host=budget.device_is_host)
    settings = plan.run_settings(cfg, student_ds, cluster, flash_attention=get_accelerator().device_name() != "cpu")
    try:
        return plan.teacher_placement(teacher, shape(cfg.model.student), settings, budget)
    except plan.PlacementError as e:
        raise ConfigError(f'"deepspeed.teacher_config" is auto, but {e}') from None


def ds_configs_for(cfg: RunConfig, world_size: int) -> tuple[Optional[dict], dict]:
    """The filled (teacher, student) DeepSpeed configs; teacher None for methods without one. With
    deepspeed.teacher_config auto, the teacher's config is that of the placement chosen by size (logged)."""
    t = cfg.train
    common = dict(micro_batch_size=t.per_device_train_batch_size,
                  gradient_accumulation_steps=t.gradient_accumulation_steps,
                  world_size=world_size, bf16=t.bf16, max_grad_norm=t.max_grad_norm,
                  nvme_path=cfg.deepspeed.nvme_path)
    student = build_ds_config(cfg.deepspeed.student_config, cfg.deepspeed.student_overrides,
                              learning_rate=t.learning_rate, weight_decay=t.weight_decay,
                              origin_key="deepspeed.student_config", **common)
    teacher = None
    if method_of(cfg).needs_teacher:
        path = cfg.deepspeed.teacher_config
        if path == "auto":
            choice = teacher_placement(cfg, student)
            log.info("%s", choice.summary())
            path = choice.placement.ds_config
        teacher = build_ds_config(path, cfg.deepspeed.teacher_overrides,
                                  learning_rate=online_learning_rate(cfg), weight_decay=cfg.online.weight_decay,
                                  with_optimizer=method_of(cfg).online, origin_key="deepspeed.teacher_config",
                                  **common)
    return teacher, student


def malloc_mmap_threshold(cfg: RunConfig, *ds_configs: Optional[dict]) -> int:
    """train.malloc_mmap_threshold with its null resolved: OFFLOAD_MMAP_THRESHOLD when one of the engines' DeepSpeed
    configs offloads parameters (host memory then holds the models' partitions and swap buffers), else 0 (glibc's
    own threshold)."""
    if cfg.train.malloc_mmap_threshold is not None:
        return cfg.train.malloc_mmap_threshold
    offloaded = any(c is not None and offload_device(c, "offload_param") != "none" for c in ds_configs)
    return OFFLOAD_MMAP_THRESHOLD if offloaded else 0


def vocab_shard_group(shards: int, rank: int, world: int):
    """(group, rank in group) for splitting the vocabulary over blocks of `shards` consecutive ranks
    (loss.vocab_shards); every rank creates every block's group, as torch.distributed requires."""
    import torch.distributed as dist

    if world % shards:
        raise ConfigError(f'"loss.vocab_shards" must divide the world size {world}, got {shards}')
    mine = None
    for first in range(0, world, shards):
        group = dist.new_group(list(range(first, first + shards)))
        if first <= rank < first + shards:
            mine = group
    return mine, rank % shards
