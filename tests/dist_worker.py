"""Runs okd_scale's trainer and dumps what the tests check: the loss history and the teacher's weights.

In-process: `run_and_dump(cfg)`. Distributed: `torchrun --nproc_per_node 2 tests/dist_worker.py CONFIG [k=v ...]
[--then CONFIG [k=v ...]] ...`: the runs one after another in one process group (one launch for several runs: a
rank's start-up, about 10 s of CPU, is most of a tiny run's cost).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def run_and_dump(cfg, inspect=None) -> dict:
    """`inspect(result)`, if given, sees the finished run's engines before they are dropped."""
    from safetensors.torch import save_file

    from okd_scale import checkpoint
    from okd_scale.trainer import train

    result = train(cfg)
    if inspect is not None:
        inspect(result)
    out = Path(cfg.output_dir)
    teacher_state = checkpoint.full_state_dict(result.teacher) if result.teacher is not None else None
    report = {"history": result.history, "metrics": result.metrics, "stopped_by": result.stopped_by}
    if int(os.environ.get("RANK", "0")) == 0:
        if teacher_state is not None:
            untied = {k: v.clone() for k, v in teacher_state.items()}
            save_file(untied, str(out / "teacher_after.safetensors"))
        (out / "report.json").write_text(json.dumps(report))
    return report


if __name__ == "__main__":
    from okd_scale.configure import load_config
    from okd_scale.process import run_and_exit

    import logging

    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="[okd_scale] %(message)s")

    def worker() -> int:
        from okd_scale.train import EXIT_STOPPED

        runs = [[]]
        for arg in sys.argv[1:]:
            if arg == "--then":
                runs.append([])
            else:
                runs[-1].append(arg)
        stopped = [run_and_dump(load_config(run[0], run[1:]))["stopped_by"] for run in runs]
        return EXIT_STOPPED if any(stopped) else 0

    run_and_exit(worker)
