"""Tests for okd_scale.divergences against float64 references written from the formulas, on DeepSpeed's
accelerator (the `device` fixture: the CPU, or the GPU under DS_ACCELERATOR=cuda)."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from okd_scale.divergences import (
    DIVERGENCES,
    DivergenceParams,
    ce_from_hidden,
    ce_loss,
    ce_sum,
    chunked_divergence_from_hidden,
    divergence_loss,
    divergence_sum,
    token_divergence,
)

PARAMS = dict(beta=0.3, alpha=0.2, mu=0.6)  # non-default values, so defaults cannot hide bugs


def tp(temperature: float) -> DivergenceParams:
    """The divergences' settings of these tests at ``temperature``."""
    return DivergenceParams(temperature=temperature, **PARAMS)


P = DivergenceParams(**PARAMS)


# --------------------------------------------------------------------------- float64 reference


def ref_kl(a, log_a, log_b):
    """sum_v a_v (log a_v - log b_v), with terms where a_v == 0 counted as 0."""
    live = a > 0
    return (a * torch.where(live, log_a - log_b, torch.zeros_like(a))).sum(-1)


def ref_akl_head_weight(p, q, mu):
    """Per token (python loops): sort by p descending, head = smallest prefix reaching mu."""
    weights = []
    for p_row, q_row in zip(p.reshape(-1, p.shape[-1]).tolist(), q.reshape(-1, q.shape[-1]).tolist()):
        order = sorted(range(len(p_row)), key=lambda i: -p_row[i])  # stable: ties by index
        g_head = g_tail = mass = 0.0
        for i in order:
            gap = abs(p_row[i] - q_row[i])
            if mass < mu:
                g_head += gap
            else:
                g_tail += gap
            mass += p_row[i]
        weights.append(g_head / (g_head + g_tail) if g_head + g_tail > 0 else 0.5)
    return torch.tensor(weights, dtype=torch.float64, device=p.device).reshape(p.shape[:-1])


def ref_divergence(name, p_logits, q_logits, temperature=1.0, beta=0.5, alpha=0.1, mu=0.5):
    """Per-token divergence in float64, directly from the definitions."""
    lp = torch.log_softmax(p_logits.double() / temperature, dim=-1)
    lq = torch.log_softmax(q_logits.double() / temperature, dim=-1)
    p, q = lp.exp(), lq.exp()
    if name == "fkl":
        return ref_kl(p, lp, lq)
    if name == "rkl":
        return ref_kl(q, lq, lp)
    if name == "js":
        lm = torch.log(beta * p + (1 - beta) * q)
        return beta * ref_kl(p, lp, lm) + (1 - beta) * ref_kl(q, lq, lm)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "skl":
        return ref_kl(p, lp, torch.log(alpha * p + (1 - alpha) * q))
    if name == "srkl":
        return ref_kl(q, lq, torch.log((1 - alpha) * p + alpha * q))
    if name == "akl":
        w = ref_akl_head_weight(p.detach(), q.detach(), mu)
        return w * ref_kl(p, lp, lq) + (1 - w) * ref_kl(q, lq, lp)
    raise AssertionError(name)


def value_and_grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    value = fn(*xs)
    grads = torch.autograd.grad(value, xs)
    return value.detach(), grads


def close(actual, expected, rtol=1e-4, atol=1e-5):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- against the reference

