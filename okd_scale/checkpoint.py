"""What a run writes and reads back: resumable checkpoints of both engines, the student as a Hugging Face
directory, the online module as its declaration (models.online_module) says: a PEFT adapter, or
models.ONLINE_CONFIG + models.TEMPERATURE_FILE.

Checkpoint layout (DeepSpeed's: one directory of tags and a `latest` file naming the newest):

    output_dir/checkpoints/latest                      the newest complete tag, switched atomically
    output_dir/checkpoints/global_step{N}/student/     student.save_checkpoint: weights, optimizer, scheduler
    output_dir/checkpoints/global_step{N}/teacher/     okd: the online module and its optimizer (frozen base left out)
    output_dir/checkpoints/global_step{N}/hf_student/  the student's config, generation config and tokenizer
    output_dir/checkpoints/global_step{N}/hf_teacher/  okd: what the online module is: its adapter_config.json, or
                                                       else online_config.json ({"placement": ...})
    output_dir/checkpoints/global_step{N}/trainer_state.json   step, data position, world size, method
    output_dir/checkpoints/global_step{N}/rng_state_{rank}.pth python, numpy, torch and accelerator RNG states

A tag is written under a temporary name and renamed into place only when every rank has finished it;
`latest` is replaced by a rename after that. A crash in between leaves the previous tag and `latest`.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import deepspeed
import torch
from safetensors.torch import save_file

from . import faults
from .config import ConfigError, OnlineArgs, RunConfig, set_override, zero_stage
from .models import ONLINE_CONFIG, ONLINE_MODULES, TEMPERATURE_FILE, online_module


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def full_state_dict(engine) -> dict | None:
    """The whole module's weights on rank 0 (None elsewhere); gathers ZeRO-3 partitions. Call on every rank."""
    if zero_stage(engine.config) == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()} if _is_rank0() else None


class OutputDirError(ValueError):
    """An output directory cannot be written as asked."""


def check_output_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse a non-empty `out_dir` (or a file in its place) unless `overwrite`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"output path {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputDirError(f"output directory {out_dir} is not empty; pass --overwrite to replace it")


@contextlib.contextmanager
def staged_dir(out_dir: str | Path) -> Iterator[Path]:
    """An empty sibling directory to write into. When the block succeeds it replaces `out_dir` by renames,
    so `out_dir` is never half written; when it fails it is removed and `out_dir` is left as it was."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def write_hf(model, tokenizer, out_dir: str | Path, *, state_dict: Optional[dict] = None,
             max_shard_size: str | int = "5GB") -> Path:
    """A Hugging Face model directory: config.json, generation_config.json, the tokenizer (with its chat
    template) and safetensors weights, sharded with an index above ``max_shard_size``; tied embeddings
    stay tied. Written staged, so ``out_dir`` is never half written. One process calls this."""
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir


def export_hf(engine, tokenizer, out_dir: str | Path) -> Path | None:
    """Write the engine's model as a Hugging Face directory (``write_hf``). Every rank calls this."""
    out_dir = Path(out_dir)
    state = full_state_dict(engine)
    if _is_rank0():
        write_hf(engine.module, tokenizer, out_dir, state_dict=state)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out_dir


def online_state_dict(engine) -> dict | None:
    """The online module's (trainable) weights on rank 0, gathered under ZeRO-3. Call on every rank."""
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in named], enabled=zero_stage(engine.config) == 3):
        return {n: p.detach().cpu().clone() for n, p in named} if _is_rank0() else None


def _online_values(args: OnlineArgs, state: dict) -> dict:
    """What ONLINE_CONFIG says of a module that is not a PEFT adapter: its placement (and a learned temperature's
    value, T = exp(s))."""
    values = {"placement": args.placement}
    if args.placement == "temperature":
        (log_t,) = state.values()
        values["temperature"] = float(log_t.float().exp())
    return values


def save_online_config(model, args: OnlineArgs, out_dir: Path) -> None:
    """What the online module of ``model`` (the run's ``args``) is: PEFT's adapter_config.json for an adapter, else
    ONLINE_CONFIG naming its placement."""
    if online_module(args).adapter:
        model.peft_config["default"].save_pretrained(str(out_dir))
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / ONLINE_CONFIG, json.dumps({"placement": args.placement}))


