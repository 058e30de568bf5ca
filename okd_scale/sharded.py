"""Vocab-sharded divergences and cross-entropy: exact, without any rank holding full-vocabulary logits.

Layout (tensor-parallel lm_head): the W ranks of ``group`` (default: the WORLD group) each hold the
logits of *the same tokens* over their own slice of the vocabulary, ``logits[..., start:end]`` with
``(start, end) = vocab_range(V, rank, W)``; slices may be uneven when W does not divide V. Masks and
labels are the same on every rank of the group.

Math (the Megatron-LM vocab-parallel cross-entropy idea, applied to every divergence of
:mod:`okd_scale.divergences`): per token, all-reduce the max logit (MAX) and the sum of
``exp((x - max) / T)`` (SUM) to get the global log-sum-exp, so each rank has the exact
``log softmax(x / T)`` on its own slice. A divergence of the registry ``divergences.DIVERGENCES`` is a sum
over the vocabulary of elementwise terms unless it declares its own sharded form, so each rank sums its
slice and one all-reduce gives the full value; a new divergence needs no edit here. The backward of log-softmax,
``dx_v = (g_v - p_v * sum_u g_u) / T``, needs only one more all-reduce of ``sum_u g_u`` per token:
values and gradients equal the dense computation (up to float summation order).

AKL (its sharded form is in the registry) needs a global sort of p to find the head (the smallest prefix of
p, sorted descending, reaching mu): it all-gathers the detached log p with :func:`all_gather_shards` (so a
[tokens, V] buffer per chunk exists on every rank, for the weights only); the gaps and both KL terms stay
sharded.

Autograd contract (as in tensor parallelism): the result is replicated; every rank calls backward on
it with the same upstream gradient, and the gradient a rank gets is the one for its own shard.
A replicated input that feeds every rank's shard (hidden states before a sharded lm_head) needs its
gradient summed over the group: :func:`sharded_divergence_from_hidden` does that; with
:func:`sharded_divergence_sum` it is the caller's job. Collectives run in forward and in backward,
so every rank must make the same calls with the same shapes (and the same ``requires_grad``).

With world size 1 (or no process group) every function is the dense one from
:mod:`okd_scale.divergences`, exactly.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from okd_scale.divergences import (
    DEFAULT_PARAMS,
    IGNORE_INDEX,
    DivergenceParams,
    ce_from_hidden,
    ce_sum,
    check_chunk_size,
    check_hidden_inputs,
    check_pair,
    chunked_divergence_from_hidden,
    counted_tokens,
    divergence,
    divergence_sum,
    row_sum,
    upcast,
)
from okd_scale.vocab_layout import (
    all_gather_into_tensor,
    all_gather_shards,
    my_range,
    rank_world,
    shard_logits,
    vocab_range,
)

__all__ = ["vocab_range", "shard_logits", "all_gather_shards", "copy_to_group", "sharded_divergence_sum",
           "sharded_ce_sum", "sharded_divergence_from_hidden", "sharded_ce_from_hidden", "gather_rows"]


# --------------------------------------------------------------------------- autograd pieces


def _row_max(x: Tensor) -> Tensor:
    """max over the last dim, -inf for an empty slice."""
    if x.shape[-1] == 0:
        return x.new_full(x.shape[:-1], float("-inf"))
    return x.amax(dim=-1)


class _VocabParallelLogSoftmax(torch.autograd.Function):
    """log softmax(x_i / T_i) over a vocabulary split across ``group``, for k shards [n, Vs] at once
    (one MAX and one SUM all-reduce of [n, k] forward, one SUM all-reduce of [n, k] backward).

    As ``divergences._log_probs``: computed in at least float32; the (detached, global) row max is
    subtracted before dividing by T so large finite logits cannot overflow.
    """

    @staticmethod
    def forward(ctx, temperatures: Sequence[float], group, *shards: Tensor):
        xs = [upcast(s) for s in shards]
        top = torch.stack([_row_max(x) for x in xs], dim=-1)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        outs = [x - top[:, i:i + 1] for i, x in enumerate(xs)]
        for o, t in zip(outs, temperatures):
            if t != 1:
                o.div_(t)
        sum_exp = torch.stack([o.exp().sum(dim=-1) for o in outs], dim=-1)
        dist.all_reduce(sum_exp, group=group)
        lse = sum_exp.log()
        for i, o in enumerate(outs):
            o.sub_(lse[:, i:i + 1])
        ctx.temperatures, ctx.group = tuple(temperatures), group
        ctx.dtypes = [s.dtype for s in shards]
        # only the outputs whose input needs a gradient are kept for backward (a frozen teacher's are not)
        ctx.save_for_backward(*[o if ctx.needs_input_grad[2 + i] else None for i, o in enumerate(outs)])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        outs = ctx.saved_tensors
        total = torch.stack([g.sum(dim=-1) for g in grads], dim=-1)
        dist.all_reduce(total, group=ctx.group)
        result = []
        for i, (g, logp, t, dtype) in enumerate(zip(grads, outs, ctx.temperatures, ctx.dtypes)):
            if not ctx.needs_input_grad[2 + i]:
                result.append(None)
                continue
            grad = logp.exp().mul_(-total[:, i:i + 1]).add_(g)  # g - p * sum(g), one [n, Vs] buffer
            if t != 1:
                grad.div_(t)
            result.append(grad.to(dtype))
        return (None, None, *result)


class _AllReduceSum(torch.autograd.Function):
    """Sum of a replicated-shape tensor over ``group``. Backward is the identity: every rank
    backpropagates the same replicated result, so d(sum)/d(own part) is the incoming gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group):
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _CopyToGroup(torch.autograd.Function):
    """Identity forward on replicated tensors; backward sums their gradients over ``group`` (each
    rank only sees the part of the gradient that flows through its own vocabulary slice)."""

    @staticmethod
    def forward(ctx, group, *xs: Tensor):
        ctx.group = group
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        result = []
        for i, g in enumerate(grads):
            if ctx.needs_input_grad[1 + i]:
                g = g.clone()
                dist.all_reduce(g, group=ctx.group)
                result.append(g)
            else:
                result.append(None)
        return (None, *result)


