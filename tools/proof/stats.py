"""Paired comparisons of methods scored on the same prompts: the mean per-prompt difference and its bootstrap
interval, pooled over training seeds, per evaluation set and on the average over the sets."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Paired:
    """mean(A - B) per prompt, its `level` percentile-bootstrap interval [low, high] and the prompts it rests on."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def text(self) -> str:
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def pooled(cells: list[dict], name: str) -> np.ndarray:
    """Each prompt's score on set `name`, the mean over `cells` (one method's training seeds): the cells'
    eval.sets[name].per_prompt."""
    rows = [c["eval"]["sets"][name].get("per_prompt") for c in cells]
    if not rows or any(r is None for r in rows):
        raise ValueError(f"set {name}: a cell has no per-prompt scores (cells scored before they were kept)")
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"set {name}: the cells scored different numbers of prompts {sorted({len(r) for r in rows})}")
    return np.mean(np.asarray(rows, dtype=np.float64), axis=0)


def paired_bootstrap(diffs: dict[str, np.ndarray], *, resamples: int = 10000, level: float = 0.95,
                     seed: int = 0) -> dict[str, Paired]:
    """For each set's per-prompt differences, and for "average" (the mean over the sets of their means, as the
    tables average), the mean difference with a percentile-bootstrap interval: prompts resampled with replacement,
    within each set, `resamples` times (the same draws for every set's and the average's interval)."""
    rng = np.random.default_rng(seed)
    alpha = (1 - level) / 2
    means, out = {}, {}
    for name, d in diffs.items():
        d = np.asarray(d, dtype=np.float64)
        if d.ndim != 1 or not len(d):
            raise ValueError(f"set {name}: expected a non-empty list of per-prompt differences")
        idx = rng.integers(0, len(d), size=(resamples, len(d)))
        means[name] = d[idx].mean(axis=1)
        out[name] = _paired(d.mean(), means[name], alpha, len(d))
    average = np.mean(list(means.values()), axis=0)
    out["average"] = _paired(float(np.mean([np.mean(d) for d in diffs.values()])), average, alpha,
                             sum(len(d) for d in diffs.values()))
    return out


def _paired(mean: float, boot: np.ndarray, alpha: float, n: int) -> Paired:
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    return Paired(float(mean), float(low), float(high), n)


def compare(groups: dict[str, list[dict]], baseline: str, sets: list[str], **kw) -> dict[str, dict[str, Paired]]:
    """Each method of `groups` (method -> its cells, one per training seed) against `baseline`: per set and on the
    average, the paired difference of their seed-pooled per-prompt scores (paired_bootstrap)."""
    base = {s: pooled(groups[baseline], s) for s in sets}
    out = {}
    for method, cells in groups.items():
        if method == baseline:
            continue
        diffs = {}
        for s in sets:
            mine = pooled(cells, s)
            if len(mine) != len(base[s]):
                raise ValueError(f"set {s}: {method} scored {len(mine)} prompts, {baseline} {len(base[s])}")
            diffs[s] = mine - base[s]
        out[method] = paired_bootstrap(diffs, **kw)
    return out


def verdict_lines(results: dict[str, dict[str, Paired]], baseline: str, level: float = 0.95) -> list[str]:
    """One line per method: its paired difference to `baseline` on the average, the interval, and whether the interval
    excludes 0."""
    lines = []
    for method, r in results.items():
        a = r["average"]
        side = ("above" if a.mean > 0 else "below") if a.excludes_zero else "not separated from"
        lines.append(f"- {method} - {baseline}: {a.text()} ROUGE-L ({level:.0%} paired bootstrap over prompts, "
                     f"seeds pooled): {side} {baseline}"
                     + ("" if a.excludes_zero else " (the interval includes 0)"))
    return lines


def paired_table(results: dict[str, dict[str, Paired]], baseline: str, sets: list[str]) -> str:
    """Markdown: one row per method, its paired difference to `baseline` [interval] per set and on the average."""
    head = ["method", *[f"{s} - {baseline}" for s in sets], f"average - {baseline}", "interval excludes 0"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in results.items():
        lines.append("| " + " | ".join([method, *[r[s].text() for s in sets], r["average"].text(),
                                        "yes" if r["average"].excludes_zero else "no"]) + " |")
    return "\n".join(lines)