def write_online_module(model, args: OnlineArgs, out_dir: str | Path, *, state: Optional[dict] = None) -> Path:
    """The online module of ``model`` (the teacher with it, as online_module(args).add gives it) in the form
    online_module(args).load reads: a PEFT adapter directory (adapter_config.json + adapter_model.safetensors),
    else ONLINE_CONFIG ({"placement": ..., its values}) and TEMPERATURE_FILE. ``state``: the module's weights
    (default: the model's trainable parameters). Written staged, so ``out_dir`` is never half written. One process
    calls this."""
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as tmp:
        if online_module(args).adapter:
            model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True, save_embedding_layers=False)
        else:
            if state is None:
                state = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / TEMPERATURE_FILE))
            (tmp / ONLINE_CONFIG).write_text(json.dumps(_online_values(args, state)))
    return out_dir


def export_online_module(engine, args: OnlineArgs, out_dir: str | Path) -> Path:
    """Write the teacher engine's online module (the run's ``args``) as ``write_online_module`` does, gathered under
    ZeRO-3. Every rank calls this."""
    out_dir = Path(out_dir)
    state = online_state_dict(engine)
    if _is_rank0():
        write_online_module(engine.module, args, out_dir, state=state)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out_dir


# ----------------------------------------------------------------------------------------- checkpoints

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TAG_PREFIX = "global_step"  # a tag is global_step<N>


def _step(tag: Path) -> int:
    return int(tag.name[len(TAG_PREFIX):])


def _tag_dirs(root: Path) -> list[Path]:
    """The tag directories under `root` (global_step<N>), in step order."""
    return sorted((p for p in root.glob(TAG_PREFIX + "*") if p.is_dir() and p.name[len(TAG_PREFIX):].isdigit()),
                  key=_step)
STOPPED = "stopped.json"  # output_dir/stopped.json: the run stopped on a signal (and where), until it runs again


def record_stop(out_dir: str | Path, step: int, signal: str, checkpoint: Optional[Path]) -> None:
    """Rank 0 notes a stop by signal in output_dir/STOPPED, for a job script whose launcher hides the trainer's
    exit status 75 (torchrun and deepspeed exit 1); ``clear_stop`` removes it when the run starts again."""
    if _rank() == 0:
        write_atomic(Path(out_dir) / STOPPED, json.dumps({"signal": signal, "step": step, "exit_status": 75,
                                                          "checkpoint": str(checkpoint) if checkpoint else None}))


def clear_stop(out_dir: str | Path) -> None:
    if _rank() == 0:
        (Path(out_dir) / STOPPED).unlink(missing_ok=True)


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit this run."""


class SaveError(RuntimeError):
    """A checkpoint could not be written (read-only or full disk, ...); the previous one is kept."""


def _gathered(error: Optional[str]) -> list:
    """Every rank's ``error`` (None where it has none), on every rank."""
    errors = [error]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        errors = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(errors, error)
    return errors


def _agree(error: Optional[str], what: str, partial: Optional[Path] = None) -> None:
    """Raise SaveError on every rank when any rank has an error; the message names the ranks and reasons. Rank 0
    removes ``partial`` (the unfinished tag) first, so a full disk gets its space back."""
    bad = [f"rank {r}: {e}" for r, e in enumerate(_gathered(error)) if e]
    if bad:
        if partial is not None and _rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise SaveError(f"cannot write {what}: {'; '.join(bad)}")


def _latest(root: Path) -> Optional[Path]:
    """The tag directory `root/latest` names, or None; CheckpointError when it names anything but a tag of `root`
    (global_step<N>: no path, so never another run's checkpoint)."""
    if not (root / LATEST).is_file():
        return None
    name = (root / LATEST).read_text(errors="replace").strip()
    if not re.fullmatch(rf"{TAG_PREFIX}[0-9]+", name):
        raise CheckpointError(f"{root / LATEST} names {name[:200]!r}, not a tag of this checkpoint directory (expected "
                              f"{TAG_PREFIX}<N>, a directory beside it); write the tag to resume from there, or pass "
                              "resume: PATH to a tag directory")
    return root / name


def _tag_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


