"""The training loop: data, engines, gradient accumulation over the global batch, logging, checkpoints.

The loop knows nothing of any method's math: each micro-batch goes to the step of the method's registry entry
(`methods.METHODS`), which also says what the run needs (a teacher, the teacher's data, resampling).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import yaml

from . import checkpoint, data, engines, faults, generation, models, perf, process, rundir, seqkd
from .records import RunRecords, read_history
from .config import RunConfig, first_line, zero_stage
from .methods import StepContext, loss_normaliser, method_of, with_counted
from .scorers import make_scorer
from .stop import REQUEST, StartupStop, StopRequest
from .watchdog import RESUME_HINT, RankFailure, Watchdog, collective_timeout

log = logging.getLogger("okd_scale")


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
class StepResult:
    row: dict  # the step's scalars, as logged
    skipped: bool  # the update was not applied (non-finite losses or gradients on some rank)
    stop: bool  # some rank was asked to stop: checkpoint now and return


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def build(cfg: RunConfig, rank: int, world: int):
    """Tokenizer, data loader and the engines for `cfg`: (tokenizer, loader, stats, teacher, student).
    For a method trained on the teacher's data (seqkd) the examples are its cached responses (made first when
    missing)."""
    m, t, method = cfg.model, cfg.train, method_of(cfg)
    clock = time.perf_counter()

    def done(what: str) -> None:
        nonlocal clock
        log.info("%s (%.1f s)", what, time.perf_counter() - clock)
        clock = time.perf_counter()

    tokenizer = models.load_tokenizer(m.student, trust_remote_code=m.trust_remote_code, allow_hub=m.allow_hub)
    if method.needs_teacher:
        t_tok = models.load_tokenizer(m.teacher, trust_remote_code=m.trust_remote_code, allow_hub=m.allow_hub)
        models.check_same_tokenizer(t_tok, tokenizer, m.teacher, m.student)
    examples, stats = data.load_dataset(cfg.data.train_file, tokenizer, cfg.data.max_length, on_error=cfg.data.on_error)
    done(f"data: {stats.summary()}")
    data.check_one_batch(len(examples), world, t.per_device_train_batch_size, cfg.data.train_file,
                         "train.per_device_train_batch_size")  # before seqkd generates for them
    ds_teacher, ds_student = engines.ds_configs_for(cfg, world)
    threshold = engines.malloc_mmap_threshold(cfg, ds_teacher, ds_student)
    if threshold:  # before the models: their freed host blocks go back to the system
        applied = process.set_malloc_mmap_threshold(threshold)
        log.info("host allocations of %d bytes or more mapped on their own%s", threshold,
                 "" if applied else ": not applied, this C library has no mallopt M_MMAP_THRESHOLD")
    if method.teacher_data:
        frozen = lambda: engines.teacher_engine(cfg, ds_teacher, tokenizer, online=False)  # noqa: E731
        with REQUEST.deferred():  # a stop ends generation after its batch, the responses so far kept
            examples, stats.seqkd = seqkd.teacher_examples(
                cfg, examples, tokenizer, rank, world, batch_size=cfg.seqkd.batch_size,
                build_teacher=lambda: seqkd.generation_teacher(cfg, tokenizer, frozen))
        done(f"seqkd: {len(examples)} teacher responses ({stats.seqkd['generated']} generated)")
    loader = data.build_dataloader(examples, batch_size=t.per_device_train_batch_size,
                                   pad_token_id=tokenizer.pad_token_id, rank=rank, world_size=world, seed=cfg.seed)
    teacher = None
    if method.teacher != "none":
        teacher = engines.teacher_engine(cfg, ds_teacher, tokenizer, online=method.online)
        done(f"teacher engine ready (ZeRO-{zero_stage(ds_teacher)})")
    faults.crash_point("kill_in_startup", 0, rank)  # a rank lost, or held, while the engines are built
    faults.hang_point("hang_in_startup", 0, rank)
    student = engines.student_engine(cfg, ds_student, tokenizer)
    done(f"student engine ready (ZeRO-{zero_stage(ds_student)})")
    return tokenizer, loader, stats, teacher, student


class _Loop:
    """One optimizer step at a time: batches (resampled on policy), losses, backward passes, engine steps."""

    def __init__(self, cfg: RunConfig, student, teacher, tokenizer, world: int, scorer, batches):
        self.cfg, self.student, self.teacher, self.world, self.scorer = cfg, student, teacher, world, scorer
        self.batches, self.vocab = batches, len(tokenizer)
        self.rank = torch.distributed.get_rank()
        self.method = method_of(cfg)
        self.state = self.method.state(cfg) if self.method.state else None
        self.timer = perf.PhaseTimer(enabled=cfg.train.profile_phases)
        self.sampler = generation.on_policy_sampler(cfg, student, tokenizer, world) if self.method.on_policy else None
        self.sampled_tokens = 0.0

    def _micro_batches(self, step: int) -> tuple[list[dict], torch.Tensor, bool]:
        """(this step's micro-batches on the device, their [counted, seen] tokens summed over ranks, on_policy)."""
        gas, device, timer = self.cfg.train.gradient_accumulation_steps, self.student.device, self.timer
        with timer.phase("data"):  # counted positions and token counts are found on the host, before batches move
            host = [with_counted(next(self.batches)) for _ in range(gas)]
        on_policy = self.sampler is not None and self.sampler.on_policy(step)
        if on_policy:
            with timer.phase("generation"):  # the sampled batches come back to the host
                host = [with_counted(self.sampler(_to(b, device))) for b in host]
        with timer.phase("comm"):
            tokens = torch.tensor([sum(b["counted_labels"].numel() for b in host),
                                   sum(int(b["attention_mask"].sum()) for b in host)], dtype=torch.float64).to(device)
            if self.world > 1:
                torch.distributed.all_reduce(tokens)
        return [_to(b, device) for b in host], tokens, on_policy

    def step(self, step: int, stop: Optional[StopRequest] = None) -> StepResult:
        """Run optimizer step `step` (``stop`` is read at the step's end: a signal during the step stops after it)."""
        cfg, student, teacher, timer, method = self.cfg, self.student, self.teacher, self.timer, self.method
        start = time.perf_counter()
        micro, tokens, on_policy = self._micro_batches(step)
        update_online = method.online and (step - 1) % cfg.online.update_every == 0
        drift = method.online and cfg.online.drift_every > 0 and (step - 1) % cfg.online.drift_every == 0
        ctx = StepContext(cfg=cfg, student=student, teacher=teacher, scorer=self.scorer, vocab_size=self.vocab,
                          num_tokens=loss_normaliser(tokens[0].float(), self.world, len(micro)),
                          update_online=update_online, on_policy=on_policy, timer=timer, state=self.state,
                          log_drift=drift, inject_nan=faults.armed("nan_batch", step, self.rank))
        sums: dict[str, torch.Tensor] = {}
        nonfinite = torch.zeros((), device=student.device)
        for b in micro:
            out = method.step(b, ctx)
            faults.crash_point("kill_after_backward", step, self.rank)
            nonfinite = torch.maximum(nonfinite, out.nonfinite)
            for k, v in out.sums.items():
                sums[k] = sums[k] + v if k in sums else v
            with timer.phase("optimizer"):
                student.step()
                if update_online:
                    teacher.step()
            faults.crash_point("kill_after_optimizer", step, self.rank)
        keys = sorted(sums)
        with timer.phase("comm"):  # the one host sync of the step; the stop flag rides along, so every rank stops
            faults.signal_point("signal_in_step", step, self.rank)
            asked = torch.tensor(float(stop is not None and stop.signal is not None), dtype=torch.float64,
                                 device=student.device)
            flags = torch.stack([nonfinite.double(), asked])
            values = torch.cat([torch.stack([sums[k].double() for k in keys]), flags])
            if self.world > 1:
                torch.distributed.all_reduce(values)
            *reduced, nonfinite, stop_flag = values.tolist()
            counted, seen = tokens.tolist()
        elapsed = time.perf_counter() - start
        applied = student.was_step_applied() and (not update_online or teacher.was_step_applied())
        skipped = nonfinite > 0 or not applied  # DeepSpeed skipped the update: weights unchanged
        row = {"step": step, **{k: v / max(counted, 1.0) for k, v in zip(keys, reduced)},
               "lr/student": student.get_lr()[0], "time/step_s": elapsed,
               **{f"time/{k}_s": v for k, v in timer.pop().items()},
               "tokens_per_s": seen / elapsed, "tokens/counted": counted, "tokens/seen": seen,
               "skipped": float(skipped)}
        if method.on_policy:
            row["sgo/on_policy"] = float(on_policy)
            self.sampled_tokens += seen if on_policy else 0.0
        if method.online:
            row["lr/online"] = teacher.get_lr()[0]
        if self.state is not None:
            self.state.after_step(row, step)
        return StepResult(row=row, skipped=skipped, stop=stop_flag > 0)


def train(cfg: RunConfig) -> TrainResult:
    """Run `cfg` to `train.max_steps` optimizer steps, resuming from a checkpoint when `cfg.resume` finds
    one; checkpoint every `train.save_every` steps, at the end, and when a stop signal arrives (then
    return early with `stopped_by` set); at the end evaluate and export the student (and online module).
    From the process group on, a rank lost is named within about train.ddp_timeout (RankFailure), and a stop
    signal before the first step ends the run at once (stopped_by set, nothing to checkpoint)."""
    from transformers import set_seed

    stop = REQUEST.install()  # train.py installs it at start already; an earlier signal is kept
    rank, world, _ = process.init_distributed(timeout_s=collective_timeout(cfg.train.ddp_timeout))
    set_seed(cfg.seed)
    out, held = Path(cfg.output_dir), []  # held: this run's lock on `out`, once taken

    def record(signal: str) -> None:  # a stop during start-up, for the job script (only where this run holds out)
        if held or rank != 0:
            checkpoint.record_stop(out, 0, signal, None)

    dog = Watchdog(rank, world, cfg.train.ddp_timeout, stop=stop, on_stop=record)
    dog.arm(startup=True)
    try:
        held += [lock for lock in [_hold(out, rank)] if lock is not None]
        return _run(cfg, rank, world, out, stop, dog)
    except StartupStop as e:
        record(e.signal)
        log.warning("stopped by %s during start-up, before the first step; run the same command again", e.signal)
        return TrainResult(student=None, teacher=None, tokenizer=None, output_dir=out, stopped_by=e.signal)
    except (TrainingError, checkpoint.SaveError, checkpoint.CheckpointError):
        raise
    except RuntimeError as e:  # a collective failed: name the rank behind it when one died or hangs
        dog.disarm()
        while dog.exiting:  # the watchdog already reported who failed and is ending this process
            time.sleep(1)
        verdict = dog.diagnose() if dog.store is not None else None
        if verdict is None:
            raise
        raise RankFailure(f"{verdict}. {RESUME_HINT} (the collective's error: {first_line(e)})") from e
    finally:
        dog.close()
        stop.uninstall()
        stop.signal, stop.startup = None, True  # served (or moot): the run is over
        for lock in held:
            lock.release()


def _hold(out: Path, rank: int) -> Optional[rundir.RunLock]:
    """Rank 0 takes `out`'s lock (one run per output directory) before anything is written there; every rank
    stops with RunDirError when it cannot."""
    from deepspeed.accelerator import get_accelerator

    lock, error = None, None
    if rank == 0:
        try:
            lock = rundir.acquire(out)
        except rundir.RunDirError as e:
            error = e
    failed = process.all_reduce_sum([float(error is not None)], get_accelerator().current_device_name())[0]
    if error is not None:
        raise error
    if failed:
        raise rundir.RunDirError(f'"output_dir": rank 0 cannot use {out} (its message says why)')
    return lock


def _run(cfg: RunConfig, rank: int, world: int, out: Path, stop: StopRequest, dog: Watchdog) -> TrainResult:
    """train() once the output directory is this run's: start-up (the watchdog armed for it), then the steps."""
    resume_from = checkpoint.find_checkpoint(out, cfg.resume)
    if resume_from is not None:
        checkpoint.check_resume_config(resume_from, cfg.to_dict(), cfg.resume_ignore)
    run_config = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if rank == 0:
        (out / "run_config.yaml").write_text(run_config)
    checkpoint.clear_stop(out)
    base_memory = perf.peak_memory_bytes()  # the process before its models: what okd plan does not count
    try:
        tokenizer, loader, stats, teacher, student = build(cfg, rank, world)
    except seqkd.GenerationStopped as e:  # before any step: nothing to checkpoint, the responses so far are kept
        log.warning("stopped by %s; resume with the same command", e)
        checkpoint.record_stop(out, 0, e.signal, None)
        return TrainResult(student=None, teacher=None, tokenizer=None, output_dir=out, stopped_by=e.signal)
    pos = data.DataPosition()
    loop = _Loop(cfg, student, teacher, tokenizer, world, make_scorer(cfg, teacher, student, len(tokenizer), rank,
                 world), data.batches_from(loader, pos))
    run = RunRecords(cfg, run_config, rank, world, tokenizer, student, teacher if loop.method.online else None)
    first_step, past = _resume(run, resume_from, loop, pos)
    run.open(first_step, past)
    result = TrainResult(student=student, teacher=teacher, tokenizer=tokenizer, output_dir=out, history=past)
    stop.startup = False  # from here a stop signal is served at the end of a step, with a checkpoint
    dog.arm()
    _steps(cfg, first_step, loop, run, result, pos, stop, dog)
    dog.disarm()
    stop.uninstall()
    run.bar.close()
    if result.stopped_by is None:
        _finish(cfg, result, loop, run, stats, base_memory)
    return result


def _resume(run: RunRecords, resume_from: Optional[Path], loop: _Loop,
            pos: data.DataPosition) -> tuple[int, list[dict]]:
    """Load the checkpoint `resume_from` (None: a fresh start) into the engines, `loop`'s method state, `pos` and
    `run`; (the first step to run, the history rows up to the checkpoint)."""
    if resume_from is None:
        return 1, []
    clock = time.perf_counter()
    state = checkpoint.load_checkpoint(resume_from, run.student, run.online, world_size=run.world,
                                       method=run.cfg.method)
    pos.epoch, pos.batches = state.epoch, state.batches_in_epoch
    run.best = state.best
    if loop.state is not None and state.method_state:
        loop.state.load_state_dict(state.method_state)
    log.info("resumed from %s at step %d (%.1f s)", resume_from, state.step, time.perf_counter() - clock)
    return state.step + 1, [r for r in read_history(run.history_file) if r["step"] <= state.step]


def _steps(cfg: RunConfig, first_step: int, loop: _Loop, run: RunRecords, result: TrainResult, pos: data.DataPosition,
           stop: StopRequest, dog: Watchdog) -> None:
    """Steps `first_step`..train.max_steps with their records and checkpoints; on a stop signal, the last step's
    checkpoint and `result.stopped_by`."""
    t, rank, bad_run = cfg.train, run.rank, 0  # bad_run: consecutive steps whose update was skipped
    for step in range(first_step, t.max_steps + 1):
        dog.progress(step)
        faults.crash_point("kill_rank", step, rank)
        faults.hang_point("hang_rank", step, rank)
        done = loop.step(step, stop)
        run.record(step, done.row)
        bad_run = bad_run + 1 if done.skipped else 0
        if done.skipped:
            log.warning("step %d: non-finite loss or gradients on some rank; the update was skipped on every rank "
                        "(%d in a row)", step, bad_run)
        if bad_run > t.max_bad_steps:
            raise TrainingError(f"{bad_run} steps in a row had non-finite losses or gradients (train.max_bad_steps is "
                                f"{t.max_bad_steps}); stopped without saving them. The last good checkpoint is "
                                f"{run.out / checkpoint.CHECKPOINTS}/latest; lower the learning rate or check the "
                                f"data, then resume")
        result.history.append(done.row)
        scheduled = step == t.max_steps or (t.save_every and step % t.save_every == 0)
        if done.stop or (scheduled and not bad_run):  # no scheduled save on a skipped step: keep the last good
            path = run.save(step, pos, loop.state)
        if done.stop and step < t.max_steps:
            result.stopped_by = stop.signal or "a signal on another rank"
            checkpoint.record_stop(run.out, step, result.stopped_by, path)
            log.warning("stopped at step %d by %s; resume with the same command", step, result.stopped_by)
            return


def _finish(cfg: RunConfig, result: TrainResult, loop: _Loop, run: RunRecords, stats, base_memory: int) -> None:
    """Metrics (costs, evaluation) and the exports at the end of a run; `base_memory`: this rank's peak memory
    before its models were built."""
    t, out, student, teacher = cfg.train, result.output_dir, result.student, result.teacher
    metrics = {"method": cfg.method, "steps": t.max_steps, "world_size": run.world, "data": vars(stats)}
    if teacher is not None:  # the placement the run used (deepspeed.teacher_config auto: the one chosen by size)
        offload = teacher.zero_offload_param()
        metrics["teacher_engine"] = {"zero_stage": int(teacher.zero_optimization_stage()),
                                     "offload_param": str(getattr(offload.device, "value", offload.device))
                                     if offload is not None else "none"}
    if result.history:
        metrics["final"] = {k: v for k, v in result.history[-1].items() if "/" in k and not k.startswith("time")}
        n_online = 0
        if loop.method.online:  # the blocks the module's backward runs through: from its lowest block to the top
            layers = teacher.module.config.num_hidden_layers
            blocks = models.online_module(cfg.online).blocks(layers, cfg.online)
            n_online = models.block_parameter_count(teacher.module, range(min(blocks), layers)) if blocks else 0
        metrics.update(perf.run_cost(result.history, teacher, student, run.world, loop.sampled_tokens, n_online,
                                     loop.method.online, recompute=cfg.online.gradient_checkpointing,
                                     base_memory=base_memory))
        if run.rank == 0:
            log.info("time per step (mean over %d steps):\n%s", len(result.history), perf.phase_table(result.history))
    if run.evaluator is not None:
        scores = run.evaluator(student, teacher)
        metrics.update(scores)
        run.scalars(scores, t.max_steps)
        log.info("eval: %s", {k: round(v, 4) for k, v in scores.items()})
    checkpoint.export_hf(student, result.tokenizer, out / "student")
    if loop.method.online:
        checkpoint.export_online_module(teacher, cfg.online, out / "online_module")
    result.metrics = metrics
    if run.rank == 0:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        run.writer.close()
        log.info("saved the student to %s%s", out / "student",
                 f" and the online module to {out / 'online_module'}" if loop.method.online else "")
