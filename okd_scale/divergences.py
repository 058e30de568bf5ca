"""Token-level divergences between two next-token distributions, and cross-entropy.

Notation: ``p`` is the *target* distribution (first argument) and ``q`` the second one. For the
student loss the caller passes p = teacher, q = student; for the teacher's online loss it passes
p = student (detached), q = teacher. Both arguments are differentiable: gradients reach whichever
one the caller did not detach.

Logits have shape ``[..., V]``; the distributions are ``softmax(logits / temperature)``, computed
in float32 (or float64 for float64 inputs) whatever the input dtype, one chunk of tokens at a time.
The temperature divides both logits; there is no ``temperature ** 2`` rescaling of the result
(the caller scales the loss if it wants the classic Hinton factor).

Numerics: everything works on log-probabilities (``log_softmax``); terms ``p log p`` with
``p == 0`` count as 0 and have zero gradient, also for ``-inf`` logits (padded vocabulary entries)
and for very large logits. Mixtures ``log(w p + (1 - w) q)`` are computed with ``logaddexp``.

Memory: with ``chunk_size`` set, tokens are processed ``chunk_size`` (counted) tokens at a time by
one autograd function that keeps only its inputs for backward and recomputes each chunk there, so
at most one chunk's float32 ``[chunk, V]`` intermediates are alive, in forward and in backward.
:func:`chunked_divergence_from_hidden` goes one step further and never forms more than one
chunk of logits from the hidden states and lm_head weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .vocab_layout import all_gather_shards

IGNORE_INDEX = -100

Number = Union[float, int, Tensor]


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class DivergenceParams:
    """The divergences' settings (loss.temperature, loss.js_beta, loss.skew_alpha, loss.akl_mu): the softmax
    temperature of p and q, and each divergence's own parameter; checked when made."""

    temperature: float = 1.0
    beta: float = 0.5  # js: the weight of p in the mixture
    alpha: float = 0.1  # skl, srkl: the skew
    mu: float = 0.5  # akl: the head's probability mass

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.beta < 1:
            raise ValueError(f"beta must be in (0, 1), got {self.beta!r}")
        if not 0 <= self.alpha < 1:
            raise ValueError(f"alpha must be in [0, 1), got {self.alpha!r}")
        if not 0 < self.mu <= 1:
            raise ValueError(f"mu must be in (0, 1], got {self.mu!r}")


DEFAULT_PARAMS = DivergenceParams()


def check_chunk_size(chunk_size: Optional[int]) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def check_pair(p_logits: Tensor, q_logits: Tensor) -> None:
    if p_logits.shape[-1] != q_logits.shape[-1]:
        raise ValueError(f"vocab sizes differ: p has {p_logits.shape[-1]}, q has {q_logits.shape[-1]}")
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"logit shapes differ: p {tuple(p_logits.shape)} vs q {tuple(q_logits.shape)}")


def counted_tokens(token_shape: torch.Size, mask: Optional[Tensor], labels: Optional[Tensor] = None,
             device=None) -> Optional[Tensor]:
    """Flat bool [N] of counted tokens (None = all): mask != 0 and, with labels, labels != -100."""
    counted = None
    if mask is not None:
        if mask.shape != token_shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match token shape {tuple(token_shape)}")
        counted = mask.reshape(-1) != 0
    if labels is not None:
        if labels.shape != token_shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match token shape {tuple(token_shape)}")
        valid = labels.reshape(-1) != IGNORE_INDEX
        counted = valid if counted is None else counted & valid
    return counted


# --------------------------------------------------------------------------- per-token math


