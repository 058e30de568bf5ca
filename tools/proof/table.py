"""A sweep's tables (tools/proof/reproduce.py): OUT/TABLE.md and OUT/table.json from its cells."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from tools import ROOT
from tools.proof import stats
from tools.proof.cells import mirror
from tools.proof.experiments import variants


def shown(path) -> str:
    """A path as the tables print it: relative to the repository when it lies inside it (no machine's prefix)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def table(cells: dict, sets: list[str], selection: str | None = None) -> tuple[str, dict]:
    """Markdown table and its JSON, one row per model: ROUGE-L per set and its average over the sets (mean ±
    population std over training seeds where a method has several, else over generation seeds), ROUGE-L on
    the validation rows, validation cross-entropy, training wall time and its fraction of sgo's (and the average
    of greedy answers where the protocol samples and the preset asks for both)."""
    groups: dict[str, list[dict]] = {}
    for cell in cells.values():
        groups.setdefault(cell.get("method", cell["name"]), []).append(cell)
    data = {}
    for name, group in groups.items():
        evs = [c["eval"] for c in group]
        row = {}
        for s in sets:
            if len(group) > 1:
                mean, std = _mean_std([e["sets"][s]["rougeL"] for e in evs])
            else:
                mean, std = evs[0]["sets"][s]["rougeL"], evs[0]["sets"][s]["std"]
            row[s] = {"mean": mean, "std": std, "n": evs[0]["sets"][s]["n"]}
        per_seed = [statistics.fmean(e["sets"][s]["rougeL"] for s in sets) for e in evs]
        row["average"], row["average_std"] = _mean_std(per_seed)
        row["per_seed_average"] = per_seed
        row["seeds"] = [c.get("seed") for c in group]
        if selection:
            row["validation_rougeL"] = statistics.fmean(e["sets"][selection]["rougeL"] for e in evs)
        if all("greedy" in c for c in group):
            row["greedy_average"] = statistics.fmean(statistics.fmean(c["greedy"]["sets"][s]["rougeL"] for s in sets)
                                                     for c in group)
        ces = [c["validation_ce"] for c in group if c.get("validation_ce") is not None]
        row["validation_ce"] = statistics.fmean(ces) if ces else None
        times = [c["train_s"] for c in group if c.get("train_s")]
        row["train_s"] = statistics.fmean(times) if times else None
        data[name] = row
    sgo_time = data.get("sgo", {}).get("train_s")
    greedy = all("greedy_average" in row for row in data.values())
    head = ["model", *sets, "average", *(["greedy average"] if greedy else []),
            *(["validation ROUGE-L"] if selection else []), "validation CE",
            "train wall s", "x sgo's time", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in data.items():
        t, ce = row["train_s"], row["validation_ce"]
        lines.append("| " + " | ".join([
            name, *[f"{row[s]['mean']:.2f} ± {row[s]['std']:.2f}" for s in sets],
            f"{row['average']:.2f}" + (f" ± {row['average_std']:.2f}" if len(row["seeds"]) > 1 else ""),
            *([f"{row['greedy_average']:.2f}"] if greedy else []),
            *([f"{row['validation_rougeL']:.2f}"] if selection else []), f"{ce:.3f}" if ce is not None else "-",
            f"{t:.0f}" if t else "-", f"{t / sgo_time:.2f}" if t and sgo_time else "-",
            str(len(row["seeds"])) if row["seeds"][0] is not None else "-"]) + " |")
    return "\n".join(lines), data


def verdict(data: dict) -> list[str]:
    """The proof's two questions in words: do the methods separate (best - worst > 3 x the largest training-seed
    std), and what fraction of the teacher's average ROUGE-L the best student reaches."""
    methods = {k: v for k, v in data.items() if k in variants()}
    if not methods:
        return []
    best = max(methods, key=lambda k: methods[k]["average"])
    worst = min(methods, key=lambda k: methods[k]["average"])
    spread = methods[best]["average"] - methods[worst]["average"]
    seeded = [v["average_std"] for v in methods.values() if len(v["seeds"]) > 1]
    lines = [f"- best method: {best} ({methods[best]['average']:.2f}); "
             f"worst: {worst} ({methods[worst]['average']:.2f}); spread {spread:.2f}"]
    if seeded:
        std = max(seeded)
        apart = spread > 3 * std
        lines.append(f"- largest training-seed std {std:.2f}: the methods {'separate' if apart else 'do not separate'} "
                     f"(spread {'>' if apart else '<='} 3 x {std:.2f})")
    if data.get("teacher", {}).get("average"):
        lines.append(f"- best student / teacher: {methods[best]['average'] / data['teacher']['average']:.0%} of the "
                     f"teacher's {data['teacher']['average']:.2f}")
    return lines


def write_table(args, preset: dict, out: Path, cells: dict, sets: dict, selection: str | None,
                choice: dict | None) -> None:
    """OUT/TABLE.md and OUT/table.json: the ROUGE-L table and its verdict; where the preset names a baseline, each
    method's paired difference to it; the teacher-forced analysis, the learning-rate choice, each cell's training
    seconds and the commits the cells ran at, where there are any."""
    test_sets = [s for s in sets if s != selection] or [selection]  # cpu-okd-search: the validation rows alone
    text, rows = table(cells, test_sets, selection)
    findings = verdict(rows)
    seeds = preset["eval"]["seeds"] if not args.gen_seeds else args.gen_seeds
    protocol = ("greedy" if not preset["eval"].get("do_sample")
                else f"sampled at temperature {preset['eval'].get('temperature', 1.0)}, generation seeds {seeds}")
    commits = sorted({c["commit"] for c in cells.values() if c.get("commit")})
    header = (f"# {args.preset}: ROUGE-L (F x100, {protocol}; ± is the population std over training seeds where "
              f"a method has several, else over generation seeds)\n\n"
              f"teacher {shown(args.teacher)}, student {shown(args.student)}, data {shown(args.train_data)}, "
              f"{args.nproc} processes, "
              f"training seeds {args.train_seeds}, trainer overrides {' '.join(preset['train'] + args.overrides)}"
              + (f", learning rate {choice['chosen']:g} (chosen on validation, below)" if choice else "")
              + (f"; cells run at commit {', '.join(commits)}" if commits else "") + "\n\n")
    sections = [text, "\n".join(findings) if findings else ""]
    extra = {"findings": findings}
    baseline = preset.get("baseline")
    if baseline:
        paired, extra["paired"] = paired_section(cells, test_sets, baseline)
        sections.append(paired)
    if preset.get("analysis"):
        sections.append(analysis_table(cells))
    if choice:
        extra["learning_rate"] = choice
        sections.append(lr_table(choice))
    trained = [f"{n} {c['train_s']:.0f}" for n, c in cells.items() if c.get("train_s")]
    if trained:
        sections.append("Training seconds per cell: " + ", ".join(trained))
    body = "\n\n".join(x for x in sections if x)
    (out / "TABLE.md").write_text(header + body + "\n")
    (out / "table.json").write_text(json.dumps({"preset": args.preset, "sets": test_sets, "selection": selection,
                                                "rows": rows, **extra}, indent=1))
    for name in ("TABLE.md", "table.json"):
        mirror(args, out / name)
    print("\n" + body)


def paired_section(cells: dict, test_sets: list[str], baseline: str) -> tuple[str, dict]:
    """(markdown, numbers) of each method's paired per-prompt difference to `baseline` (tools/proof/stats.py)."""
    groups: dict[str, list[dict]] = {}
    for c in cells.values():
        if c.get("method"):
            groups.setdefault(c["method"], []).append(c)
    if baseline not in groups or len(groups) < 2:
        return "", {}
    try:
        results = stats.compare(groups, baseline, test_sets)
    except ValueError as e:
        return f"No paired comparison: {e}.", {}
    text = (f"## Paired differences to {baseline} (ROUGE-L per prompt, seeds pooled; 95% bootstrap over prompts)\n\n"
            + stats.paired_table(results, baseline, test_sets) + "\n\n"
            + "\n".join(stats.verdict_lines(results, baseline)))
    return text, {m: {s: vars(p) for s, p in r.items()} for m, r in results.items()}


def analysis_table(cells: dict) -> str:
    """Markdown: per model (seeds pooled by the mean), the teacher-forced analysis on the validation rows: CE, and per
    tercile of the original teacher's uncertainty the top-1 agreement with it, KL(pT || pS) and the std of the
    student's logits."""
    from okd_scale.evaluate import TERCILES  # torch and transformers: not for --help

    groups: dict[str, list[dict]] = {}
    for c in cells.values():
        if c.get("analysis"):
            groups.setdefault(c.get("method", c["name"]), []).append(c["analysis"])
    if not groups:
        return ""
    head = ["model", "CE", *[f"{t} {k}" for t in TERCILES for k in ("agreement", "KL", "logit std")]]
    lines = ["## Teacher-forced, on the validation rows, against the original teacher (terciles of its uncertainty "
             "1 - pT(y))", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, group in groups.items():
        def mean(f):
            return statistics.fmean(f(a) for a in group)
        lines.append("| " + " | ".join([name, f"{mean(lambda a: a['ce']):.4f}", *[
            f"{mean(lambda a: a['terciles'][t][k]):.4f}" for t in TERCILES for k in ("agreement", "kl", "logit_std")]])
            + " |")
    return "\n".join(lines)


def lr_table(choice: dict) -> str:
    """Markdown: the learning-rate runs and the choice."""
    lines = [f"## Learning rate, chosen on validation ({', '.join(choice['methods'])}; {' '.join(choice['runs'])})",
             "", "| run | validation CE | validation ROUGE-L | train s |", "|---|---|---|---|"]
    lines += [f"| {n} | {c['validation_ce']:.4f} | {c['validation_rougeL']:.2f} | {c['train_s']:.0f} |"
              for n, c in choice["cells"].items()]
    lines += ["", "Mean validation CE per rate: " + ", ".join(f"{r:g} {ce:.4f}" for r, ce in
                                                              choice["mean_validation_ce"].items())
              + f"; chosen {choice['chosen']:g}"]
    return "\n".join(lines)

