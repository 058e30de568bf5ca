"""The run configuration: one dataclass tree, read from YAML with `key=value` overrides, validated at start.

Every error names the file or flag, the key and what was expected, and is raised before any engine starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

PACKAGE_DIR = Path(__file__).resolve().parent  # holds the shipped DeepSpeed configs, ds_configs/
_ALIASES = {"lambda": "lmbda"}  # YAML keys that are Python keywords
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAPER_TARGETS = ["q_proj", "v_proj"]  # the paper's online LoRA: attention query and value
MAX_MMAP_THRESHOLD = 32 * 2 ** 20  # glibc's largest M_MMAP_THRESHOLD on 64-bit hosts
OFFLOAD_MMAP_THRESHOLD = 65536  # train.malloc_mmap_threshold's null when a model's parameters are offloaded


def first_line(e: BaseException) -> str:
    """An exception's first line of text (its type when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def arg(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, names: str = "") -> Any:
    """A config key with its default and help (``--help`` and the README's key table print them), as the Hugging
    Face argument dataclasses declare theirs; `names`: the registry whose names the key takes (methods,
    divergences, online_modules, online_objectives), listed after the help where the registries are known."""
    meta = {"help": help, **({"names": names} if names else {})}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelArgs:
    teacher: str = arg("", "local Hugging Face model directory of the teacher (methods with a teacher)")
    student: str = arg("", "local Hugging Face model directory of the student")
    allow_hub: bool = arg(False, "accept hub ids (downloads); off, so that a mistyped path is an error")
    trust_remote_code: bool = arg(False, "run the models' own code from their directories")
    use_safetensors: bool = arg(True, "load weights from safetensors files only; false also reads PyTorch .bin "
                                      "files (weights-only unpickling)")


@dataclass
class DataArgs:
    train_file: str = arg("", "training data: .jsonl, .json or a datasets.save_to_disk directory (required)")
    eval_file: Optional[str] = arg(None, "validation data, same formats (null: none)")
    max_length: int = arg(512, "tokens per example, prompt and response")
    on_error: str = arg("raise", "a malformed row: raise | skip")
    eval_rouge_examples: int = arg(32, "validation rows whose greedy answers are scored with ROUGE-L at each "
                                       "evaluation (0: none)")
    eval_max_new_tokens: int = arg(64, "new tokens per greedy answer at evaluation")


@dataclass
class TrainArgs:
    max_steps: int = arg(100, "optimizer steps")
    per_device_train_batch_size: int = arg(4, "sequences per rank per micro-step")
    gradient_accumulation_steps: int = arg(1, "micro-steps per optimizer step")
    learning_rate: float = arg(5e-5, "the student's peak learning rate")
    weight_decay: float = arg(0.0, "the student's AdamW weight decay")
    lr_scheduler_type: str = arg("cosine", "linear | cosine | constant | constant_with_warmup")
    warmup_steps: int = arg(0, "the student's warm-up steps")
    max_grad_norm: float = arg(1.0, "gradient clipping (0: off)")
    bf16: bool = arg(False, "bf16 mixed precision")
    gradient_checkpointing: bool = arg(False, "the student's activation checkpointing")
    logging_steps: int = arg(1, "write TensorBoard scalars every N steps")
    profile_phases: bool = arg(False, "time each phase of a step, synchronising the accelerator at every phase "
                                      "edge")
    eval_every: int = arg(0, "evaluate on data.eval_file every N steps (0: only at the end)")
    save_every: int = arg(0, "checkpoint every N optimizer steps (0: only at the end and on a stop signal)")
    keep_last: int = arg(2, "checkpoints kept (0: all)")
    keep_best: bool = arg(False, "also keep the checkpoint with the lowest validation loss (needs eval_every a "
                                 "multiple of save_every)")
    max_bad_steps: int = arg(10, "stop after more than N consecutive steps skipped for non-finite losses or "
                                 "gradients")
    ddp_timeout: int = arg(1800, "seconds a rank waits for the others before the one that died or hangs is named")
    malloc_mmap_threshold: Optional[int] = arg(None, "host allocations of at least this many bytes are mapped on "
                                                     "their own and given back to the system when freed (glibc's "
                                                     "M_MMAP_THRESHOLD, up to 33554432): less resident host memory, "
                                                     "some step time on a CPU; null: 65536 when a model's parameters "
                                                     "are offloaded (ZeRO-3 to CPU or NVMe), else glibc's own; 0: "
                                                     "glibc's own, which keeps freed blocks for reuse")


