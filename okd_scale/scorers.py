"""How the losses read the models: one scorer per path, all with one interface.

A scorer turns the models' outputs at the counted positions (teacher zT or None, student zS, labels y) into

    LS = student.div_weight * sum D(pT || pS) + student.ce_weight * sum CE(zS, y)     (pT a constant)
    LT = online.ce_weight * sum CE(zT, y) + online.div_weight * sum D_T(pS || pT)     (pS a constant)

(sums over the counted tokens; LT only when an online loss is asked for) and the detached term sums
[D, CE_S, D_T, CE_T]. The paths:

- ``HiddenScorer`` (``loss.from_hidden``, the default): outputs are final hidden states, scored with the
  lm_head rows one chunk of tokens at a time, each chunk's gradients computed in the same pass as its
  values (``divergences.distill_from_hidden``);
- ``ShardedScorer`` (``loss.vocab_shards`` W > 1): the same over a vocabulary split across each group of W
  ranks, which first exchange their rows (``sharded``);
- ``LogitsScorer``: outputs are logits (a ZeRO-3 student, whose lm_head is partitioned, or
  ``loss.from_hidden: false``), chunked and recomputed in backward.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from . import engines, models, sharded
from .config import ConfigError, RunConfig
from .data import IGNORE_INDEX
from .divergences import Mix, ce_sum, distill_from_hidden, divergence_sum, interpolated_target

log = logging.getLogger("okd_scale")


def _params(cfg: RunConfig) -> dict:
    lo = cfg.loss
    return dict(temperature=lo.temperature, chunk_size=lo.chunk_size, beta=lo.js_beta, alpha=lo.skew_alpha,
                mu=lo.akl_mu)


def _mixed(terms: list[torch.Tensor], student: Mix, online: Optional[Mix]) -> tuple:
    """(LS, LT) from differentiable term sums [D, CE_S, D_T, CE_T]."""
    kd, ce, kd_t, ce_t = terms
    ls = student.div_weight * kd + student.ce_weight * ce
    lt = online.ce_weight * ce_t + online.div_weight * kd_t if online is not None else None
    return ls, lt


@dataclass
class HiddenScorer:
    """Hidden states [N, H] scored with the lm_head rows: the student's live (a view of its parameter, so
    gradients reach it) and the frozen teacher's read once."""

    cfg: RunConfig
    student: object  # DeepSpeed engine
    teacher_head: Optional[torch.Tensor]
    vocab_size: int
    hidden: bool = True
    log_scale: float = 1.0  # what each rank's logged sums are multiplied by

    def student_head(self) -> torch.Tensor:
        weight = self.student.module.get_output_embeddings().weight
        return weight if weight.shape[0] == self.vocab_size else weight[:self.vocab_size]  # no slice to backprop

    def losses(self, zt, zs, y, student: Mix, online: Optional[Mix] = None, *, timer=None) -> tuple:
        return distill_from_hidden(zt, self.teacher_head, zs, self.student_head(), y, student=student,
                                   online=online, **_params(self.cfg))


@dataclass
class LogitsScorer:
    """Logits [N, V] at the counted positions."""

    cfg: RunConfig
    hidden: bool = False
    log_scale: float = 1.0

    def losses(self, zt, zs, y, student: Mix, online: Optional[Mix] = None, *, timer=None) -> tuple:
        kw = _params(self.cfg)
        chunk = kw["chunk_size"]
        zero = zs.new_zeros((), dtype=torch.float32)
        ce = ce_sum(zs, y, chunk_size=chunk)
        kd = zero
        if zt is not None:
            kd = divergence_sum(student.name, interpolated_target(zt.detach(), zs, student.target_t), zs, **kw)
        kd_t = ce_t = zero
        if online is not None:
            kd_t = divergence_sum(online.name, zs.detach(), zt, **kw)
            ce_t = ce_sum(zt, y, chunk_size=chunk)
        terms = [kd, ce, kd_t, ce_t]
        return (*_mixed(terms, student, online), torch.stack([t.detach().float() for t in terms]))


