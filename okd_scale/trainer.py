"""The training loop: data, engines, gradient accumulation over the global batch, logging, final save.

The loop knows nothing of any method's math: it hands each micro-batch to `methods.METHODS[cfg.method]`.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
import yaml

from . import checkpoint, data, engines, faults, generation, models, perf, seqkd
from .config import TEACHER_METHODS, RunConfig
from .divergences import ce_sum
from .methods import METHOD_STATE, METHODS, StepContext, forward_counted, loss_normaliser, with_counted
from .scorers import make_scorer
from .stop import REQUEST, StopRequest
from .watchdog import RESUME_HINT, RankFailure, Watchdog, collective_timeout

log = logging.getLogger("okd_scale")
TRAINING_TEACHER = ("okd", "kd", "sgo", "taid")  # methods with a teacher engine during training


@dataclass
class TrainResult:
    student: object  # DeepSpeed engine
    teacher: Optional[object]
    tokenizer: object
    output_dir: Path
    history: list = field(default_factory=list)  # one dict of scalars per optimizer step
    metrics: dict = field(default_factory=dict)
    stopped_by: Optional[str] = None  # the signal that stopped the run early (after a checkpoint), if any


class TrainingError(RuntimeError):
    """Training cannot go on (diverged); the last good checkpoint is intact."""


@dataclass
class DataPosition:
    epoch: int = 0  # the epoch the next batch comes from
    batches: int = 0  # batches already taken from it (by this rank)


def _batches(loader, pos: DataPosition) -> Iterator[dict]:
    """The loader's batches epoch after epoch from `pos` (skipping the batches a resumed run already used),
    keeping `pos` up to date."""
    while True:
        loader.sampler.set_epoch(pos.epoch)
        for i, batch in enumerate(loader):
            if i >= pos.batches:
                pos.batches = i + 1
                yield batch
        pos.epoch, pos.batches = pos.epoch + 1, 0


def _all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _load_teacher(cfg: RunConfig, ds_teacher: dict, tokenizer, *, online: bool):
    """The teacher's DeepSpeed engine: frozen, with the online module (its only trainable part) for okd."""
    m, t = cfg.model, cfg.train
    tmodel = models.load_causal_lm(m.teacher, ds_config=ds_teacher, bf16=t.bf16,
                                   trust_remote_code=m.trust_remote_code, allow_hub=m.allow_hub)
    models.check_vocab(tmodel, tokenizer, m.teacher, "teacher")
    if online:
        tmodel = models.add_online_module(tmodel, cfg.online)
        every = cfg.online.update_every
        warmup = t.warmup_steps if cfg.online.warmup_steps is None else cfg.online.warmup_steps
        sched = engines.make_scheduler(t.lr_scheduler_type, warmup // every,
                                       max(1, math.ceil(t.max_steps / every)))
        teacher = engines.init_engine(tmodel, ds_teacher, models.trainable_parameters(tmodel), sched)
    else:
        models.freeze(tmodel)
        teacher = engines.init_engine(tmodel, ds_teacher)
    teacher.train(online)
    return teacher


def _generation_teacher(cfg: RunConfig, ds_teacher: dict, tokenizer):
    """The frozen teacher SeqKD generates with, as (module, device): a whole copy on this rank's device
    (``seqkd.generate_with: copy``, or ``auto`` when its weights fit in half the free device memory),
    else the ZeRO-3 engine, whose every generated token all-gathers every layer."""
    from deepspeed.accelerator import get_accelerator

    m, sq = cfg.model, cfg.seqkd
    accel = get_accelerator()
    need = models.weight_bytes(m.teacher, cfg.train.bf16)
    free = accel.available_memory()
    copy = sq.generate_with == "copy" or (sq.generate_with == "auto" and need is not None and need <= free / 2)
    log.info("seqkd: generating with %s (teacher weights %s, free device memory %.1f GiB)",
             "a whole copy of the teacher per rank" if copy else "the ZeRO-3 teacher engine",
             "unknown" if need is None else f"{need / 2**30:.2f} GiB", free / 2**30)
    if not copy:
        engine = _load_teacher(cfg, ds_teacher, tokenizer, online=False)
        return engine.module, engine.device
    model = models.load_causal_lm(m.teacher, bf16=cfg.train.bf16, trust_remote_code=m.trust_remote_code,
                                  allow_hub=m.allow_hub)
    models.check_vocab(model, tokenizer, m.teacher, "teacher")
    models.freeze(model)
    device = torch.device(accel.current_device_name())
    return model.to(device), device