@dataclass
class LossArgs:
    divergence: str = arg("fkl", "D in LS = kd_ratio D(pT || pS) + (1 - kd_ratio) CE", names="divergences")
    kd_ratio: float = arg(0.5, "the weight of D in the student's loss, the rest on CE")
    temperature: float = arg(1.0, "softmax temperature of both distributions in D (no T^2 factor)")
    js_beta: float = arg(0.5, "js: the weight of p in the mixture")
    skew_alpha: float = arg(0.1, "skl, srkl: the skew")
    akl_mu: float = arg(0.5, "akl: the head's probability mass")
    chunk_size: int = arg(1024, "tokens per chunk of the loss computation")
    from_hidden: bool = arg(True, "losses from final hidden states and lm_head rows, logits one chunk at a time")
    vocab_shards: int = arg(1, "W > 1: each group of W ranks splits the vocabulary (needs from_hidden)")


@dataclass
class OnlineArgs:
    """The teacher's online module (method okd), zero-initialised so that step 0's teacher is the given one,
    trained with LT while the rest of the teacher stays frozen. The defaults are the paper's OKD (arXiv
    2409.12512 v2, section V): a rank-32 LoRA (scale lora_alpha / r = 1) on q_proj and v_proj of every block, at
    the student's learning rate and schedule, LT = 0.5 KL(sg[pS] || pT) + 0.5 CE(zT, y).

    placement (what the module is, and what its backward costs):
      blocks       a LoRA (r, lora_alpha, target_modules) on the last num_blocks blocks (all: the paper's);
                   backward through them (online.gradient_checkpointing recomputes their activations)
      head         a LoRA on the lm_head: zT = h (W + lora_alpha/r B A)^T; the blocks run without gradient,
                   so OKD costs about what KD costs (one [V, H] product more per step)
      temperature  one learnable temperature: zT = h W^T / T_online (T_online = exp(s), s = 0 at step 0)
    objective (LT, over the counted tokens; pS = student, pT = adapted teacher, sg = no gradient):
      decoupled    LT = ce_weight CE(zT, y) + divergence_weight D_T(sg[pS] || pT), D_T = online.divergence
                   (the paper's, with alpha = divergence_weight = 1 - ce_weight)
      joint        LT = ce_weight CE(zT, y) + divergence_weight kd_ratio D(pT || sg[pS]), D = loss.divergence:
                   the student's own distillation loss also trains the module (PESF-KD's form)
    """

    placement: str = arg("blocks", "what the module is", names="online_modules")
    objective: str = arg("decoupled", "the module's loss LT", names="online_objectives")
    r: int = arg(32, "the LoRA rank")
    lora_alpha: int = arg(32, "the LoRA scale numerator (scale lora_alpha / r)")
    lora_dropout: float = arg(0.0, "LoRA dropout")
    num_blocks: Optional[int] = arg(None, "k, the teacher's last blocks that carry it (null: every block)")
    target_modules: list = arg(help="the modules of those blocks that get a LoRA",
                               factory=lambda: list(PAPER_TARGETS))
    learning_rate: Union[float, str] = arg("ratio:1", "the module's peak learning rate, or ratio:R (R x "
                                                      "train.learning_rate); 0: the module stays as it starts")
    warmup_steps: Optional[int] = arg(None, "the module's warm-up steps (null: train.warmup_steps)")
    weight_decay: float = arg(0.0, "the module's AdamW weight decay")
    update_every: int = arg(1, "update the module every N optimizer steps")
    divergence: str = arg("fkl", "D_T of the decoupled objective", names="divergences")
    divergence_weight: float = arg(0.5, "the weight on LT's divergence term (the paper's alpha)")
    ce_weight: float = arg(0.5, "the weight on LT's CE(zT, y) term (the paper's 1 - alpha)")
    gradient_checkpointing: bool = arg(False, "recompute the teacher's block activations in the module's backward "
                                              "instead of keeping them (placements whose backward reaches blocks)")
    drift_every: int = arg(10, "log teacher/drift = KL(original teacher || adapted teacher) every N steps (0: "
                               "never)")