def upcast(x: Tensor) -> Tensor:
    """float32 for half types, unchanged for float32/float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / temperature) in at least float32.

    The (detached) row max is subtracted before dividing by the temperature so that finite logits
    near the float32 limit cannot overflow to inf; softmax is shift-invariant, so values and
    gradients are unchanged.
    """
    x = upcast(logits)
    if temperature != 1:
        top = x.detach().amax(dim=-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        x = (x - top) / temperature
    return torch.log_softmax(x, dim=-1)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_i a_i (log a_i - log b_i), with 0 log 0 = 0 (value and gradient)."""
    a = log_a.exp()
    live = a > 0
    # The inner where keeps (-inf) - (-inf) = nan out of the graph where a == 0.
    diff = torch.where(live, log_a - log_b, torch.zeros_like(log_a))
    return (a * diff).sum(dim=-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w a + (1 - w) b), stably; entries where a == b == 0 are left finite (they never count)."""
    if w == 1:
        return log_a
    if w == 0:
        return log_b
    x = log_a + math.log(w)
    y = log_b + math.log1p(-w)
    dead = torch.isneginf(x) & torch.isneginf(y)
    zero = torch.zeros_like(x)
    return torch.logaddexp(torch.where(dead, zero, x), torch.where(dead, zero, y))


def _fkl(logp: Tensor, logq: Tensor, params: DivergenceParams) -> Tensor:
    """Forward KL: FKL(p, q) = KL(p || q) = sum_v p_v log(p_v / q_v)."""
    return _kl(logp, logq)


def _rkl(logp: Tensor, logq: Tensor, params: DivergenceParams) -> Tensor:
    """Reverse KL: RKL(p, q) = KL(q || p) = sum_v q_v log(q_v / p_v)."""
    return _kl(logq, logp)


def _js(logp: Tensor, logq: Tensor, params: DivergenceParams) -> Tensor:
    """Generalised Jensen-Shannon: JS_beta = beta KL(p || m) + (1 - beta) KL(q || m),
    m = beta p + (1 - beta) q. Bounded by -beta log beta - (1 - beta) log(1 - beta) nats."""
    beta = params.beta
    logm = _log_mix(logp, logq, beta)
    return beta * _kl(logp, logm) + (1 - beta) * _kl(logq, logm)


def _tvd(logp: Tensor, logq: Tensor, params: DivergenceParams) -> Tensor:
    """Total variation distance: TVD = 1/2 sum_v |p_v - q_v|, in [0, 1]."""
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(dim=-1)


def _skl(logp: Tensor, logq: Tensor, params: DivergenceParams) -> Tensor:
    """Skew KL: SKL_alpha = KL(p || alpha p + (1 - alpha) q); alpha = 0 gives FKL."""
    return _kl(logp, _log_mix(logp, logq, params.alpha))


def _srkl(logp: Tensor, logq: Tensor, params: DivergenceParams) -> Tensor:
    """Skew reverse KL: SRKL_alpha = KL(q || (1 - alpha) p + alpha q); alpha = 0 gives RKL."""
    return _kl(logq, _log_mix(logp, logq, 1 - params.alpha))


def _akl_mix(w_head: Tensor, logp: Tensor, logq: Tensor) -> Tensor:
    return w_head * _kl(logp, logq) + (1 - w_head) * _kl(logq, logp)


def _akl_weight(g_head: Tensor, g_total: Tensor) -> Tensor:
    return torch.where(g_total > 0, g_head / torch.where(g_total > 0, g_total, 1.0), 0.5)


def _akl(logp: Tensor, logq: Tensor, params: DivergenceParams) -> Tensor:
    """Adaptive KL (Wu et al. 2024, arXiv 2404.02657):
    AKL = g_head / (g_head + g_tail) * FKL + g_tail / (g_head + g_tail) * RKL, where the vocabulary
    is sorted by p descending, the head is the smallest prefix whose cumulative p reaches mu, and
    g_head = sum_head |p - q|, g_tail = sum_tail |p - q|. When p == q (g_head + g_tail = 0) the
    result is 0.

    The mixing weights are constants for autograd (computed under no_grad): the authors' code
    computes the head/tail gaps from detached student probabilities and a teacher run without
    gradient, so no gradient flows through the weights; gradients are
    w_head * grad(FKL) + w_tail * grad(RKL). Ties in p are broken by vocabulary index (stable sort).
    Note: their code puts the token whose cumulative mass first exceeds mu in the tail (unless it
    is the top token); here it is in the head, per the paper's "smallest prefix reaching mu".
    """
    with torch.no_grad():
        p, q = logp.exp(), logq.exp()
        p_sorted, order = p.sort(dim=-1, descending=True, stable=True)
        gap = (p_sorted - q.gather(-1, order)).abs()
        cum = p_sorted.cumsum(dim=-1)
        mass_before = F.pad(cum[..., :-1], (1, 0))  # mass of all tokens ranked above this one
        head = mass_before < params.mu
        w_head = _akl_weight((gap * head).sum(dim=-1), gap.sum(dim=-1))
    return _akl_mix(w_head, logp, logq)


def _akl_sharded(logp: Tensor, logq: Tensor, params: DivergenceParams, start: int, vocab_size: int,
                 group) -> Tensor:
    """This rank's part of sum_tokens AKL from its vocabulary slices of log p and log q: the head/tail weights
    from a global stable sort of the all-gathered detached p (as ``_akl``), the gaps summed per slice and
    all-reduced."""
    import torch.distributed as dist

    with torch.no_grad():
        p_full = all_gather_shards(logp, vocab_size, group).exp_()
        p_sorted, order = p_full.sort(dim=-1, descending=True, stable=True)
        mass_before = F.pad(p_sorted.cumsum(dim=-1)[..., :-1], (1, 0))
        head_full = torch.zeros_like(p_full, dtype=torch.bool).scatter_(-1, order, mass_before < params.mu)
        del p_full, p_sorted, order, mass_before
        head = head_full[:, start:start + logp.shape[-1]]
        gap = (logp.exp() - logq.exp()).abs()
        gaps = torch.stack([(gap * head).sum(dim=-1), gap.sum(dim=-1)], dim=-1)
        dist.all_reduce(gaps, group=group)
        w_head = _akl_weight(*gaps.unbind(-1))
    return _akl_mix(w_head, logp, logq).sum()


@dataclass(frozen=True)
class Divergence:
    """A divergence D(p || q) per token, from log p and log q over the vocabulary (the last dim)."""

    per_token: Callable[[Tensor, Tensor, DivergenceParams], Tensor]
    # over the vocabulary split across ranks (log p, log q: this rank's slices, normalised over the whole
    # vocabulary): this rank's part of the sum over tokens (params, slice start, vocabulary size, group). None:
    # D is a sum over the vocabulary of terms of (p_v, q_v), so per_token on the slices, summed, is that part
    sharded: Optional[Callable[..., Tensor]] = None


# the divergences, by the name loss.divergence and online.divergence take
DIVERGENCES: dict[str, Divergence] = {
    "fkl": Divergence(_fkl),
    "rkl": Divergence(_rkl),
    "js": Divergence(_js),
    "tvd": Divergence(_tvd),
    "skl": Divergence(_skl),
    "srkl": Divergence(_srkl),
    "akl": Divergence(_akl, sharded=_akl_sharded),
}


def divergence(name: str) -> Divergence:
    """The registry's divergence `name`; ValueError naming the valid ones otherwise."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; valid names: {', '.join(DIVERGENCES)}")
    return DIVERGENCES[name]


def token_divergence(name: str, p_logits: Tensor, q_logits: Tensor, *,
                     params: DivergenceParams = DEFAULT_PARAMS) -> Tensor:
    """Per-token divergence D(p || q), shape ``[...]`` for logits ``[..., V]``.

    p = softmax(p_logits / temperature), q = softmax(q_logits / temperature), over the last dim.
      fkl:  sum p log(p / q)
      rkl:  sum q log(q / p)
      js:   beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
      tvd:  1/2 sum |p - q|
      skl:  KL(p || alpha p + (1 - alpha) q)
      srkl: KL(q || (1 - alpha) p + alpha q)
      akl:  w_head FKL + w_tail RKL with head/tail gap weights (see ``_akl``; weights are constants)
    with the temperature and parameters of ``params``. Result dtype: float32 (float64 for float64 inputs). No
    temperature**2 factor.
    """
    div = divergence(name)
    check_pair(p_logits, q_logits)
    logp = _log_probs(p_logits, params.temperature)
    logq = _log_probs(q_logits, params.temperature)
    return div.per_token(logp, logq, params)


# --------------------------------------------------------------------------- chunked sums


class _ChunkedSum(torch.autograd.Function):
    """sum over chunks c of fn(*[r[c] for r in rows], *shared), recomputing each chunk in backward.
    fn returns a scalar or a small vector of terms (summed elementwise over chunks).

    ``rows`` are [N, ...] tensors indexed by ``index`` (the counted rows), ``shared`` tensors (lm_head
    weights) are used whole by every chunk. Forward keeps no intermediates; backward recomputes
    one chunk at a time, writes the row gradients into place and accumulates shared gradients in
    float32. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, fn, index, chunk_size, num_rows, *tensors):
        rows, shared = tensors[:num_rows], tensors[num_rows:]
        total = None
        for start in range(0, index.numel(), chunk_size):
            sel = index[start:start + chunk_size]
            value = fn(*[r.index_select(0, sel) for r in rows], *shared)
            total = value if total is None else total + value
        if total is None:  # no counted rows: fn on empty rows gives zeros of the right shape
            total = fn(*[r[:0] for r in rows], *shared)
        ctx.fn, ctx.chunk_size, ctx.num_rows = fn, chunk_size, num_rows
        ctx.save_for_backward(index, *tensors)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        index, *tensors = ctx.saved_tensors
        _, grads = _chunk_pass(ctx.fn, index, ctx.chunk_size, tensors, ctx.num_rows, ctx.needs_input_grad[4:],
                               grad_out)
        return (None, None, None, None, *grads)