def copy_to_group(*tensors: Tensor, group=None) -> tuple[Tensor, ...]:
    """The identity on replicated tensors whose backward sums their gradients over ``group``: wrap
    the hidden states before ``hidden @ weight_shard.T`` so that they get the full gradient (each
    rank alone only sees the part flowing through its own vocabulary slice)."""
    if rank_world(group)[1] == 1:
        return tensors
    return _CopyToGroup.apply(group, *tensors)


# --------------------------------------------------------------------------- per-chunk sums (local part)


def _local_divergence(name: str, logp: Tensor, logq: Tensor, params: DivergenceParams, start: int,
                      vocab_size: int, group) -> Tensor:
    """This rank's part of sum_tokens D(p || q) from its slices of log p and log q."""
    div = divergence(name)
    if div.sharded is not None:
        return div.sharded(logp, logq, params, start, vocab_size, group)
    return div.per_token(logp, logq, params).sum()


def _local_ce(logp: Tensor, labels: Tensor, start: int) -> Tensor:
    """This rank's part of sum_tokens -log p[label]: the labels inside its slice."""
    width = logp.shape[-1]
    if width == 0:
        return logp.sum()  # 0, but keeps this rank in the graph (its backward all-reduce must run)
    local = labels - start
    own = (local >= 0) & (local < width)
    picked = logp.gather(-1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
    return -torch.where(own, picked, torch.zeros_like(picked)).sum()


def _check_labels(labels: Tensor, counted: Optional[Tensor], vocab_size: int) -> None:
    lab = labels.reshape(-1)
    if counted is not None:
        lab = lab[counted]
    if lab.numel() and (lab.min() < 0 or lab.max() >= vocab_size):
        raise ValueError(f"labels must be in [0, {vocab_size}) or {IGNORE_INDEX}, got values in "
                         f"[{int(lab.min())}, {int(lab.max())}]")


# --------------------------------------------------------------------------- public sums


def sharded_divergence_sum(name: str, p_shard: Tensor, q_shard: Tensor, mask: Optional[Tensor] = None, *,
                           vocab_size: int, group=None, params: DivergenceParams = DEFAULT_PARAMS,
                           chunk_size: Optional[int] = None) -> Tensor:
    """``divergences.divergence_sum`` over the full vocabulary, from this rank's slices [..., end-start]
    of the p and q logits: sum over counted tokens (mask nonzero; all when None) of D(p || q), the
    same scalar on every rank. Gradients reach both shards (unless detached).

    ``chunk_size``: as in ``divergence_sum``, that many counted tokens at a time, recomputed in
    backward (so only one chunk's [chunk, end-start] float32 intermediates are alive).
    """
    divergence(name)
    check_chunk_size(chunk_size)
    check_pair(p_shard, q_shard)
    start, _ = my_range(vocab_size, group, p_shard.shape[-1])
    if rank_world(group)[1] == 1:
        return divergence_sum(name, p_shard, q_shard, mask, params=params, chunk_size=chunk_size)
    counted = counted_tokens(p_shard.shape[:-1], mask)
    temperature = params.temperature

    def fn(p_rows: Tensor, q_rows: Tensor) -> Tensor:
        logp, logq = _VocabParallelLogSoftmax.apply((temperature, temperature), group, p_rows, q_rows)
        local = _local_divergence(name, logp, logq, params, start, vocab_size, group)
        return _AllReduceSum.apply(local, group)

    width = p_shard.shape[-1]
    return row_sum(fn, [p_shard.reshape(-1, width), q_shard.reshape(-1, width)], [], counted, chunk_size)


def sharded_ce_sum(logits_shard: Tensor, labels: Tensor, mask: Optional[Tensor] = None, *, vocab_size: int,
                   group=None, chunk_size: Optional[int] = None) -> Tensor:
    """``divergences.ce_sum`` from this rank's logits slice: sum over counted tokens (mask nonzero and
    label != -100) of -log softmax(logits)[label]; ``labels`` are global vocabulary ids (the rank
    owning a label contributes its log-probability; one all-reduce sums them)."""
    check_chunk_size(chunk_size)
    start, _ = my_range(vocab_size, group, logits_shard.shape[-1])
    if rank_world(group)[1] == 1:
        return ce_sum(logits_shard, labels, mask, chunk_size=chunk_size)
    counted = counted_tokens(logits_shard.shape[:-1], mask, labels)
    _check_labels(labels, counted, vocab_size)

    def fn(rows: Tensor, lab: Tensor) -> Tensor:
        (logp,) = _VocabParallelLogSoftmax.apply((1.0,), group, rows)
        return _AllReduceSum.apply(_local_ce(logp, lab, start), group)

    width = logits_shard.shape[-1]
    return row_sum(fn, [logits_shard.reshape(-1, width), labels.reshape(-1)], [], counted, chunk_size)


def sharded_divergence_from_hidden(name: str, p_hidden: Tensor, p_weight_shard: Tensor, q_hidden: Tensor,
                                   q_weight_shard: Tensor, mask: Optional[Tensor] = None, *, vocab_size: int,
                                   group=None, chunk_size: Optional[int] = 1024,
                                   params: DivergenceParams = DEFAULT_PARAMS, labels: Optional[Tensor] = None,
                                   ce_weight: float = 0.0, div_weight: float = 1.0, split: bool = False) -> Tensor:
    """``divergences.chunked_divergence_from_hidden`` with a vocab-sharded lm_head: the hidden states
    [..., H] are replicated, each rank holds rows [start, end) of each lm_head weight ([end-start, H]).

    Each chunk of tokens forms only its [chunk, end-start] logits slices (again in backward), so per
    rank the float32 intermediates are about 1/W of the unsharded chunked ones. The gradients of the
    hidden states are summed over the group (every rank gets the full, replicated gradient); each
    weight shard gets its own gradient. With world size 1 this is ``chunked_divergence_from_hidden``.
    """
    divergence(name)
    check_chunk_size(chunk_size)
    start, _ = my_range(vocab_size, group, p_weight_shard.shape[0])
    if q_weight_shard.shape[0] != p_weight_shard.shape[0]:
        raise ValueError(f"weight shards differ in rows: p {p_weight_shard.shape[0]}, q {q_weight_shard.shape[0]}")
    if rank_world(group)[1] == 1:
        return chunked_divergence_from_hidden(name, p_hidden, p_weight_shard, q_hidden, q_weight_shard, mask,
                                              chunk_size=chunk_size, params=params, labels=labels,
                                              ce_weight=ce_weight, div_weight=div_weight, split=split)
    check_hidden_inputs(p_hidden, p_weight_shard, q_hidden, q_weight_shard, labels, ce_weight,
                         weight_name="weight_shard", rows="end - start")
    use_ce = ce_weight != 0
    tokens = p_hidden.shape[:-1]
    counted = counted_tokens(tokens, mask, labels)
    if use_ce:
        _check_labels(labels, counted, vocab_size)
    if chunk_size is None:
        chunk_size = max(tokens.numel(), 1)
    rows = [p_hidden.reshape(-1, p_hidden.shape[-1]), q_hidden.reshape(-1, q_hidden.shape[-1])]
    if use_ce:
        rows.append(labels.reshape(-1))

    def fn(p_h: Tensor, q_h: Tensor, *rest: Tensor) -> Tensor:
        p_w, q_w = rest[-2:]
        p_h, q_h = copy_to_group(p_h, q_h, group=group)
        q_logits = q_h @ q_w.t()
        shards, temps = [p_h @ p_w.t(), q_logits], [params.temperature, params.temperature]
        if use_ce:  # CE uses the untempered q logits: one more slice through the same collectives
            shards.append(q_logits)
            temps.append(1.0)
        logs = _VocabParallelLogSoftmax.apply(tuple(temps), group, *shards)
        del shards, q_logits  # the logits slices are not needed past the log-softmax
        div = div_weight * _local_divergence(name, logs[0], logs[1], params, start, vocab_size, group)
        ce = ce_weight * _local_ce(logs[2], rest[0], start) if use_ce else div.new_zeros(())
        return _AllReduceSum.apply(torch.stack([div, ce]) if split else div + ce, group)

    return row_sum(fn, rows, [p_weight_shard, q_weight_shard], counted, chunk_size)


def sharded_ce_from_hidden(hidden: Tensor, weight_shard: Tensor, labels: Tensor, mask: Optional[Tensor] = None, *,
                           vocab_size: int, group=None, chunk_size: Optional[int] = 1024) -> Tensor:
    """``divergences.ce_from_hidden`` with a vocab-sharded lm_head (layout and gradients as in
    :func:`sharded_divergence_from_hidden`)."""
    check_chunk_size(chunk_size)
    start, _ = my_range(vocab_size, group, weight_shard.shape[0])
    if rank_world(group)[1] == 1:
        return ce_from_hidden(hidden, weight_shard, labels, mask, chunk_size=chunk_size)
    if weight_shard.dim() != 2 or hidden.shape[-1] != weight_shard.shape[1]:
        raise ValueError(f"hidden [..., {hidden.shape[-1]}] does not match weight_shard "
                         f"{tuple(weight_shard.shape)} (expected [end - start, {hidden.shape[-1]}])")
    counted = counted_tokens(hidden.shape[:-1], mask, labels)
    _check_labels(labels, counted, vocab_size)

    def fn(h: Tensor, lab: Tensor, w: Tensor) -> Tensor:
        (h,) = copy_to_group(h, group=group)
        (logp,) = _VocabParallelLogSoftmax.apply((1.0,), group, h @ w.t())
        return _AllReduceSum.apply(_local_ce(logp, lab, start), group)

    return row_sum(fn, [hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)], [weight_shard], counted,
                    chunk_size)


