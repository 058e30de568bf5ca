"""The sweeps' experiments as data: each method cell (a variant) and each preset is a YAML file under
configs/experiments/.

    configs/experiments/variants/<name>.yaml   about, set: [trainer key=value, ...], teacher_from, family
    configs/experiments/presets/<name>.yaml    about, extends, config, nproc, train, eval, methods, ...

A variant's `set` goes on top of its preset's `train` overrides. The earlier OKD variants (`family: earlier-okd`) pin
every setting they ran with, so that their committed cells keep their meaning whatever the defaults become. A
variant with `teacher_from: NAME` learns from NAME's teacher (same training seed) with NAME's trained online module
merged. A preset with `extends: NAME` is NAME's preset with its own keys replacing NAME's.
"""
from __future__ import annotations

import functools
from pathlib import Path

import yaml

from tools import ROOT

EXPERIMENTS = ROOT / "configs" / "experiments"

VARIANT_KEYS = {"about": str, "set": list, "teacher_from": str, "family": str}
VARIANT_REQUIRED = ("about", "set")
PRESET_KEYS = {
    "about": str, "extends": str, "config": str, "nproc": int, "prompt_format": str, "data": dict, "heal": dict,
    "train": list, "eval": dict, "validation_rows": int, "shared_sets": list, "demo_eval": bool, "train_seeds": list,
    "reseed_top": int, "reseed": list, "methods": list, "greedy": bool, "init_from": str, "select_lr": dict,
    "seeds_for": dict, "baseline": str, "analysis": bool,
}
PRESET_REQUIRED = ("about", "config", "nproc", "prompt_format", "train", "eval", "shared_sets", "demo_eval",
                   "train_seeds", "methods")
PROMPT_FORMATS = ("chat", "as-is")


class ExperimentError(ValueError):
    """An experiment file that cannot be used: the message names the file and the field."""


def _read(path: Path, keys: dict) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ExperimentError(f"{path}: not readable as YAML: {e}") from None
    if not isinstance(data, dict):
        raise ExperimentError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    for key, value in data.items():
        if key not in keys:
            raise ExperimentError(f"{path}: unknown key {key!r}; expected one of {', '.join(keys)}")
        if value is not None and not isinstance(value, keys[key]):
            raise ExperimentError(f"{path}: {key!r} must be a {keys[key].__name__}, got {value!r}")
    return data


def _required(path: Path, data: dict, required: tuple) -> None:
    if missing := [k for k in required if k not in data]:
        raise ExperimentError(f"{path}: missing {', '.join(repr(k) for k in missing)}")


def load_variants(root: Path = EXPERIMENTS) -> dict[str, dict]:
    """name -> variant, from root/variants/*.yaml (sorted by name); each `set` a list of key=value strings and each
    `teacher_from` another variant."""
    variants = {}
    for path in sorted((root / "variants").glob("*.yaml")):
        data = _read(path, VARIANT_KEYS)
        _required(path, data, VARIANT_REQUIRED)
        if bad := [x for x in data["set"] if not isinstance(x, str) or "=" not in x]:
            raise ExperimentError(f"{path}: 'set' entries must be trainer overrides key=value, got {bad}")
        variants[path.stem] = data
    for name, data in variants.items():
        if data.get("teacher_from") and data["teacher_from"] not in variants:
            raise ExperimentError(f"{root / 'variants' / (name + '.yaml')}: teacher_from {data['teacher_from']!r} "
                                  f"is not a variant ({', '.join(variants)})")
    return variants


def load_presets(variants: dict[str, dict], root: Path = EXPERIMENTS) -> dict[str, dict]:
    """name -> preset, from root/presets/*.yaml with each `extends` resolved; every method a variant, each variant's
    teacher_from source run in the same preset before it."""
    raw = {path.stem: (path, _read(path, PRESET_KEYS))
           for path in sorted((root / "presets").glob("*.yaml"))}
    presets = {}
    for name, (path, data) in raw.items():
        base = data.get("extends")
        if base is not None:
            if base not in raw or "extends" in raw[base][1]:
                raise ExperimentError(f"{path}: extends {base!r}, which is not a preset without 'extends' "
                                      f"({', '.join(n for n, (_, d) in raw.items() if 'extends' not in d)})")
            data = {**raw[base][1], **data}
        preset = {k: v for k, v in data.items() if k != "extends"}
        _required(path, preset, PRESET_REQUIRED)
        _check_preset(path, preset, variants, raw)
        presets[name] = preset
    return presets


def _check_preset(path: Path, preset: dict, variants: dict[str, dict], raw: dict) -> None:
    if preset["prompt_format"] not in PROMPT_FORMATS:
        raise ExperimentError(f"{path}: prompt_format must be one of {', '.join(PROMPT_FORMATS)}, "
                              f"got {preset['prompt_format']!r}")
    methods = preset["methods"]
    for key in ("methods", "reseed"):
        if unknown := [m for m in preset.get(key) or [] if m not in variants]:
            raise ExperimentError(f"{path}: {key} {unknown} are not variants (configs/experiments/variants: "
                                  f"{', '.join(variants)})")
    for i, method in enumerate(methods):
        source = variants[method].get("teacher_from")
        if source and source not in methods[:i]:
            raise ExperimentError(f"{path}: methods: {method} learns from {source}'s teacher, so {source} must come "
                                  f"before it")
    if preset.get("init_from") and preset["init_from"] not in raw:
        raise ExperimentError(f"{path}: init_from {preset['init_from']!r} is not a preset")
    if not (ROOT / preset["config"]).is_file():
        raise ExperimentError(f"{path}: config {preset['config']!r}: no such file in the repository")


@functools.cache
def variants() -> dict[str, dict]:
    """The repository's variants (load_variants), read once."""
    return load_variants()


@functools.cache
def presets() -> dict[str, dict]:
    """The repository's presets (load_presets), read once."""
    return load_presets(variants())


def teacher_sources() -> set[str]:
    """The variants another variant takes its teacher from (teacher_from)."""
    return {v["teacher_from"] for v in variants().values() if v.get("teacher_from")}


def earlier_okd() -> dict[str, list[str]]:
    """The earlier OKD variants (family: earlier-okd): name -> trainer overrides."""
    return {name: v["set"] for name, v in variants().items() if v.get("family") == "earlier-okd"}