def _chunk_pass(fn, index: Tensor, chunk_size: int, tensors: Sequence[Tensor], num_rows: int,
                needs: Sequence[bool], grad_out: Tensor) -> tuple[Tensor, list[Optional[Tensor]]]:
    """(sum over chunks of fn's value, the gradients of <grad_out, that sum> with respect to the tensors that
    need one): ``tensors[:num_rows]`` are [N, ...] rows indexed by ``index``, the rest shared by every chunk.
    One chunk's graph is alive at a time; row gradients are written into place (zero for rows not in
    ``index``), shared ones accumulated in at least float32 and returned in their tensor's dtype."""
    grads: list[Optional[Tensor]] = [None] * len(tensors)
    for i, (t, need) in enumerate(zip(tensors[:num_rows], needs)):
        if need:
            grads[i] = torch.zeros_like(t)
    total = None
    for start in range(0, index.numel(), chunk_size):
        sel = index[start:start + chunk_size]
        with torch.enable_grad():
            inputs = [r.index_select(0, sel).detach().requires_grad_(need)
                      for r, need in zip(tensors[:num_rows], needs[:num_rows])]
            inputs += [w.detach().requires_grad_(need) for w, need in zip(tensors[num_rows:], needs[num_rows:])]
            wanted = [x for x, need in zip(inputs, needs) if need]
            value = fn(*inputs)
            got = iter(torch.autograd.grad(value, wanted, grad_out, allow_unused=True) if wanted else ())
        total = value.detach() if total is None else total + value.detach()
        for i, need in enumerate(needs):
            g = next(got) if need else None
            if g is None:
                continue
            if i < num_rows:
                grads[i].index_copy_(0, sel, g.to(grads[i].dtype))
            elif grads[i] is None:  # the first chunk's, in at least float32 (no zero-filled buffer to add it to)
                grads[i] = g.to(upcast(g).dtype)
            else:
                grads[i] += g
        got = g = value = inputs = wanted = None  # free this chunk's buffers before the next one
    for i in range(num_rows, len(tensors)):
        if needs[i] and grads[i] is None:  # no rows
            grads[i] = torch.zeros_like(tensors[i])
        elif grads[i] is not None:
            grads[i] = grads[i].to(tensors[i].dtype)
    return total, grads