@dataclass
class TrainerState:
    """Where training stands after `step` optimizer steps."""

    step: int
    epoch: int  # the data epoch the next batch comes from
    batches_in_epoch: int  # batches each rank has taken from that epoch
    world_size: int
    method: str
    method_state: dict = field(default_factory=dict)  # the method's own state across steps (e.g. TAID's t)
    best: dict = field(default_factory=dict)  # train.keep_best: {"step", "eval/student_ce"} of the best tag so far
    written: int = 0  # the tag's place in the write order of its checkpoints directory (pruning keeps the newest)


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a synced temporary file and a rename: the old content or the new, never a
    part."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch, accelerator) as tensors and plain values, so
    that torch.load(weights_only=True) reads them back."""
    import numpy as np
    from deepspeed.accelerator import get_accelerator

    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "cached": cached},
             "torch": torch.get_rng_state()}
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        state["accelerator"] = accel.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    from deepspeed.accelerator import get_accelerator

    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


def save_checkpoint(out_dir: str | Path, state: TrainerState, student, teacher=None, *, tokenizer=None,
                    run_config: str = "", keep_last: int = 0, online: Optional[OnlineArgs] = None) -> Path:
    """Write tag global_step{state.step} of both engines (the teacher's trainable part only; None: no
    teacher state), then point `latest` at it and prune to the newest `keep_last` tags (0: keep all), never
    the best one of `state.best`. ``online``: the run's online section, what the teacher's module is (the
    default's with none given). Every rank calls this."""
    root = Path(out_dir) / CHECKPOINTS
    online = online or OnlineArgs()
    tag = f"{TAG_PREFIX}{state.step}"
    final, tmp = root / tag, root / f".{tag}.tmp"
    previous = _latest(root)
    kept = f"the previous checkpoint ({previous}) is kept as latest" if previous else "no earlier checkpoint exists"
    error = None
    if _rank() == 0:  # before any engine writes: a directory we can write, and room for one more tag
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            free = shutil.disk_usage(root).free
            need = _tag_bytes(previous) if previous else estimated_bytes(student, teacher)
            if need > free:
                took = "the last checkpoint took" if previous else "a checkpoint of this run takes about"
                error = f"{root}: {free} bytes free, {took} {need}"
        except OSError as e:
            error = f"{e.strerror or e}: {e.filename or root}"
    _agree(error, f"checkpoint {final} ({kept})", tmp)
    error = None
    failed = _guarded_save(student, str(tmp), tag="student", save_latest=False)
    if teacher is not None and failed is None:
        failed = _guarded_save(teacher, str(tmp), tag="teacher", save_latest=False, exclude_frozen_parameters=True)
    if failed is None:
        try:
            torch.save(rng_state(), tmp / f"rng_state_{_rank()}.pth")
        except (OSError, RuntimeError) as e:
            failed = (e, tmp / f"rng_state_{_rank()}.pth")
    if failed is not None:
        error = _write_error(*failed, root)
    faults.crash_point("crash_in_save", state.step, _rank())
    _agree(error, f"checkpoint {final} ({kept})", tmp)
    if _rank() == 0:
        try:
            _finish_tag(tmp, final, root, tag, state, student, teacher, online, tokenizer, run_config,
                        keep_last)
        except OSError as e:
            error = f"{e.strerror or e}: {e.filename or tmp}"
            shutil.rmtree(tmp, ignore_errors=True)
    _agree(error, f"checkpoint {final} ({kept})")
    return final


FULL_DISK_BYTES = 1 << 20  # a failed write with less than this free on the checkpoint disk: the disk is full


class _GuardedWrites:
    """An engine's checkpoint engine whose failed writes are recorded (``failed``: (error, path)) instead of raised,
    later ones skipped: the rank goes on through DeepSpeed's collectives like the others, and the save reports the
    failure once every rank is through."""

    def __init__(self, inner):
        self.inner, self.failed = inner, None

    def _guard(self, write, path, *args, **kwargs):
        if self.failed is None:
            try:
                return write(*args, **kwargs)
            except (OSError, RuntimeError) as e:  # torch reports a write cut short (a full disk) as RuntimeError
                self.failed = (e, path)

    def save(self, state_dict, path):
        return self._guard(self.inner.save, path, state_dict, path)

    def makedirs(self, path, exist_ok=False):
        return self._guard(self.inner.makedirs, path, path, exist_ok=exist_ok)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _guarded_save(engine, save_dir: str, **kwargs) -> Optional[tuple]:
    """engine.save_checkpoint with its writes guarded (_GuardedWrites; DeepSpeed's copy of its recovery scripts
    too); the first failed write as (error, path), or None."""
    guard, copy = _GuardedWrites(engine.checkpoint_engine), engine._copy_recovery_script
    engine.checkpoint_engine = guard
    engine._copy_recovery_script = lambda path: guard._guard(copy, path, path)
    try:
        engine.save_checkpoint(save_dir, **kwargs)
    finally:
        engine.checkpoint_engine = guard.inner
        del engine._copy_recovery_script
    return guard.failed


def _write_error(e: Exception, path, root: Path) -> str:
    """The reason a checkpoint write failed, in words: the OS error, or a full disk behind torch's RuntimeError."""
    if isinstance(e, OSError):
        return f"{e.strerror or e}: {path}"
    free = shutil.disk_usage(root).free
    if free > FULL_DISK_BYTES:
        return f"{str(e).splitlines()[0][:200]}: {path}"
    return f"No space left on device ({free} bytes free): {path}"


def estimated_bytes(student, teacher=None) -> int:
    """About what one tag takes: 16 bytes per trainable parameter (the weights, and Adam's fp32 master copy and
    two moments), for the student and the teacher's online module."""
    count = sum(getattr(p, "ds_numel", p.numel()) for engine in (student, teacher) if engine is not None
                for p in engine.module.parameters() if p.requires_grad)
    return 16 * count


def _finish_tag(tmp: Path, final: Path, root: Path, tag: str, state: TrainerState, student, teacher,
                online: Optional[OnlineArgs], tokenizer, run_config: str, keep_last: int) -> None:
    """Rank 0, once every rank wrote its part: the small files, the rename, `latest`, pruning."""
    (tmp / "run_config.yaml").write_text(run_config)
    student.module.config.save_pretrained(str(tmp / "hf_student"))  # what okd_scale.convert rebuilds it from
    if getattr(student.module, "generation_config", None) is not None:
        student.module.generation_config.save_pretrained(str(tmp / "hf_student"))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp / "hf_student"))
    if teacher is not None:
        save_online_config(teacher.module, online, tmp / "hf_teacher")
    tags = {p: _written(p) for p in _tag_dirs(root)}
    state.written = max(tags.values(), default=0) + 1
    write_atomic(tmp / "trainer_state.json", json.dumps(asdict(state), indent=1))
    write_manifest(tmp)
    replaced = None
    if final.exists():  # the same step saved again (a resumed run that stopped at once): the old tag goes last
        replaced = root / f".{tag}.replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(tmp, final)
    write_atomic(root / LATEST, tag)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    if keep_last:  # by write order (a rerun in an old directory may write lower steps), never latest or the best
        best = f"{TAG_PREFIX}{state.best['step']}" if state.best else None
        older = sorted((p for p in tags if p.name != tag), key=lambda p: (tags[p], _step(p)))
        for old in older[:max(0, len(older) - (keep_last - 1))]:
            if old.name != best:
                shutil.rmtree(old, ignore_errors=True)