@dataclass
class SGOArgs:
    """Student-generated outputs, GKD-style (method sgo): with probability `lambda` a step's responses are
    sampled from the current student, then scored by the teacher with loss.divergence."""

    lmbda: float = arg(0.5, "the probability a step's responses are sampled from the student (config key "
                            "sgo.lambda; TRL's GKDConfig calls it lmbda, both are accepted)")
    max_new_tokens: int = arg(128, "new tokens per sampled response")
    temperature: float = arg(1.0, "sampling temperature")
    top_p: float = arg(1.0, "nucleus sampling's p")


@dataclass
class TAIDArgs:
    """Temporally Adaptive Interpolated Distillation (method taid, Shing et al., ICLR 2025): the student learns
    KL(p_t || q_S) with p_t = softmax((1 - t) sg[z_S] + t z_T), t rising from t_start to t_end."""

    t_start: float = arg(0.4, "t at step 0")
    t_end: float = arg(1.0, "the largest t")
    alpha: float = arg(5e-4, "the adaptive step: t += alpha sigmoid(momentum of the loss's relative fall) (1 - t)")
    beta: float = arg(0.99, "the momentum's decay")
    adaptive: bool = arg(True, "false: t follows the linear floor t_start + (t_end - t_start) step / max_steps")


@dataclass
class SeqKDArgs:
    """Sequence-level KD (method seqkd): the teacher's responses to the training prompts, generated once
    before training and cached as jsonl; the student is then fine-tuned on them."""

    cache_file: Optional[str] = arg(None, "the responses' cache (null: output_dir/seqkd/teacher_responses.jsonl)")
    max_new_tokens: int = arg(128, "new tokens per response")
    do_sample: bool = arg(False, "sample (false: greedy)")
    temperature: float = arg(1.0, "sampling temperature")
    top_p: float = arg(1.0, "nucleus sampling's p")
    batch_size: int = arg(8, "prompts per generation batch")
    generate_with: str = arg("auto", "auto: a whole copy of the teacher per rank when its weights fit in half the "
                                     "free device memory, else the ZeRO-3 engine; copy | engine force one")


@dataclass
class DeepSpeedArgs:
    teacher_config: str = arg("auto", "auto: placed by its size (a whole replica per rank, else ZeRO-3, else "
                                      "ZeRO-3 offloaded to CPU, else to NVMe); or a DeepSpeed JSON path")
    student_config: str = arg("ds_configs/student_zero2.json", "the student's DeepSpeed JSON (student_zero2.json "
                                                               "or student_zero3.json)")
    nvme_path: Optional[str] = arg(None, "a fast local disk for ZeRO-3 NVMe offload (teacher_config auto, or "
                                         "\"auto\" in a JSON)")
    teacher_overrides: dict = arg(help="merged into the teacher's DeepSpeed JSON", factory=dict)
    student_overrides: dict = arg(help="merged into the student's DeepSpeed JSON", factory=dict)