def row_sum(fn: Callable[..., Tensor], rows: Sequence[Tensor], shared: Sequence[Tensor],
             counted: Optional[Tensor], chunk_size: Optional[int]) -> Tensor:
    """sum of fn over the counted rows of ``rows`` (flat [N, ...]); dense when chunk_size is None."""
    if chunk_size is None:
        if counted is not None:
            index = counted.nonzero().squeeze(1)
            rows = [r.index_select(0, index) for r in rows]
        return fn(*rows, *shared)
    n = rows[0].shape[0]
    index = torch.arange(n, device=rows[0].device) if counted is None else counted.nonzero().squeeze(1)
    return _ChunkedSum.apply(fn, index, chunk_size, len(rows), *rows, *shared)


def _num_counted(counted: Optional[Tensor], total: int) -> Tensor:
    if counted is None:
        return torch.tensor(float(total))
    return counted.sum()


def _divide(value: Tensor, num_tokens: Number) -> Tensor:
    if isinstance(num_tokens, Tensor):
        return value / num_tokens.to(device=value.device, dtype=value.dtype).clamp_min(1)
    return value / max(float(num_tokens), 1.0)


def divergence_sum(name: str, p_logits: Tensor, q_logits: Tensor, mask: Optional[Tensor] = None, *,
                   params: DivergenceParams = DEFAULT_PARAMS, chunk_size: Optional[int] = None) -> Tensor:
    """Sum of the per-token divergence (see :func:`token_divergence`) over tokens where ``mask`` is
    nonzero (all tokens when mask is None); a scalar.

    ``chunk_size``: process that many counted tokens at a time, recomputing each chunk in backward,
    so only one chunk's float32 [chunk, V] intermediates are alive. Same values and gradients as
    ``chunk_size=None`` (up to float summation order).
    """
    div = divergence(name)
    check_chunk_size(chunk_size)
    check_pair(p_logits, q_logits)
    vocab = p_logits.shape[-1]
    counted = counted_tokens(p_logits.shape[:-1], mask)

    def fn(p_rows: Tensor, q_rows: Tensor) -> Tensor:
        logp = _log_probs(p_rows, params.temperature)
        logq = _log_probs(q_rows, params.temperature)
        return div.per_token(logp, logq, params).sum()

    return row_sum(fn, [p_logits.reshape(-1, vocab), q_logits.reshape(-1, vocab)], [], counted, chunk_size)


