"""`okd plan`'s memory against the measured peak, per method, online module and teacher placement: a table.

    python -m tools.bench.memory                                   # the demo pair (made when missing)
    python -m tools.bench.memory --teacher T --student S --data train.jsonl --nproc 2 --batch-size 4 \
        --max-length 192 --cells kd,okd,okd_ckpt,okd_blocks_lr1e5,okd_head,okd_temp --placements replica,zero3

Each cell is a short run of okd_scale/train.py (tools.bench.methods.run_method: torchrun, `--nproc` processes,
the same rows) with the teacher's DeepSpeed config of the placement, and the plan of the same run from its config
(`okd plan --config ... --gpus-per-node nproc`, as the trainer's `deepspeed.teacher_config: auto` computes it).
Measured per rank: the peak (GPU: max allocated; CPU: peak RSS) and the base, the rank's peak before its models
were built (CPU: the interpreter, torch, DeepSpeed, transformers and the data; GPU: about 0). The plan counts what
the run allocates for its models, so it is compared with the peak less the base (the largest rank's); the verdict
is PASS when the plan is within `--tolerance` (15%) of it.

Cells: the method names of tools.bench.methods (kd, okd, the earlier OKD variants of configs/experiments/variants) and
`okd_ckpt`, the paper's OKD with the teacher's blocks checkpointed (online.gradient_checkpointing).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from okd_scale.plan import PLACEMENTS
from tools.bench import methods as bench
from tools.proof.experiments import earlier_okd

EXTRA = {"okd_ckpt": ("okd", ["online.gradient_checkpointing=true"])}  # cell: (method or variant, more overrides)
PLACEMENT_CONFIGS = {p.name: p.ds_config for p in PLACEMENTS}  # okd_scale.plan's placements: name -> DeepSpeed config
GIB = 2 ** 30


def cell_overrides(args, cell: str, placement: str) -> tuple[str, list[str]]:
    """(the bench method the cell runs, its overrides after the bench's own)."""
    method, extra = EXTRA.get(cell, (cell, []))
    return method, [f"deepspeed.teacher_config={PLACEMENT_CONFIGS[placement]}", "train.profile_phases=false", *extra]


def planned(args, method: str, overrides: list[str]):
    """okd plan's Plan of the run `method` with `overrides` makes (the same keys the bench passes to train.py)."""
    from okd_scale import plan

    variant = earlier_okd().get(method, [])
    keys = [f"method={'okd' if variant else method}", f"model.teacher={args.teacher}", f"model.student={args.student}",
            f"data.max_length={args.max_length}", f"train.per_device_train_batch_size={args.batch_size}",
            *(["train.bf16=true"] if args.bf16 else []), *args.overrides, *variant, *overrides]
    parser = plan.build_parser()
    parser.set_defaults(**plan.defaults_from_config(str(args.config), keys))
    from deepspeed.accelerator import get_accelerator

    a = parser.parse_args(["--nodes", "1", "--gpus-per-node", str(args.nproc),
                           "--accelerator", get_accelerator().device_name()])
    return plan.make_plan(plan.read_shape(a.teacher), plan.read_shape(a.student), plan.settings_from_args(a))


def measure(args, cell: str, placement: str, out: Path) -> dict:
    """One cell's run and its plan: the numbers of a table row."""
    method, overrides = cell_overrides(args, cell, placement)
    p = planned(args, method, overrides)
    planned_bytes = p.gpu_total + p.cpu_node_total / args.nproc  # per rank; on CPU the device is the host
    run = bench.run_method(method, args, out / placement / cell, overrides)
    metrics = json.loads((out / placement / cell / method / "metrics.json").read_text())
    peaks, bases = metrics["peak_memory_gib_per_rank"], metrics["base_memory_gib_per_rank"]
    models = max(pk - b for pk, b in zip(peaks, bases))
    biggest = max(p.items, key=lambda i: i.gpu + i.cpu_node)
    return {"cell": cell, "placement": placement, "peak_gib": peaks, "base_gib": bases, "measured_gib": models,
            "planned_gib": planned_bytes / GIB, "ratio": planned_bytes / GIB / models,
            "step_s": run["step_s"], "device": run["device"],
            "online_params": p.online_params, "reached_blocks": p.reached_blocks,
            "biggest": f"{biggest.name} {(biggest.gpu + biggest.cpu_node) / GIB:.2f}",
            "items_gib": {i.key: (i.gpu + i.cpu_node / args.nproc) / GIB for i in p.items}}


def table(rows: list[dict], tolerance: float) -> str:
    head = ["cell", "teacher", "online params", "reached blocks", "peak GiB/rank", "base GiB/rank",
            "peak - base GiB", "planned GiB/rank", "planned / measured", f"within {tolerance:.0%}",
            "plan's biggest item (GiB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ok = abs(r["ratio"] - 1) <= tolerance
        lines.append("| " + " | ".join([
            r["cell"], r["placement"], f"{r['online_params']:,}", str(r["reached_blocks"]),
            "/".join(f"{g:.2f}" for g in r["peak_gib"]), "/".join(f"{g:.2f}" for g in r["base_gib"]),
            f"{r['measured_gib']:.2f}", f"{r['planned_gib']:.2f}", f"{r['ratio']:.2f}", "PASS" if ok else "FAIL",
            r["biggest"]]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.pair_arguments(p)
    cells = ["kd", "okd", "okd_ckpt", "okd_blocks_lr1e5", "okd_head", "okd_temp"]
    p.add_argument("--cells", default=",".join(cells), help="comma-separated cells (see the docstring)")
    p.add_argument("--placements", default="replica,zero3",
                   help=f"teacher placements, a comma-separated subset of {','.join(PLACEMENT_CONFIGS)} (the offload "
                        f"ones with their deepspeed.* paths as overrides)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per run (the peak comes with the first)")
    p.add_argument("--batch-size", type=int, default=4, help="per process")
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--bf16", action="store_true", help="train in bf16 (train.bf16=true)")
    p.add_argument("--tolerance", type=float, default=0.15)
    p.add_argument("--out", help="run directory (default: a temporary one)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("overrides", nargs="*", help="more key=value for every run")
    args = p.parse_args(argv)
    wanted = [c.strip() for c in args.cells.split(",") if c.strip()]
    known = [*bench.METHODS, *earlier_okd(), *EXTRA]
    bad = [c for c in wanted if c not in known or EXTRA.get(c, (c,))[0] in ("sft", "seqkd", "sgo")]
    if bad:
        p.error(f"--cells: unknown or without a trained teacher module {bad}; expected a subset of "
                f"kd,okd,{','.join([*earlier_okd(), *EXTRA])}")
    placements = [x.strip() for x in args.placements.split(",") if x.strip()]
    if not placements or any(x not in PLACEMENT_CONFIGS for x in placements):
        p.error(f"--placements: expected a comma-separated subset of {','.join(PLACEMENT_CONFIGS)}")
    # what tools.bench.methods.run_method reads besides these flags
    args.warmup, args.divergence, args.sgo_new_tokens, args.teacher_config = 0, "fkl", 1, None
    bench.demo_pair(args)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_memory_"))
    out.mkdir(parents=True, exist_ok=True)
    args.data = bench.bench_rows(args.data, args.nproc * args.batch_size * args.steps, out, p)
    rows = []
    for placement in placements:
        for cell in wanted:
            print(f"bench_memory: {cell} / {placement} ...", file=sys.stderr, flush=True)
            rows.append(measure(args, cell, placement, out))
    print(f"\n{args.nproc} processes x {args.batch_size} sequences of at most {args.max_length} tokens, "
          f"{args.steps} steps, {'bf16' if args.bf16 else 'fp32'}; device {rows[0]['device']}\n")
    print(table(rows, args.tolerance))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