def build(cfg: RunConfig, rank: int, world: int):
    """Tokenizer, data loader and the engines for `cfg`: (tokenizer, loader, stats, teacher, student).
    For seqkd the training examples are the teacher's cached responses (made first when missing)."""
    m = cfg.model
    clock = time.perf_counter()

    def done(what: str) -> None:
        nonlocal clock
        log.info("%s (%.1f s)", what, time.perf_counter() - clock)
        clock = time.perf_counter()

    tokenizer = models.load_tokenizer(m.student, trust_remote_code=m.trust_remote_code, allow_hub=m.allow_hub)
    if cfg.method in TEACHER_METHODS:
        t_tok = models.load_tokenizer(m.teacher, trust_remote_code=m.trust_remote_code, allow_hub=m.allow_hub)
        models.check_same_tokenizer(t_tok, tokenizer, m.teacher, m.student)
    examples, stats = data.load_dataset(cfg.data.train_file, tokenizer, cfg.data.max_length,
                                        on_error=cfg.data.on_error)
    t = cfg.train
    done(f"data: {stats.summary()}")
    data.check_one_batch(len(examples), world, t.per_device_train_batch_size, cfg.data.train_file,
                         "train.per_device_train_batch_size")  # before seqkd generates for them
    ds_teacher, ds_student = engines.ds_configs_for(cfg, world)
    if cfg.method == "seqkd":
        examples, stats.seqkd = seqkd.teacher_examples(
            cfg, examples, tokenizer, rank, world, batch_size=cfg.seqkd.batch_size,
            build_teacher=lambda: _generation_teacher(cfg, ds_teacher, tokenizer))
        done(f"seqkd: {len(examples)} teacher responses ({stats.seqkd['generated']} generated)")
    loader = data.build_dataloader(examples, batch_size=t.per_device_train_batch_size,
                                   pad_token_id=tokenizer.pad_token_id, rank=rank, world_size=world, seed=cfg.seed)
    teacher = None
    if cfg.method in TRAINING_TEACHER:
        teacher = _load_teacher(cfg, ds_teacher, tokenizer, online=cfg.method == "okd")
        done(f"teacher engine ready (ZeRO-{engines.zero_stage(ds_teacher)})")
    smodel = models.load_causal_lm(m.student, ds_config=ds_student, bf16=t.bf16,
                                   trust_remote_code=m.trust_remote_code, allow_hub=m.allow_hub)
    models.check_vocab(smodel, tokenizer, m.student, "student")
    if t.gradient_checkpointing:
        smodel.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student = engines.init_engine(smodel, ds_student, models.trainable_parameters(smodel),
                                  engines.make_scheduler(t.lr_scheduler_type, t.warmup_steps, t.max_steps))
    student.train()
    done(f"student engine ready (ZeRO-{engines.zero_stage(ds_student)})")
    return tokenizer, loader, stats, teacher, student


@torch.no_grad()
def eval_loss(engine, loader, vocab_size: int) -> float:
    """Mean cross-entropy per counted token of `engine`'s model over a loader (all ranks)."""
    was_training = engine.training
    engine.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=engine.device), 0.0
    for batch in loader:
        batch = _to(with_counted(batch), engine.device)
        total += ce_sum(forward_counted(engine, batch, vocab_size, hidden=False), batch["counted_labels"]).double()
        count += batch["counted_labels"].numel()
    engine.train(was_training)
    total, count = _all_reduce_sum([float(total), count], engine.device)
    return total / max(count, 1.0)


def _sgo_sampler(cfg: RunConfig, student, tokenizer, world: int):
    """For sgo: batch -> the batch with responses sampled from the current student, with an
    ``on_policy(step)`` attribute: whether step samples, drawn from (seed, step) alone, so every rank and
    a resumed run draw the same; else None."""
    if cfg.method != "sgo":
        return None
    import random

    eos, pad = generation.eos_and_pad(student.module, tokenizer)
    synced = generation.needs_synced_gpus(student.module, world)
    sg = cfg.sgo

    def sample(batch: dict) -> dict:
        return generation.sample_responses(student, batch, eos=eos, pad_id=pad, max_new_tokens=sg.max_new_tokens,
                                           temperature=sg.temperature, top_p=sg.top_p, synced_gpus=synced)

    sample.on_policy = lambda step: random.Random(cfg.seed * 1_000_003 + step).random() < sg.lmbda
    return sample