def divergence_loss(name: str, p_logits: Tensor, q_logits: Tensor, mask: Optional[Tensor] = None, *,
                    num_tokens: Optional[Number] = None, **kw) -> Tensor:
    """divergence_sum(...) / num_tokens. ``num_tokens`` (float or 0-dim tensor, e.g. a global count)
    defaults to the number of counted tokens; a count below 1 is treated as 1 (empty mask -> 0)."""
    total = divergence_sum(name, p_logits, q_logits, mask, **kw)
    if num_tokens is None:
        num_tokens = _num_counted(counted_tokens(p_logits.shape[:-1], mask), p_logits.shape[:-1].numel())
    return _divide(total, num_tokens)


def _ce_rows(logits: Tensor, labels: Tensor) -> Tensor:
    """sum_tokens -log softmax(logits)[label], in at least float32."""
    return F.cross_entropy(upcast(logits), labels, reduction="sum")


def ce_sum(logits: Tensor, labels: Tensor, mask: Optional[Tensor] = None, *,
           chunk_size: Optional[int] = None) -> Tensor:
    """Sum over counted tokens of -log softmax(logits)[label] (no temperature).

    ``labels`` [...] int64, aligned with ``logits`` [..., V] (shift them before calling). Counted:
    mask nonzero (all if None) and label != -100. ``chunk_size`` as in :func:`divergence_sum`.
    """
    check_chunk_size(chunk_size)
    vocab = logits.shape[-1]
    counted = counted_tokens(logits.shape[:-1], mask, labels)
    return row_sum(_ce_rows, [logits.reshape(-1, vocab), labels.reshape(-1)], [], counted, chunk_size)


def ce_loss(logits: Tensor, labels: Tensor, mask: Optional[Tensor] = None, *,
            num_tokens: Optional[Number] = None, chunk_size: Optional[int] = None) -> Tensor:
    """ce_sum(...) / num_tokens; ``num_tokens`` defaults to the number of counted tokens (min 1)."""
    total = ce_sum(logits, labels, mask, chunk_size=chunk_size)
    if num_tokens is None:
        num_tokens = _num_counted(counted_tokens(logits.shape[:-1], mask, labels), logits.shape[:-1].numel())
    return _divide(total, num_tokens)


# --------------------------------------------------------------------------- from hidden states


def check_hidden_inputs(p_hidden, p_weight, q_hidden, q_weight, labels, ce_weight, *,
                         weight_name: str = "weight", rows: str = "V") -> None:
    """Hidden states [..., H] against lm_head weights [rows, H], equal token shapes, labels when CE is asked."""
    for side, hidden, weight in (("p", p_hidden, p_weight), ("q", q_hidden, q_weight)):
        if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
            raise ValueError(f"{side}_hidden [..., {hidden.shape[-1]}] does not match {side}_{weight_name} "
                             f"{tuple(weight.shape)} (expected [{rows}, {hidden.shape[-1]}])")
    if p_hidden.shape[:-1] != q_hidden.shape[:-1]:
        raise ValueError(f"token shapes differ: p_hidden {tuple(p_hidden.shape[:-1])} vs "
                         f"q_hidden {tuple(q_hidden.shape[:-1])}")
    if ce_weight != 0 and labels is None:
        raise ValueError("ce_weight != 0 needs labels")


