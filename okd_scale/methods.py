"""One training step per method: forward passes, losses and backward passes (the engines step in the trainer).

A step returns the *sums* over its counted tokens of each loss term (detached tensors on the device, so a
step needs no host sync), so the trainer can report means over the global batch; the losses it
backpropagates are those sums divided by `ctx.num_tokens`. How the losses read the models (hidden states
and lm_head rows, vocab-sharded or not, or logits) is the scorer's business (scorers.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from . import models
from .config import RunConfig
from .data import IGNORE_INDEX
from .divergences import Mix
from .perf import PhaseTimer


@dataclass
class StepContext:
    cfg: RunConfig
    student: object  # DeepSpeed engine
    teacher: Optional[object]  # DeepSpeed engine, or None for sft
    num_tokens: Union[float, torch.Tensor]  # the normaliser: the global batch's counted tokens / (world x accumulation)
    vocab_size: int  # the tokenizer's real size; logits beyond it (padding) are dropped
    scorer: object  # scorers.HiddenScorer | ShardedScorer | LogitsScorer
    update_online: bool = False
    on_policy: bool = False  # sgo: this step's responses were sampled from the student (the loss is D alone)
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    state: object = None  # the method's state across steps (Method.state), e.g. TAID's t
    log_drift: bool = False  # okd: also log the adapted teacher's divergence from the original one
    inject_nan: bool = False  # test hook: make this rank's student outputs NaN (faults.py, "nan_batch")


def loss_normaliser(counted_tokens, world_size: int, accumulation_steps: int):
    """What each micro-batch's loss sum is divided by, so that after DeepSpeed's scaling (1 / accumulation
    steps) and its gradient average over ranks, the gradient is that of the mean over the global batch's
    counted tokens (a float, or a tensor for a count still on the device)."""
    if isinstance(counted_tokens, torch.Tensor):
        return counted_tokens.clamp_min(1.0) / (world_size * accumulation_steps)
    return max(counted_tokens, 1.0) / (world_size * accumulation_steps)


def targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [B, T-1], mask [B, T-1]) aligned with logits[:, :-1]."""
    labels = batch["labels"][:, 1:]
    return labels, labels != IGNORE_INDEX


def with_counted(batch: dict) -> dict:
    """The batch with the indices its losses read, computed where the batch is (on the host, before it moves
    to the device, the step needs no device sync for them): "counted_labels" [N], the counted tokens'
    labels; "counted_rows" [N], their positions in the flattened [B * T]; "counted_cols" [P], the positions
    counted in any row; "counted_cols_rows" [N], their positions in the flattened [B * P]."""
    if "counted_rows" in batch:
        return batch
    labels, mask = targets(batch)
    keep = F.pad(mask, (0, 1), value=False)
    cols = keep.any(0).nonzero().squeeze(1)
    return {**batch, "counted_labels": labels[mask], "counted_rows": keep.flatten().nonzero().squeeze(1),
            "counted_cols": cols, "counted_cols_rows": keep[:, cols].flatten().nonzero().squeeze(1)}


def forward_counted(engine, batch: dict, vocab_size: int, *, hidden: bool) -> torch.Tensor:
    """The model's outputs at the counted positions (`with_counted`): its final (post-norm) hidden states
    [N, H] when ``hidden``, else its logits [N, vocab_size]. Either way no [B, T, V] logits are formed:
    transformers' ``logits_to_keep`` selects the positions the lm_head sees (none, for hidden)."""
    batch = with_counted(batch)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if not hidden:
        logits = engine(**inputs, logits_to_keep=batch["counted_cols"]).logits
        return logits.flatten(0, 1).index_select(0, batch["counted_cols_rows"])[:, :vocab_size]
    captured = []

    def grab(module, args, out):
        captured.append(out[0] if isinstance(out, tuple) else out.last_hidden_state)

    handle = engine.module.get_decoder().register_forward_hook(grab)
    try:
        engine(**inputs, logits_to_keep=batch["counted_cols"][:0])
    finally:
        handle.remove()
    return captured[-1].flatten(0, 1).index_select(0, batch["counted_rows"])