def _cost(cfg: RunConfig, history: list, teacher, student, world: int, sampled_tokens: float) -> dict:
    """Median step time, mean time per phase, tokens/s, peak memory per rank, FLOPs and (on a known
    GPU) model FLOPs utilisation; see perf.py for the formula."""
    median = sorted(r["time/step_s"] for r in history)[len(history) // 2]
    phases = {k[5:-2]: sum(r.get(k, 0.0) for r in history) / len(history)
              for k in sorted({k for r in history for k in r}) if k.startswith("time/") and k != "time/step_s"}
    peaks = _all_reduce_sum([perf.peak_memory_bytes() if r == torch.distributed.get_rank() else 0.0
                             for r in range(world)], student.device)
    n_student = perf.num_parameters(student.module)
    n_teacher = perf.num_parameters(teacher.module) if teacher is not None else 0
    n_online = 0
    if cfg.method == "okd" and models.ONLINE_MODULES[cfg.online.placement].head_rows is None:  # a module in the blocks
        blocks = models.online_block_ids(teacher.module.config.num_hidden_layers, cfg.online.num_blocks)
        n_online = models.block_parameter_count(teacher.module, blocks)
    seen = sum(r["tokens/seen"] for r in history)
    flops = perf.step_flops(n_student=n_student, n_teacher=n_teacher, n_online=n_online, tokens=seen / len(history),
                            teacher=teacher is not None, online=cfg.method == "okd",
                            sampled_tokens=sampled_tokens / len(history))
    total_time = sum(r["time/step_s"] for r in history)
    device = perf.device_name()
    peak = perf.peak_flops(device)
    out = {"median_step_s": median, "time_per_phase_s": phases, "tokens_per_s": seen / total_time,
           "peak_memory_gib_per_rank": [p / 2**30 for p in peaks], "params": {"student": n_student,
           "teacher": n_teacher, "online_blocks": n_online}, "flops_per_step": flops, "device": device}
    if peak is not None:
        out["mfu"] = flops * len(history) / (total_time * world * peak)
    return out


def _read_history(path: Path) -> list[dict]:
    """The rows of log_history.jsonl; a line that does not parse (torn by a kill mid-write) is left out."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            log.warning("%s line %d is not a complete JSON row (a write cut short); left out", path, number)
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def train(cfg: RunConfig) -> TrainResult:
    """Run `cfg` to `train.max_steps` optimizer steps, resuming from a checkpoint when `cfg.resume` finds
    one; checkpoint every `train.save_every` steps, at the end, and when a stop signal arrives (then
    return early with `stopped_by` set); at the end evaluate and export the student (and online module)."""
    from transformers import set_seed

    rank, world, _ = engines.init_distributed(timeout_s=collective_timeout(cfg.train.ddp_timeout))
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    resume_from = checkpoint.find_checkpoint(out, cfg.resume)
    if resume_from is not None:
        checkpoint.check_resume_config(resume_from, cfg.to_dict(), cfg.resume_ignore)
    run_config = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.yaml").write_text(run_config)
    checkpoint.clear_stop(out)
    stop = REQUEST.install()  # train.py installs it at start already; an earlier signal is kept
    try:
        tokenizer, loader, stats, teacher, student = build(cfg, rank, world)
    except seqkd.GenerationStopped as e:  # before any step: nothing to checkpoint, the responses so far are kept
        log.warning("stopped by %s; resume with the same command", e)
        checkpoint.record_stop(out, 0, e.signal, None)
        stop.uninstall()
        stop.signal = None
        return TrainResult(student=None, teacher=None, tokenizer=None, output_dir=out, stopped_by=e.signal)
    online = teacher if cfg.method == "okd" else None  # the teacher's state that changes, hence is saved
    pos, first_step, method_state, best = DataPosition(), 1, {}, {}
    history = out / "log_history.jsonl"  # one JSON row per optimizer step, appended as steps end
    past: list[dict] = []
    if resume_from is not None:
        clock = time.perf_counter()
        state = checkpoint.load_checkpoint(resume_from, student, online, world_size=world, method=cfg.method)
        pos, first_step = DataPosition(state.epoch, state.batches_in_epoch), state.step + 1
        method_state, best = state.method_state, state.best
        if history.is_file():
            past = [r for r in _read_history(history) if r["step"] <= state.step]
        log.info("resumed from %s at step %d (%.1f s)", resume_from, state.step, time.perf_counter() - clock)
    if rank == 0:
        history.write_text("".join(json.dumps(r) + "\n" for r in past))
    scorer = make_scorer(cfg, teacher, student, len(tokenizer), rank, world)
    t = cfg.train
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=first_step)
    from tqdm.auto import tqdm
    bar = tqdm(total=t.max_steps, initial=first_step - 1, desc=cfg.method, disable=rank != 0, dynamic_ncols=True)

    result = TrainResult(student=student, teacher=teacher, tokenizer=tokenizer, output_dir=out, history=past)
    loop = _Loop(cfg, student, teacher, tokenizer, world, scorer, _batches(loader, pos))
    if loop.state is not None and method_state:
        loop.state.load_state_dict(method_state)
    evaluator = Evaluator(cfg, tokenizer, rank, world) if cfg.data.eval_file else None
    bad_run = 0  # consecutive steps whose update was skipped
    dog = Watchdog(rank, world, t.ddp_timeout)
    dog.arm()
    try:
        for step in range(first_step, t.max_steps + 1):
            dog.progress(step)
            faults.crash_point("kill_rank", step, rank)
            faults.hang_point("hang_rank", step, rank)
            row = loop.step(step, stop)
            if writer is not None and (step % t.logging_steps == 0 or step == t.max_steps):
                for k, v in row.items():
                    if k not in ("step", "stop"):
                        writer.add_scalar(k, v, step)
            if evaluator is not None and t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
                scores = evaluator(student)
                row.update(scores)
                if writer is not None:
                    for k, v in scores.items():
                        writer.add_scalar(k, v, step)
                log.info("step %d eval: %s", step, {k: round(v, 4) for k, v in scores.items()})
                if t.keep_best and (not best or scores["eval/student_ce"] < best["eval/student_ce"]):
                    best = {"step": step, "eval/student_ce": scores["eval/student_ce"]}
            bar.set_postfix({k.split("/")[-1] if k.startswith("student/") else k: f"{v:.4g}"
                             for k, v in row.items() if k in ("student/loss", "teacher/loss")})
            bar.update(1)
            stopping = row.pop("stop") > 0
            bad_run = bad_run + 1 if row["skipped"] else 0
            if row["skipped"]:
                log.warning("step %d: non-finite loss or gradients on some rank; the update was skipped on every "
                            "rank (%d in a row)", step, bad_run)
            if bad_run > t.max_bad_steps:
                raise TrainingError(f"{bad_run} steps in a row had non-finite losses or gradients (train.max_bad_steps "
                                    f"is {t.max_bad_steps}); stopped without saving them. The last good checkpoint "
                                    f"is {out / checkpoint.CHECKPOINTS}/latest; lower the learning rate or check the "
                                    f"data, then resume")
            result.history.append(row)
            if rank == 0:
                with open(history, "a") as f:
                    f.write(json.dumps(row) + "\n")
            scheduled = step == t.max_steps or (t.save_every and step % t.save_every == 0)
            if stopping or (scheduled and not bad_run):  # no scheduled save on a skipped step: keep the last good
                clock = time.perf_counter()
                state = checkpoint.TrainerState(step=step, epoch=pos.epoch, batches_in_epoch=pos.batches,
                                                world_size=world, method=cfg.method,
                                                method_state=loop.state.state_dict() if loop.state else {},
                                                best=best)
                path = checkpoint.save_checkpoint(out, state, student, online, tokenizer=tokenizer,
                                                  run_config=run_config, keep_last=t.keep_last)
                log.info("checkpoint %s (%.1f s)", path, time.perf_counter() - clock)
            if stopping and step < t.max_steps:
                result.stopped_by = stop.signal or "a signal on another rank"
                checkpoint.record_stop(out, step, result.stopped_by, path)
                log.warning("stopped at step %d by %s; resume with the same command", step, result.stopped_by)
                bar.close()
                return result
    except (TrainingError, checkpoint.SaveError):
        raise
    except RuntimeError as e:  # a collective failed: name the rank behind it when one died or hangs
        dog.disarm()
        while dog.exiting:  # the watchdog already reported who failed and is ending this process
            time.sleep(1)
        verdict = dog.diagnose() if dog.store is not None else None
        if verdict is None:
            raise
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RankFailure(f"{verdict}. {RESUME_HINT} (the collective's error: {cause})") from e
    finally:
        dog.close()
        stop.uninstall()
        stop.signal = None  # served (or moot): the run is over
    bar.close()
    _finish(cfg, result, loop, stats, rank, world, writer, evaluator)
    return result


class Evaluator:
    """Evaluation on data.eval_file during and after training: mean cross-entropy per response token, and
    ROUGE-L (F x100) of greedy generations on its first data.eval_rouge_examples rows (rows with a
    `prompt` and `output`; other formats get the loss only). Every rank takes its share of both."""

    def __init__(self, cfg: RunConfig, tokenizer, rank: int, world: int):
        from .evaluate import EvaluateError, read_eval_set

        d = cfg.data
        examples, _ = data.load_dataset(d.eval_file, tokenizer, d.max_length, on_error=d.on_error)
        self.loader = data.build_dataloader(examples, batch_size=cfg.train.per_device_train_batch_size,
                                            pad_token_id=tokenizer.pad_token_id, rank=rank, world_size=world,
                                            seed=cfg.seed, shuffle=False, drop_last=False)
        self.tokenizer, self.rank, self.world, self.max_new_tokens = tokenizer, rank, world, d.eval_max_new_tokens
        self.rows = []
        if d.eval_rouge_examples:
            try:
                self.rows = read_eval_set(d.eval_file, max_examples=d.eval_rouge_examples)
            except EvaluateError as e:
                log.info("eval: no ROUGE-L on %s (%s); the loss only", d.eval_file, e)

    def __call__(self, student, teacher=None) -> dict:
        vocab = len(self.tokenizer)
        scores = {"eval/student_ce": eval_loss(student, self.loader, vocab)}
        if teacher is not None:
            scores["eval/teacher_ce"] = eval_loss(teacher, self.loader, vocab)
        if self.rows:
            scores["eval/student_rougeL"] = self.rouge(student)
        return scores

    def rouge(self, engine) -> float:
        from .evaluate import rouge_l

        tok = self.tokenizer
        mine = self.rows[self.rank::self.world]
        real = len(mine)
        synced = generation.needs_synced_gpus(engine.module, self.world)
        if synced:  # ZeRO-3: every rank runs the same number of collective forwards
            mine += [self.rows[0]] * (-(-len(self.rows) // self.world) - real)
        eos, pad = generation.eos_and_pad(engine.module, tok)
        outs = generation.generate_ids(engine.module, [tok.encode(r["prompt"], add_special_tokens=False) for r in mine],
                                       eos=eos, pad_id=pad, max_new_tokens=self.max_new_tokens, batch_size=8,
                                       device=engine.device, synced_gpus=synced)
        total = sum(rouge_l(tok.decode(o, skip_special_tokens=True).strip(), r["references"])
                    for o, r in zip(outs[:real], mine[:real]))
        total, count = _all_reduce_sum([total, float(real)], engine.device)
        return total / max(count, 1.0)


class _Loop:
    """One optimizer step at a time: batches (sgo: resampled), losses, backward passes, engine steps."""

    def __init__(self, cfg: RunConfig, student, teacher, tokenizer, world: int, scorer, batches):
        self.cfg, self.student, self.teacher, self.world, self.scorer = cfg, student, teacher, world, scorer
        self.batches, self.vocab = batches, len(tokenizer)
        self.rank = torch.distributed.get_rank()
        self.step_fn = METHODS[cfg.method]
        self.state = METHOD_STATE[cfg.method](cfg) if cfg.method in METHOD_STATE else None
        self.timer = perf.PhaseTimer(enabled=cfg.train.profile_phases)
        self.sampler = _sgo_sampler(cfg, student, tokenizer, world)
        self.sampled_tokens = 0.0

    def step(self, step: int, stop: Optional[StopRequest] = None) -> dict:
        """Run optimizer step `step`; its row of scalars, with "stop" > 0 when any rank was asked to stop (``stop``
        read at the step's end, so a signal during the step stops after it)."""
        cfg, student, teacher, timer = self.cfg, self.student, self.teacher, self.timer
        gas, device = cfg.train.gradient_accumulation_steps, student.device
        start = time.perf_counter()
        with timer.phase("data"):  # counted positions and token counts are found on the host, before batches move
            host = [with_counted(next(self.batches)) for _ in range(gas)]
        on_policy = self.sampler is not None and self.sampler.on_policy(step)
        if on_policy:
            with timer.phase("generation"):  # the sampled batches come back to the host
                host = [with_counted(self.sampler(_to(b, device))) for b in host]
        micro = [_to(b, device) for b in host]
        with timer.phase("comm"):
            tokens = torch.tensor([sum(b["counted_labels"].numel() for b in host),
                                   sum(int(b["attention_mask"].sum()) for b in host)], dtype=torch.float64).to(device)
            if self.world > 1:
                torch.distributed.all_reduce(tokens)
        update_online = cfg.method == "okd" and (step - 1) % cfg.online.update_every == 0
        drift = cfg.online.drift_every > 0 and (step - 1) % cfg.online.drift_every == 0
        ctx = StepContext(cfg=cfg, student=student, teacher=teacher,
                          num_tokens=loss_normaliser(tokens[0].float(), self.world, gas), vocab_size=self.vocab,
                          scorer=self.scorer, update_online=update_online, on_policy=on_policy, timer=timer,
                          state=self.state, log_drift=cfg.method == "okd" and drift,
                          inject_nan=faults.armed("nan_batch", step, self.rank))
        sums: dict[str, torch.Tensor] = {}
        nonfinite = torch.zeros((), device=device)
        for b in micro:
            logs = self.step_fn(b, ctx)
            faults.crash_point("kill_after_backward", step, self.rank)
            nonfinite = torch.maximum(nonfinite, logs.pop("nonfinite"))
            for k, v in logs.items():
                sums[k] = sums[k] + v if k in sums else v
            with timer.phase("optimizer"):
                student.step()
                if update_online:
                    teacher.step()
            faults.crash_point("kill_after_optimizer", step, self.rank)
        keys = sorted(sums)
        with timer.phase("comm"):  # the one host sync of the step; the stop flag rides along, so every rank stops
            faults.signal_point("signal_in_step", step, self.rank)
            stop_requested = stop is not None and stop.signal is not None
            flags = torch.stack([nonfinite.double(), torch.tensor(float(stop_requested), dtype=torch.float64,
                                                                  device=device)])
            values = torch.cat([torch.stack([sums[k].double() for k in keys]), flags])
            if self.world > 1:
                torch.distributed.all_reduce(values)
            *reduced, nonfinite, stop = values.tolist()
            counted, seen = tokens.tolist()
        elapsed = time.perf_counter() - start
        row = {"step": step, **{k: v / max(counted, 1.0) for k, v in zip(keys, reduced)},
               "lr/student": student.get_lr()[0], "time/step_s": elapsed,
               **{f"time/{k}_s": v for k, v in timer.pop().items()},
               "tokens_per_s": seen / elapsed, "tokens/counted": counted, "tokens/seen": seen, "stop": stop}
        applied = student.was_step_applied() and (not update_online or teacher.was_step_applied())
        row["skipped"] = float(nonfinite > 0 or not applied)  # DeepSpeed skipped the update: weights unchanged
        if cfg.method == "sgo":
            row["sgo/on_policy"] = float(on_policy)
        if on_policy:
            self.sampled_tokens += seen
        if cfg.method == "okd":
            row["lr/online"] = teacher.get_lr()[0]
        if self.state is not None:
            self.state.after_step(row, step)
        return row


def _finish(cfg: RunConfig, result: TrainResult, loop: _Loop, stats, rank: int, world: int, writer,
            evaluator: Optional["Evaluator"]) -> None:
    """Metrics (costs, evaluation) and the exports at the end of a run."""
    t, out, student, teacher, tokenizer = cfg.train, result.output_dir, result.student, result.teacher, result.tokenizer
    metrics = {"method": cfg.method, "steps": t.max_steps, "world_size": world, "data": vars(stats)}
    if result.history:
        metrics["final"] = {k: v for k, v in result.history[-1].items() if "/" in k and not k.startswith("time")}
        metrics.update(_cost(cfg, result.history, teacher, student, world, loop.sampled_tokens))
        if rank == 0:
            log.info("time per step (mean over %d steps):\n%s", len(result.history),
                     perf.phase_table(result.history))
    if evaluator is not None:
        metrics.update(evaluator(student, teacher))
        if writer is not None:
            for k, v in metrics.items():
                if k.startswith("eval/"):
                    writer.add_scalar(k, v, t.max_steps)
        log.info("eval: %s", {k: round(v, 4) for k, v in metrics.items() if k.startswith("eval/")})

    checkpoint.export_hf(student, tokenizer, out / "student")
    if cfg.method == "okd":
        checkpoint.export_online_module(teacher, out / "online_module")
    result.metrics = metrics
    if rank == 0:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        writer.close()
        log.info("saved the student to %s%s", out / "student",
                 f" and the online module to {out / 'online_module'}" if cfg.method == "okd" else "")