def chunked_divergence_from_hidden(name: str, p_hidden: Tensor, p_weight: Tensor, q_hidden: Tensor,
                                   q_weight: Tensor, mask: Optional[Tensor] = None, *,
                                   chunk_size: Optional[int] = 1024, params: DivergenceParams = DEFAULT_PARAMS,
                                   labels: Optional[Tensor] = None, ce_weight: float = 0.0,
                                   div_weight: float = 1.0, split: bool = False) -> Tensor:
    """Sum over counted tokens of div_weight * D(p || q) + ce_weight * CE(q_logits, labels), where
    p_logits = p_hidden @ p_weight.T and q_logits = q_hidden @ q_weight.T ([..., H] hidden states,
    [V, H] lm_head weights; the two V must be equal). ``split=True`` returns the two terms as a [2]
    vector (div_weight * sum D, ce_weight * sum CE) instead of their sum, so a caller can log both and
    weight them in one pass.

    Logits are formed one chunk of ``chunk_size`` counted tokens at a time, in forward and again in
    backward (None = one chunk). Gradients reach all four tensors when they require grad. Counted
    tokens: mask nonzero (all if None) and, when labels are given, label != -100. The temperature
    applies to D only; CE uses the untempered q logits. Logits are formed in the inputs' dtype (as
    the lm_head would) and upcast to float32 per chunk.
    """
    div = divergence(name)
    check_chunk_size(chunk_size)
    if p_weight.shape[0] != q_weight.shape[0]:
        raise ValueError(f"vocab sizes differ: p_weight has V={p_weight.shape[0]}, q_weight has "
                         f"V={q_weight.shape[0]}; align the vocabularies before calling")
    check_hidden_inputs(p_hidden, p_weight, q_hidden, q_weight, labels, ce_weight)
    tokens = p_hidden.shape[:-1]
    counted = counted_tokens(tokens, mask, labels)
    if chunk_size is None:
        chunk_size = max(tokens.numel(), 1)
    rows = [p_hidden.reshape(-1, p_hidden.shape[-1]), q_hidden.reshape(-1, q_hidden.shape[-1])]
    use_ce = ce_weight != 0
    if use_ce:
        rows.append(labels.reshape(-1))

    def fn(p_h: Tensor, q_h: Tensor, *rest: Tensor) -> Tensor:
        lab = rest[0] if use_ce else None
        p_w, q_w = rest[-2:]
        q_logits = q_h @ q_w.t()
        logp = _log_probs(p_h @ p_w.t(), params.temperature)
        logq = _log_probs(q_logits, params.temperature)
        d = div_weight * div.per_token(logp, logq, params).sum()
        ce = ce_weight * _ce_rows(q_logits, lab) if use_ce else d.new_zeros(())
        return torch.stack([d, ce]) if split else d + ce

    return row_sum(fn, rows, [p_weight, q_weight], counted, chunk_size)


@dataclass(frozen=True)
class Mix:
    """A loss as weights on two terms: div_weight * sum D + ce_weight * sum CE, D the divergence ``name``.
    For the student's loss, ``target_t`` < 1 makes D's target p_t = softmax((1 - t) sg[zS] + t zT) (TAID).
    For the online loss, D is D(sg[pS] || pT), or with ``joint`` D(pT || sg[pS]) (the student's own divergence,
    its gradient taken with respect to the teacher)."""

    name: str
    div_weight: float
    ce_weight: float
    target_t: float = 1.0
    joint: bool = False


# the detached sums the losses report, in this order: D, CE_S, D_T, CE_T, then the teacher's (D's target's)
# and the student's entropies and the teacher's top-1 hits on the labels (zeros without a teacher)
TERMS: tuple[str, ...] = ("kd", "ce", "kd_t", "ce_t", "entropy_t", "entropy_s", "top1_t")


