"""Stage 1 of the GPU check: the tests that run on the accelerator (GROUPS), in one pytest run with a JUnit report,
counted per group."""
from __future__ import annotations

import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tools.gpu.machine import run_logged
from tools.gpu.report import Clock


@dataclass
class Group:
    """Tests that run on the accelerator: pytest node ids, and the dry run's subset (None: the same)."""

    name: str
    tests: list
    dry: Optional[list] = None


GROUPS = [
    Group("divergences vs float64: fp32, bf16, chunked, hidden path", ["tests/test_divergences.py"],
          ["tests/test_divergences.py::test_hidden_path_equals_dense_logits"]),
    Group("vocabulary-sharded divergences, world size 1",
          ["tests/test_sharded.py::test_world_size_one_is_dense_exactly"]),
    Group("every method in process (world size 1), and bf16",
          ["tests/test_train.py::test_one_process", "tests/test_train.py::test_bf16_one_process"],
          ["tests/test_train.py::test_one_process[kd]"]),
    Group("bitwise resume mid-epoch, fp32", ["tests/test_resume.py::test_resume_mid_epoch_is_exact_in_process"]),
    Group("checkpoint -> Hugging Face conversion parity (ZeRO-2, ZeRO-3)",
          ["tests/test_convert.py::test_student_fp32_equals_the_trained_model[1proc-zero2]",
           "tests/test_convert.py::test_student_fp32_equals_the_trained_model[1proc-zero3]"],
          ["tests/test_convert.py::test_student_fp32_equals_the_trained_model[1proc-zero2]"]),
    Group("evaluation and batched generation", ["tests/test_evaluate.py"],
          ["tests/test_evaluate.py::test_left_padding_matches_unbatched",
           "tests/test_evaluate.py::test_cli_outputs_match_evaluate_model"]),
]


def run_tests(groups: list, dry: bool, clock: Clock, logs: Path, limit_s: float) -> tuple[list[dict], dict]:
    """One pytest run over every group's tests: per group passed, failed, skipped, seconds; and the run's
    status and seconds."""
    ids = [t for g in groups for t in (g.dry if dry and g.dry else g.tests)]
    xml = logs / "tests.xml"
    timeout = max(10.0, min(limit_s, clock.left()))
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", f"--junitxml={xml}", *ids]
    started = time.perf_counter()
    with open(logs / "tests.log", "w") as log:
        code = run_logged(cmd, log, timeout)
    status = f"pytest exit {code}" if code is not None else f"timed out after {timeout:.0f} s"
    cases = _junit_cases(xml) if xml.is_file() else _log_cases(logs / "tests.log")  # killed: no report
    rows = []
    for g in groups:
        mine = [c for c in cases if any(_matches(c["id"], t) for t in (g.dry if dry and g.dry else g.tests))]
        row = {"group": g.name, "passed": sum(c["outcome"] == "passed" for c in mine),
               "failed": sum(c["outcome"] == "failed" for c in mine),
               "skipped": sum(c["outcome"] == "skipped" for c in mine),
               "seconds": sum(c["seconds"] for c in mine), "failures": [c["id"] for c in mine
                                                                          if c["outcome"] == "failed"]}
        if not mine:
            row["note"] = f"no results ({status})"
        rows.append(row)
    return rows, {"status": status, "seconds": time.perf_counter() - started}


def _junit_cases(xml: Path) -> list[dict]:
    out = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "skipped"
        out.append({"id": f"{module}.py::{case.get('name')}", "outcome": outcome,
                    "seconds": float(case.get("time", 0.0))})
    return out


def _log_cases(log: Path) -> list[dict]:
    """The outcomes pytest -v printed before it was stopped (no times)."""
    import re

    words = {"PASSED": "passed", "FAILED": "failed", "ERROR": "failed", "SKIPPED": "skipped"}
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)\b", line)
        if m:
            out.append({"id": m.group(1), "outcome": words[m.group(2)], "seconds": 0.0})
    return out


def _matches(case_id: str, selector: str) -> bool:
    """Whether a test (path.py::name[param]) is selected by a node id (a file, a function, or one case)."""
    if "::" not in selector:
        return case_id.startswith(selector + "::")
    return case_id == selector or case_id.startswith(selector + "[")