def _written(tag_dir: Path) -> int:
    """A tag's place in the write order (tags from before the order was recorded: 0, by step among themselves)."""
    try:
        return int(json.loads((tag_dir / "trainer_state.json").read_text()).get("written", 0))
    except (OSError, ValueError, AttributeError):
        return 0


# run-config keys that an exact resume needs unchanged ("online." covers every online.* key); a run lists the ones
# it changes on purpose in resume_ignore
RESUME_KEYS = ("seed", "model.teacher", "model.student", "data.train_file", "data.max_length",
               "train.per_device_train_batch_size", "train.gradient_accumulation_steps", "online.")
_PATH_KEYS = ("model.teacher", "model.student", "data.train_file")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k not in ("teacher_overrides", "student_overrides"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def online_args(run_config: dict, origin: str) -> OnlineArgs:
    """The online section of a run config (``run_config``: run_config.yaml's mapping) over OnlineArgs' defaults."""
    cfg = RunConfig()
    section = run_config.get("online") or {}
    if not isinstance(section, dict):
        raise CheckpointError(f'{origin}: "online" must be a mapping of online.* keys, got {section!r}')
    try:
        for key, value in section.items():
            set_override(cfg, f"online.{key}={json.dumps(value)}")
    except ConfigError as e:
        raise CheckpointError(f"{origin}: {e}") from None
    if cfg.online.placement not in ONLINE_MODULES:
        raise CheckpointError(f'{origin}: "online.placement" must be one of {" | ".join(ONLINE_MODULES)}, got '
                              f"{cfg.online.placement!r}")
    return cfg.online


def check_resume_config(path: Path, run_config: dict, ignore: list) -> None:
    """Refuse to resume from tag ``path`` when this run's config (``run_config``, nested) differs from the saved one
    in a key of RESUME_KEYS that ``ignore`` does not list; keys either config lacks (an older version's) pass."""
    import yaml

    saved_file = path / "run_config.yaml"
    try:
        saved = _flat(yaml.safe_load(saved_file.read_text()) or {})
    except FileNotFoundError:
        return
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{saved_file}: unreadable ({e})") from None
    now = _flat(run_config)

    def norm(key, value):
        return str(Path(value).expanduser().resolve()) if key in _PATH_KEYS and value else value

    changed = [k for k in sorted(saved.keys() & now.keys())
               if k.startswith(RESUME_KEYS) and k not in ignore and norm(k, saved[k]) != norm(k, now[k])]
    if changed:
        diff = "; ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise CheckpointError(f"{path} was saved with another {', '.join(changed)} ({diff}); an exact resume needs "
                              f"them unchanged. Use a new output_dir (or resume=none) to start afresh, or list the "
                              f"keys in resume_ignore to resume anyway")