CASES = [  # (shape, masked, temperature)
    ((7, 33), False, 1.7),
    ((2, 5, 64), True, 0.6),
    ((3, 4, 300), True, 2.0),
]


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("shape,masked,temperature", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64_reference(name, shape, masked, temperature, dtype, device):
    g = torch.Generator().manual_seed(100 * list(DIVERGENCES).index(name) + shape[-1])
    pl = (torch.randn(shape, generator=g) * 3).to(device, dtype)
    ql = (torch.randn(shape, generator=g) * 3).to(device, dtype)
    mask = (torch.rand(shape[:-1], generator=g) > 0.4).to(device) if masked else None
    up = torch.rand(shape[:-1], generator=g, dtype=torch.float64).to(device)  # per-token upstream weights
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)

    # per-token values and gradients w.r.t. both logits
    v, (gp, gq) = value_and_grads(
        lambda a, b: (token_divergence(name, a, b, params=tp(temperature)) * up.to(dtype)).sum(), pl, ql)
    rv, (rgp, rgq) = value_and_grads(
        lambda a, b: (ref_divergence(name, a, b, temperature, **PARAMS) * up).sum(), pl.double(), ql.double())
    close(v, rv, **tol)
    close(gp, rgp, **tol)
    close(gq, rgq, **tol)

    # masked sum
    keep = torch.ones(shape[:-1], dtype=torch.bool, device=device) if mask is None else mask
    v, (gp, gq) = value_and_grads(
        lambda a, b: divergence_sum(name, a, b, mask, params=tp(temperature)), pl, ql)
    rv, (rgp, rgq) = value_and_grads(
        lambda a, b: ref_divergence(name, a, b, temperature, **PARAMS)[keep].sum(), pl.double(), ql.double())
    close(v, rv, **tol)
    close(gp, rgp, **tol)
    close(gq, rgq, **tol)
    assert v.dtype == torch.promote_types(dtype, torch.float32)


@pytest.mark.parametrize("name", [n for n in DIVERGENCES if n != "akl"])
def test_gradcheck(name, device):
    g = torch.Generator().manual_seed(1)
    pl = torch.randn(3, 7, generator=g, dtype=torch.float64).to(device).requires_grad_()
    ql = torch.randn(3, 7, generator=g, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: token_divergence(name, a, b, params=tp(1.3)), (pl, ql))
    mask = torch.tensor([True, False, True], device=device)
    assert torch.autograd.gradcheck(
        lambda a, b: divergence_sum(name, a, b, mask, chunk_size=1, params=tp(0.8)), (pl, ql))


def test_akl_gradient_is_fixed_weight_mixture_of_fkl_and_rkl(device):
    """AKL's weights are constants for autograd, so gradcheck does not apply to it directly;
    check by finite differences that its gradient is that of w*FKL + (1-w)*RKL, w held fixed."""
    g = torch.Generator().manual_seed(2)
    pl = torch.randn(4, 9, generator=g, dtype=torch.float64).to(device)
    ql = torch.randn(4, 9, generator=g, dtype=torch.float64).to(device)
    w = ref_akl_head_weight(torch.softmax(pl, -1), torch.softmax(ql, -1), PARAMS["mu"])
    assert ((w > 0.05) & (w < 0.95)).any()  # a real mixture, not just FKL or RKL

    def frozen(a, b):
        return (w * token_divergence("fkl", a, b) + (1 - w) * token_divergence("rkl", a, b)).sum()

    _, (gp, gq) = value_and_grads(lambda a, b: token_divergence("akl", a, b, params=P).sum(), pl, ql)
    eps = 1e-6
    for x, grad, which in ((pl, gp, 0), (ql, gq, 1)):
        d = torch.randn(x.shape, generator=g, dtype=torch.float64).to(device)
        plus = [pl, ql]
        minus = [pl, ql]
        plus[which], minus[which] = x + eps * d, x - eps * d
        numeric = (frozen(*plus) - frozen(*minus)) / (2 * eps)
        assert abs(numeric.item() - (grad * d).sum().item()) < 1e-6