def sharded_entropy_top1(hidden: Tensor, weight_shard: Tensor, labels: Optional[Tensor] = None, *, vocab_size: int,
                         group=None, temperature: float = 1.0, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Over the rows of [N, H] hidden states (every row counted, the same rows on every rank of the group) with a
    vocab-sharded lm_head: (sum of H(softmax(z / temperature)), the rows whose label is a top-1 logit; 0 without
    labels), z = hidden @ W.T. No gradient; the sums are the group's, on every rank."""
    start, _ = my_range(vocab_size, group, weight_shard.shape[0])
    _, world = rank_world(group)
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    ent, hits = hidden.new_zeros((), dtype=dtype), hidden.new_zeros((), dtype=dtype)
    with torch.no_grad():
        for i in range(0, hidden.shape[0], chunk_size):
            z = (hidden[i:i + chunk_size] @ weight_shard.t()).to(dtype)
            zt = z / temperature
            peak = _row_max(zt)  # the max of a row's shard, then of the row
            if world > 1:
                dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
            e = torch.exp(zt - peak[:, None])
            stats = torch.stack([e.sum(-1), (e * zt).sum(-1)])
            if world > 1:
                dist.all_reduce(stats, group=group)
            lse = peak + stats[0].log()
            ent += (lse - stats[1] / stats[0]).sum()
            if labels is not None:
                y = labels[i:i + chunk_size] - start
                mine = (y >= 0) & (y < z.shape[-1])
                label_logit = torch.where(mine, z.gather(-1, y.clamp(0, z.shape[-1] - 1)[:, None]).squeeze(-1),
                                          -math.inf)
                top = torch.stack([_row_max(z), label_logit])
                if world > 1:
                    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
                hits += (top[1] >= top[0]).sum()
    return ent, hits


# --------------------------------------------------------------------------- data-parallel rows


class _GatherRows(torch.autograd.Function):
    """[W * n_max, ...] from each rank's [n, ...] rows (padded to n_max); backward keeps this rank's
    rows of the incoming gradient, which the vocab-sharded sums have already summed over the group."""

    @staticmethod
    def forward(ctx, x: Tensor, group, n_max: int, pad_value: float):
        rank, world = rank_world(group)
        padded = x.new_full((n_max, *x.shape[1:]), pad_value)
        padded[:x.shape[0]] = x
        out = x.new_empty(world * n_max, *x.shape[1:])
        all_gather_into_tensor(out, padded, group=group)
        ctx.rows = (rank * n_max, rank * n_max + x.shape[0])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        start, end = ctx.rows
        return grad[start:end], None, None, None


def gather_rows(*tensors: Tensor, group=None, pad_values: Sequence[float] = ()) -> tuple[Tensor, ...]:
    """Data-parallel tokens onto a vocab-sharded group: each rank's [n_r, ...] rows (hidden states,
    labels; n_r may differ) become the group's [W * max n_r, ...] rows on every rank, in one
    ``all_gather_into_tensor`` per tensor into a preallocated buffer; padding rows get
    ``pad_values[i]`` (default 0; give labels ``IGNORE_INDEX`` so the padding is not counted).

    Gradients: the backward returns this rank's rows of the incoming gradient, which is exact when the
    consumer sums hidden-state gradients over the group (:func:`sharded_divergence_from_hidden` and
    :func:`sharded_ce_from_hidden` do). With world size 1 the tensors are returned as they are.
    """
    if rank_world(group)[1] == 1:
        return tensors
    counts = torch.tensor([t.shape[0] for t in tensors], device=tensors[0].device)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=group)
    pads = list(pad_values) + [0] * (len(tensors) - len(pad_values))
    return tuple(_GatherRows.apply(t, group, int(n), pad) for t, n, pad in zip(tensors, counts.tolist(), pads))
