"""One training step per method: forward passes, losses and backward passes (the engines step in the trainer).

A step returns the *sums* over its counted tokens of each loss term (detached), so the trainer can report
means over the global batch; the losses it backpropagates are those sums divided by `ctx.num_tokens`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .config import RunConfig
from .data import IGNORE_INDEX
from .divergences import ce_sum, divergence_sum


@dataclass
class StepContext:
    cfg: RunConfig
    student: object  # DeepSpeed engine
    teacher: Optional[object]  # DeepSpeed engine, or None for sft
    num_tokens: float  # the normaliser: counted tokens of the global batch / (world size x accumulation steps)
    vocab_size: int  # the tokenizer's real size; logits beyond it (padding) are dropped
    update_online: bool = False


def loss_normaliser(counted_tokens: float, world_size: int, accumulation_steps: int) -> float:
    """What each micro-batch's loss sum is divided by, so that after DeepSpeed's scaling (1 / accumulation
    steps) and its gradient average over ranks, the gradient is that of the mean over the global batch's
    counted tokens."""
    return max(counted_tokens, 1.0) / (world_size * accumulation_steps)


def targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [B, T-1], mask [B, T-1]) aligned with logits[:, :-1]."""
    labels = batch["labels"][:, 1:]
    return labels, labels != IGNORE_INDEX


def response_logits(engine, batch: dict, mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits at the counted positions only: [N, vocab_size]."""
    out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits[:, :-1][mask][:, :vocab_size]


def _div(name: str, p: torch.Tensor, q: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    lo = cfg.loss
    return divergence_sum(name, p, q, temperature=lo.temperature, chunk_size=lo.chunk_size, beta=lo.js_beta,
                          alpha=lo.skew_alpha, mu=lo.akl_mu)


def _student_update(ctx: StepContext, zt: torch.Tensor, zs: torch.Tensor, y: torch.Tensor) -> dict:
    """LS = kd_ratio * D(pT.detach() || pS) + (1 - kd_ratio) * CE(zS, y); backward on the student."""
    lo = ctx.cfg.loss
    kd = _div(lo.divergence, zt.detach(), zs, ctx.cfg)
    ce = ce_sum(zs, y, chunk_size=lo.chunk_size)
    total = lo.kd_ratio * kd + (1.0 - lo.kd_ratio) * ce
    ctx.student.backward(total / ctx.num_tokens)
    return {"student/loss": total.detach(), "student/kd": kd.detach(), "student/ce": ce.detach()}


def sft_step(batch: dict, ctx: StepContext) -> dict:
    """Cross-entropy on the response tokens."""
    labels, mask = targets(batch)
    zs = response_logits(ctx.student, batch, mask, ctx.vocab_size)
    ce = ce_sum(zs, labels[mask], chunk_size=ctx.cfg.loss.chunk_size)
    ctx.student.backward(ce / ctx.num_tokens)
    return {"student/loss": ce.detach(), "student/ce": ce.detach()}


def kd_step(batch: dict, ctx: StepContext) -> dict:
    """Frozen teacher; the student learns kd_ratio * D(pT || pS) + (1 - kd_ratio) * CE."""
    labels, mask = targets(batch)
    with torch.no_grad():
        zt = response_logits(ctx.teacher, batch, mask, ctx.vocab_size)
    zs = response_logits(ctx.student, batch, mask, ctx.vocab_size)
    return _student_update(ctx, zt, zs, labels[mask])


def okd_step(batch: dict, ctx: StepContext) -> dict:
    """Online KD (design.md section 2): the student step of `kd`, and on update steps the online module's
    LT = CE(zT, y) + divergence_weight * D_T(pS.detach() || pT), backpropagated into the teacher's LoRA only."""
    labels, mask = targets(batch)
    y = labels[mask]
    grad = torch.enable_grad() if ctx.update_online else torch.no_grad()
    with grad:
        zt = response_logits(ctx.teacher, batch, mask, ctx.vocab_size)
    zs = response_logits(ctx.student, batch, mask, ctx.vocab_size)
    logs = _student_update(ctx, zt, zs, y)
    if ctx.update_online:
        on = ctx.cfg.online
        ce_t = ce_sum(zt, y, chunk_size=ctx.cfg.loss.chunk_size)
        kd_t = _div(on.divergence, zs.detach(), zt, ctx.cfg)
        total_t = ce_t + on.divergence_weight * kd_t
        ctx.teacher.backward(total_t / ctx.num_tokens)
        logs.update({"teacher/loss": total_t.detach(), "teacher/ce": ce_t.detach(), "teacher/kd": kd_t.detach()})
    return logs


METHODS: dict[str, Callable[[dict, StepContext], dict]] = {"sft": sft_step, "kd": kd_step, "okd": okd_step}
