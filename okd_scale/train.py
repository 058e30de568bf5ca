"""Entry point: `deepspeed okd_scale/train.py --config cfg.yaml [key=value ...]` (also torchrun, or plain python).

Exit status: 0 done; 2 bad configuration, data, model or checkpoint (the message names what); 75 stopped
by SIGTERM or SIGUSR1 after saving a checkpoint (run the same command again to resume); 1 any other failure.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early with a checkpoint; resumable


def keys_epilog() -> str:
    """Every config key with its default and help, for --help."""
    import textwrap

    # heavy (torch, deepspeed, through the registries): only --help lists the keys
    from okd_scale.configure import key_help

    lines = ["config keys (YAML, or key=value on the command line):"]
    for key, default, help in key_help():
        lines += textwrap.wrap(f"{key} (default {default}): {help}", width=110, initial_indent="  ",
                               subsequent_indent="      ")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="okd_scale/train.py", description=__doc__.splitlines()[0],
                                epilog=keys_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=10")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    # first of all: the stop handler, installed before the slow imports
    from okd_scale.stop import REQUEST, StartupStop

    try:
        REQUEST.install()  # before the slow imports: a stop during start-up ends the run at once, exit 75
        return _main(argv)
    except StartupStop as e:
        print(f"stopped by {e.signal} during start-up, before the first step; run the same command again",
              file=sys.stderr)
        return EXIT_STOPPED


def _main(argv=None) -> int:
    args = parse_args(argv)
    # heavy (torch, deepspeed): imported after --help and after the stop handler is installed
    from okd_scale.checkpoint import CheckpointError, SaveError
    from okd_scale.config import ConfigError
    from okd_scale.configure import load_config
    from okd_scale.data import DataError
    from okd_scale.models import ModelError
    from okd_scale.trainer import TrainingError, train
    from okd_scale.watchdog import RankFailure

    # DeepSpeed calls torch.distributed collectives that torch marks deprecated, once per step: not actionable here
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    rank0 = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING,
                        format="[%(asctime)s] [okd_scale] %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
        if train(cfg).stopped_by:
            return EXIT_STOPPED
    except (ConfigError, DataError, ModelError, CheckpointError) as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, SaveError, RankFailure) as e:
        if rank0 or isinstance(e, RankFailure):  # a rank failure is reported by whichever rank survives
            print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # heavy (torch): the package path is set above, and --help needs none of it
    from okd_scale.process import run_and_exit

    run_and_exit(main)