def find_checkpoint(out_dir: str | Path, resume: str) -> Optional[Path]:
    """The tag directory to resume from: resume "auto" = `latest` in out_dir/checkpoints if there is one,
    "none" = start afresh, else a path to a tag directory or to a checkpoints directory with `latest`."""
    if resume == "none":
        return None
    if resume == "auto":
        return _latest(Path(out_dir) / CHECKPOINTS)
    path = Path(resume).expanduser()
    path = _latest(path) or path
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(f'"resume": {resume} is not a checkpoint tag directory (no trainer_state.json) nor a '
                              f"checkpoints directory with a `{LATEST}` file")
    return path


def tag_dir(checkpoint_dir: Path, tag: Optional[str]) -> Path:
    """The tag directory `tag` (global_step<N>), or the one `latest` names, under a run's output_dir or its
    checkpoints/; CheckpointError naming the tags there otherwise."""
    root = checkpoint_dir / CHECKPOINTS if (checkpoint_dir / CHECKPOINTS).is_dir() else checkpoint_dir
    if not root.is_dir():
        raise CheckpointError(f"{checkpoint_dir}: no such checkpoint directory")
    tags = [p.name for p in _tag_dirs(root)]
    if tag is None:
        latest = _latest(root)
        if latest is None:
            raise CheckpointError(f"{root}: no `{LATEST}` file; pass --tag (tags here: {', '.join(tags) or 'none'})")
        tag = latest.name
    if tag not in tags:
        raise CheckpointError(f"--tag {tag}: no such tag in {root} (tags here: {', '.join(tags) or 'none'})")
    return root / tag


def check_shards(path: Path, part: str) -> None:
    """Every rank's ZeRO shard of `part` (student, teacher) is in the tag directory `path` (the world size comes
    from trainer_state.json); CheckpointError naming what is missing otherwise."""
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no trainer_state.json)")
    world = json.loads(state_file.read_text())["world_size"]
    if not (path / part).is_dir():
        raise CheckpointError(f"{path / part}: missing; this checkpoint has no {part} "
                              f"({'only okd runs save the online module' if part == 'teacher' else 'incomplete'})")
    found = {int(m.group(1)) for p in (path / part).iterdir()
             if (m := re.fullmatch(r".*zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt", p.name))}
    missing = sorted(set(range(world)) - found)
    if missing:
        raise CheckpointError(f"{path / part}: incomplete checkpoint: saved by {world} ranks, but the optimizer-state "
                              f"shard of rank(s) {', '.join(map(str, missing))} is missing "
                              f"(*zero_pp_rank_<r>_mp_rank_00_optim_states.pt)")


