"""A run's records on disk and on screen: run_config.yaml, log_history.jsonl, TensorBoard, the progress bar,
evaluations during training and the checkpoints it saves."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from . import checkpoint
from .config import RunConfig
from .evaluate import Evaluator

log = logging.getLogger("okd_scale")


class RunRecords:
    """A run's records on disk and on screen: run_config.yaml, log_history.jsonl, TensorBoard, the progress
    bar, evaluation and checkpoints."""

    def __init__(self, cfg: RunConfig, run_config: str, rank: int, world: int, tokenizer, student, online):
        self.cfg, self.run_config, self.rank, self.world, self.tokenizer = cfg, run_config, rank, world, tokenizer
        self.student, self.online = student, online  # the engines whose state a checkpoint holds
        self.out = Path(cfg.output_dir)
        self.history_file = self.out / "log_history.jsonl"  # one JSON row per optimizer step, appended as steps end
        self.evaluator = Evaluator(cfg, tokenizer, rank, world) if cfg.data.eval_file else None
        self.best: dict = {}
        self.writer = self.bar = None

    def open(self, first_step: int, past: list[dict]) -> None:
        """Start the records at `first_step`, keeping the history rows `past` of the run resumed."""
        from tqdm.auto import tqdm

        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            self.history_file.write_text("".join(json.dumps(r) + "\n" for r in past))
            self.writer = SummaryWriter(log_dir=str(self.out / "tensorboard"), purge_step=first_step)
        self.bar = tqdm(total=self.cfg.train.max_steps, initial=first_step - 1, desc=self.cfg.method,
                        disable=self.rank != 0, dynamic_ncols=True)

    def scalars(self, values: dict, step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                if k != "step":
                    self.writer.add_scalar(k, v, step)

    def record(self, step: int, row: dict) -> None:
        """Log step `step`'s row (with an evaluation when one is due) to TensorBoard, the bar and the history."""
        t = self.cfg.train
        if step % t.logging_steps == 0 or step == t.max_steps:
            self.scalars(row, step)
        if self.evaluator is not None and t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
            scores = self.evaluator(self.student)
            row.update(scores)
            self.scalars(scores, step)
            log.info("step %d eval: %s", step, {k: round(v, 4) for k, v in scores.items()})
            if t.keep_best and (not self.best or scores["eval/student_ce"] < self.best["eval/student_ce"]):
                self.best = {"step": step, "eval/student_ce": scores["eval/student_ce"]}
        self.bar.set_postfix({k.split("/")[-1] if k.startswith("student/") else k: f"{v:.4g}"
                              for k, v in row.items() if k in ("student/loss", "teacher/loss")})
        self.bar.update(1)
        if self.rank == 0:
            with open(self.history_file, "a") as f:
                f.write(json.dumps(row) + "\n")

    def save(self, step: int, pos, method_state) -> Path:
        """Checkpoint step `step` (data position `pos`, the method's state across steps); its directory."""
        clock = time.perf_counter()
        state = checkpoint.TrainerState(step=step, epoch=pos.epoch, batches_in_epoch=pos.batches, world_size=self.world,
                                        method=self.cfg.method, best=self.best,
                                        method_state=method_state.state_dict() if method_state else {})
        path = checkpoint.save_checkpoint(self.out, state, self.student, self.online, tokenizer=self.tokenizer,
                                          run_config=self.run_config, keep_last=self.cfg.train.keep_last,
                                          online=self.cfg.online)
        log.info("checkpoint %s (%.1f s)", path, time.perf_counter() - clock)
        return path


def read_history(path: Path) -> list[dict]:
    """The rows of log_history.jsonl; a line that does not parse (torn by a kill mid-write) is left out."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines() if path.is_file() else [], 1):
        try:
            row = json.loads(line)
        except ValueError:
            log.warning("%s line %d is not a complete JSON row (a write cut short); left out", path, number)
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows
