"""One training step per method: forward passes, losses and backward passes (the engines step in the trainer).

A step returns the *sums* over its counted tokens of each loss term (detached), so the trainer can report
means over the global batch; the losses it backpropagates are those sums divided by `ctx.num_tokens`.

Token distributions come from the models' final hidden states at the counted positions and their lm_head
weights, one chunk of tokens at a time (`loss.from_hidden`, the default; with `loss.vocab_shards` W > 1 the
W ranks of a group also split the vocabulary), or from the models' logits at the counted positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .config import RunConfig
from .data import IGNORE_INDEX
from .divergences import ce_from_hidden, ce_sum, chunked_divergence_from_hidden, divergence_sum
from .perf import PhaseTimer
from .sharded import gather_rows, sharded_ce_from_hidden, sharded_divergence_from_hidden


@dataclass
class StepContext:
    cfg: RunConfig
    student: object  # DeepSpeed engine
    teacher: Optional[object]  # DeepSpeed engine, or None for sft
    num_tokens: float  # the normaliser: counted tokens of the global batch / (world size x accumulation steps)
    vocab_size: int  # the tokenizer's real size; logits beyond it (padding) are dropped
    update_online: bool = False
    on_policy: bool = False  # sgo: this step's responses were sampled from the student (the loss is D alone)
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    from_hidden: bool = False  # score hidden states with lm_head rows (else: logits at the counted positions)
    teacher_head: Optional[torch.Tensor] = None  # the frozen teacher lm_head's rows vocab_slice, gathered once
    vocab_slice: Optional[tuple[int, int]] = None  # this rank's [start, end) of the vocabulary; None: all of it
    vocab_group: object = None  # the group the vocabulary is split over (loss.vocab_shards > 1), else None
    vocab_shards: int = 1
    inject_nan: bool = False  # test hook: make this rank's student outputs NaN (faults.py, "nan_batch")

    def student_head(self) -> torch.Tensor:
        """The student's lm_head rows for this rank (a view: gradients reach the parameter)."""
        start, end = self.vocab_slice or (0, self.vocab_size)
        return self.student.module.get_output_embeddings().weight[start:end]


def loss_normaliser(counted_tokens: float, world_size: int, accumulation_steps: int) -> float:
    """What each micro-batch's loss sum is divided by, so that after DeepSpeed's scaling (1 / accumulation
    steps) and its gradient average over ranks, the gradient is that of the mean over the global batch's
    counted tokens."""
    return max(counted_tokens, 1.0) / (world_size * accumulation_steps)


def targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [B, T-1], mask [B, T-1]) aligned with logits[:, :-1]."""
    labels = batch["labels"][:, 1:]
    return labels, labels != IGNORE_INDEX


def forward_counted(engine, batch: dict, mask: torch.Tensor, vocab_size: int, *, hidden: bool) -> torch.Tensor:
    """The model's outputs at the counted positions (mask [B, T-1]): its final (post-norm) hidden states
    [N, H] when ``hidden``, else its logits [N, vocab_size]. Either way no [B, T, V] logits are formed:
    transformers' ``logits_to_keep`` mask selects the positions the lm_head sees (none, for hidden)."""
    keep = F.pad(mask, (0, 1), value=False)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if not hidden:
        return engine(**inputs, logits_to_keep=keep).logits[:, :vocab_size]
    captured = []

    def grab(module, args, out):
        captured.append(out[0] if isinstance(out, tuple) else out.last_hidden_state)

    handle = engine.module.get_decoder().register_forward_hook(grab)
    try:
        engine(**inputs, logits_to_keep=torch.zeros_like(keep))
    finally:
        handle.remove()
    return captured[-1][keep]


