"""tools/proof/stats.py: paired per-prompt differences and their bootstrap intervals."""
import numpy as np
import pytest

from tools.proof import stats


def cell(**sets):
    return {"eval": {"sets": {name: {"per_prompt": list(v)} for name, v in sets.items()}}}


def test_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.4, 1.0, 4000), rng.normal(0.0, 2.0, 3000)
    r = stats.paired_bootstrap({"a": a, "b": b}, resamples=4000, seed=3)
    for name, d in (("a", a), ("b", b)):
        se = d.std() / np.sqrt(len(d))
        assert r[name].mean == pytest.approx(d.mean())
        assert (r[name].high - r[name].low) == pytest.approx(2 * 1.96 * se, rel=0.1)
        assert r[name].low < d.mean() < r[name].high
    se_avg = np.sqrt(a.var() / len(a) + b.var() / len(b)) / 2  # the average of the two set means
    assert r["average"].mean == pytest.approx((a.mean() + b.mean()) / 2)
    assert (r["average"].high - r["average"].low) == pytest.approx(2 * 1.96 * se_avg, rel=0.1)
    assert r["a"].excludes_zero and not r["b"].excludes_zero and r["average"].n == 7000


def test_constant_difference_has_no_width_and_pairing_matters():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 60, 300)  # prompts differ a lot, the methods by a steady 0.5 on each
    r = stats.compare({"kd": [cell(x=base)], "okd": [cell(x=base + 0.5)]}, "kd", ["x"])
    assert list(r) == ["okd"]
    assert r["okd"]["x"].mean == pytest.approx(0.5) and r["okd"]["x"].low == pytest.approx(0.5)
    assert r["okd"]["x"].high == pytest.approx(0.5) and r["okd"]["average"].excludes_zero
    lines = stats.verdict_lines(r, "kd")
    assert lines == ["- okd - kd: +0.50 [+0.50, +0.50] ROUGE-L (95% paired bootstrap over prompts, seeds pooled): "
                     "above kd"]
    table = stats.paired_table(r, "kd", ["x"]).splitlines()
    assert table[0] == "| method | x - kd | average - kd | interval excludes 0 |"
    assert table[2] == "| okd | +0.50 [+0.50, +0.50] | +0.50 [+0.50, +0.50] | yes |"


def test_seeds_are_pooled_per_prompt_and_bad_cells_are_named():
    pooled = stats.pooled([cell(x=[1.0, 2.0, 3.0]), cell(x=[3.0, 2.0, 1.0])], "x")
    assert pooled.tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="set x: the cells scored different numbers of prompts"):
        stats.pooled([cell(x=[1.0]), cell(x=[1.0, 2.0])], "x")
    with pytest.raises(ValueError, match="set x: a cell has no per-prompt scores"):
        stats.pooled([{"eval": {"sets": {"x": {"rougeL": 1.0}}}}], "x")
    with pytest.raises(ValueError, match="okd scored 2 prompts, kd 3"):
        stats.compare({"kd": [cell(x=[1, 2, 3])], "okd": [cell(x=[1, 2])]}, "kd", ["x"])
    r = stats.compare({"kd": [cell(x=[0, 10, 0, 10])], "sft": [cell(x=[10, 0, 10, 0])]}, "kd", ["x"])
    assert not r["sft"]["average"].excludes_zero
    assert stats.verdict_lines(r, "kd")[0].endswith("not separated from kd (the interval includes 0)")
