"""Dependency floors: what the code needs, said once in okd_scale.FLOORS and in pyproject.toml, checked at import;
the constraints file make installs with."""
from __future__ import annotations

import re
from pathlib import Path

import okd_scale

ROOT = Path(__file__).resolve().parents[1]


def test_floors_match_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    for name, (floor, _) in okd_scale.FLOORS.items():
        assert re.search(rf'"{name}>={re.escape(floor)}[",]', text), name


def test_an_old_dependency_is_named_with_what_needs_it():
    problems = okd_scale.dependency_problems({"torch": "2.13.0+cpu", "transformers": "4.46.3", "deepspeed": "0.19.8",
                                              "peft": None})
    assert problems == ["transformers 4.46.3 is older than 4.56, which okd_scale needs for from_pretrained(dtype=...) "
                        "and a tensor of positions as logits_to_keep: pip install 'transformers>=4.56'"]
    assert okd_scale.dependency_problems({"torch": "2.4.1", "deepspeed": "0.15.0"})[1].startswith("deepspeed 0.15.0")


def test_constraints_pin_versions_above_the_floors():
    from packaging.version import Version

    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert "torch" not in pins  # the Makefile pins torch (TORCH_SPEC), the CPU wheel or a site's CUDA build
    for name, (floor, _) in okd_scale.FLOORS.items():
        if name != "torch":
            assert Version(pins[name]) >= Version(floor), name
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