def _terms(ctx: StepContext, name: str, p: torch.Tensor, q: torch.Tensor, y: torch.Tensor,
           p_head: Optional[torch.Tensor] = None, q_head: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[sum D(p || q), sum CE(q, y)] over the counted tokens: p, q are logits, or hidden states scored
    with the lm_head rows p_head, q_head (vocab-sharded over ctx.vocab_group when it is set)."""
    lo = ctx.cfg.loss
    kw = dict(temperature=lo.temperature, chunk_size=lo.chunk_size, beta=lo.js_beta, alpha=lo.skew_alpha,
              mu=lo.akl_mu)
    if p_head is None:
        return torch.stack([divergence_sum(name, p, q, **kw), ce_sum(q, y, chunk_size=lo.chunk_size)])
    if ctx.vocab_group is not None:
        return sharded_divergence_from_hidden(name, p, p_head, q, q_head, labels=y, ce_weight=1.0, split=True,
                                              vocab_size=ctx.vocab_size, group=ctx.vocab_group, **kw)
    return chunked_divergence_from_hidden(name, p, p_head, q, q_head, labels=y, ce_weight=1.0, split=True, **kw)


def _outputs(ctx: StepContext, batch: dict, *, teacher_grad: bool) -> tuple:
    """(teacher outputs or None, student outputs, labels) at the counted positions, gathered over the
    vocab-sharded group when there is one."""
    labels, mask = targets(batch)
    y = labels[mask]
    zt = None
    if ctx.teacher is not None:
        with ctx.timer.phase("teacher_forward"), torch.enable_grad() if teacher_grad else torch.no_grad():
            zt = forward_counted(ctx.teacher, batch, mask, ctx.vocab_size, hidden=ctx.from_hidden)
    with ctx.timer.phase("student_forward"):
        zs = forward_counted(ctx.student, batch, mask, ctx.vocab_size, hidden=ctx.from_hidden)
    if ctx.inject_nan:  # test hook (faults.py): a batch whose forward pass overflowed
        zs = zs * float("nan")
    if ctx.vocab_group is not None:
        rows = (zs, y) if zt is None else (zs, y, zt)
        with ctx.timer.phase("comm"):
            zs, y, *rest = gather_rows(*rows, group=ctx.vocab_group, pad_values=(0, IGNORE_INDEX, 0))
        zt = rest[0] if rest else None
    return zt, zs, y


def _student_loss(ctx: StepContext, zt: torch.Tensor, zs: torch.Tensor, y: torch.Tensor) -> dict:
    """LS = kd_ratio * D(pT.detach() || pS) + (1 - kd_ratio) * CE(zS, y) and its terms (sums).
    On an sgo step with sampled responses, LS = D(pT.detach() || pS) (GKD: no CE on the student's own samples)."""
    lo = ctx.cfg.loss
    heads = (ctx.teacher_head, ctx.student_head()) if ctx.from_hidden else ()
    ratio = 1.0 if ctx.on_policy else lo.kd_ratio
    with ctx.timer.phase("loss"):
        kd, ce = _terms(ctx, lo.divergence, zt.detach(), zs, y, *heads)
    return {"student/loss": ratio * kd + (1.0 - ratio) * ce, "student/kd": kd, "student/ce": ce}


def _backward(ctx: StepContext, parts: list[tuple[object, torch.Tensor, str]]) -> float:
    """engine.backward(loss / num_tokens) for each (engine, loss sum, timer phase). When any of the losses
    is not finite on any rank, every loss is made NaN first, so that every engine's DeepSpeed step finds
    non-finite gradients and skips (no weight changes, on every rank). Returns 1.0 for such a step, else 0.0."""
    with ctx.timer.phase("comm"):
        bad = torch.tensor([float(not bool(torch.isfinite(loss).all())) for _, loss, _ in parts],
                           device=parts[0][1].device).max()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    poison = float("nan") if bad.item() > 0 else 1.0
    for engine, loss, phase in parts:
        with ctx.timer.phase(phase):
            engine.backward(loss * poison / ctx.num_tokens)
    return float(bad.item())


def _logs(ctx: StepContext, values: dict, nonfinite: float) -> dict:
    """Detached sums for this rank: a vocab-sharded group's sums are the group's, so each rank reports 1/W."""
    return {**{k: v.detach() / ctx.vocab_shards for k, v in values.items()}, "nonfinite": nonfinite}


def sft_step(batch: dict, ctx: StepContext) -> dict:
    """Cross-entropy on the response tokens."""
    _, zs, y = _outputs(ctx, batch, teacher_grad=False)
    chunk = ctx.cfg.loss.chunk_size
    with ctx.timer.phase("loss"):
        if not ctx.from_hidden:
            ce = ce_sum(zs, y, chunk_size=chunk)
        elif ctx.vocab_group is not None:
            ce = sharded_ce_from_hidden(zs, ctx.student_head(), y, vocab_size=ctx.vocab_size,
                                        group=ctx.vocab_group, chunk_size=chunk)
        else:
            ce = ce_from_hidden(zs, ctx.student_head(), y, chunk_size=chunk)
    bad = _backward(ctx, [(ctx.student, ce, "student_backward")])
    return _logs(ctx, {"student/loss": ce, "student/ce": ce}, bad)


def kd_step(batch: dict, ctx: StepContext) -> dict:
    """Frozen teacher; the student learns kd_ratio * D(pT || pS) + (1 - kd_ratio) * CE."""
    zt, zs, y = _outputs(ctx, batch, teacher_grad=False)
    ls = _student_loss(ctx, zt, zs, y)
    return _logs(ctx, ls, _backward(ctx, [(ctx.student, ls["student/loss"], "student_backward")]))


def okd_step(batch: dict, ctx: StepContext) -> dict:
    """Online KD (design.md section 2): the student step of `kd`, and on update steps the online module's
    LT = CE(zT, y) + divergence_weight * D_T(pS.detach() || pT), backpropagated into the teacher's LoRA only."""
    zt, zs, y = _outputs(ctx, batch, teacher_grad=ctx.update_online)
    losses = _student_loss(ctx, zt, zs, y)
    parts = [(ctx.student, losses["student/loss"], "student_backward")]
    if ctx.update_online:
        on = ctx.cfg.online
        heads = (ctx.student_head().detach(), ctx.teacher_head) if ctx.from_hidden else ()
        with ctx.timer.phase("online_loss"):
            kd_t, ce_t = _terms(ctx, on.divergence, zs.detach(), zt, y, *heads)
        losses.update({"teacher/loss": ce_t + on.divergence_weight * kd_t, "teacher/ce": ce_t, "teacher/kd": kd_t})
        parts.append((ctx.teacher, losses["teacher/loss"], "online_backward"))
    return _logs(ctx, losses, _backward(ctx, parts))


# seqkd is sft on the teacher's cached responses; sgo is kd on batches the trainer may first resample
METHODS: dict[str, Callable[[dict, StepContext], dict]] = {"sft": sft_step, "seqkd": sft_step, "kd": kd_step,
                                                           "sgo": kd_step, "okd": okd_step}