def _outputs(ctx: StepContext, batch: dict, *, teacher_grad: bool) -> tuple:
    """(teacher outputs or None, student outputs, labels) at the counted positions."""
    batch = with_counted(batch)
    zt = None
    if ctx.teacher is not None:
        with ctx.timer.phase("teacher_forward"), torch.enable_grad() if teacher_grad else torch.no_grad():
            zt = forward_counted(ctx.teacher, batch, ctx.vocab_size, hidden=ctx.scorer.hidden)
    with ctx.timer.phase("student_forward"):
        zs = forward_counted(ctx.student, batch, ctx.vocab_size, hidden=ctx.scorer.hidden)
    if ctx.inject_nan:  # test hook (faults.py): a batch whose forward pass overflowed
        zs = zs * float("nan")
    return zt, zs, batch["counted_labels"]


def _backward(ctx: StepContext, parts: list[tuple[object, torch.Tensor, str]]) -> torch.Tensor:
    """engine.backward(loss / num_tokens) for each (engine, loss sum, timer phase). When any of the losses
    is not finite on any rank, every loss is made NaN first, so that every engine's DeepSpeed step finds
    non-finite gradients and skips (no weight changes, on every rank). Returns 1.0 for such a step, else
    0.0, as a tensor on the device (no host sync)."""
    with ctx.timer.phase("comm"):
        bad = torch.stack([~torch.isfinite(loss).all() for _, loss, _ in parts]).any().float()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    scale = torch.where(bad > 0, float("nan"), 1.0) / ctx.num_tokens
    for engine, loss, phase in parts:
        with ctx.timer.phase(phase):
            engine.backward(loss * scale)
    return bad


@dataclass
class StepOutput:
    """What a method's step gives the trainer for one micro-batch: this rank's detached loss sums by log name
    (``output["student/loss"]``), and whether any rank's losses were not finite."""

    sums: dict
    nonfinite: torch.Tensor  # 1.0 when some rank's losses were not finite (every engine then skips the step), else 0.0

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.sums[key]


def _logs(ctx: StepContext, values: dict, nonfinite: torch.Tensor) -> StepOutput:
    """Detached sums for this rank (scaled by the scorer's share: a vocab-sharded group's sums are the group's)."""
    return StepOutput({k: v.detach() * ctx.scorer.log_scale for k, v in values.items()}, nonfinite)


# the distributions' statistics the scorers report (divergences.TERMS), under their log names
STATS = {"entropy_t": "teacher/entropy", "entropy_s": "student/entropy", "top1_t": "teacher/top1"}


def _student_logs(ls, terms: dict, *, teacher: bool = True) -> dict:
    """LS, its terms and the statistics the scorer computed (the teacher's only when there is one)."""
    logs = {"student/loss": ls, "student/ce": terms["ce"], **({"student/kd": terms["kd"]} if teacher else {})}
    return {**logs, **{name: terms[k] for k, name in STATS.items() if k in terms and (teacher or k == "entropy_s")}}


def _student_mix(ctx: StepContext) -> Mix:
    """LS's weights: kd_ratio on D, the rest on CE; D alone on an sgo step with sampled responses (GKD: no CE on
    the student's own samples)."""
    lo = ctx.cfg.loss
    ratio = 1.0 if ctx.on_policy else lo.kd_ratio
    return Mix(lo.divergence, ratio, 1.0 - ratio)


def student_step(batch: dict, ctx: StepContext, mix: Mix) -> StepOutput:
    """The student learns LS = mix (from the frozen teacher's outputs, when the run has a teacher); the step's logs.
    The building block of a method whose teacher does not train."""
    zt, zs, y = _outputs(ctx, batch, teacher_grad=False)
    with ctx.timer.phase("loss"):
        ls, _, terms = ctx.scorer.losses(zt, zs, y, mix, timer=ctx.timer)
    bad = _backward(ctx, [(ctx.student, ls, "student_backward")])
    return _logs(ctx, _student_logs(ls, terms, teacher=zt is not None), bad)


