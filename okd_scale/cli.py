"""The `okd` command: `okd train | evaluate | convert | plan [ARGS...]`, each the command line of its module
(`okd_scale/train.py`, `python -m okd_scale.evaluate`, `python -m okd_scale.convert`, `python -m okd_scale.plan`)."""
from __future__ import annotations

import argparse
import importlib
import math
import sys

COMMANDS = {
    "train": ("okd_scale.train", "train a student (a run config and key=value overrides)"),
    "evaluate": ("okd_scale.evaluate", "ROUGE-L of a model's answers on evaluation sets"),
    "convert": ("okd_scale.convert", "a run's checkpoint -> a Hugging Face model directory, checked by its logits"),
    "plan": ("okd_scale.plan", "memory per device and node, the teacher's placement, the step-time floor"),
}


def number_type(kind: type, minimum: float, strict: bool, what: str):
    """An argparse type: a finite number of `kind` at least `minimum` (above it when `strict`), `what` in the error."""
    def parse(text: str):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if kind is int:
            if not value.is_integer():
                raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
            value = int(value)
        if value < minimum or (strict and value == minimum) or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


POS_INT = number_type(int, 0, True, "a positive integer")
POS_FLOAT = number_type(float, 0, True, "a positive number")


def FRACTION(text: str) -> float:  # noqa: N802 (an argparse type, named as its siblings)
    """An argparse type: a number in (0, 1]."""
    value = POS_FLOAT(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def usage() -> str:
    return "usage: okd {" + ",".join(COMMANDS) + "} [ARGS...]\n\n" + "\n".join(
        f"  {name:<9} {what}" for name, (_, what) in COMMANDS.items()) + "\n\n`okd COMMAND --help` for its own options."


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"okd: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    if argv[0] == "train":  # a training process leaves its process group and exits as okd_scale/train.py does
        # heavy (torch): only `okd train` needs it
        from .process import run_and_exit

        run_and_exit(module.main, argv[1:])
    sys.argv[0] = f"okd {argv[0]}"
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
