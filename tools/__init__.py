"""Developer scripts, run from the repository root as modules (`python -m tools.bench.methods --help`).

demo/   the embedded default: the teacher, the student, the data, and the end-to-end demo
bench/  speed and memory tables: divergences, methods, TRL beside okd_scale
proof/  the method comparisons (sweeps), on this machine or packed for a GPU machine
gpu/    what a GPU machine without network needs (wheels) and its one-command check
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