@dataclass
class ShardedScorer:
    """Hidden states scored on this rank's slice of the vocabulary, over the rows of its whole group."""

    cfg: RunConfig
    student: object
    teacher_head: Optional[torch.Tensor]
    vocab_size: int
    vocab_slice: tuple[int, int]
    group: object
    hidden: bool = True
    log_scale: float = 1.0  # 1 / W: a group's sums are the group's, so each rank reports its share

    def losses(self, zt, zs, y, student: Mix, online: Optional[Mix] = None, *, timer=None) -> tuple:
        from contextlib import nullcontext

        kw, vocab, group = _params(self.cfg), self.vocab_size, self.group
        start, end = self.vocab_slice
        s_head = self.student.module.get_output_embeddings().weight[start:end]
        with timer.phase("comm") if timer is not None else nullcontext():
            rows = (zs, y) if zt is None else (zs, y, zt)
            zs, y, *rest = sharded.gather_rows(*rows, group=group, pad_values=(0, IGNORE_INDEX, 0))
        zt = rest[0] if rest else None
        if student.target_t != 1:
            raise ValueError("the vocab-sharded scorer has no interpolated (TAID) target")
        zero = zs.new_zeros((), dtype=torch.float32)
        if zt is None:
            ce = sharded.sharded_ce_from_hidden(zs, s_head, y, vocab_size=vocab, group=group, chunk_size=kw["chunk_size"])
            kd = zero
        else:
            kd, ce = sharded.sharded_divergence_from_hidden(student.name, zt.detach(), self.teacher_head, zs, s_head,
                                                            labels=y, ce_weight=1.0, split=True, vocab_size=vocab,
                                                            group=group, **kw)
        kd_t = ce_t = zero
        if online is not None:
            kd_t, ce_t = sharded.sharded_divergence_from_hidden(online.name, zs.detach(), s_head.detach(), zt,
                                                                self.teacher_head, labels=y, ce_weight=1.0, split=True,
                                                                vocab_size=vocab, group=group, **kw)
        terms = [kd, ce, kd_t, ce_t]
        return (*_mixed(terms, student, online), torch.stack([t.detach().float() for t in terms]))


def make_scorer(cfg: RunConfig, teacher, student, vocab_size: int, rank: int, world: int):
    """The scorer for this run: from hidden states and lm_head rows (this rank's vocabulary slice when
    loss.vocab_shards > 1) when the student's lm_head is whole on each rank, else from logits."""
    lo = cfg.loss
    weight = student.module.get_output_embeddings().weight
    if not lo.from_hidden:
        return LogitsScorer(cfg)
    if models.is_partitioned(weight):
        if lo.vocab_shards > 1:
            raise ConfigError(f'"loss.vocab_shards" is {lo.vocab_shards}, but the student runs under ZeRO-3 '
                              f"({cfg.deepspeed.student_config}), which partitions its lm_head; use a ZeRO-0/1/2 "
                              f"student config or loss.vocab_shards=1")
        log.info("student under ZeRO-3: its lm_head is partitioned, so the losses use logits at the response "
                 "positions (loss.from_hidden needs the student's lm_head whole on each rank)")
        return LogitsScorer(cfg)
    if lo.vocab_shards == 1:
        head = models.frozen_head_rows(teacher.module, 0, vocab_size) if teacher is not None else None
        return HiddenScorer(cfg, student, head, vocab_size)
    group, shard_rank = engines.vocab_shard_group(lo.vocab_shards, rank, world)
    start, end = sharded.vocab_range(vocab_size, shard_rank, lo.vocab_shards)
    head = models.frozen_head_rows(teacher.module, start, end) if teacher is not None else None
    return ShardedScorer(cfg, student, head, vocab_size, (start, end), group, log_scale=1.0 / lo.vocab_shards)
