"""A run config made whole: the method's own defaults (its registry entry) under the file and the overrides, and
the checks that need the registries (the names of methods, divergences, online modules and objectives, and what a
method supports) before config's own."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .config import ConfigError, RunConfig, build, check, check_values, key_rows, named_keys, read_values, yaml_text
from .divergences import DIVERGENCES
from .methods import METHODS, ONLINE_OBJECTIVES
from .models import ONLINE_MODULES

__all__ = ["ConfigError", "REGISTRIES", "load_config", "validate", "method_defaults", "key_help", "key_table"]

# the registries config keys take names of (config.arg's `names`)
REGISTRIES = {"methods": METHODS, "divergences": DIVERGENCES, "online_modules": ONLINE_MODULES,
              "online_objectives": ONLINE_OBJECTIVES}


def method_defaults(method: str) -> dict:
    """The defaults the method registry declares for `method` ({dotted key: value}; {} for an unknown name, which
    validate reports)."""
    entry = METHODS.get(method)
    return dict(entry.defaults) if entry is not None else {}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config (optional), apply `key=value` overrides over the method's own defaults, validate."""
    values, origin = read_values(path)
    cfg = build(values, origin, overrides=overrides)
    defaults = method_defaults(cfg.method)
    if defaults:
        cfg = build(values, origin, defaults, overrides)
    validate(cfg, origin=origin)
    return cfg


def _value(cfg: RunConfig, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: RunConfig, origin: str = "config") -> None:
    """Every key that takes a registry's names holds one of them, what the method supports, then ranges, choices
    and paths (config.check_values); raises ConfigError naming the key."""
    for key, names in named_keys():
        value = _value(cfg, key)
        check(value in REGISTRIES[names], origin, key, f"one of {', '.join(REGISTRIES[names])}", value)
    method = METHODS[cfg.method]
    check(method.vocab_shards or cfg.loss.vocab_shards == 1, origin, "loss.vocab_shards",
          f"1 for method {cfg.method} (its loss is not vocab-sharded yet)", cfg.loss.vocab_shards)
    check_values(cfg, origin, needs_teacher=method.needs_teacher)


def key_help() -> list[tuple[str, str, str]]:
    """(dotted key as the config file spells it, its default as YAML, its help with the registry's names it takes
    and the defaults methods declare for it) for every key, in order."""
    rows = []
    for key, spelled, default, help, names in key_rows():
        own = [f"{name}: {yaml_text(m.defaults[key])}" for name, m in METHODS.items() if key in m.defaults]
        rows.append((spelled, default, help + (f": {' | '.join(REGISTRIES[names])}" if names else "")
                     + (f" (method {'; '.join(own)})" if own else "")))
    return rows


def key_table() -> str:
    """The README's table of every config key: its default and what it is."""
    lines = ["| key | default | what it is |", "|---|---|---|"]
    for key, default, help in key_help():
        lines.append(f"| `{key}` | `{default}` | {help.replace('|', chr(92) + '|')} |")
    return "\n".join(lines)
