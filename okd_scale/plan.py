"""Memory and step-time plan for a distillation run, and where the teacher goes (`teacher_placement`).

A teacher (a whole replica, ZeRO-3, or ZeRO-3 with its parameters offloaded to CPU or NVMe) with, for
OKD, its online module (the run's `online` section, as okd_scale.models.ONLINE_MODULES declares it), and a
student under ZeRO-0/1/2/3, both data-parallel over every GPU. The trainer's `deepspeed.teacher_config: auto`
and the command line use the same formulas and the same choice:

    python -m okd_scale.plan --teacher-params 7e9 --student-params 1.1e9 --seq-len 2048 --nodes 2
    okd plan --teacher demo_out/teacher --student demo_out/student_init --gpus-per-node 2

Each model is a Hugging Face directory (or its config.json, read with transformers.AutoConfig, local
files only) or a parameter count. Notation: V vocab, h hidden, L blocks, a heads, kv key/value heads,
d head dim, I intermediate size, s sequence length, b micro-batch per GPU, N = nodes * gpus-per-node
(the data-parallel size), G = gpus-per-node, R the teacher blocks the online module's backward reaches.

Parameters (Llama layout; exact for llama, mistral, qwen2, qwen3 configs):
    embeddings V*h; per block: attention h*a*d (q) + 2*h*kv*d (k, v) + a*d*h (o) [+ q, k, v biases for
    qwen2 or attention_bias, + o bias for attention_bias; + 2*d q/k norms for qwen3], gated MLP 3*h*I
    [+ 2*I + h for mlp_bias], two RMSNorms 2*h; final norm h; lm_head V*h unless tie_word_embeddings.
    A bare count gets an assumed shape (printed) for the items that need one: untied, head dim 128
    (64 below h = 1024), a = kv = h / head dim, I = 8h/3, L = h/128, h the multiple of the head dim
    whose 12*L*h^2 + 2*V*h is nearest the count. The count itself is used as given.
Online module (online.placement, as its declaration's `params` and `blocks` count; R = L - the lowest block
that carries it, 0 when none does):
    blocks       a rank-r LoRA on target_modules (default q_proj, v_proj) of the last k blocks (default all L):
                 k * sum over those matrices of r*(in + out) trainable parameters; R = k
    head         a rank-r LoRA on the lm_head: r*(h + V); R = 0
    temperature  one learned temperature: 1; R = 0

Model states (ZeRO paper accounting, Adam), bytes per parameter:
    bf16 mixed precision: 2 params + 2 grads + 12 optimizer (fp32 master, exp_avg, exp_avg_sq) = 16;
    fp32: 4 params + 4 grads + 8 optimizer (exp_avg, exp_avg_sq) = 16.
    The teacher's frozen base has parameters only; grads and optimizer states are the online module's.
    ZeRO stage >= 1 divides optimizer states by N, >= 2 also gradients, 3 also parameters (partitions
    rounded up). Offload to CPU moves the partitioned ones to CPU memory: per node G partitions; offload
    to NVMe moves the teacher's partitioned parameters to NVMe (its online module's states stay in CPU memory),
    through pinned swap buffers in CPU memory: offload_param.buffer_count * buffer_size elements (DeepSpeed's
    defaults 5 * 1e8) in the compute dtype per rank.
Without an online module (kd, sgo) the teacher has no trainable parameters and keeps no activations.
Activations per micro-batch (Korthikanti et al. 2022, "Reducing Activation Recomputation", bf16):
    per block s*b*h*(34 + 5*a*s/h) bytes; --flash-attention drops the 5*a*s/h term (no stored a*s^2
    scores); fp32 doubles it. Checkpointed (the student's --activation-checkpointing, the teacher's
    --teacher-gradient-checkpointing): each block keeps its input, 2*s*b*h bytes (fp32: 4*s*b*h), plus one
    block's full activations while it is recomputed. Student: all L blocks. Teacher: the R reached blocks are
    kept (checkpointed or not) for the online module's backward; below them the forward keeps nothing, so
    one block's activations, once (not checkpointed: added to the R blocks' as a bound).
Working sets:
    ZeRO-3 gathered parameters, for each ZeRO-3 engine, in the compute dtype: DeepSpeed keeps gathered parameters
    resident up to stage3_max_live_parameters (MAX_LIVE_PARAMETERS, its default 1e9) when they will be used again
    within stage3_max_reuse_distance (the backward after the forward, the next step's forward), so min(that, the
    engine's parameters), and at least 2 (prefetch) * the largest layer (a block or the V*h embedding); with
    stage3_max_reuse_distance 0 (teacher_zero3_nvme.json) a module's parameters are released after each use, so
    the 2 largest layers.
    Teacher lm_head copy: V*h in the compute dtype (the trainer gathers it once per rank) when the
    teacher is ZeRO-3 and the student is not (the hidden-state loss path).
    Student under ZeRO-3 (the logits loss path): teacher and student logits at the response positions
    and their gradients, 2*s*b*(V_teacher + V_student)*dtype bytes (every token a response token: an
    upper bound).
    Loss: LOSS_CHUNK_BUFFERS = 6 float32 [chunk, V] buffers (chunk = min(--chunk-size, s*b); the two
    models' logits, their log-softmaxes, the elementwise term and its gradient), in a 16-bit compute dtype
    LOSS_CHUNK_COPIES = 3 more [chunk, V] in that dtype (the two models' logits before the float32 cast and
    the student's logit gradient after it), with an online module the teacher's logit gradient once in
    float32 and once in the compute dtype; plus on the hidden-state path the float32 V*h gradient
    accumulator of the student's lm_head.
    Gradient buckets of a ZeRO-1/2 engine with trainable parameters (contiguous_gradients, DeepSpeed's default):
    reduce_bucket_size elements, twice with overlap_comm, in the compute dtype (ZeRO-1: float32, the shipped
    grad_accum_dtype), allocated for its backward; on the CPU accelerator (--accelerator cpu) only the pages its
    gradients fill are resident: min(that, its trainable parameters).
Phases: the items live at once are those of one phase of the step, and a total is the largest phase's sum; model
states, swap buffers, teacher activations and the teacher lm_head copy (read once) are live in every phase, and:
    teacher forward   the teacher's gathered layers;
    loss              the student's activations and gathered layers, logits, loss buffers (the loss's chunks,
                      forward and backward, end before any parameter gradient reaches an engine);
    student backward  the student's activations, gathered layers, logits and gradient buckets (DeepSpeed
                      allocates them at the first parameter gradient, after the loss's chunks are freed);
    online backward   the teacher's gathered layers and gradient buckets.
Step-time floor, per optimizer step, T = s*b*grad_accum*N tokens (N_student, N_teacher, N_block:
parameter counts of the student, the teacher and one teacher block):
    FLOPs = 6*N_student*T (student forward + backward) + 2*N_teacher*T (teacher forward)
            + 2*N_block*R*T (the online module's backward through the R reached teacher blocks: input
              gradients only, their weights being frozen) [+ 2*N_block*R*T: their forward again, checkpointed]
    time  = FLOPs / (N * peak_tflops * 1e12 * mfu); mfu = 1 gives the floor.

Teacher placement (`teacher_placement`): the first of replica, ZeRO-3, ZeRO-3 + CPU offload, ZeRO-3 +
NVMe offload whose plan fits HEADROOM of the free memory (per device: the minimum over ranks; per node:
host memory; on the CPU accelerator the ranks of a node share host memory as their device).

tests/test_plan.py checks the counts against the models transformers builds (and each online module), and the
fp32 model states against the tensors of a real torch AdamW step on this machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .cli import FRACTION, POS_FLOAT, POS_INT
from .config import ConfigError, OnlineArgs, RunConfig, first_line, offload_device, resolve_path, zero_stage
from .configure import load_config
from .methods import METHODS, method_of
from .models import ONLINE_MODULES, ModelError, online_module
from .perf import step_flops  # the trainer's formula, shared

GIB = 2 ** 30
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
# bytes per trainable parameter: (gradient, optimizer states)
TRAIN_BYTES = {"bf16": (2, 12), "fp32": (4, 8)}
LOSS_CHUNK_BUFFERS = 6  # float32 [chunk, V]
LOSS_CHUNK_COPIES = 3  # [chunk, V] in a 16-bit compute dtype
QWEN2_QKV_BIAS = {"qwen2"}
QK_NORM_TYPES = {"qwen3"}
EXACT_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


class PlanError(ValueError):
    """An input the planner cannot use; `flag` names the command-line option it came from."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