def sft_step(batch: dict, ctx: StepContext) -> StepOutput:
    """Cross-entropy on the response tokens."""
    return student_step(batch, ctx, Mix(ctx.cfg.loss.divergence, 0.0, 1.0))


def kd_step(batch: dict, ctx: StepContext) -> StepOutput:
    """Frozen teacher; the student learns LS = kd_ratio * D(pT || pS) + (1 - kd_ratio) * CE."""
    return student_step(batch, ctx, _student_mix(ctx))


# online.objective: the online module's loss LT as a Mix (config.OnlineArgs gives the formulas)
ONLINE_OBJECTIVES: dict[str, Callable[[RunConfig], Mix]] = {
    "decoupled": lambda cfg: Mix(cfg.online.divergence, cfg.online.divergence_weight, cfg.online.ce_weight),
    "joint": lambda cfg: Mix(cfg.loss.divergence, cfg.online.divergence_weight * cfg.loss.kd_ratio,
                             cfg.online.ce_weight, joint=True),
}


def _original_teacher(ctx: StepContext, batch: dict, zt: torch.Tensor) -> torch.Tensor:
    """The given teacher's outputs at the counted positions, without its online module (the adapted ``zt``
    themselves when the module is on the output side and the scorer reads hidden states)."""
    module = models.ONLINE_MODULES[ctx.cfg.online.placement]
    if ctx.scorer.hidden and module.head_rows is not None:
        return zt.detach()
    with torch.no_grad(), module.disabled(ctx.teacher.module):
        return forward_counted(ctx.teacher, batch, ctx.vocab_size, hidden=ctx.scorer.hidden)


def okd_step(batch: dict, ctx: StepContext) -> StepOutput:
    """Online KD: the student step of `kd` from the adapted teacher, and on update steps, from the same outputs in
    the same pass, the online module's LT (online.objective), backpropagated into the module only."""
    zt, zs, y = _outputs(ctx, batch, teacher_grad=ctx.update_online)
    online = ONLINE_OBJECTIVES[ctx.cfg.online.objective](ctx.cfg) if ctx.update_online else None
    with ctx.timer.phase("loss"):
        ls, lt, terms = ctx.scorer.losses(zt, zs, y, _student_mix(ctx), online, timer=ctx.timer)
    losses = _student_logs(ls, terms)
    parts = [(ctx.student, ls, "student_backward")]
    if online is not None:
        losses.update({"teacher/loss": lt, "teacher/ce": terms["ce_t"], "teacher/kd": terms["kd_t"]})
        parts.append((ctx.teacher, lt, "online_backward"))
    bad = _backward(ctx, parts)
    if ctx.log_drift:  # after the backward (the weights step later): a teacher forward between its forward and its
        # backward would reset ZeRO-3's per-module backward counts, which then keep every gathered weight to the end
        with ctx.timer.phase("drift"):
            losses["teacher/drift"] = ctx.scorer.drift(_original_teacher(ctx, batch, zt), zt.detach())
    return _logs(ctx, losses, bad)


