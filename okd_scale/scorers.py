"""How the losses read the models: one scorer per path, all with one interface.

A scorer turns the models' outputs at the counted positions (teacher zT or None, student zS, labels y) into

    LS = student.div_weight * sum D(pT || pS) + student.ce_weight * sum CE(zS, y)     (pT a constant)
    LT = online.ce_weight * sum CE(zT, y) + online.div_weight * sum D_T(pS || pT)     (pS a constant)

(sums over the counted tokens; LT only when an online loss is asked for) and a dict of detached sums named by
``divergences.TERMS`` (those the path computes). With an online module on the teacher's output side
(``models.OnlineModule.head_rows``), zT is formed from the teacher's final hidden states with the lm_head rows
the module gives, so LT's gradient reaches the module and never the teacher's blocks. The paths:

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
from .methods import method_of
from .divergences import (TERMS, DivergenceParams, Mix, ce_sum, chunked_divergence_from_hidden, distill_from_hidden,
                          divergence_sum, entropy_sum, interpolated_target)

log = logging.getLogger("okd_scale")


def divergence_params(cfg: RunConfig) -> DivergenceParams:
    """The divergences' settings of the run (loss.*)."""
    lo = cfg.loss
    return DivergenceParams(temperature=lo.temperature, beta=lo.js_beta, alpha=lo.skew_alpha, mu=lo.akl_mu)


def _mixed(terms: dict, student: Mix, online: Optional[Mix]) -> tuple:
    """(LS, LT, the detached sums) from differentiable term sums."""
    ls = student.div_weight * terms["kd"] + student.ce_weight * terms["ce"]
    lt = online.ce_weight * terms["ce_t"] + online.div_weight * terms["kd_t"] if online is not None else None
    return ls, lt, {k: v.detach().float() for k, v in terms.items()}


@dataclass
class _TeacherHead:
    """The teacher's lm_head rows [start, end) as the scorers read them: W read once (frozen), and, with an
    output-side online module, W as the module changes it, formed anew at each call."""

    rows: Optional[torch.Tensor]  # W[start:end], or None without a teacher
    model: object = None  # the teacher's module, when its online module changes the lm_head
    head_rows: object = None  # models.OnlineModule.head_rows
    start: int = 0
    end: int = 0

    def adapted(self, grad: bool) -> Optional[torch.Tensor]:
        if self.head_rows is None:
            return self.rows
        with torch.enable_grad() if grad else torch.no_grad():
            return self.head_rows(self.model, self.rows, self.start, self.end)


def _teacher_head(cfg: RunConfig, teacher, start: int, end: int) -> _TeacherHead:
    if teacher is None:
        return _TeacherHead(None)
    rows = models.frozen_head_rows(teacher.module, start, end)
    head_rows = models.ONLINE_MODULES[cfg.online.placement].head_rows if method_of(cfg).online else None
    return _TeacherHead(rows, teacher.module, head_rows, start, end)


@dataclass
class HiddenScorer:
    """Hidden states [N, H] scored with the lm_head rows: the student's live (a view of its parameter, so
    gradients reach it) and the teacher's from its _TeacherHead."""

    cfg: RunConfig
    student: object  # DeepSpeed engine
    teacher_head: _TeacherHead
    vocab_size: int
    hidden: bool = True
    log_scale: float = 1.0  # what each rank's logged sums are multiplied by

    def student_head(self) -> torch.Tensor:
        weight = self.student.module.get_output_embeddings().weight
        return weight if weight.shape[0] == self.vocab_size else weight[:self.vocab_size]  # no slice to backprop

    def losses(self, zt, zs, y, student: Mix, online: Optional[Mix] = None, *, timer=None) -> tuple:
        wt = self.teacher_head.adapted(grad=online is not None)
        ls, lt, terms = distill_from_hidden(zt, wt, zs, self.student_head(), y, student=student, online=online,
                                            chunk_size=self.cfg.loss.chunk_size, params=divergence_params(self.cfg))
        return ls, lt, dict(zip(TERMS, terms))

    def drift(self, zt0, zt) -> torch.Tensor:
        """Sum over the rows of KL(original teacher || adapted teacher), from their hidden states."""
        with torch.no_grad():
            return chunked_divergence_from_hidden("fkl", zt0, self.teacher_head.rows, zt,
                                                  self.teacher_head.adapted(grad=False),
                                                  chunk_size=self.cfg.loss.chunk_size).float()