@dataclass
class ModelShape:
    """A causal LM's size: its parameter count and the shape the per-layer estimates need."""

    params: int
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    block_params: int
    source: str = ""
    assumed: bool = False  # shape guessed from a bare parameter count
    note: str = ""

    def describe(self) -> str:
        kind = "assumed shape" if self.assumed else "config"
        text = (f"{self.params:,} params ({kind}: L={self.layers}, h={self.hidden}, a={self.heads}, "
                f"kv={self.kv_heads}, I={self.intermediate}, V={self.vocab}, "
                f"{'tied' if self.tied else 'untied'}; {self.block_params:,} per block)")
        return text + (f" [{self.note}]" if self.note else "")


MAX_REUSE_DISTANCE = 10 ** 9  # DeepSpeed's zero_optimization.stage3_max_reuse_distance default
REDUCE_BUCKET_SIZE = 5 * 10 ** 8  # DeepSpeed's zero_optimization.reduce_bucket_size default
SWAP_BUFFER_NUMEL = 5 * 10 ** 8  # DeepSpeed's offload_param buffer_count (5) * buffer_size (1e8) defaults


@dataclass
class EngineSpec:
    """How one DeepSpeed engine runs: ZeRO stage, offload target, and the ZeRO-3 settings the plan reads."""

    zero: int
    offload: str = "none"  # "cpu" | "nvme" | "none"
    max_reuse_distance: int = MAX_REUSE_DISTANCE  # zero_optimization.stage3_max_reuse_distance
    swap_buffer_numel: int = SWAP_BUFFER_NUMEL  # offload_param buffer_count * buffer_size (NVMe swap buffers)
    bucket_numel: Optional[int] = None  # ZeRO-1/2 gradient buckets: reduce_bucket_size (x2 with overlap_comm),
    # 0 without contiguous_gradients; None: DeepSpeed's defaults for the stage (REDUCE_BUCKET_SIZE; ZeRO-3: 0)

    @property
    def grad_buckets(self) -> int:
        """Elements of the engine's gradient reduction buckets (ZeRO-1/2 only)."""
        if self.zero not in (1, 2):
            return 0
        return REDUCE_BUCKET_SIZE if self.bucket_numel is None else self.bucket_numel


def engine_spec(ds_config: dict) -> EngineSpec:
    """The EngineSpec of a DeepSpeed config (its parameters' offload; DeepSpeed's defaults where a key is unset)."""
    zero = ds_config.get("zero_optimization", {})
    offload = zero.get("offload_param", {})
    buffers = int(float(offload.get("buffer_count", 5))) * int(float(offload.get("buffer_size", 1e8)))
    stage = zero_stage(ds_config)
    buckets = None
    if stage in (1, 2) and any(k in zero for k in ("reduce_bucket_size", "overlap_comm", "contiguous_gradients")):
        buckets = (int(float(zero.get("reduce_bucket_size", REDUCE_BUCKET_SIZE))) * (2 if zero.get("overlap_comm")
                   else 1) if zero.get("contiguous_gradients", True) else 0)
    return EngineSpec(stage, offload_device(ds_config, "offload_param"),
                      max_reuse_distance=int(float(zero.get("stage3_max_reuse_distance", MAX_REUSE_DISTANCE))),
                      swap_buffer_numel=buffers, bucket_numel=buckets)


