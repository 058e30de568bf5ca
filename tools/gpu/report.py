"""What the GPU check found (Report, written as gpu_check.json), its time budget (Clock), and the markdown table
that shows both."""
from __future__ import annotations

import time
from dataclasses import dataclass, field


class Clock:
    """The check's time budget."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.monotonic(), budget_s

    def used(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.used()


@dataclass
class Report:
    """What the check found, stage by stage (written as gpu_check.json)."""

    environment: dict = field(default_factory=dict)
    carried: dict = field(default_factory=dict)
    tests: list = field(default_factory=list)
    tests_run: dict = field(default_factory=dict)  # the pytest run as a whole: status, seconds
    bench: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def _f(x, fmt: str, unit: str = "") -> str:
    return "-" if x is None else format(x, fmt) + unit


def table(report: Report, clock: Clock) -> str:
    """The whole report as markdown: the set-up, the tests per group, the methods' costs with their plans."""
    return "\n".join(_header(report, clock) + _tests_section(report) + _bench_section(report)) + "\n"


def _header(report: Report, clock: Clock) -> list[str]:
    env = report.environment
    memory = f", {env['device_memory_gib']:.0f} GiB" if env.get("device_memory_gib") else ""
    lines = ["# okd_scale GPU check" + (" (dry run)" if env.get("dry_run") else ""), "",
             f"{env.get('device')} ({env.get('device_name')}{memory}); torch {env.get('torch')}, deepspeed "
             f"{env.get('deepspeed')}, transformers {env.get('transformers')}, python {env.get('python')}; "
             f"{clock.used():.0f} s of a {clock.budget_s:.0f} s budget.", ""]
    peak = env.get("peak_flops")
    if peak:
        lines.append(f"MFU = FLOPs per step (okd_scale/perf.py) / (median step time x {peak / 1e12:.0f} TFLOP/s, "
                     f"the bf16 peak of okd_scale/perf.py's PEAK_BF16_FLOPS).")
    else:
        lines.append("MFU: no peak FLOP/s known for this device (okd_scale/perf.py PEAK_BF16_FLOPS).")
    bad = {k: v for k, v in report.carried.items() if str(v).startswith("error")}
    good = ", ".join(f"{k} {v}" for k, v in report.carried.items() if k not in bad)
    lines += ["", "Carried packages: " + good + ("; FAILED: " + "; ".join(f"{k}: {v}" for k, v in bad.items())
                                                 if bad else ""), ""]
    return lines


def _tests_section(report: Report) -> list[str]:
    lines = [f"## Tests on {report.environment.get('device_name')}", "", "| group | passed | failed | skipped | s |",
             "|---|---:|---:|---:|---:|"]
    for r in report.tests:
        name = r["group"] + (f" ({r['note']})" if r.get("note") else "")
        lines.append(f"| {name} | {r['passed']} | {r['failed']} | {r['skipped']} | {r['seconds']:.1f} |")
    if report.tests_run:
        total = {k: sum(r[k] for r in report.tests) for k in ("passed", "failed", "skipped")}
        lines.append(f"| **all** ({report.tests_run['status']}) | {total['passed']} | {total['failed']} | "
                     f"{total['skipped']} | {report.tests_run['seconds']:.1f} |")
    failures = [f for r in report.tests for f in r.get("failures", [])]
    return lines + (["", "Failed: " + ", ".join(failures) + " (tests.log)"] if failures else [])


def _bench_section(report: Report) -> list[str]:
    dtypes = "/".join(sorted({r["dtype"] for r in report.bench if "dtype" in r})) or "-"
    lines = ["", f"## Methods: tools/bench/methods.py, 1 process, {dtypes}, both engines on torch's Adam (no "
                 "fused-Adam build)", "",
             "| pair | method | batch x seq | step s | tokens/s | peak GiB | MFU | plan GiB | plan / peak | "
             "one-off s | run s | phases s/step |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report.bench:
        head = f"| {r['pair']} | {r['method']} | {r.get('batch', '-')} x {r.get('seq', '-')} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | | | | | |")
            continue
        phases = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["phases_s"].items(), key=lambda kv: -kv[1])
                           if v >= 5e-4)
        plan_gib = "error" if "plan_error" in r else _f(r.get("plan_gib"), ".2f")
        mfu = _f(100 * r["mfu"] if r.get("mfu") else None, ".1f", "%")
        lines.append(f"{head} {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_gib']:.2f} | {mfu} | {plan_gib} | "
                     f"{_f(r.get('plan_pct'), '.0f', '%')} | {r['one_off_s']:.1f} | {r['run_s']:.0f} | {phases} |")
    lines += ["", "step s: the median over the measured steps; peak GiB: the accelerator's max allocated bytes (on CPU "
                  "the peak RSS); plan GiB: okd_scale.plan's per-device total for the run's shapes, micro-batch, "
                  "sequence, ZeRO stages and dtype (kd, sgo, okd; sft and seqkd have no teacher); plan / peak: that "
                  "total over the measured peak; one-off s: seqkd's teacher generation; run s: the whole run (start, "
                  "loading, steps, checkpoint, export)."]
    plan_errors = [f"{r['pair']} {r['method']}: plan: {r['plan_error']}" for r in report.bench if "plan_error" in r]
    return lines + [f"- {n}" for n in report.notes + plan_errors]


def all_passed(report: Report) -> bool:
    """Every test passed (and ran), every run finished, every carried package imports."""
    return (all(r["failed"] == 0 and not r.get("note") for r in report.tests)
            and all("error" not in r for r in report.bench)
            and not any(str(v).startswith("error") for v in report.carried.values()))