def test_akl_head_is_smallest_prefix_reaching_mu(device):
    p = torch.tensor([0.40, 0.35, 0.25], dtype=torch.float64, device=device)
    q = torch.tensor([0.20, 0.50, 0.30], dtype=torch.float64, device=device)
    # mu=0.5: head = {0.40, 0.35} (mass before 0.35 is 0.40 < 0.5); g_head=0.35, g_tail=0.05
    akl = token_divergence("akl", p.log(), q.log(), params=DivergenceParams(mu=0.5))
    fkl = token_divergence("fkl", p.log(), q.log())
    rkl = token_divergence("rkl", p.log(), q.log())
    close(akl, 0.875 * fkl + 0.125 * rkl, rtol=1e-12, atol=1e-12)
    # mu=0.3: head = {0.40} only -> w = 0.2 / 0.4
    close(token_divergence("akl", p.log(), q.log(), params=DivergenceParams(mu=0.3)), 0.5 * fkl + 0.5 * rkl,
          rtol=1e-12, atol=1e-12)
    # mu=1: every token is in the head -> pure FKL
    close(token_divergence("akl", p.log(), q.log(), params=DivergenceParams(mu=1.0)), fkl, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- extreme inputs


def check_finite_and_reference(name, pl, ql, temperature, rtol=1e-4, atol=1e-4):
    v, (gp, gq) = value_and_grads(
        lambda a, b: token_divergence(name, a, b, params=tp(temperature)).sum(), pl, ql)
    assert torch.isfinite(v), (name, v)
    assert torch.isfinite(gp).all() and torch.isfinite(gq).all(), name
    rv, (rgp, rgq) = value_and_grads(
        lambda a, b: ref_divergence(name, a, b, temperature, **PARAMS).sum(), pl.double(), ql.double())
    if torch.isfinite(rv):
        close(v, rv, rtol=rtol, atol=atol)
        for ours, ref in ((gp, rgp), (gq, rgq)):
            ok = torch.isfinite(ref)
            close(ours[ok], ref[ok], rtol=rtol, atol=atol)
    return v, gp, gq


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("scale", [1e4, 1e6])
def test_huge_logits(name, scale, device):
    g = torch.Generator().manual_seed(3)
    pl = (torch.randn(6, 50, generator=g) * scale).to(device)
    ql = (torch.randn(6, 50, generator=g) * scale).to(device)
    ql[0] = pl[0]  # one token with p == q
    for temperature in (1.0, 0.7):
        # float32 log_softmax of ~1e4 logits is exact to ~1e-3 absolute; values are up to ~1e4
        v, _, _ = check_finite_and_reference(name, pl, ql, temperature, rtol=1e-4, atol=scale * 1e-6)
        assert v >= 0


@pytest.mark.parametrize("name", ["fkl", "js", "tvd", "skl", "srkl"])
def test_logits_near_float32_limit(name, device):
    """|logit| ~ 3e38 with temperature < 1 (dividing would overflow): finite where the true value is.
    (RKL and AKL are genuinely infinite here: log p underflows for tokens the student keeps.)"""
    pl = torch.zeros(2, 20, device=device)
    pl[:, 0], pl[:, 1] = 3e38, -3e38
    ql = torch.randn(2, 20, generator=torch.Generator().manual_seed(4)).to(device)
    cold = DivergenceParams(temperature=0.5)
    v, (gp, gq) = value_and_grads(lambda a, b: token_divergence(name, a, b, params=cold).sum(), pl, ql)
    assert torch.isfinite(v) and torch.isfinite(gp).all() and torch.isfinite(gq).all()


@pytest.mark.parametrize("name", DIVERGENCES)
def test_neg_inf_logits(name, device):
    """Padded vocab entries at -inf in both: same as the distribution without those entries."""
    g = torch.Generator().manual_seed(5)
    pl = (torch.randn(2, 4, 40, generator=g) * 2).to(device)
    ql = (torch.randn(2, 4, 40, generator=g) * 2).to(device)
    pad = torch.zeros(40, dtype=torch.bool, device=device)
    pad[[3, 17, 30, 39]] = True
    pl[..., pad] = -math.inf
    ql[..., pad] = -math.inf
    mask = torch.tensor([[True, False, True, True], [False, True, True, True]], device=device)
    for chunk_size in (None, 3):
        v, (gp, gq) = value_and_grads(
            lambda a, b: divergence_sum(name, a, b, mask, chunk_size=chunk_size, params=tp(1.5)),
            pl, ql)
        assert torch.isfinite(v) and torch.isfinite(gp).all() and torch.isfinite(gq).all()
        assert (gp[..., pad] == 0).all() and (gq[..., pad] == 0).all()
        rv, (rgp, rgq) = value_and_grads(
            lambda a, b: ref_divergence(name, a, b, 1.5, **PARAMS)[mask].sum(), pl[..., ~pad], ql[..., ~pad])
        close(v, rv)
        close(gp[..., ~pad], rgp)
        close(gq[..., ~pad], rgq)


@pytest.mark.parametrize("name", ["fkl", "js", "tvd", "skl", "srkl"])
def test_neg_inf_only_in_target(name, device):
    """Teacher masks tokens the student still gives mass to: these divergences stay finite."""
    g = torch.Generator().manual_seed(6)
    pl = torch.randn(5, 30, generator=g).to(device)
    ql = torch.randn(5, 30, generator=g).to(device)
    pl[:, :4] = -math.inf
    check_finite_and_reference(name, pl, ql, 1.0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_one_hot_teacher_uniform_student(name, device):
    pl = torch.full((3, 64), -20.0, device=device)
    pl[torch.arange(3, device=device), torch.tensor([0, 5, 63], device=device)] = 1e4  # one-hot teacher
    ql = torch.zeros(3, 64, device=device)  # uniform student
    for temperature in (1.0, 2.0):
        v, _, _ = check_finite_and_reference(name, pl, ql, temperature, rtol=1e-5, atol=1e-5)
        check_finite_and_reference(name, ql, pl.flip(-1), temperature, rtol=1e-5, atol=1e-5)
        assert v > 0


# --------------------------------------------------------------------------- identities


def random_logits(*shape, seed=0, scale=3.0, device=None):
    """Reproducible logits (drawn on the CPU, then moved to ``device``)."""
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(device)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergence_of_a_distribution_with_itself_is_zero(name, device):
    x = random_logits(5, 80, seed=7, device=device)
    v, (gp, gq) = value_and_grads(lambda a, b: token_divergence(name, a, b, params=P).sum(), x, x)
    torch.testing.assert_close(v, torch.tensor(0.0, device=device), atol=1e-6, rtol=0)
    assert torch.isfinite(gp).all()
    torch.testing.assert_close(gq, torch.zeros_like(gq), atol=1e-6, rtol=0)  # q = p is a minimum


@pytest.mark.parametrize("name", DIVERGENCES)
def test_nonnegative(name, device):
    for seed in range(3):
        pl, ql = random_logits(40, 50, seed=seed, scale=5.0, device=device), random_logits(40, 50, seed=seed + 10,
                                                                                         device=device)
        for temperature in (0.3, 1.0, 4.0):
            assert (token_divergence(name, pl, ql, params=tp(temperature)) >= -1e-6).all()


def test_skew_at_alpha_zero_equals_plain_kl(device):
    pl, ql = random_logits(6, 70, seed=8, device=device), random_logits(6, 70, seed=9, device=device)
    unskewed = DivergenceParams(alpha=0.0)
    assert torch.equal(token_divergence("skl", pl, ql, params=unskewed), token_divergence("fkl", pl, ql))
    assert torch.equal(token_divergence("srkl", pl, ql, params=unskewed), token_divergence("rkl", pl, ql))
    # and the skew really changes the value for alpha > 0
    assert (token_divergence("skl", pl, ql, params=DivergenceParams(alpha=0.3)) < token_divergence("fkl", pl, ql)).all()
    # KL(p || a p + (1-a) q) <= log(1/a)
    assert (token_divergence("skl", pl, ql * 50, params=DivergenceParams(alpha=0.3)) <= -math.log(0.3) + 1e-6).all()


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_js_bounds(beta, device):
    bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    pl, ql = random_logits(30, 40, seed=11, scale=8.0, device=device), random_logits(30, 40, seed=12, scale=8.0,
                                                                                     device=device)
    js = token_divergence("js", pl, ql, params=DivergenceParams(beta=beta))
    assert (js >= -1e-7).all() and (js <= bound + 1e-6).all()
    # disjoint supports reach the bound
    a = torch.full((1, 10), -math.inf, device=device)
    b = a.clone()
    a[0, 0], b[0, 1] = 0.0, 0.0
    torch.testing.assert_close(token_divergence("js", a, b, params=DivergenceParams(beta=beta)),
                               torch.tensor([bound], device=device))


def test_tvd_bounds_and_akl_between_fkl_and_rkl(device):
    pl, ql = random_logits(30, 40, seed=13, scale=6.0, device=device), random_logits(30, 40, seed=14, device=device)
    tvd = token_divergence("tvd", pl, ql)
    assert (tvd >= 0).all() and (tvd <= 1 + 1e-6).all()
    a = torch.full((1, 10), -math.inf, device=device)
    b = a.clone()
    a[0, 0], b[0, 1] = 0.0, 0.0
    torch.testing.assert_close(token_divergence("tvd", a, b), torch.tensor([1.0], device=device))
    fkl, rkl = token_divergence("fkl", pl, ql), token_divergence("rkl", pl, ql)
    akl = token_divergence("akl", pl, ql)
    assert (akl >= torch.minimum(fkl, rkl) - 1e-5).all() and (akl <= torch.maximum(fkl, rkl) + 1e-5).all()


# --------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_equals_dense(name, masked, device):
    pl, ql = random_logits(3, 9, 48, seed=15, device=device), random_logits(3, 9, 48, seed=16, device=device)
    mask = (random_logits(3, 9, seed=17, device=device) > 0) if masked else None
    n = int(mask.sum()) if masked else 27
    dense, (dgp, dgq) = value_and_grads(
        lambda a, b: divergence_sum(name, a, b, mask, params=tp(1.3)), pl, ql)
    for chunk_size in (1, 4, 7, n, 1000):  # 4 and 7 do not divide the count; 1000 > count
        v, (gp, gq) = value_and_grads(
            lambda a, b: divergence_sum(name, a, b, mask, chunk_size=chunk_size, params=tp(1.3)),
            pl, ql)
        close(v, dense, rtol=1e-6, atol=1e-6)
        close(gp, dgp, rtol=1e-6, atol=1e-8)
        close(gq, dgq, rtol=1e-6, atol=1e-8)
        if masked:
            assert (gq[~mask] == 0).all() and (gp[~mask] == 0).all()


def test_chunked_gradient_reaches_only_the_argument_not_detached(device):
    pl = random_logits(4, 20, seed=18, device=device).requires_grad_()
    ql = random_logits(4, 20, seed=19, device=device).requires_grad_()
    divergence_sum("fkl", pl.detach(), ql, chunk_size=3).backward()
    assert pl.grad is None and ql.grad is not None and ql.grad.abs().sum() > 0


def test_ce_matches_reference_and_chunks(device):
    g = torch.Generator().manual_seed(20)
    logits = (torch.randn(2, 7, 30, generator=g) * 3).to(device)
    labels = torch.randint(0, 30, (2, 7), generator=g).to(device)
    labels[0, :2] = -100
    mask = (torch.rand(2, 7, generator=g) > 0.3).to(device)
    for m in (None, mask):
        counted = labels != -100 if m is None else (labels != -100) & m
        ref, (rg,) = value_and_grads(
            lambda x: -torch.log_softmax(x.double(), -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0][counted]
            .sum(),
            logits)
        for chunk_size in (None, 1, 4, 100):
            v, (gx,) = value_and_grads(lambda x: ce_sum(x, labels, m, chunk_size=chunk_size), logits)
            close(v, ref, rtol=1e-5)
            close(gx, rg, rtol=1e-5, atol=1e-7)
        loss = ce_loss(logits, labels, m, chunk_size=3)
        close(loss, ref / counted.sum(), rtol=1e-5)
        close(ce_loss(logits, labels, m, num_tokens=torch.tensor(50, device=device)), ref / 50, rtol=1e-5)


class LargestFloat32(TorchDispatchMode):
    """Records the largest float32 tensor (in elements) any op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", ["fkl", "js", "akl"])
def test_chunked_never_forms_full_float32_logits(name, device):
    tokens, vocab, chunk = 64, 256, 8
    pl = random_logits(tokens, vocab, seed=21, device=device).bfloat16().requires_grad_()
    ql = random_logits(tokens, vocab, seed=22, device=device).bfloat16().requires_grad_()
    with LargestFloat32() as seen:
        divergence_sum(name, pl, ql, chunk_size=chunk).backward()
    assert seen.largest <= chunk * vocab, seen.largest
    with LargestFloat32() as seen:  # the check itself works: the dense path does upcast everything
        divergence_sum(name, pl, ql).backward()
    assert seen.largest >= tokens * vocab


# --------------------------------------------------------------------------- from hidden states


def hidden_case(dtype=torch.float64, seed=23, shape=(2, 6), vocab=40, hp=12, hq=8, device=None):
    """Hidden states and lm_head weights of two models, labels and a mask (drawn on the CPU, then moved
    to ``device``)."""
    g = torch.Generator().manual_seed(seed)
    ph = torch.randn(*shape, hp, generator=g, dtype=dtype)
    pw = torch.randn(vocab, hp, generator=g, dtype=dtype) * 0.5
    qh = torch.randn(*shape, hq, generator=g, dtype=dtype)
    qw = torch.randn(vocab, hq, generator=g, dtype=dtype) * 0.5
    labels = torch.randint(0, vocab, shape, generator=g)
    labels.view(-1)[::5] = -100
    mask = torch.rand(shape, generator=g) > 0.25
    return tuple(t.to(device) for t in (ph, pw, qh, qw, labels, mask))


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("ce_weight", [0.0, 0.7])
def test_hidden_path_equals_dense_logits(name, ce_weight, device):
    ph, pw, qh, qw, labels, mask = hidden_case(device=device)
    counted = mask & (labels != -100)

    def dense(a, b, c, d):
        p_logits, q_logits = a @ b.T, c @ d.T
        div = divergence_sum(name, p_logits, q_logits, counted, params=tp(1.4))
        return 0.5 * div + ce_weight * ce_sum(q_logits, labels, counted)

    ref, ref_grads = value_and_grads(dense, ph, pw, qh, qw)
    for chunk_size in (1, 5, 1000, None):
        v, grads = value_and_grads(
            lambda a, b, c, d: chunked_divergence_from_hidden(
                name, a, b, c, d, mask, chunk_size=chunk_size, labels=labels,
                ce_weight=ce_weight, div_weight=0.5, params=tp(1.4)),
            ph, pw, qh, qw)
        close(v, ref, rtol=1e-10, atol=1e-12)
        for ours, theirs in zip(grads, ref_grads):
            assert ours.abs().sum() > 0
            close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_hidden_path_without_labels_and_gradcheck(device):
    ph, pw, qh, qw, _, mask = hidden_case(shape=(5,), vocab=7, hp=3, hq=4, device=device)
    v = chunked_divergence_from_hidden("js", ph, pw, qh, qw, mask, chunk_size=2)
    close(v, divergence_sum("js", ph @ pw.T, qh @ qw.T, mask), rtol=1e-12, atol=1e-14)
    ins = [t.clone().requires_grad_() for t in (ph, pw, qh, qw)]
    labels = torch.tensor([1, -100, 3, 0, 6], device=device)
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: chunked_divergence_from_hidden(
            "fkl", a, b, c, d, mask, chunk_size=2, params=DivergenceParams(temperature=0.9), labels=labels,
            ce_weight=0.3),
        ins)


def test_hidden_path_bf16_never_forms_full_float32_logits(device):
    tokens, vocab, hidden, chunk = 64, 256, 16, 8
    ph, pw, qh, qw, labels, mask = hidden_case(torch.bfloat16, shape=(tokens,), vocab=vocab, hp=hidden, hq=hidden,
                                               device=device)
    ins = [t.clone().requires_grad_() for t in (ph, pw, qh, qw)]
    with LargestFloat32() as seen:
        chunked_divergence_from_hidden("fkl", *ins, mask, chunk_size=chunk, labels=labels, ce_weight=1.0).backward()
    assert seen.largest <= max(chunk * vocab, vocab * hidden), seen.largest  # weight grads accumulate in fp32
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 and torch.isfinite(t.grad).all() for t in ins)


def test_ce_from_hidden_equals_ce_of_the_logits(device):
    _, _, qh, qw, labels, mask = hidden_case(device=device)
    counted = mask & (labels != -100)
    ref, ref_grads = value_and_grads(lambda c, d: ce_sum(c @ d.T, labels, counted), qh, qw)
    for chunk_size in (1, 7, None):
        v, grads = value_and_grads(lambda c, d: ce_from_hidden(c, d, labels, mask, chunk_size=chunk_size), qh, qw)
        close(v, ref, rtol=1e-10, atol=1e-12)
        for ours, theirs in zip(grads, ref_grads):
            close(ours, theirs, rtol=1e-10, atol=1e-12)
    empty = ce_from_hidden(qh, qw, labels, torch.zeros_like(mask), chunk_size=4)
    assert empty.item() == 0.0


def test_split_terms_are_the_weighted_divergence_and_ce(device):
    ph, pw, qh, qw, labels, mask = hidden_case(device=device)
    counted = mask & (labels != -100)
    terms = chunked_divergence_from_hidden("rkl", ph, pw, qh, qw, mask, chunk_size=3, labels=labels, ce_weight=0.25,
                                           div_weight=2.0, split=True, params=P)
    assert terms.shape == (2,)
    close(terms[0], 2.0 * divergence_sum("rkl", ph @ pw.T, qh @ qw.T, counted, params=P), rtol=1e-10, atol=1e-12)
    close(terms[1], 0.25 * ce_sum(qh @ qw.T, labels, counted), rtol=1e-10, atol=1e-12)


def test_hidden_path_rejects_different_vocab_sizes():
    ph, pw, qh, qw, _, _ = hidden_case()
    with pytest.raises(ValueError, match="40.*39|39.*40"):
        chunked_divergence_from_hidden("fkl", ph, pw, qh, qw[:39])


# --------------------------------------------------------------------------- bf16, losses, errors


@pytest.mark.parametrize("name", DIVERGENCES)
def test_bf16_inputs(name, device):
    pl, ql = random_logits(2, 8, 96, seed=24, device=device), random_logits(2, 8, 96, seed=25, device=device)
    mask = random_logits(2, 8, seed=26, device=device) > -0.5
    pb, qb = pl.bfloat16(), ql.bfloat16()
    v, (gp, gq) = value_and_grads(lambda a, b: divergence_sum(name, a, b, mask, chunk_size=5, params=P), pb, qb)
    assert v.dtype == torch.float32 and torch.isfinite(v)
    assert gp.dtype == torch.bfloat16 and torch.isfinite(gp).all() and torch.isfinite(gq).all()
    # same as float32 on the bf16-rounded logits ...
    v32, (gp32, gq32) = value_and_grads(lambda a, b: divergence_sum(name, a, b, mask, params=P), pb.float(), qb.float())
    close(v, v32, rtol=1e-5, atol=1e-5)
    close(gp, gp32, rtol=1e-2, atol=1e-3)  # gradients are rounded to bf16
    close(gq, gq32, rtol=1e-2, atol=1e-3)
    # ... and close to float32 on the original logits
    close(v, divergence_sum(name, pl, ql, mask, params=P), rtol=3e-2, atol=3e-2)


def test_divergence_loss_normalisation(device):
    pl, ql = random_logits(3, 5, 20, seed=27, device=device), random_logits(3, 5, 20, seed=28, device=device)
    mask = random_logits(3, 5, seed=29, device=device) > 0
    total = divergence_sum("rkl", pl, ql, mask)
    close(divergence_loss("rkl", pl, ql, mask), total / mask.sum())
    close(divergence_loss("rkl", pl, ql), divergence_sum("rkl", pl, ql) / 15)
    close(divergence_loss("rkl", pl, ql, mask, num_tokens=40.0), total / 40)
    close(divergence_loss("rkl", pl, ql, mask, num_tokens=torch.tensor(40, device=device), chunk_size=2), total / 40)
    empty = torch.zeros(3, 5, dtype=torch.bool, device=device)
    x = pl.clone().requires_grad_()
    loss = divergence_loss("rkl", x, ql, empty, chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()


def test_bad_name_raises():
    x = random_logits(2, 5)
    for call in (
        lambda: token_divergence("kl", x, x),
        lambda: divergence_sum("kl", x, x),
        lambda: divergence_loss("kl", x, x),
        lambda: chunked_divergence_from_hidden("kl", x, torch.ones(4, 5), x, torch.ones(4, 5)),
    ):
        with pytest.raises(ValueError, match="'kl'.*fkl, rkl, js, tvd, skl, srkl, akl"):
            call()


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta=0.0), r"beta.*\(0, 1\)"),
    (dict(beta=1.0), r"beta.*\(0, 1\)"),
    (dict(alpha=1.0), r"alpha.*\[0, 1\)"),
    (dict(alpha=-0.1), r"alpha.*\[0, 1\)"),
    (dict(mu=0.0), r"mu.*\(0, 1\]"),
    (dict(mu=1.5), r"mu.*\(0, 1\]"),
    (dict(temperature=0.0), r"temperature.*> 0"),
    (dict(temperature=-1.0), r"temperature.*> 0"),
    (dict(chunk_size=0), r"chunk_size"),
])
def test_bad_parameter_raises(kwargs, match):
    x = random_logits(2, 5)
    with pytest.raises(ValueError, match=match):
        if "chunk_size" in kwargs:
            divergence_sum("fkl", x, x, **kwargs)
        else:
            divergence_sum("fkl", x, x, params=DivergenceParams(**kwargs))
    if "chunk_size" not in kwargs:
        with pytest.raises(ValueError, match=match):
            token_divergence("fkl", x, x, params=DivergenceParams(**kwargs))


def test_shape_mismatches_raise():
    x = random_logits(2, 3, 5)
    with pytest.raises(ValueError, match="vocab sizes differ.*5.*6"):
        token_divergence("fkl", x, random_logits(2, 3, 6))
    with pytest.raises(ValueError, match="mask shape"):
        divergence_sum("fkl", x, x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels shape"):
        ce_sum(x, torch.zeros(3, 2, dtype=torch.long))


def test_a_new_divergence_is_a_function_and_a_registry_line(monkeypatch):
    """A divergence registered at run time (tests/tiny.py: the squared Hellinger distance) runs through every
    entry point with no other edit: dense, token-chunked, from hidden states, and the student/online losses,
    each equal to a float64 reference (its vocab-sharded form: tests/test_sharded.py)."""
    import tiny

    from okd_scale.divergences import Mix, distill_from_hidden

    monkeypatch.setitem(DIVERGENCES, "hellinger", tiny.hellinger_divergence())
    g = torch.Generator().manual_seed(3)
    ph, qh = (torch.randn(2, 6, 8, generator=g, dtype=torch.float64) for _ in range(2))
    pw, qw = (torch.randn(31, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.tensor([[1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 0, 1]])
    params = DivergenceParams(temperature=1.3)

    def ref(a, b):  # per token, float64
        p, q = torch.softmax(a.double() / 1.3, -1), torch.softmax(b.double() / 1.3, -1)
        return 0.5 * (p.sqrt() - q.sqrt()).square().sum(-1)

    pl, ql = ph @ pw.T, qh @ qw.T
    want = ref(pl, ql)[mask.bool()].sum()
    close(token_divergence("hellinger", pl, ql, params=params), ref(pl, ql), rtol=1e-12, atol=1e-12)
    for chunk in (None, 4):
        close(divergence_sum("hellinger", pl, ql, mask, params=params, chunk_size=chunk), want, rtol=1e-12, atol=1e-12)
        close(chunked_divergence_from_hidden("hellinger", ph, pw, qh, qw, mask, params=params, chunk_size=chunk),
              want, rtol=1e-12, atol=1e-12)
    rows = mask.reshape(-1).bool()
    labels = torch.randint(0, 31, (int(rows.sum()),), generator=g)
    t_h, s_h = ph.reshape(-1, 8)[rows], qh.reshape(-1, 8)[rows]
    ls, lt, terms = distill_from_hidden(t_h, pw, s_h, qw, labels, student=Mix("hellinger", 1.0, 0.0),
                                        online=Mix("hellinger", 1.0, 0.0), chunk_size=3, params=params)
    close(ls, want, rtol=1e-12, atol=1e-12)
    close(lt, ref(s_h @ qw.T, t_h @ pw.T).sum(), rtol=1e-12, atol=1e-12)  # D_T(pS || pT)