@dataclass
class Cluster:
    """Nodes x GPUs per node, all data-parallel, with each GPU's and each node's memory."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    cpu_mem_gib: float = 512.0
    device_is_host: bool = False  # DeepSpeed's CPU accelerator: only the pages a rank writes are resident

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Settings:
    """Everything a plan depends on besides the two models."""

    seq_len: int = 512
    micro_batch: int = 4
    grad_accum: int = 1
    cluster: Cluster = field(default_factory=Cluster)
    teacher: EngineSpec = field(default_factory=lambda: EngineSpec(3, "cpu"))
    student: EngineSpec = field(default_factory=lambda: EngineSpec(2, "none"))
    online: bool = True  # the teacher carries the online module (okd); False: a frozen teacher (kd, sgo)
    module: OnlineArgs = field(default_factory=OnlineArgs)  # the run's `online` section: what the module is
    dtype: str = "bf16"
    peak_tflops: float = 989.0
    mfu: float = 1.0
    activation_checkpointing: bool = False
    flash_attention: bool = False
    chunk_size: int = 1024


PHASES = ("teacher forward", "loss", "student backward", "online backward")  # of one step, in order


@dataclass
class Item:
    """One memory item: bytes on each GPU and bytes of CPU memory on each node, and the phases it is live in."""

    name: str
    gpu: int = 0
    cpu_node: int = 0
    key: str = ""  # a stable name to look the item up by (Plan.item); defaults to `name`
    phases: tuple[str, ...] = PHASES

    def __post_init__(self):
        self.key = self.key or self.name


@dataclass
class Plan:
    teacher: ModelShape
    student: ModelShape
    settings: Settings
    online_params: int  # the online module's trainable parameters (0: a frozen teacher)
    reached_blocks: int  # the teacher blocks its backward reaches
    items: list[Item]
    tokens_per_step: int
    flops_per_step: float
    step_time_s: float

    def phase_totals(self, where: str) -> dict[str, int]:
        """Each phase's sum of the items live in it, on "gpu" (per GPU) or "cpu_node" (per node)."""
        return {ph: sum(getattr(i, where) for i in self.items if ph in i.phases) for ph in PHASES}

    def peak_phase(self, where: str) -> str:
        totals = self.phase_totals(where)
        return max(PHASES, key=totals.__getitem__)

    @property
    def gpu_total(self) -> int:
        return max(self.phase_totals("gpu").values())

    @property
    def cpu_node_total(self) -> int:
        return max(self.phase_totals("cpu_node").values())

    @property
    def gpu_fits(self) -> bool:
        return self.gpu_total <= self.settings.cluster.gpu_mem_gib * GIB

    @property
    def cpu_fits(self) -> bool:
        return self.cpu_node_total <= self.settings.cluster.cpu_mem_gib * GIB

    @property
    def fits(self) -> bool:
        return self.gpu_fits and self.cpu_fits

    def item(self, name: str) -> Item:
        """The item with this key, e.g. "student gradients", "teacher activations"."""
        return next(i for i in self.items if i.key == name)


# --------------------------------------------------------------------------- model shapes


def block_params(hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, *,
                 qkv_bias: bool = False, o_bias: bool = False, mlp_bias: bool = False,
                 qk_norm: bool = False) -> int:
    """Parameters of one Llama-layout decoder block."""
    q, kv = heads * head_dim, kv_heads * head_dim
    attn = hidden * q + 2 * hidden * kv + q * hidden
    if qkv_bias:
        attn += q + 2 * kv
    if o_bias:
        attn += hidden
    if qk_norm:
        attn += 2 * head_dim
    mlp = 3 * hidden * intermediate + ((2 * intermediate + hidden) if mlp_bias else 0)
    return attn + mlp + 2 * hidden