@dataclass
class LogitsScorer:
    """Logits [N, V] at the counted positions."""

    cfg: RunConfig
    hidden: bool = False
    log_scale: float = 1.0

    def losses(self, zt, zs, y, student: Mix, online: Optional[Mix] = None, *, timer=None) -> tuple:
        params, chunk = divergence_params(self.cfg), self.cfg.loss.chunk_size
        kw = dict(params=params, chunk_size=chunk)
        zero = zs.new_zeros((), dtype=torch.float32)
        terms = dict.fromkeys(TERMS, zero)
        terms["ce"] = ce_sum(zs, y, chunk_size=chunk)
        if zt is not None:
            target = interpolated_target(zt.detach(), zs, student.target_t)
            terms["kd"] = divergence_sum(student.name, target, zs, **kw)
            if online is not None:
                p, q = (zt, zs.detach()) if online.joint else (zs.detach(), zt)
                terms["kd_t"] = divergence_sum(online.name, p, q, **kw)
                terms["ce_t"] = ce_sum(zt, y, chunk_size=chunk)
            terms["entropy_t"] = entropy_sum(target.detach(), temperature=params.temperature, chunk_size=chunk)
            terms["top1_t"] = (zt.detach().argmax(-1) == y).sum().float()
        terms["entropy_s"] = entropy_sum(zs.detach(), temperature=params.temperature, chunk_size=chunk)
        return _mixed(terms, student, online)

    def drift(self, zt0, zt) -> torch.Tensor:
        with torch.no_grad():
            return divergence_sum("fkl", zt0, zt, chunk_size=self.cfg.loss.chunk_size).float()


@dataclass
class ShardedScorer:
    """Hidden states scored on this rank's slice of the vocabulary, over the rows of its whole group."""

    cfg: RunConfig
    student: object
    teacher_head: _TeacherHead
    vocab_size: int
    vocab_slice: tuple[int, int]
    group: object
    hidden: bool = True
    log_scale: float = 1.0  # 1 / W: a group's sums are the group's, so each rank reports its share

    def losses(self, zt, zs, y, student: Mix, online: Optional[Mix] = None, *, timer=None) -> tuple:
        from contextlib import nullcontext

        params, chunk, vocab, group = divergence_params(self.cfg), self.cfg.loss.chunk_size, self.vocab_size, self.group
        start, end = self.vocab_slice
        s_head = self.student.module.get_output_embeddings().weight[start:end]
        t_head = self.teacher_head.adapted(grad=online is not None)
        with timer.phase("comm") if timer is not None else nullcontext():
            rows = (zs, y) if zt is None else (zs, y, zt)
            zs, y, *rest = sharded.gather_rows(*rows, group=group, pad_values=(0, IGNORE_INDEX, 0))
        zt = rest[0] if rest else None
        if student.target_t != 1:
            raise ValueError("the vocab-sharded scorer has no interpolated (TAID) target")
        zero = zs.new_zeros((), dtype=torch.float32)
        terms = {"kd": zero, "kd_t": zero, "ce_t": zero}
        common = dict(vocab_size=vocab, group=group, params=params, chunk_size=chunk)
        if zt is None:
            terms["ce"] = sharded.sharded_ce_from_hidden(zs, s_head, y, vocab_size=vocab, group=group,
                                                         chunk_size=chunk)
        else:
            terms["kd"], terms["ce"] = sharded.sharded_divergence_from_hidden(
                student.name, zt.detach(), t_head.detach(), zs, s_head, labels=y, ce_weight=1.0, split=True, **common)
        if online is not None and online.joint:
            terms["kd_t"] = sharded.sharded_divergence_from_hidden(online.name, zt, t_head, zs.detach(),
                                                                   s_head.detach(), **common)
            terms["ce_t"] = sharded.sharded_ce_from_hidden(zt, t_head, y, vocab_size=vocab, group=group,
                                                           chunk_size=chunk)
        elif online is not None:
            terms["kd_t"], terms["ce_t"] = sharded.sharded_divergence_from_hidden(
                online.name, zs.detach(), s_head.detach(), zt, t_head, labels=y, ce_weight=1.0, split=True, **common)
        keep = y != IGNORE_INDEX  # not the rows that pad the gathered ones
        stats = dict(vocab_size=vocab, group=group, temperature=params.temperature, chunk_size=chunk)
        if zt is not None:
            terms["entropy_t"], terms["top1_t"] = sharded.sharded_entropy_top1(zt.detach()[keep], t_head.detach(),
                                                                               y[keep], **stats)
        terms["entropy_s"], _ = sharded.sharded_entropy_top1(zs.detach()[keep], s_head.detach(), **stats)
        return _mixed(terms, student, online)

    def drift(self, zt0, zt) -> torch.Tensor:
        with torch.no_grad():  # the rows padding the gathered ones are zeros on both sides: KL 0
            zt0, zt = sharded.gather_rows(zt0, zt, group=self.group)
            return sharded.sharded_divergence_from_hidden(
                "fkl", zt0, self.teacher_head.rows, zt, self.teacher_head.adapted(grad=False),
                vocab_size=self.vocab_size, group=self.group, chunk_size=self.cfg.loss.chunk_size).float()


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
        return HiddenScorer(cfg, student, _teacher_head(cfg, teacher, 0, vocab_size), vocab_size)
    group, shard_rank = engines.vocab_shard_group(lo.vocab_shards, rank, world)
    start, end = sharded.vocab_range(vocab_size, shard_rank, lo.vocab_shards)
    return ShardedScorer(cfg, student, _teacher_head(cfg, teacher, start, end), vocab_size, (start, end), group,
                         log_scale=1.0 / lo.vocab_shards)