def online_divergence(online: Mix, logp: Tensor, logq: Tensor, params: DivergenceParams) -> Tensor:
    """The online loss's per-token divergence from teacher (logp, differentiable) and student (logq) log-probs."""
    per_token = divergence(online.name).per_token
    if online.joint:
        return per_token(logp, logq.detach(), params)
    return per_token(logq.detach(), logp, params)


def entropy(logp: Tensor) -> Tensor:
    """Per-token entropy H(p) = -sum p log p of log-probabilities [..., V] (0 log 0 = 0)."""
    return -torch.where(logp > -math.inf, logp.exp() * logp, 0).sum(-1)


def entropy_sum(logits: Tensor, *, temperature: float = 1.0, chunk_size: int = 1024) -> Tensor:
    """Sum over the rows of [N, V] logits of H(softmax(logits / temperature)), ``chunk_size`` rows at a time;
    no gradient."""
    with torch.no_grad():
        return sum((entropy(_log_probs(c, temperature)).sum() for c in logits.split(chunk_size)),
                   logits.new_zeros((), dtype=upcast(logits).dtype))


def interpolated_target(zt: Tensor, zs: Tensor, t: float) -> Tensor:
    """TAID's target logits (1 - t) sg[zs] + t zt, in float32 at least; zt itself (bitwise) when t = 1."""
    if t == 1:
        return zt
    return (1 - t) * upcast(zs.detach()) + t * upcast(zt)


class _KnownGrad(torch.autograd.Function):
    """A detached scalar ``value`` whose gradients with respect to ``inputs`` (``grads``, None where an input
    needs none) were computed with it; backward scales them by the incoming gradient, once."""

    @staticmethod
    def forward(ctx, value, grads, *inputs):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):
        grads, ctx.grads = ctx.grads, None  # freed as soon as they are handed on
        return (None, None, *[None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads])