def shape_from_config(config, source: str = "") -> ModelShape:
    """The parameter count and shape of a transformers config (Llama layout)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if getattr(text, k, None) is None]
    if missing:
        raise ValueError(f"the config ({type(config).__name__}) has no {', '.join(missing)}; expected a "
                         f"decoder-only causal LM config with vocab_size, hidden_size, num_hidden_layers, "
                         f"num_attention_heads and intermediate_size")
    h, heads = int(text.hidden_size), int(text.num_attention_heads)
    kv = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or h // heads)
    model_type = getattr(text, "model_type", "") or ""
    attention_bias = bool(getattr(text, "attention_bias", False))
    blk = block_params(h, heads, kv, head_dim, int(text.intermediate_size),
                       qkv_bias=attention_bias or model_type in QWEN2_QKV_BIAS, o_bias=attention_bias,
                       mlp_bias=bool(getattr(text, "mlp_bias", False)), qk_norm=model_type in QK_NORM_TYPES)
    vocab, layers = int(text.vocab_size), int(text.num_hidden_layers)
    tied = bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))
    params = vocab * h + layers * blk + h + (0 if tied else vocab * h)
    note = "" if model_type in EXACT_TYPES else f"model_type {model_type or '?'}: counted with the Llama layout"
    return ModelShape(params=params, vocab=vocab, hidden=h, layers=layers, heads=heads, kv_heads=kv,
                      head_dim=head_dim, intermediate=int(text.intermediate_size), tied=tied, block_params=blk,
                      source=source, note=note)


def read_shape(path: str | Path) -> ModelShape:
    """The shape of a local Hugging Face model directory or config.json (no hub access)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    if p.is_dir() and not (p / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read a transformers config from {path}: {first_line(e)}") from None
    return shape_from_config(config, source=str(path))


def shape_from_count(params: int, vocab: int = 32000) -> ModelShape:
    """A Llama-like shape for a bare parameter count (see the module docstring); the count is kept."""
    best = None
    for hidden in [*range(64, 1024, 64), *range(1024, 32768 + 1, 128)]:
        layers = max(1, round(hidden / 128))
        err = abs(12 * layers * hidden ** 2 + 2 * vocab * hidden - params)
        if best is None or err < best[0]:
            best = (err, hidden, layers)
    _, h, layers = best
    head_dim = 128 if h >= 1024 else 64
    heads = max(1, h // head_dim)
    inter = max(64, round(8 * h / 3 / 64) * 64)
    return ModelShape(params=params, vocab=vocab, hidden=h, layers=layers, heads=heads, kv_heads=heads,
                      head_dim=h // heads, intermediate=inter, tied=False,
                      block_params=block_params(h, heads, heads, h // heads, inter), source=f"{params:.3g} params",
                      assumed=True)


# --------------------------------------------------------------------------- memory


def model_states(total: int, trainable: int, dtype: str, engine: EngineSpec, cluster: Cluster) -> dict[str, Item]:
    """Parameters, gradients and Adam states of one engine, partitioned by ZeRO and offloaded as asked."""
    grad_b, opt_b = TRAIN_BYTES[dtype]
    full = {"parameters": total * DTYPE_BYTES[dtype], "gradients": trainable * grad_b,
            "optimizer states": trainable * opt_b}
    partitioned = {"optimizer states": engine.zero >= 1, "gradients": engine.zero >= 2,
                   "parameters": engine.zero >= 3}
    out = {}
    for kind, size in full.items():
        if not partitioned[kind]:
            out[kind] = Item(kind, gpu=size)
            continue
        share = math.ceil(size / cluster.gpus)
        if engine.offload == "nvme" and kind == "parameters":
            out[kind] = Item(kind)  # on NVMe: neither device nor host memory
        elif engine.offload in ("cpu", "nvme"):
            out[kind] = Item(kind, cpu_node=share * cluster.gpus_per_node)
        else:
            out[kind] = Item(kind, gpu=share)
    return out


def block_activation_bytes(shape: ModelShape, seq: int, micro: int, dtype: str, flash: bool = False) -> int:
    """Activations one block keeps for backward, per micro-batch (Korthikanti et al.)."""
    s, b, h, a = seq, micro, shape.hidden, shape.heads
    per_token_layer = 34 * h + (0 if flash else 5 * a * s)
    return s * b * per_token_layer * DTYPE_BYTES[dtype] // 2


def activation_bytes(shape: ModelShape, seq: int, micro: int, dtype: str, *, kept_blocks: int,
                     checkpointing: bool = False, flash: bool = False, transient_block: bool = False) -> int:
    """Activations of `kept_blocks` blocks kept for backward (block inputs only when checkpointing, plus
    one block being recomputed), and optionally one block's activations that live only during forward."""
    full = block_activation_bytes(shape, seq, micro, dtype, flash)
    if checkpointing and kept_blocks:
        kept = kept_blocks * seq * micro * shape.hidden * DTYPE_BYTES[dtype] + full
    else:
        kept = kept_blocks * full
    return kept + (full if transient_block else 0)


def largest_layer(shape: ModelShape) -> int:
    """Parameters of the largest module ZeRO-3 gathers whole: a block or the embedding."""
    return max(shape.block_params, shape.vocab * shape.hidden)


MAX_LIVE_PARAMETERS = 10 ** 9  # DeepSpeed's zero_optimization.stage3_max_live_parameters default


def gathered_params(shape: ModelShape, engine: EngineSpec = EngineSpec(3)) -> int:
    """Parameters a ZeRO-3 engine keeps gathered at its peak: up to stage3_max_live_parameters of the model, at
    least two of its largest layers (the one in use and the one prefetched); only those two when
    stage3_max_reuse_distance is 0 (nothing kept for reuse)."""
    if engine.max_reuse_distance == 0:
        return 2 * largest_layer(shape)
    return max(2 * largest_layer(shape), min(MAX_LIVE_PARAMETERS, shape.params))


def _gathered_bound(engine: EngineSpec) -> str:
    return ("2 largest layers: stage3_max_reuse_distance 0" if engine.max_reuse_distance == 0
            else "up to stage3_max_live_parameters")


def memory_items(teacher: ModelShape, student: ModelShape, cfg: Settings, reached: int,
                 n_online: int) -> list[Item]:
    """Per-GPU and per-node CPU bytes of every item, teacher first, with the phases each is live in."""
    c, dt, db = cfg.cluster, cfg.dtype, DTYPE_BYTES[cfg.dtype]
    forward, loss_ph, student_bwd, online_bwd = PHASES
    s, b = cfg.seq_len, cfg.micro_batch
    items = []
    t_states = model_states(teacher.params + n_online, n_online, dt, cfg.teacher, c)
    labels = {"parameters": "teacher parameters (frozen base + online module)",
              "gradients": "teacher gradients (online module)",
              "optimizer states": "teacher optimizer states (online module)"}
    for kind, it in t_states.items():
        items.append(Item(labels[kind], it.gpu, it.cpu_node, key=f"teacher {kind}"))
    if cfg.teacher.offload == "nvme":
        items.append(Item("teacher NVMe swap buffers (offload_param buffer_count x buffer_size, pinned)",
                          cpu_node=cfg.teacher.swap_buffer_numel * db * c.gpus_per_node, key="teacher swap buffers"))
    ckpt = cfg.module.gradient_checkpointing and reached > 0
    below = reached < teacher.layers and not ckpt  # checkpointed: the recomputed block bounds the forward's too
    if not reached:
        what = "1 forward block"
    elif ckpt:
        what = f"{reached} reached blocks checkpointed: inputs + 1 recomputed block"
    else:
        what = f"{reached} reached blocks kept" + (" + 1 forward block" if below else "")
    items.append(Item(f"teacher activations ({what})",
                      gpu=activation_bytes(teacher, s, b, dt, kept_blocks=reached, checkpointing=ckpt,
                                           flash=cfg.flash_attention, transient_block=below),
                      key="teacher activations"))
    if cfg.teacher.zero == 3:
        items.append(Item("teacher ZeRO-3 gathered parameters (" + _gathered_bound(cfg.teacher) + ")",
                          gpu=gathered_params(teacher, cfg.teacher) * db, key="teacher gathered layers",
                          phases=(forward, online_bwd)))
    if n_online:
        items += _buckets("teacher", cfg.teacher, n_online, dt, c, (online_bwd,))
    hidden_path = cfg.student.zero < 3
    if cfg.teacher.zero == 3 and hidden_path:
        items.append(Item("teacher lm_head copy", gpu=teacher.vocab * teacher.hidden * db,
                          key="teacher lm_head copy"))  # read once, kept for the run
    for kind, it in model_states(student.params, student.params, dt, cfg.student, c).items():
        items.append(Item(f"student {kind}", it.gpu, it.cpu_node))
    items += _buckets("student", cfg.student, student.params, dt, c, (student_bwd,))
    ckpt = " (checkpointed)" if cfg.activation_checkpointing else ""
    items.append(Item(f"student activations{ckpt}",
                      gpu=activation_bytes(student, s, b, dt, kept_blocks=student.layers,
                                           checkpointing=cfg.activation_checkpointing, flash=cfg.flash_attention),
                      key="student activations", phases=(loss_ph, student_bwd)))
    if cfg.student.zero == 3:
        items.append(Item("student ZeRO-3 gathered parameters (" + _gathered_bound(cfg.student) + ")",
                          gpu=gathered_params(student, cfg.student) * db, key="student gathered layers",
                          phases=(loss_ph, student_bwd)))
        items.append(Item("logits at response positions + grads (ZeRO-3 student)",
                          gpu=2 * s * b * (teacher.vocab + student.vocab) * db, key="response logits",
                          phases=(loss_ph, student_bwd)))
    copy = db if db < 4 else 0  # a 16-bit compute dtype's [chunk, V] before and after the float32 cast
    per_row = LOSS_CHUNK_BUFFERS * 4 + LOSS_CHUNK_COPIES * copy + (4 + copy if n_online else 0)
    loss = min(cfg.chunk_size, s * b) * max(teacher.vocab, student.vocab) * per_row
    loss += student.vocab * student.hidden * 4 if hidden_path else 0
    items.append(Item("loss buffers (logit chunks" + (" + fp32 lm_head grad)" if hidden_path else ")"), gpu=loss,
                      key="loss buffers", phases=(loss_ph,)))
    return items


def _buckets(model: str, engine: EngineSpec, trainable: int, dtype: str, cluster: Cluster,
             phases: tuple[str, ...]) -> list[Item]:
    """A ZeRO-1/2 engine's gradient buckets during its backward: [] when it has none."""
    numel = engine.grad_buckets
    if cluster.device_is_host:
        numel = min(numel, trainable)
    if not numel:
        return []
    name = f"{model} gradient buckets (ZeRO-{engine.zero} reduce_bucket_size" + (
        ", the pages its gradients fill)" if cluster.device_is_host else ")")
    return [Item(name, gpu=numel * (4 if engine.zero == 1 else DTYPE_BYTES[dtype]), key=f"{model} gradient buckets",
                 phases=phases)]


# --------------------------------------------------------------------------- step time


def step_time(flops: float, gpus: int, peak_tflops: float, mfu: float = 1.0) -> float:
    """Seconds per step at `mfu` of the GPUs' peak (mfu = 1: the floor)."""
    return flops / (gpus * peak_tflops * 1e12 * mfu)


def online_cost(teacher: ModelShape, cfg: Settings) -> tuple[int, int]:
    """(the online module's trainable parameters, the teacher blocks its backward reaches); (0, 0) without one."""
    if not cfg.online:
        return 0, 0
    args = cfg.module
    module = online_module(args)
    try:
        blocks = module.blocks(teacher.layers, args)
    except ModelError as e:
        raise PlanError("--online-blocks", str(e)) from None
    try:
        params = module.params(teacher, args)
    except ModelError as e:
        raise PlanError("--online-targets", str(e)) from None
    return params, teacher.layers - min(blocks) if blocks else 0


def make_plan(teacher: ModelShape, student: ModelShape, cfg: Settings) -> Plan:
    """Memory items, FLOPs and the step-time floor of one OKD setting."""
    if cfg.student.offload == "cpu" and cfg.student.zero == 0:
        raise PlanError("--student-offload", "cpu offload needs --student-zero 1, 2 or 3")
    if cfg.teacher.offload == "cpu" and cfg.teacher.zero == 0:
        raise PlanError("--teacher-offload", "cpu offload needs --teacher-zero 1, 2 or 3")
    if cfg.teacher.offload == "nvme" and cfg.teacher.zero != 3:
        raise PlanError("--teacher-offload", "nvme offload needs --teacher-zero 3")
    n_online, reached = online_cost(teacher, cfg)
    tokens = cfg.seq_len * cfg.micro_batch * cfg.grad_accum * cfg.cluster.gpus
    flops = step_flops(n_student=student.params, n_teacher=teacher.params, n_online=teacher.block_params * reached,
                       tokens=tokens, teacher=True, online=cfg.online, recompute=cfg.module.gradient_checkpointing)
    return Plan(teacher=teacher, student=student, settings=cfg, online_params=n_online, reached_blocks=reached,
                items=memory_items(teacher, student, cfg, reached, n_online), tokens_per_step=tokens,
                flops_per_step=flops, step_time_s=step_time(flops, cfg.cluster.gpus, cfg.peak_tflops, cfg.mfu))


# --------------------------------------------------------------------------- teacher placement

HEADROOM = 0.9  # the share of free memory a plan may fill: the rest is the allocator's, the CUDA context's, slack


class PlacementError(ValueError):
    """No placement of the teacher fits the memory there is."""


@dataclass(frozen=True)
class Placement:
    """One way to hold the teacher: its engine spec and the shipped DeepSpeed config that gives it."""

    name: str
    engine: EngineSpec
    ds_config: str  # relative to the repository
    what: str


# in order of preference: the fastest that fits wins; each engine is engine_spec of its DeepSpeed config (a test checks)
PLACEMENTS = (
    Placement("replica", EngineSpec(1), "ds_configs/teacher_replica.json",
              "a whole frozen replica per rank (only the online module's optimizer states partitioned)"),
    Placement("zero3", EngineSpec(3), "ds_configs/teacher_zero3.json", "ZeRO-3 partitioned over the devices"),
    Placement("zero3_offload_cpu", EngineSpec(3, "cpu"), "ds_configs/teacher_zero3_offload.json",
              "ZeRO-3 with its parameters offloaded to CPU memory"),
    Placement("zero3_offload_nvme", EngineSpec(3, "nvme", max_reuse_distance=0), "ds_configs/teacher_zero3_nvme.json",
              "ZeRO-3 with its parameters offloaded to NVMe (deepspeed.nvme_path)"),
)


@dataclass
class Budget:
    """The memory a run may use: the minimum over its ranks of free device memory, and of free host
    memory per node; on the CPU accelerator the ranks of a node share host memory as their device."""

    device_bytes: int
    host_bytes: int
    device_is_host: bool = False
    nvme_path: Optional[str] = None


@dataclass
class PlacementChoice:
    """The chosen placement, its plan, and every placement considered with why it was refused."""

    placement: Placement
    plan: Plan
    refused: list[tuple[Placement, str]]
    budget: Budget

    def summary(self) -> str:
        """One line: the choice and the numbers behind it."""
        c, b = self.plan.settings.cluster, self.budget
        weights = self.plan.teacher.params * DTYPE_BYTES[self.plan.settings.dtype]
        if b.device_is_host:
            need = f"{fmt_bytes(_host_need(self.plan, b))} of {fmt_bytes(b.host_bytes)} free host memory"
        else:
            need = (f"{fmt_bytes(self.plan.gpu_total)} per device of {fmt_bytes(b.device_bytes)} free, "
                    f"{fmt_bytes(self.plan.cpu_node_total)} host per node of {fmt_bytes(b.host_bytes)} free")
        text = (f"teacher placement: {self.placement.name} ({self.placement.what}); teacher weights "
                f"{fmt_bytes(weights)}, planned {need} ({c.nodes} node(s) x {c.gpus_per_node} ranks, "
                f"headroom {HEADROOM:g})")
        if self.refused:
            text += "; not " + "; not ".join(f"{p.name}: {why}" for p, why in self.refused)
        return text


def _host_need(plan: Plan, budget: Budget) -> int:
    """Host memory per node: offloaded items, plus every rank's device items when the device is the host."""
    per_rank = plan.gpu_total if budget.device_is_host else 0
    return per_rank * plan.settings.cluster.gpus_per_node + plan.cpu_node_total


def refusal(plan: Plan, budget: Budget) -> str:
    """Why the plan does not fit the budget ("" when it fits)."""
    if plan.settings.teacher.offload == "nvme" and not budget.nvme_path:
        return "deepspeed.nvme_path is not set"
    host = _host_need(plan, budget)
    if not budget.device_is_host and plan.gpu_total > HEADROOM * budget.device_bytes:
        return f"needs {fmt_bytes(plan.gpu_total)} per device, {fmt_bytes(budget.device_bytes)} free"
    if host > HEADROOM * budget.host_bytes:
        return f"needs {fmt_bytes(host)} of host memory per node, {fmt_bytes(budget.host_bytes)} free"
    return ""


def teacher_placement(teacher: ModelShape, student: ModelShape, cfg: Settings, budget: Budget) -> PlacementChoice:
    """The first of PLACEMENTS whose plan fits the budget; PlacementError with the numbers when none does."""
    refused = []
    for placement in PLACEMENTS:
        plan = make_plan(teacher, student, dataclasses.replace(cfg, teacher=placement.engine))
        why = refusal(plan, budget)
        if not why:
            return PlacementChoice(placement, plan, refused, budget)
        refused.append((placement, why))
    weights = teacher.params * DTYPE_BYTES[cfg.dtype]
    raise PlacementError(f"the teacher ({fmt_bytes(weights)} of weights) fits nowhere: "
                         + "; ".join(f"{p.name} {why}" for p, why in refused)
                         + ". Use more devices or nodes, a smaller micro-batch or sequence length, bf16, or set "
                           "deepspeed.nvme_path to a fast local disk")


# --------------------------------------------------------------------------- output


def fmt_bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1."""
    for unit, size in (("GiB", GIB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _verdict(total: int, limit_gib: float, items: list[tuple[str, int]], where: str) -> str:
    ok = total <= limit_gib * GIB
    name, size = max(items, key=lambda x: x[1])
    return (f"{where}: {fmt_bytes(total)} of {limit_gib:g} GiB -> {'FITS' if ok else 'DOES NOT FIT'} "
            f"(biggest: {name}, {fmt_bytes(size)})")


def _engine(e: EngineSpec) -> str:
    return f"ZeRO-{e.zero}" + (f", offload {e.offload}" if e.offload != "none" else "")


def module_text(plan: Plan) -> str:
    """What the teacher's online module is, its size and what its backward reaches."""
    cfg, layers = plan.settings, plan.teacher.layers
    if not cfg.online:
        return "none (a frozen teacher)"
    n = plan.online_params
    text = f"{online_module(cfg.module).describe(cfg.module, layers)}, {n:,} trainable parameter{'s' * (n != 1)}; "
    if not plan.reached_blocks:
        return text + "its backward reaches no teacher block"
    return (text + f"its backward reaches {plan.reached_blocks} of {layers} teacher blocks"
            + (", checkpointed" if cfg.module.gradient_checkpointing else ""))


def render(plan: Plan) -> str:
    """The plan as markdown: settings, the memory table, fit verdicts, FLOPs and the step-time floor."""
    cfg, c = plan.settings, plan.settings.cluster
    factor = 4 if cfg.module.gradient_checkpointing else 2
    online_term = f" + {factor}*N_block*{plan.reached_blocks}" if plan.reached_blocks else ""
    run = (f"{c.nodes} node(s) x {c.gpus_per_node} GPUs = {c.gpus} GPUs; seq {cfg.seq_len}, micro-batch "
           f"{cfg.micro_batch}, grad-accum {cfg.grad_accum}, {cfg.dtype}")
    run += ", student activation checkpointing" if cfg.activation_checkpointing else ""
    run += ", flash attention" if cfg.flash_attention else ""
    lines = [
        "## OKD plan",
        "",
        f"- teacher: {plan.teacher.describe()}; {_engine(cfg.teacher)}",
        f"- online module: {module_text(plan)}",
        f"- student: {plan.student.describe()}; {_engine(cfg.student)}",
        f"- {run}",
        "",
        "| item | per GPU | CPU per node | live during |",
        "|---|---:|---:|---|",
    ]
    for it in plan.items:
        live = "the whole step" if it.phases == PHASES else ", ".join(it.phases)
        lines.append(f"| {it.name} | {fmt_bytes(it.gpu)} | {fmt_bytes(it.cpu_node)} | {live} |")
    lines.append(f"| **total** (the largest phase) | **{fmt_bytes(plan.gpu_total)}** | "
                 f"**{fmt_bytes(plan.cpu_node_total)}** | {plan.peak_phase('gpu')} |")
    lines += [
        "",
        "- a phase's items are live at once; the totals are the largest phase's, what the run allocates; the rank "
        "that loads a checkpoint also maps its safetensors files, whose resident pages are page cache the kernel "
        "drops under pressure (not counted)",
        "- " + _verdict(plan.gpu_total, c.gpu_mem_gib, [(i.name, i.gpu) for i in plan.items], "GPU per GPU"),
        "- " + _verdict(plan.cpu_node_total, c.cpu_mem_gib, [(i.name, i.cpu_node) for i in plan.items],
                        "CPU per node"),
        f"- overall: {'FITS' if plan.fits else 'DOES NOT FIT'}",
        "",
        f"- tokens per step: {plan.tokens_per_step:,}",
        f"- FLOPs per step: {plan.flops_per_step:.4e} (6*N_student + 2*N_teacher{online_term} per token)",
        f"- step time: {plan.step_time_s:.6g} s at mfu {cfg.mfu:g} of {cfg.peak_tflops:g} TFLOP/s per GPU"
        + (" (the floor)" if cfg.mfu == 1.0 else ""),
        f"- throughput: {plan.tokens_per_step / plan.step_time_s:,.0f} tokens/s",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated module names such as q_proj,v_proj, got {text!r}")
    return names


# the command line's online-module flags (argparse dests) -> the OnlineArgs keys they set
ONLINE_FLAGS = {"online_placement": "placement", "online_blocks": "num_blocks", "online_targets": "target_modules",
                "lora_r": "r", "teacher_gradient_checkpointing": "gradient_checkpointing"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Per-GPU / per-node memory, the teacher's placement and the step-time "
                                "floor of a distillation run (formulas: the docstring of okd_scale/plan.py).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c = p.add_argument_group("a run config instead of the flags below (flags given as well win)")
    c.add_argument("--config", help="a run config (okd_scale/train.py's YAML): models, method, lengths, batch, "
                                    "dtype, the online module and the DeepSpeed configs come from it")
    c.add_argument("overrides", nargs="*", help="key=value overrides of the run config, as for train.py")
    m = p.add_argument_group("models (a local Hugging Face directory / config.json, or a parameter count)")
    m.add_argument("--teacher", help="teacher model directory or config.json")
    m.add_argument("--teacher-params", type=POS_INT, help="teacher parameter count, e.g. 7e9")
    m.add_argument("--student", help="student model directory or config.json")
    m.add_argument("--student-params", type=POS_INT, help="student parameter count, e.g. 1.1e9")
    m.add_argument("--vocab-size", type=POS_INT, default=32000, help="vocabulary of a model given as a count")
    r = p.add_argument_group("run")
    r.add_argument("--method", choices=[n for n, m in METHODS.items() if m.teacher != "none"], default="okd",
                   help="a method with a teacher engine: the online ones (okd) train its online module, the others "
                        "keep it frozen")
    r.add_argument("--seq-len", type=POS_INT, default=512, help="tokens per sequence")
    r.add_argument("--micro-batch", type=POS_INT, default=4, help="sequences per GPU per micro-step")
    r.add_argument("--grad-accum", type=POS_INT, default=1, help="micro-steps per optimizer step")
    r.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="bf16 mixed precision or fp32")
    r.add_argument("--activation-checkpointing", action="store_true", help="student gradient checkpointing")
    r.add_argument("--flash-attention", action="store_true", help="attention keeps no a*s^2 scores")
    r.add_argument("--chunk-size", type=POS_INT, default=1024, help="loss.chunk_size: tokens per logits chunk")
    o = p.add_argument_group("the online module (the run config's online section)")
    paper = OnlineArgs()
    o.add_argument("--online-placement", choices=list(ONLINE_MODULES), default=paper.placement,
                   help="online.placement: a LoRA on the teacher's blocks or on its lm_head, or a learned temperature")
    o.add_argument("--online-blocks", type=POS_INT,
                   help="online.num_blocks: k, the last blocks that carry the blocks LoRA (default: every block)")
    o.add_argument("--online-targets", type=_names, default=",".join(paper.target_modules),
                   help="online.target_modules: the blocks' linear layers that get a LoRA")
    o.add_argument("--lora-r", type=POS_INT, default=paper.r, help="online.r: the LoRA rank")
    o.add_argument("--teacher-gradient-checkpointing", action="store_true",
                   help="online.gradient_checkpointing: recompute the reached teacher blocks in the module's backward")
    p.set_defaults(online_module=paper)  # the run config's online section when --config gives one
    k = p.add_argument_group("cluster")
    k.add_argument("--nodes", type=POS_INT, default=1, help="nodes")
    k.add_argument("--gpus-per-node", type=POS_INT, default=8, help="GPUs per node")
    k.add_argument("--gpu-mem-gib", type=POS_FLOAT, default=80.0, help="memory per GPU")
    k.add_argument("--cpu-mem-gib", type=POS_FLOAT, default=512.0, help="CPU memory per node")
    k.add_argument("--peak-tflops", type=POS_FLOAT, default=989.0, help="peak per GPU (989: H100 bf16 dense)")
    k.add_argument("--mfu", type=FRACTION, default=1.0, help="assumed utilisation in (0, 1]; 1 gives the floor")
    k.add_argument("--accelerator", default="cuda", help="DeepSpeed's accelerator name; cpu: the devices are the "
                   "nodes' host memory, where only the pages a rank writes are resident")
    z = p.add_argument_group("DeepSpeed")
    z.add_argument("--teacher-zero", type=int, choices=(0, 1, 2, 3),
                   help="teacher ZeRO stage (default: chosen with the offload, as deepspeed.teacher_config: auto does)")
    z.add_argument("--teacher-offload", choices=("cpu", "nvme", "none"),
                   help="teacher offload target (default: chosen with the stage)")
    z.add_argument("--nvme-path", help="deepspeed.nvme_path: lets the automatic choice offload the teacher to NVMe")
    z.add_argument("--student-zero", type=int, choices=(0, 1, 2, 3), default=2, help="student ZeRO stage")
    z.add_argument("--student-offload", choices=("cpu", "none"), default="none", help="student offload target")
    return p


def _shape(parser: argparse.ArgumentParser, path: Optional[str], count: Optional[int], flag: str,
           vocab: int) -> ModelShape:
    if path and count:
        parser.error(f"give either --{flag} or --{flag}-params, not both")
    if count:
        return shape_from_count(count, vocab)
    if not path:
        parser.error(f"--{flag} or --{flag}-params is required: a model directory / config.json, or a "
                     f"parameter count such as 7e9")
    try:
        return read_shape(path)
    except (OSError, ValueError) as e:
        parser.error(f"--{flag} {path}: {e} (expected a local Hugging Face model directory or its config.json)")


def _online(method: str) -> bool:
    return METHODS[method].online


def teacher_engine(zero: int, offload: str, given: Optional[EngineSpec] = None) -> EngineSpec:
    """The teacher's EngineSpec for a ZeRO stage and offload: `given` (a run config's teacher DeepSpeed config) when
    it has them, else the shipped placement's that has them, else DeepSpeed's defaults."""
    return _matching(zero, offload, ([given] if given else []) + [p.engine for p in PLACEMENTS])


def student_engine(zero: int, offload: str, given: Optional[EngineSpec] = None) -> EngineSpec:
    """The student's EngineSpec: `given` (a run config's student DeepSpeed config) when it has this stage and
    offload, else the shipped ds_configs/student_zero<stage>.json's buckets, else DeepSpeed's defaults."""
    shipped = resolve_path(f"ds_configs/student_zero{zero}.json")
    specs = ([given] if given else []) + ([dataclasses.replace(engine_spec(json.loads(shipped.read_text())),
                                                               offload=offload)] if shipped.exists() else [])
    return _matching(zero, offload, specs)


def _matching(zero: int, offload: str, specs: list[EngineSpec]) -> EngineSpec:
    return next((spec for spec in specs if (spec.zero, spec.offload) == (zero, offload)), EngineSpec(zero, offload))


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The Settings the flags give; the teacher's engine as given (ZeRO-3 and no offload by default)."""
    teacher = teacher_engine(3 if args.teacher_zero is None else args.teacher_zero, args.teacher_offload or "none",
                             getattr(args, "teacher_engine", None))
    module = dataclasses.replace(args.online_module, **{key: getattr(args, dest) for dest, key in ONLINE_FLAGS.items()})
    return Settings(seq_len=args.seq_len, micro_batch=args.micro_batch, grad_accum=args.grad_accum,
                    cluster=Cluster(args.nodes, args.gpus_per_node, args.gpu_mem_gib, args.cpu_mem_gib,
                                    device_is_host=args.accelerator == "cpu"),
                    teacher=teacher, online=_online(args.method),
                    student=student_engine(args.student_zero, args.student_offload,
                                           getattr(args, "student_engine", None)), module=module, dtype=args.dtype,
                    peak_tflops=args.peak_tflops, mfu=args.mfu, activation_checkpointing=args.activation_checkpointing,
                    flash_attention=args.flash_attention, chunk_size=args.chunk_size)


def run_settings(cfg: RunConfig, student_ds: dict, cluster: Cluster, flash_attention: bool) -> Settings:
    """The memory plan's settings of the run `cfg` describes, whose student has the DeepSpeed config `student_ds`,
    on `cluster`; the teacher's engine is left at the plan's default (its placement is what is asked)."""
    t = cfg.train
    offload = offload_device(student_ds, "offload_optimizer")
    return Settings(
        seq_len=cfg.data.max_length, micro_batch=t.per_device_train_batch_size,
        grad_accum=t.gradient_accumulation_steps, dtype="bf16" if t.bf16 else "fp32", cluster=cluster,
        student=dataclasses.replace(engine_spec(student_ds), offload="cpu" if offload == "cpu" else "none"),
        online=method_of(cfg).online, module=cfg.online,
        activation_checkpointing=t.gradient_checkpointing, chunk_size=cfg.loss.chunk_size,
        flash_attention=flash_attention)


def defaults_from_config(path: str, overrides: Sequence[str]) -> dict:
    """The flags' values that a run config gives (raises config.ConfigError naming the key): the settings the
    trainer's own placement uses (run_settings), its online section whole, the models and the teacher's
    engine when it is given."""
    cfg = load_config(path, list(overrides))
    if METHODS[cfg.method].teacher == "none":
        raise ConfigError(f'{path}: "method" {cfg.method} trains without a teacher engine: nothing to place')
    ds = cfg.deepspeed

    def ds_config(ds_path: str) -> dict:
        return json.loads(resolve_path(ds_path).read_text())

    s = run_settings(cfg, ds_config(ds.student_config), Cluster(), flash_attention=False)
    out = dict(teacher=cfg.model.teacher, student=cfg.model.student, method=cfg.method, nvme_path=ds.nvme_path,
               student_zero=s.student.zero, student_offload=s.student.offload, student_engine=s.student,
               online_module=s.module, **{dest: getattr(s.module, key) for dest, key in ONLINE_FLAGS.items()},
               **{k: getattr(s, k) for k in ("seq_len", "micro_batch", "grad_accum", "dtype", "chunk_size",
                                             "activation_checkpointing")})
    if ds.teacher_config != "auto":
        spec = engine_spec(ds_config(ds.teacher_config))
        out.update(teacher_zero=spec.zero, teacher_offload=spec.offload, teacher_engine=spec)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config or args.overrides:
        try:
            parser.set_defaults(**defaults_from_config(args.config, args.overrides))
        except ConfigError as e:
            parser.error(str(e))
        args = parser.parse_args(argv)
    teacher = _shape(parser, args.teacher, args.teacher_params, "teacher", args.vocab_size)
    student = _shape(parser, args.student, args.student_params, "student", args.vocab_size)
    settings = settings_from_args(args)
    try:
        if args.teacher_zero is None and args.teacher_offload is None:
            budget = Budget(int(args.gpu_mem_gib * GIB), int(args.cpu_mem_gib * GIB),
                            device_is_host=args.accelerator == "cpu", nvme_path=args.nvme_path)
            try:
                choice = teacher_placement(teacher, student, settings, budget)
                plan, placement = choice.plan, f"- {choice.summary()}"
            except PlacementError as e:  # the plan of the smallest placement, with its DOES NOT FIT verdicts
                last = PLACEMENTS[-1] if args.nvme_path else PLACEMENTS[-2]
                plan = make_plan(teacher, student, dataclasses.replace(settings, teacher=last.engine))
                placement = f"- teacher placement: {e} (the table: {last.name})"
        else:
            plan, placement = make_plan(teacher, student, settings), "- teacher placement: as given by the flags"
    except PlanError as e:
        parser.error(str(e))
    print(render(plan) + "\n" + placement)
    return 0


if __name__ == "__main__":
    sys.exit(main())