@dataclass
class RunConfig:
    method: str = arg("okd", "the training method", names="methods")
    seed: int = arg(42, "the run's seed")
    output_dir: str = arg("runs/okd", "checkpoints, logs, the exported student")
    resume: str = arg("auto", "auto: from output_dir/checkpoints/latest if any; none; or a checkpoint path")
    resume_ignore: list = arg(help="keys of the checkpoint's run config deliberately changed on resume", factory=list)
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    loss: LossArgs = field(default_factory=LossArgs)
    online: OnlineArgs = field(default_factory=OnlineArgs)
    sgo: SGOArgs = field(default_factory=SGOArgs)
    taid: TAIDArgs = field(default_factory=TAIDArgs)
    seqkd: SeqKDArgs = field(default_factory=SeqKDArgs)
    deepspeed: DeepSpeedArgs = field(default_factory=DeepSpeedArgs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------ DeepSpeed configs


def zero_stage(ds_config: dict) -> int:
    """The ZeRO stage a DeepSpeed config sets (0 when it sets none)."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def offload_device(ds_config: dict, kind: str) -> str:
    """Where a DeepSpeed config offloads `kind` (offload_param or offload_optimizer): none, cpu or nvme."""
    return ds_config.get("zero_optimization", {}).get(kind, {}).get("device", "none")


# ----------------------------------------------------------------------------------------------- parsing


def _leaf_fields(cls, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """(dotted key, field) of every leaf of the dataclass tree `cls`, in declaration order."""
    leaves = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            leaves += _leaf_fields(hint, prefix + f.name + ".")
        else:
            leaves.append((prefix + f.name, f))
    return leaves


def yaml_text(value: Any) -> str:
    """`value` as one line of YAML (flow style), as --help, the key table and the method defaults spell it."""
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def named_keys(cls=RunConfig) -> list[tuple[str, str]]:
    """(dotted key, the registry whose names it takes) for every key that declares one (arg's `names`)."""
    return [(key, f.metadata["names"]) for key, f in _leaf_fields(cls) if "names" in f.metadata]


def _all_keys(cls, prefix: str = "") -> list[str]:
    return [key for key, _ in _leaf_fields(cls, prefix)]


def key_rows(cls=RunConfig, prefix: str = "") -> list[tuple[str, str, str, str, str]]:
    """(dotted key, the key as the config file spells it, its default as YAML, its help, the registry whose names
    it takes or "") for every key, in order."""
    names = {v: k for k, v in _ALIASES.items()}
    rows = []
    for key, f in _leaf_fields(cls, prefix):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        *sections, name = key.split(".")
        rows.append((key, ".".join([*sections, names.get(name, name)]), yaml_text(default), f.metadata.get("help", ""),
                     f.metadata.get("names", "")))
    return rows


def _unknown(key: str, cls, origin: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(RunConfig), n=1, cutoff=0.6)
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    return ConfigError(f'{origin}: unknown key "{key}"{hint}')


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(value: Any, hint, key: str, origin: str) -> Any:
    """Check `value` against a field's type; accept ints for floats and YAML 1.1 strings like 5e-5."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        for member in members[:-1]:  # the first member the value is, else the last one's error
            try:
                return _coerce(value, member, key, origin)
            except ConfigError:
                pass
        hint = members[-1]
    want = typing.get_origin(hint) or hint
    ok = False
    if want is bool:
        ok = isinstance(value, bool)
    elif want is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif want is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            value = float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif want is str:
        ok = isinstance(value, str)
    elif want is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif want is dict:
        ok = isinstance(value, dict)
    if not ok:
        name = {list: "list of strings"}.get(want, getattr(want, "__name__", str(want)))
        raise ConfigError(f'{origin}: "{key}" must be {name}, got {type(value).__name__} {value!r}')
    return value


def _apply(obj, values: dict, origin: str, prefix: str = "") -> None:
    if not isinstance(values, dict):
        raise ConfigError(f'{origin}: "{prefix.rstrip(".") or "<top>"}" must be a mapping, got {values!r}')
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        full = prefix + str(key)
        key = _ALIASES.get(key, key)
        if key not in hints:
            raise _unknown(full, type(obj), origin)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            _apply(getattr(obj, key), value or {}, origin, full + ".")
        else:
            setattr(obj, key, _coerce(value, hint, full, origin))


def set_override(cfg: RunConfig, item: str) -> None:
    """Apply one `dotted.key=value` override; the value is parsed as YAML."""
    origin = f"override {item!r}"
    if "=" not in item:
        raise ConfigError(f"{origin}: expected key=value, e.g. train.max_steps=10")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f'{origin}: the value of "{key}" is not valid YAML ({problem})') from None
    parts = [_ALIASES.get(p, p) for p in key.split(".")]
    obj = cfg
    for p in parts[:-1]:
        if not dataclasses.is_dataclass(obj) or p not in typing.get_type_hints(type(obj)):
            raise _unknown(key, RunConfig, origin)
        obj = getattr(obj, p)
    hints = typing.get_type_hints(type(obj)) if dataclasses.is_dataclass(obj) else {}
    if parts[-1] not in hints or dataclasses.is_dataclass(hints[parts[-1]]):
        raise _unknown(key, RunConfig, origin)
    setattr(obj, parts[-1], _coerce(value, hints[parts[-1]], key, origin))


def read_values(path: str | Path | None) -> tuple[dict, str]:
    """(the values of the YAML run config at `path`, the name errors give it); ({}, "config") for None."""
    if path is None:
        return {}, "config"
    origin, path = str(path), Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.start}: {e.reason}); save the config as "
                          "UTF-8 YAML") from None
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it: {e.strerror or e}") from None
    return values, origin


def build(values: dict, origin: str, defaults: Optional[dict] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """The run config of `defaults` ({dotted key: value}), then the file's `values`, then `key=value` overrides."""
    cfg = RunConfig()
    for key, value in (defaults or {}).items():
        set_override(cfg, f"{key}={yaml_text(value)}")
    _apply(cfg, values, origin)
    for item in overrides:
        set_override(cfg, item)
    return cfg


# -------------------------------------------------------------------------------------------- validation


def resolve_path(p: str) -> Path:
    """A path as given if it exists, else relative to the package (the shipped ds_configs/ in a pip install too)."""
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path
    alt = PACKAGE_DIR / p
    return alt if alt.exists() else path


def _model_dir(value: str, key: str, allow_hub: bool, origin: str) -> None:
    if not value:
        raise ConfigError(f'{origin}: "{key}" is required: a local Hugging Face model directory')
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f'{origin}: "{key}": {path} has no config.json; expected a Hugging Face model '
                              "directory (save_pretrained output)")
        return
    if allow_hub and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", value):
        return
    if re.fullmatch(r"[\w.-]+/[\w.-]+", value) and not value.startswith((".", "/")):
        raise ConfigError(f'{origin}: "{key}": {value!r} is not a local directory. Models load from local '
                          "directories; set model.allow_hub=true to download it from the Hugging Face Hub")
    raise ConfigError(f'{origin}: "{key}": model directory not found: {path}')


def check(cond: bool, origin: str, key: str, expected: str, value: Any) -> None:
    """Raises ConfigError naming `key` in `origin`, what it must be and what it is, unless `cond`."""
    if not cond:
        raise ConfigError(f'{origin}: "{key}" must be {expected}, got {value!r}')


def _online_lr(value, student_lr: float) -> Optional[float]:
    """online.learning_rate as a number, or None when it is neither a number >= 0 nor "ratio:R" with R >= 0."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*ratio\s*:\s*(.+)", value)
        if not m or not _FLOAT_RE.match(m.group(1).strip()):
            return None
        value = float(m.group(1)) * student_lr
    return float(value) if value >= 0 else None


def online_learning_rate(cfg: RunConfig) -> float:
    """The online module's peak learning rate (online.learning_rate, resolved against train.learning_rate)."""
    return _online_lr(cfg.online.learning_rate, cfg.train.learning_rate)


def check_values(cfg: RunConfig, origin: str = "config", *, needs_teacher: bool = True) -> None:
    """Ranges, choices and paths that need no registry (configure.validate checks the names); raises ConfigError
    naming the key. `needs_teacher`: model.teacher must be a model directory."""
    _check_ranges(cfg, origin)
    _check_method_sections(cfg, origin)
    _check_choices(cfg, origin)
    _check_paths(cfg, origin, needs_teacher)


def _check_ranges(cfg: RunConfig, origin: str) -> None:
    """The numbers of the train, data, loss and online sections."""
    t, lo, on = cfg.train, cfg.loss, cfg.online
    for key, v in [("train.max_steps", t.max_steps),
                   ("train.per_device_train_batch_size", t.per_device_train_batch_size),
                   ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
                   ("train.logging_steps", t.logging_steps), ("data.max_length", cfg.data.max_length),
                   ("loss.chunk_size", lo.chunk_size), ("loss.vocab_shards", lo.vocab_shards), ("online.r", on.r),
                   ("online.update_every", on.update_every),
                   ("data.eval_max_new_tokens", cfg.data.eval_max_new_tokens)]:
        check(v >= 1, origin, key, "an integer >= 1", v)
    check(cfg.data.max_length >= 2, origin, "data.max_length", "an integer >= 2", cfg.data.max_length)
    check(t.warmup_steps >= 0, origin, "train.warmup_steps", "an integer >= 0", t.warmup_steps)
    for key, v in [("train.save_every", t.save_every), ("train.keep_last", t.keep_last),
                   ("train.max_bad_steps", t.max_bad_steps),
                   ("train.eval_every", t.eval_every), ("data.eval_rouge_examples", cfg.data.eval_rouge_examples)]:
        check(v >= 0, origin, key, "an integer >= 0", v)
    check(t.ddp_timeout >= 1, origin, "train.ddp_timeout", "an integer >= 1 (seconds)", t.ddp_timeout)
    check(t.malloc_mmap_threshold is None or 0 <= t.malloc_mmap_threshold <= MAX_MMAP_THRESHOLD, origin,
          "train.malloc_mmap_threshold", f"null or an integer in [0, {MAX_MMAP_THRESHOLD}] (bytes)",
          t.malloc_mmap_threshold)
    if t.keep_best:
        check(bool(cfg.data.eval_file), origin, "data.eval_file", "a validation file when train.keep_best is true",
              cfg.data.eval_file)
        check(t.eval_every > 0 and t.save_every > 0 and t.eval_every % t.save_every == 0, origin, "train.eval_every",
              "a positive multiple of train.save_every when train.keep_best is true (every evaluated step saved)",
              t.eval_every)
    check(bool(cfg.resume), origin, "resume", "auto, none or a checkpoint path", cfg.resume)
    unknown = [k for k in cfg.resume_ignore if k not in _all_keys(RunConfig)]
    check(not unknown, origin, "resume_ignore", "a list of run-config keys", unknown)
    for key, v in [("train.learning_rate", t.learning_rate), ("loss.temperature", lo.temperature)]:
        check(v > 0, origin, key, "a number > 0", v)
    check(_online_lr(on.learning_rate, t.learning_rate) is not None, origin, "online.learning_rate",
          "a number >= 0, or ratio:R with R >= 0 (R x train.learning_rate; 0: the module stays as it starts)",
          on.learning_rate)
    check(on.warmup_steps is None or on.warmup_steps >= 0, origin, "online.warmup_steps", "null or an integer >= 0",
          on.warmup_steps)
    for key, v in [("train.weight_decay", t.weight_decay), ("online.weight_decay", on.weight_decay),
                   ("train.max_grad_norm", t.max_grad_norm), ("online.divergence_weight", on.divergence_weight),
                   ("online.ce_weight", on.ce_weight), ("online.lora_alpha", on.lora_alpha)]:
        check(v >= 0, origin, key, "a number >= 0", v)
    check(0.0 <= lo.kd_ratio <= 1.0, origin, "loss.kd_ratio", "in [0, 1]", lo.kd_ratio)


def _check_method_sections(cfg: RunConfig, origin: str) -> None:
    """The sgo, seqkd and taid sections."""
    sg, sq = cfg.sgo, cfg.seqkd
    check(0.0 <= sg.lmbda <= 1.0, origin, "sgo.lambda", "in [0, 1]", sg.lmbda)
    for key, v in [("sgo.max_new_tokens", sg.max_new_tokens), ("seqkd.max_new_tokens", sq.max_new_tokens),
                   ("seqkd.batch_size", sq.batch_size)]:
        check(v >= 1, origin, key, "an integer >= 1", v)
    for key, v in [("sgo.temperature", sg.temperature), ("seqkd.temperature", sq.temperature)]:
        check(v > 0, origin, key, "a number > 0", v)
    for key, v in [("sgo.top_p", sg.top_p), ("seqkd.top_p", sq.top_p)]:
        check(0.0 < v <= 1.0, origin, key, "in (0, 1]", v)
    check(sq.generate_with in ("auto", "copy", "engine"), origin, "seqkd.generate_with", "auto, copy or engine",
           sq.generate_with)
    ta = cfg.taid
    check(0.0 <= ta.t_start <= 1.0, origin, "taid.t_start", "in [0, 1]", ta.t_start)
    check(ta.t_start <= ta.t_end <= 1.0, origin, "taid.t_end", f"in [taid.t_start, 1] = [{ta.t_start}, 1]", ta.t_end)
    check(0.0 <= ta.alpha <= 1.0, origin, "taid.alpha", "in [0, 1]", ta.alpha)
    check(0.0 <= ta.beta < 1.0, origin, "taid.beta", "in [0, 1)", ta.beta)


def _check_choices(cfg: RunConfig, origin: str) -> None:
    """The loss and online sections' parameters, and the names that must be in a list of choices."""
    t, lo, on = cfg.train, cfg.loss, cfg.online
    check(0.0 < lo.js_beta < 1.0, origin, "loss.js_beta", "in (0, 1)", lo.js_beta)
    check(0.0 <= lo.skew_alpha < 1.0, origin, "loss.skew_alpha", "in [0, 1)", lo.skew_alpha)
    check(0.0 < lo.akl_mu <= 1.0, origin, "loss.akl_mu", "in (0, 1]", lo.akl_mu)
    check(0.0 <= on.lora_dropout < 1.0, origin, "online.lora_dropout", "in [0, 1)", on.lora_dropout)
    check(on.num_blocks is None or on.num_blocks >= 1, origin, "online.num_blocks", "null or an integer >= 1",
          on.num_blocks)
    check(len(on.target_modules) > 0, origin, "online.target_modules", "a non-empty list of module names",
          on.target_modules)
    check(lo.vocab_shards == 1 or lo.from_hidden, origin, "loss.vocab_shards",
          "1 when loss.from_hidden is false (sharding splits the lm_head)", lo.vocab_shards)
    check("lm_head" not in on.target_modules, origin, "online.target_modules",
          "modules of the teacher's blocks (for a module on the lm_head use online.placement=head)",
          on.target_modules)
    check(on.drift_every >= 0, origin, "online.drift_every", "an integer >= 0", on.drift_every)
    check(t.lr_scheduler_type in SCHEDULERS, origin, "train.lr_scheduler_type", f"one of {', '.join(SCHEDULERS)}",
          t.lr_scheduler_type)
    check(cfg.data.on_error in ("raise", "skip"), origin, "data.on_error", "raise or skip", cfg.data.on_error)
    check(bool(cfg.output_dir), origin, "output_dir", "a directory path", cfg.output_dir)


def _check_paths(cfg: RunConfig, origin: str, needs_teacher: bool) -> None:
    """The models, data files and DeepSpeed configs exist."""
    _model_dir(cfg.model.student, "model.student", cfg.model.allow_hub, origin)
    if needs_teacher:
        _model_dir(cfg.model.teacher, "model.teacher", cfg.model.allow_hub, origin)
    for key in ("train_file", "eval_file"):
        value = getattr(cfg.data, key)
        if key == "train_file" and not value:
            raise ConfigError(f'{origin}: "data.train_file" is required')
        if value and not Path(value).expanduser().exists():
            raise ConfigError(f'{origin}: "data.{key}": file not found: {value}')
    for key in ("teacher_config", "student_config"):
        value = getattr(cfg.deepspeed, key)
        if key == "teacher_config" and value == "auto":
            continue
        if not resolve_path(value).is_file():
            raise ConfigError(f'{origin}: "deepspeed.{key}": DeepSpeed config not found: {value}')
