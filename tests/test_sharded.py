"""okd_scale.sharded on 2 real gloo processes equals okd_scale.divergences on one, values and gradients."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from okd_scale import sharded
from okd_scale.process import free_port
from okd_scale.divergences import DIVERGENCES, ce_sum, chunked_divergence_from_hidden, divergence_sum
from sharded_worker import DP_ROWS, SPLIT_WEIGHTS, case_inputs, run_case, tp

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def _cases() -> list[dict]:
    cases = []
    for i, name in enumerate(DIVERGENCES):
        for vocab in (101, 257):
            for masked in (False, True):
                cases.append(dict(kind="div", name=name, vocab=vocab, masked=masked, temperature=2.0,
                                  seed=100 + len(cases)))
        # token chunks (recomputed in backward), temperature 1, a padded vocabulary (-inf logits)
        cases.append(dict(kind="div", name=name, vocab=101, masked=True, temperature=1.0, chunk=3,
                          pad_from=90, seed=300 + i))
    for name in ("fkl", "rkl", "akl"):  # rank 1's whole slice [51, 101) is padding
        cases.append(dict(kind="div", name=name, vocab=101, masked=False, temperature=0.7, pad_from=51,
                          seed=400 + len(cases)))
    cases.append(dict(kind="div", name="js", vocab=257, masked=True, temperature=1.5, chunk=4,
                      dtype=torch.float32, seed=500))
    cases.append(dict(kind="div", name="tvd", vocab=101, masked=True, temperature=1.0, dtype=torch.bfloat16, seed=501))
    for name, chunk in (("js", None), ("akl", 2)):  # nothing counted: 0, zero gradients
        cases.append(dict(kind="div", name=name, vocab=101, masked="empty", temperature=1.0, chunk=chunk, seed=502))
    for vocab, masked, chunk in ((101, False, None), (257, True, 3)):
        cases.append(dict(kind="ce", vocab=vocab, masked=masked, chunk=chunk, seed=600 + vocab))
    for name, chunk in (("fkl", 4), ("akl", 3), ("tvd", None)):
        cases.append(dict(kind="hidden", name=name, vocab=101, masked=True, temperature=2.0, chunk=chunk,
                          hidden=True, seed=700 + len(cases)))
    for name, chunk in (("js", 3), ("akl", None)):
        cases.append(dict(kind="hidden_split", name=name, vocab=101, masked=True, temperature=1.5, chunk=chunk,
                          hidden=True, seed=760 + len(cases)))
    for vocab, chunk in ((101, 4), (257, None)):
        cases.append(dict(kind="ce_hidden", vocab=vocab, masked=True, chunk=chunk, hidden=True, seed=770 + vocab))
    for name, chunk in (("fkl", 3), ("rkl", None)):
        cases.append(dict(kind="dp_rows", name=name, vocab=101, temperature=1.0, chunk=chunk, hidden=True,
                          seed=780 + len(cases)))
    cases.append(dict(kind="logits_from_hidden", name="srkl", vocab=257, masked=True, temperature=1.3, chunk=4,
                      hidden=True, seed=750))
    # a divergence registered at run time (tests/tiny.py): sharded with no edit of okd_scale/sharded.py
    cases.append(dict(kind="div", name="hellinger", vocab=101, masked=True, temperature=1.5, chunk=3, pad_from=90,
                      seed=850))
    cases.append(dict(kind="hidden", name="hellinger", vocab=257, masked=True, temperature=1.0, chunk=4, hidden=True,
                      seed=851))
    cases.append(dict(kind="gather", vocab=101, seed=800))
    cases.append(dict(kind="gather", vocab=257, dtype=torch.float32, seed=801))
    return cases


CASES = _cases()


def _case_id(case: dict) -> str:
    return "-".join(str(case[k]) for k in ("kind", "name", "vocab", "masked", "temperature", "chunk", "pad_from")
                    if case.get(k) is not None)


@pytest.fixture(scope="module", autouse=True)
def toy_divergence():
    """The toy divergence of tests/tiny.py in the registry while this module's tests run."""
    import tiny

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(DIVERGENCES, "hellinger", tiny.hellinger_divergence())
        yield


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    """Runs every case once on 2 gloo ranks; returns [rank][case] result dicts."""
    import sharded_worker

    out = tmp_path_factory.mktemp("sharded")
    mp.spawn(sharded_worker.main, args=(WORLD, free_port(), str(out), CASES), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _dense(case: dict) -> dict:
    """The reference: okd_scale.divergences on full logits in one process, with gradients."""
    x = case_inputs(case)
    if case["kind"] == "hidden":
        leaves = {k: x[k].clone().requires_grad_() for k in ("ph", "pw", "qh", "qw")}
        value = chunked_divergence_from_hidden(
            case["name"], leaves["ph"], leaves["pw"], leaves["qh"], leaves["qw"], x["mask"], chunk_size=None,
            labels=x["labels"], ce_weight=0.7, div_weight=1.3, params=tp(case["temperature"]))
    elif case["kind"] == "hidden_split":
        leaves = {k: x[k].clone().requires_grad_() for k in ("ph", "pw", "qh", "qw")}
        terms = chunked_divergence_from_hidden(
            case["name"], leaves["ph"], leaves["pw"], leaves["qh"], leaves["qw"], x["mask"], chunk_size=None,
            labels=x["labels"], ce_weight=1.0, split=True, params=tp(case["temperature"]))
        split_value = SPLIT_WEIGHTS[0] * terms[0] + SPLIT_WEIGHTS[1] * terms[1]
        summed = chunked_divergence_from_hidden(  # split=False with the same weights: the same number
            case["name"], x["ph"], x["pw"], x["qh"], x["qw"], x["mask"], chunk_size=2, div_weight=SPLIT_WEIGHTS[0],
            labels=x["labels"], ce_weight=SPLIT_WEIGHTS[1], params=tp(case["temperature"]))
        torch.testing.assert_close(split_value, summed, rtol=1e-10, atol=0)
        split_value.backward()
        return {"value": split_value.detach(), "terms": terms.detach(),
                **{f"grad_{k}": v.grad for k, v in leaves.items()}}
    elif case["kind"] == "ce_hidden":
        leaves = {k: x[k].clone().requires_grad_() for k in ("qh", "qw")}
        value = ce_sum(leaves["qh"] @ leaves["qw"].t(), x["labels"], x["mask"])
    elif case["kind"] == "dp_rows":
        leaves = {k: x[k].clone().requires_grad_() for k in ("ph", "pw", "qh", "qw")}
        value = chunked_divergence_from_hidden(
            case["name"], leaves["ph"], leaves["pw"], leaves["qh"], leaves["qw"], chunk_size=None,
            labels=x["labels"], ce_weight=0.7, div_weight=1.3, params=tp(case["temperature"]))
    elif case["kind"] == "logits_from_hidden":
        leaves = {k: x[k].clone().requires_grad_() for k in ("ph", "pw", "qh", "qw")}
        value = divergence_sum(case["name"], leaves["ph"] @ leaves["pw"].t(), leaves["qh"] @ leaves["qw"].t(),
                               x["mask"], params=tp(case["temperature"]))
    elif case["kind"] == "ce":
        leaves = {"q": x["q"].clone().requires_grad_()}
        value = ce_sum(leaves["q"], x["labels"], x["mask"])
    else:
        leaves = {k: x[k].clone().requires_grad_() for k in ("p", "q")}
        value = divergence_sum(case["name"], leaves["p"], leaves["q"], x["mask"], params=tp(case["temperature"]))
    value.backward()
    return {"value": value.detach(), **{f"grad_{k}": v.grad for k, v in leaves.items()}}


def _tol(case: dict) -> dict:
    dtype = case.get("dtype", torch.float64)
    if dtype == torch.bfloat16:  # float32 math, gradients rounded to bfloat16
        return dict(rtol=1e-2, atol=1e-4)
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


@pytest.mark.xdist_group("sharded_results")  # one worker spawns the 2 ranks for every case
@pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_sharded_equals_dense(sharded_results, index):
    case = CASES[index]
    if case["kind"] == "gather":  # every rank gets the full logits back, bit for bit
        full = case_inputs(case)["p"]
        for r in range(WORLD):
            assert torch.equal(sharded_results[r][index]["full"], full)
        return
    want = _dense(case)
    assert torch.isfinite(want["value"]) and (want["value"] > 0) == (case.get("masked") != "empty")
    for r in range(WORLD):
        got = sharded_results[r][index]
        start, end = sharded.vocab_range(case["vocab"], r, WORLD)
        torch.testing.assert_close(got["value"], want["value"], **_tol(case))
        if "terms" in want:
            torch.testing.assert_close(got["terms"], want["terms"], **_tol(case))
        for key, grad in want.items():
            if not key.startswith("grad_"):
                continue
            if key in ("grad_p", "grad_q", "grad_pw", "grad_qw"):  # this rank's rows of the vocabulary
                grad = grad[..., start:end] if key in ("grad_p", "grad_q") else grad[start:end]
            elif case["kind"] == "dp_rows":  # this rank's own token rows
                lo, hi = DP_ROWS[r]
                grad = grad.reshape(-1, grad.shape[-1])[lo:hi]
            assert got[key].shape == grad.shape, key
            torch.testing.assert_close(got[key], grad, **_tol(case), msg=lambda m: f"rank {r} {key}: {m}")


# --------------------------------------------------------------------------- one process


def test_vocab_range_covers_the_vocabulary_unevenly():
    for vocab, world in ((101, 2), (257, 3), (10, 4), (3, 5), (0, 2)):
        ranges = [sharded.vocab_range(vocab, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == vocab
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        widths = [e - s for s, e in ranges]
        assert max(widths) - min(widths) <= 1 and widths == sorted(widths, reverse=True)
    assert sharded.vocab_range(101, 1, 2) == (51, 101)
    with pytest.raises(ValueError):
        sharded.vocab_range(10, 2, 2)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_world_size_one_is_dense_exactly(name, device):
    """No process group (world size 1): the very same numbers as okd_scale.divergences, on the accelerator."""
    case = dict(vocab=101, masked=True, seed=9, hidden=True)
    on_host = case_inputs(case)
    x = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in on_host.items()}
    kw = dict(params=tp(1.7))
    assert torch.equal(sharded.shard_logits(x["p"]), x["p"])
    for chunk in (None, 3):
        got = sharded.sharded_divergence_sum(name, x["p"], x["q"], x["mask"], vocab_size=101, chunk_size=chunk, **kw)
        assert torch.equal(got, divergence_sum(name, x["p"], x["q"], x["mask"], chunk_size=chunk, **kw))
    got = sharded.sharded_ce_sum(x["q"], x["labels"], x["mask"], vocab_size=101, chunk_size=3)
    assert torch.equal(got, ce_sum(x["q"], x["labels"], x["mask"], chunk_size=3))
    hidden = (x["ph"], x["pw"], x["qh"], x["qw"], x["mask"])
    got = sharded.sharded_divergence_from_hidden(name, *hidden, vocab_size=101, chunk_size=4, **kw)
    assert torch.equal(got, chunked_divergence_from_hidden(name, *hidden, chunk_size=4, **kw))
    assert torch.equal(sharded.all_gather_shards(x["p"], 101), x["p"])
    # and the values those functions are compared with come from run_case too (the worker's code path, on the CPU)
    assert torch.equal(run_case(dict(kind="div", name=name, vocab=101, masked=True, temperature=1.7, seed=9))["value"],
                       divergence_sum(name, on_host["p"], on_host["q"], on_host["mask"], **kw))


def test_shape_errors_are_clear():
    p = torch.randn(3, 101)
    with pytest.raises(ValueError, match="width 100"):
        sharded.sharded_divergence_sum("fkl", p[:, :100], p[:, :100], vocab_size=101)
    with pytest.raises(ValueError, match="unknown divergence"):
        sharded.sharded_divergence_sum("kl", p, p, vocab_size=101)
    with pytest.raises(ValueError, match="expected"):
        sharded.all_gather_shards(p, 101, out=torch.empty(3, 100))


# --------------------------------------------------------------------------- the benchmark, tiny


def test_bench_quick_prints_a_row_per_configuration(capsys):
    from tools.bench import divergence as bench_divergence

    rows = bench_divergence.main(["--quick", "--divergences", "fkl,akl"])
    table = capsys.readouterr().out
    configs = [(v, t) for v, t in bench_divergence.QUICK_SIZES]
    assert len(rows) == len(configs) * 2 * len(bench_divergence.METHODS)
    for vocab, tokens in configs:
        for name in ("fkl", "akl"):
            for method in bench_divergence.METHODS:
                assert sum(f"| {name} | {vocab} | {tokens} | {method} |" in line for line in table.splitlines()) == 1
    assert all(r["max_rel_diff"] < 1e-5 for r in rows)