def _deepspeed_globals() -> list:
    """The classes besides tensors and containers that DeepSpeed's checkpoint files hold (ZeRO 0-3, fp32, bf16,
    fp16): all a checkpoint may unpickle."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def safe_loads(what: str | Path) -> Iterator[None]:
    """Within, every torch.load (DeepSpeed's too, which ask for weights_only=False) loads weights only, with
    _deepspeed_globals allowed: a file that would unpickle anything else (code) is refused, naming ``what``,
    with CheckpointError, and nothing of it runs."""
    import pickle

    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            yield
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), str(e).splitlines()[0])
        raise CheckpointError(f"{what}: refused to load: a file holds objects that are not tensors or DeepSpeed's "
                              f"checkpoint state ({reason}); a checkpoint from elsewhere may run code when "
                              f"unpickled, so it is never loaded that way") from None
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


MANIFEST = "manifest.json"  # {relative path: {"bytes", "sha256"}} of every file of a tag, written last


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(tag_dir: Path) -> None:
    files = sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {str(p.relative_to(tag_dir)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    write_atomic(tag_dir / MANIFEST, json.dumps(manifest, indent=1))


def verify_manifest(tag_dir: Path, rank: int = 0, world: int = 1) -> None:
    """Every file the tag's manifest lists (with ``world`` > 1: this rank's share of them, every world-th) is there
    with its size and sha256 (a tag without a manifest, from an older version, passes); CheckpointError names the
    first file that is missing, truncated or altered."""
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{tag_dir / MANIFEST}: unreadable ({e})") from None
    for name, want in sorted(manifest.items())[rank::world]:
        path = tag_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the checkpoint's manifest lists it)")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {want['bytes']} (truncated or replaced)")
        if _sha256(path) != want["sha256"]:
            raise CheckpointError(f"{path}: its sha256 differs from the manifest's (the file was altered)")


def _check_module_names(part: Path, engine) -> None:
    """The trainable parameters saved in ``part`` (DeepSpeed's model states: ZeRO's param_shapes, else the module's
    keys) are exactly the engine's: the teacher's state is saved without its frozen base, so DeepSpeed loads it
    non-strictly, and this is the strict check."""
    files = sorted(part.glob("*model_states.pt"))
    if not files:
        raise CheckpointError(f"{part}: no model states file (an incomplete checkpoint)")
    saved = torch.load(files[0], map_location="cpu", weights_only=True)
    names = set().union(*saved["param_shapes"]) if saved.get("param_shapes") else set(saved.get("module") or {})
    want = {n for n, p in engine.module.named_parameters() if p.requires_grad}
    if names != want:
        missing, unexpected = sorted(want - names), sorted(names - want)
        raise CheckpointError(f"{part}: the saved online module does not match this run's: missing {missing[:3]}"
                              f"{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                              f"{' ...' if len(unexpected) > 3 else ''} (another online.placement, num_blocks, "
                              f"target_modules or r)")


def load_checkpoint(path: str | Path, student, teacher=None, *, world_size: int, method: str) -> TrainerState:
    """Restore both engines, this rank's RNG states, and return where training stands."""
    path = Path(path)
    try:
        state = TrainerState(**json.loads((path / "trainer_state.json").read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path / 'trainer_state.json'}: unreadable ({e})") from None
    if state.world_size != world_size:
        raise CheckpointError(f"{path} was saved by {state.world_size} processes and this run has {world_size}; "
                              f"ZeRO partitions, data order and RNG states are per rank. Resume with "
                              f"{state.world_size} processes, or start a new run from its weights "
                              f"(python -m okd_scale.convert {path.parent} OUT --tag {path.name}, then "
                              f"model.student=OUT)")
    if state.method != method:
        raise CheckpointError(f"{path} is a {state.method} checkpoint; this run's method is {method}")
    rng_file = path / f"rng_state_{_rank()}.pth"
    for part in ["student"] + (["teacher"] if teacher is not None else []):
        if not (path / part).is_dir():
            raise CheckpointError(f"{path / part}: missing (an incomplete checkpoint)")
    if not rng_file.is_file():
        raise CheckpointError(f"{rng_file}: missing (an incomplete checkpoint)")
    try:  # each rank hashes a share of the files, so the tag is read once, not once per rank
        verify_manifest(path, _rank(), world_size)
        error = None
    except CheckpointError as e:
        error = str(e)
    bad = [e for e in _gathered(error) if e]
    if bad:
        raise CheckpointError(bad[0])
    with safe_loads(path):
        if teacher is not None:
            _check_module_names(path / "teacher", teacher)
        student.load_checkpoint(str(path), tag="student", load_optimizer_states=True, load_lr_scheduler_states=True)
        if teacher is not None:
            teacher.load_checkpoint(str(path), tag="teacher", load_module_strict=False, load_optimizer_states=True,
                                    load_lr_scheduler_states=True)
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state
