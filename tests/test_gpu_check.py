"""tools/gpu/check.py and its stages (suite.py, benchmark.py, report.py): its test selection names real tests, its
table, and its reduced run on the CPU."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tiny
from tools.gpu import benchmark, suite
from tools.gpu import report as gpu_report

ROOT = Path(__file__).resolve().parents[1]


def _test_names(path: Path) -> set[str]:
    return {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}


def test_every_selected_test_exists():
    """Each node id of GROUPS (and of their dry subsets) names a test file and, where given, a test in it."""
    for group in suite.GROUPS:
        for node in group.tests + (group.dry or []):
            file, _, rest = node.partition("::")
            assert (ROOT / file).is_file(), node
            if rest:
                assert rest.split("[")[0] in _test_names(ROOT / file), node
        for node in group.dry or []:  # a dry run's subset of the group's own tests
            assert any(suite._matches(node, t) for t in group.tests), node


def test_node_ids_select_cases():
    assert suite._matches("tests/test_train.py::test_one_process[kd]", "tests/test_train.py::test_one_process")
    assert suite._matches("tests/test_train.py::test_one_process[kd]", "tests/test_train.py")
    assert suite._matches("tests/test_train.py::test_one_process[kd]", "tests/test_train.py::test_one_process[kd]")
    assert not suite._matches("tests/test_train.py::test_one_process_x", "tests/test_train.py::test_one_process")
    assert not suite._matches("tests/test_train.py::test_one_process[okd]",
                              "tests/test_train.py::test_one_process[kd]")


def test_outcomes_from_the_report_or_from_a_stopped_run(tmp_path):
    """Per-test outcomes from pytest's JUnit report; from the -v log where pytest was stopped before writing it."""
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="tests.test_a" name="test_x[1]" time="0.5"/>'
                   '<testcase classname="tests.test_a" name="test_y" time="1"><failure message="no"/></testcase>'
                   '<testcase classname="tests.test_b" name="test_z" time="0"><skipped/></testcase>'
                   '</testsuite></testsuites>')
    assert suite._junit_cases(xml) == [
        {"id": "tests/test_a.py::test_x[1]", "outcome": "passed", "seconds": 0.5},
        {"id": "tests/test_a.py::test_y", "outcome": "failed", "seconds": 1.0},
        {"id": "tests/test_b.py::test_z", "outcome": "skipped", "seconds": 0.0}]
    log = tmp_path / "tests.log"
    log.write_text("tests/test_a.py::test_x[1] PASSED [ 33%]\ntests/test_a.py::test_y FAILED [ 66%]\n"
                   "tests/test_b.py::test_z ERROR\nsomething else\n")
    assert [(c["id"], c["outcome"]) for c in suite._log_cases(log)] == [
        ("tests/test_a.py::test_x[1]", "passed"), ("tests/test_a.py::test_y", "failed"),
        ("tests/test_b.py::test_z", "failed")]


def test_table_rows():
    """Tests per group with a total; a bench row with MFU and the plan's share; an error row; the peak named."""
    report = gpu_report.Report(
        environment={"device": "NVIDIA H200", "device_name": "cuda:0", "device_memory_gib": 139.8, "torch": "2.11",
                     "deepspeed": "0.19.8", "transformers": "5.17", "python": "3.12.3", "dry_run": False,
                     "peak_flops": 790e12},
        carried={"deepspeed": "0.19.8", "rouge_score": "error: ImportError: no nltk"},
        tests=[{"group": "divergences", "passed": 10, "failed": 1, "skipped": 0, "seconds": 2.0,
                "failures": ["tests/test_divergences.py::test_x"]}],
        tests_run={"status": "pytest exit 1", "seconds": 3.0},
        bench=[{"pair": "1B-class", "method": "okd", "batch": 8, "seq": 1024, "dtype": "bf16", "step_s": 0.5,
                "tokens_per_s": 16384.0, "peak_gib": 40.0, "mfu": 0.41, "plan_gib": 36.0, "plan_pct": 90.0,
                "one_off_s": 0.0, "run_s": 41.2, "phases_s": {"teacher_forward": 0.1, "optimizer": 0.0001}},
               {"pair": "1B-class", "method": "sft", "batch": 8, "seq": 1024,
                "error": "skipped: the time budget is spent"}])
    text = gpu_report.table(report, gpu_report.Clock(290))
    assert "790 TFLOP/s" in text and "PEAK_BF16_FLOPS" in text
    assert "FAILED: rouge_score: error: ImportError" in text
    assert "| divergences | 10 | 1 | 0 | 2.0 |" in text and "| **all** (pytest exit 1) | 10 | 1 | 0 | 3.0 |" in text
    assert "Failed: tests/test_divergences.py::test_x" in text
    assert ("| 1B-class | okd | 8 x 1024 | 0.500 | 16384 | 40.00 | 41.0% | 36.00 | 90% | 0.0 | 41 | "
            "teacher_forward 0.100 |") in text
    assert "| 1B-class | sft | 8 x 1024 | skipped: the time budget is spent |" in text
    assert not gpu_report.all_passed(report)


@pytest.mark.slow
def test_dry_run_on_the_cpu(tmp_path):
    """The reduced check (what `make gpu-check` does where the accelerator is the CPU): every group of tests
    ran and passed, every benchmark row has its numbers and its plan, the table is written and printed last."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "tools.gpu.check", "--dry-run", "--out", str(out),
                           "--work", str(tmp_path / "work")], env=tiny.subprocess_env(), capture_output=True,
                          text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    text = (out / "gpu_check.md").read_text()
    assert proc.stdout.rstrip().endswith(text.rstrip())
    assert {"gpu_check.md", "gpu_check.json", "tests.log", "tests.xml", "bench.log"} <= {p.name for p in out.iterdir()}
    for group in suite.GROUPS:
        row = next(line for line in text.splitlines() if line.startswith(f"| {group.name} |"))
        passed, failed = (int(x) for x in row.split("|")[2:4])
        assert passed > 0 and failed == 0, row
    for pair in benchmark.DRY_PAIRS:
        for method in pair.methods.split(","):
            row = next(line for line in text.splitlines() if line.startswith(f"| {pair.name} | {method} |"))
            cells = [c.strip() for c in row.split("|")[1:-1]]
            assert float(cells[3]) > 0 and float(cells[4]) > 0 and float(cells[5]) > 0, row  # step s, tokens/s, GiB
            assert cells[8].endswith("%"), row  # the plan against the measured peak