@dataclass
class TAIDSchedule:
    """TAID's interpolation parameter t (Shing et al., ICLR 2025). After each step with distillation loss L:

        m <- beta * m + (1 - beta) * (L_prev - L) / (L_prev + 1e-15)
        t <- min(t_end, max(t_start + (t_end - t_start) * step / max_steps, t + alpha * sigmoid(m) * (1 - t)))

    (only the linear floor when not adaptive); the first step only records L."""

    t_start: float
    t_end: float
    alpha: float
    beta: float
    adaptive: bool
    max_steps: int
    t: Optional[float] = None  # t_start until the first update
    momentum: float = 0.0
    prev_loss: Optional[float] = None

    def __post_init__(self):
        self.t = self.t_start if self.t is None else self.t

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "TAIDSchedule":
        ta = cfg.taid
        return cls(ta.t_start, ta.t_end, ta.alpha, ta.beta, ta.adaptive, cfg.train.max_steps)

    def update(self, loss: float, step: int) -> None:
        if self.prev_loss is None:
            self.prev_loss = loss
            return
        change = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1 - self.beta) * change
        floor = self.t_start + (self.t_end - self.t_start) * step / self.max_steps
        grown = self.t + self.alpha / (1 + math.exp(-self.momentum)) * (1 - self.t)
        self.t = min(self.t_end, max(floor, grown) if self.adaptive else floor)
        self.prev_loss = loss

    def after_step(self, row: dict, step: int) -> None:
        """Log the step's t, then move it on the step's global mean distillation loss (not on a skipped step)."""
        row["taid/t"] = self.t
        if not row["skipped"]:
            self.update(row["student/kd"], step)

    def state_dict(self) -> dict:
        return {"t": self.t, "momentum": self.momentum, "prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.momentum, self.prev_loss = state["t"], state["momentum"], state["prev_loss"]


def taid_step(batch: dict, ctx: StepContext) -> StepOutput:
    """Frozen teacher; LS = kd_ratio * KL(p_t || pS) + (1 - kd_ratio) * CE, p_t = softmax((1 - t) sg[zS] + t zT)
    with t from the run's TAIDSchedule."""
    ratio = ctx.cfg.loss.kd_ratio
    return student_step(batch, ctx, Mix("fkl", ratio, 1.0 - ratio, target_t=ctx.state.t))


@dataclass(frozen=True)
class Method:
    """A training method: its step, and what the trainer must give that step."""

    step: Callable[[dict, StepContext], StepOutput]
    teacher: str = "none"  # the teacher engine while training: none | frozen | online (its online module trains)
    teacher_data: bool = False  # the training examples are the teacher's responses, generated before training
    on_policy: bool = False  # a step's batches may be resampled from the student (sgo.lambda)
    state: Optional[Callable[[RunConfig], object]] = None  # state across steps: a factory of an object with
    # after_step(row, step), state_dict() and load_state_dict(), saved in checkpoints
    vocab_shards: bool = True  # its loss runs split over the vocabulary (loss.vocab_shards > 1)
    defaults: dict = field(default_factory=dict)  # {config key: value}: the method's own defaults, under the run's
    # config file and overrides (configure.load_config)

    @property
    def needs_teacher(self) -> bool:
        """Whether the run needs model.teacher (to train from, or to generate the training data)."""
        return self.teacher != "none" or self.teacher_data

    @property
    def online(self) -> bool:
        """Whether the teacher has a trainable online module (saved in checkpoints, exported at the end)."""
        return self.teacher == "online"


# the registry every other module derives its method logic from
METHODS: dict[str, Method] = {
    # the paper's OKD (arXiv 2409.12512 v2, section V): the student learns forward KL to the adapted teacher alone
    # (no CE); the online module's own defaults (config.OnlineArgs) are the paper's LoRA and LT
    "okd": Method(okd_step, teacher="online", defaults={"loss.divergence": "fkl", "loss.kd_ratio": 1.0}),
    "kd": Method(kd_step, teacher="frozen"),
    "sft": Method(sft_step),
    "seqkd": Method(sft_step, teacher_data=True),  # sft on the teacher's cached responses
    "sgo": Method(kd_step, teacher="frozen", on_policy=True),  # kd on batches the trainer may first resample
    "taid": Method(taid_step, teacher="frozen", state=TAIDSchedule.from_config, vocab_shards=False),
}


def method_of(cfg: RunConfig) -> Method:
    """The registry's entry for cfg.method."""
    return METHODS[cfg.method]