def _log_probs_and_ce(z: Tensor, y: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(log softmax(z / temperature), sum of CE(z, y) untempered)."""
    logz = _log_probs(z, temperature)
    return logz, (F.nll_loss(logz, y, reduction="sum") if temperature == 1 else _ce_rows(z, y))


def _check_distill_inputs(t_hidden, t_weight, s_hidden, s_weight, labels, student: Mix, online: Optional[Mix],
                          chunk_size) -> None:
    """distill_from_hidden's arguments: shapes, vocabularies and which losses are defined."""
    if online is not None:
        divergence(online.name)
        if t_hidden is None:
            raise ValueError("an online loss needs the teacher's hidden states")
        if student.target_t != 1:
            raise ValueError("an online loss with an interpolated target (student.target_t < 1) is not defined")
    check_chunk_size(chunk_size)
    if t_hidden is not None:
        check_hidden_inputs(t_hidden, t_weight, s_hidden, s_weight, labels, 1.0)
        if t_weight.shape[0] != s_weight.shape[0]:
            raise ValueError(f"vocab sizes differ: t_weight has V={t_weight.shape[0]}, s_weight has "
                             f"V={s_weight.shape[0]}; align the vocabularies before calling")
    if labels.shape != s_hidden.shape[:-1] or s_hidden.dim() != 2:
        raise ValueError(f"expected s_hidden [N, H] and labels [N], got {tuple(s_hidden.shape)} and "
                         f"{tuple(labels.shape)}")


def distill_from_hidden(t_hidden: Optional[Tensor], t_weight: Optional[Tensor], s_hidden: Tensor, s_weight: Tensor,
                        labels: Tensor, *, student: Mix, online: Optional[Mix] = None, chunk_size: int = 1024,
                        params: DivergenceParams = DEFAULT_PARAMS) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """The student's and the online module's losses over the rows of [N, H] hidden states, every row counted:

        LS = student.div_weight * sum D(pT || pS) + student.ce_weight * sum CE(zS, y)     (pT a constant)
        LT = online.ce_weight * sum CE(zT, y) + online.div_weight * sum D_T(pS || pT)     (pS a constant)

    with zT = t_hidden @ t_weight.T, zS = s_hidden @ s_weight.T ([V, H] lm_head rows), D = student.name,
    D_T = online.name (with online.joint, D_T(pT || pS), pS a constant), the temperature on D and D_T only;
    with student.target_t = t < 1, LS's pT is TAID's p_t = softmax((1 - t) sg[zS] + t zT) (no online loss then).
    Returns (LS, LT or None without ``online``, the detached sums named by TERMS); without a teacher (t_hidden
    None) LS is its CE term alone.

    LS's gradient reaches s_hidden and s_weight, LT's t_hidden and t_weight (those that require grad). Logits
    are formed ``chunk_size`` rows at a time, and each chunk's gradients are computed in the same pass as its
    values and kept for backward, which only scales them: nothing is recomputed (one [chunk, V] set of
    intermediates alive at a time; the row gradients and a float32 lm_head gradient kept until backward).
    """
    teacher, temperature = t_hidden is not None, params.temperature
    student_div = divergence(student.name)
    _check_distill_inputs(t_hidden, t_weight, s_hidden, s_weight, labels, student, online, chunk_size)

    def fn(hs: Tensor, y: Tensor, *rest: Tensor) -> Tensor:
        ht, ws, wt = rest if teacher else (None, rest[0], None)
        zs = hs @ ws.t()
        logq, ce_s = _log_probs_and_ce(zs, y, temperature)
        zero = ce_s.new_zeros(())
        kd = kd_t = ce_t = ent_t = top1 = zero
        ls, lt = student.ce_weight * ce_s, zero
        if teacher:
            zt = ht @ wt.t()
            logp = _log_probs(interpolated_target(zt, zs, student.target_t), temperature)
            kd = student_div.per_token(logp.detach(), logq, params).sum()
            ls = ls + student.div_weight * kd
            if online is not None:
                kd_t = online_divergence(online, logp, logq, params).sum()
                ce_t = F.nll_loss(logp, y, reduction="sum") if temperature == 1 else _ce_rows(zt, y)
                lt = online.ce_weight * ce_t + online.div_weight * kd_t
            with torch.no_grad():
                ent_t, top1 = entropy(logp).sum(), (zt.argmax(-1) == y).sum().to(zero.dtype)
        with torch.no_grad():
            ent_s = entropy(logq).sum()
        return torch.stack([ls, lt, kd, ce_s, kd_t, ce_t, ent_t, ent_s, top1])

    tensors = [s_hidden, labels] + ([t_hidden, s_weight, t_weight] if teacher else [s_weight])
    on = online is not None
    needs = [s_hidden.requires_grad, False] + ([t_hidden.requires_grad and on, s_weight.requires_grad,
                                                t_weight.requires_grad and on] if teacher else [s_weight.requires_grad])
    num_rows = 3 if teacher else 2
    grad_out = torch.tensor([1.0, 1.0] + [0.0] * len(TERMS), device=s_hidden.device, dtype=upcast(s_hidden).dtype)
    index = torch.arange(s_hidden.shape[0], device=s_hidden.device)
    total, grads = _chunk_pass(fn, index, chunk_size, tensors, num_rows, needs, grad_out)
    if total is None:  # no rows: zeros of the right shape and dtype
        total = fn(*[t[:0] for t in tensors[:num_rows]], *tensors[num_rows:]).detach()
    g_s = [grads[0], grads[-2 if teacher else -1]]  # s_hidden, s_weight
    ls = _KnownGrad.apply(total[0], g_s, s_hidden, s_weight)
    lt = _KnownGrad.apply(total[1], [grads[2], grads[4]], t_hidden, t_weight) if on else None
    return ls, lt, total[2:]


def ce_from_hidden(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Optional[Tensor] = None, *,
                   chunk_size: Optional[int] = 1024) -> Tensor:
    """Sum over counted tokens of -log softmax(hidden @ weight.T)[label]: ``ce_sum`` of the logits of
    [..., H] hidden states under a [V, H] lm_head, formed one chunk of ``chunk_size`` counted tokens
    at a time in forward and again in backward (None: all at once, kept for backward)."""
    check_chunk_size(chunk_size)
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., {hidden.shape[-1]}] does not match weight {tuple(weight.shape)} "
                         f"(expected [V, {hidden.shape[-1]}])")
    counted = counted_tokens(hidden.shape[:-1], mask, labels)

    def fn(h: Tensor, lab: Tensor, w: Tensor) -> Tensor:
        return _ce_rows(h @ w.t(), lab)

    return row_sum(fn, [hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)], [weight], counted, chunk_size)
