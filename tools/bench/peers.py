"""TRL's GKDTrainer and okd_scale side by side, on the same pair, rows, order and batch shapes: a table.

    python -m tools.bench.peers                                    # the demo pair, 1 process, fp32
    python -m tools.bench.peers --teacher T --student S --data train.jsonl --nproc 2 --bf16 \\
        --steps 10 --warmup 2 --batch-size 4 --max-length 128 --new-tokens 128 --out runs/peers --json peers.json

Five runs of `--warmup + --steps` optimizer steps, each under torchrun with `--nproc` processes:

| run             | what it optimises                                                                      |
|-----------------|----------------------------------------------------------------------------------------|
| TRL GKD lmbda=0 | trl.experimental.gkd.GKDTrainer, lmbda=0, beta=0: forward KL on the data's responses   |
| okd_scale kd    | method kd, loss.kd_ratio=1, loss.divergence=fkl: the same loss                         |
| okd_scale okd   | method okd with the same student loss, and its online module                           |
| TRL GKD lmbda=1 | GKDTrainer, lmbda=1, beta=0: every step samples up to --new-tokens tokens from the     |
|                 | student (temperature 1, top-k/top-p off, stop at eos) and scores them with forward KL  |
| okd_scale sgo   | method sgo, sgo.lambda=1, the same new tokens and sampling, forward KL                 |

Held equal:
- models: the same teacher and student directories. TRL trains as transformers' Trainer does under torchrun
  (DDP, each model whole on each device, ddp_find_unused_parameters=False); its student is kept in fp32 and
  `--bf16` turns on the Trainer's bf16 mixed precision, with the teacher loaded in bf16. okd_scale runs its
  shipped DeepSpeed configs with train.bf16 under `--bf16`; the teacher's placement is okd_scale's default
  (deepspeed.teacher_config) unless `--teacher-config` says otherwise.
- rows and rendering: every run reads the first nproc x batch x steps rows of `--data`, tokenised by
  okd_scale.data (the tokenizer's chat template for `messages` rows, okd_scale's truncation to
  `--max-length`). TRL's batches are okd_scale.data.collate's tensors (the same input ids, attention mask and
  labels) plus the left-padded prompts its generation reads, in place of its DataCollatorForChatML (which
  pads on the left, keeps the last max_length tokens and puts the loss on everything after the prompt).
- order: TRL's training loader draws from okd_scale's own per-rank sampler (data.build_dataloader's
  DistributedSampler, the run config's seed, epoch 0), so at every step each rank of either trainer holds
  the same rows.
- optimisation: learning rate, weight decay and clipping from the run config (`--config` with the
  overrides), constant schedule without warm-up, no gradient accumulation or checkpointing (TRL's
  SFTConfig would turn checkpointing on, which also turns off the KV cache of its generation), AdamW with
  betas (0.9, 0.999) and eps 1e-8 in both, softmax temperature 1.

Measured: the step time is the wall time of one optimizer step, its median over the steps after the
warm-up. TRL's is taken by a TrainerCallback from on_step_begin to on_step_end, the accelerator
synchronised at both ends (the Trainer fetches the batch before on_step_begin); okd_scale's is its
log_history time/step_s (run with train.profile_phases=false where that key exists), which includes
fetching the batch. tokens/s = non-padding tokens of the global batch (on sampling steps the prompts and
the sampled tokens up to eos) over the measured steps / their summed step time; tokens/step is their mean,
so the sampled lengths can be compared. Peak memory per rank at the end of the run: the accelerator's max
allocated on a GPU, the peak RSS on CPU (which includes an offloaded teacher). The last column is the
tokens/s over that of the TRL run the row pairs with (kd, okd: lmbda=0; sgo: lmbda=1).

`--repeat N` runs the five N times, one after another (so that a slow spell of a shared machine falls on every
row alike), each repeat in DIR/repeat<k>/; each cell is then the median over the repeats with its range
(min-max), a ratio taken within each repeat first, and the peak memory per rank is the largest of the repeats.
`--cells DIR` keeps each run's row in DIR/repeat<k>/<run>.json (with the flags, the commit and the date) as soon
as it finishes, so that a long comparison spans sessions: run again with the same flags, only the missing runs run.

Targets: okd_scale kd >= 1.2x TRL GKD's tokens/s (lmbda=0); sgo >= 1.2x TRL GKD's tokens/s (lmbda=1);
okd <= 1.25x kd's step time.

TRL is a benchmark-only extra: `pip install -e .[bench]`. `--out DIR` keeps every run (TRL's in
DIR/trl_gkd*/ with each rank's measurements and the log); `--json PATH` writes the numbers.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools import ROOT
from tools.bench.methods import bench_rows, demo_pair, has_config_key, launch_env, pair_arguments, run_method

# (run, label, the TRL run it pairs with), in the table's order
RUNS = (("trl_gkd", "TRL GKD lmbda=0", None), ("kd", "okd_scale kd", "trl_gkd"), ("okd", "okd_scale okd", "trl_gkd"),
        ("trl_gkd_onpolicy", "TRL GKD lmbda=1", None), ("sgo", "okd_scale sgo", "trl_gkd_onpolicy"))
TRL_LMBDA = {"trl_gkd": 0.0, "trl_gkd_onpolicy": 1.0}
# what makes okd_scale's runs optimise TRL's loss: forward KL alone, softmax and sampling temperature 1
SAME_LOSS = ["loss.kd_ratio=1", "loss.divergence=fkl", "loss.temperature=1", "sgo.temperature=1", "sgo.top_p=1"]


# ------------------------------------------------------------------------------------------ TRL's side

def gkd_batch(features: list[dict], pad_id: int, device) -> dict:
    """okd_scale's collated batch of `features`, with the left-padded prompts (`prompts`,
    `prompt_attention_mask`) that GKDTrainer samples from, on `device`."""
    import torch

    # heavy (torch): imported in a TRL run's processes only
    from okd_scale import data, generation

    batch = data.collate(features, pad_id)
    prompts = generation.prompts_of(batch)
    width = max(len(p) for p in prompts)
    batch["prompts"] = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    batch["prompt_attention_mask"] = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        batch["prompts"][i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        batch["prompt_attention_mask"][i, width - len(p):] = 1
    return {k: v.to(device) for k, v in batch.items()}


def gkd_config(spec: dict, output_dir: str, use_cpu: bool):
    """GKDTrainer's settings for the run `spec` describes: the run config's optimisation settings, a constant
    schedule, no accumulation, checkpointing, logging or saving, the student in fp32."""
    from trl.experimental.gkd import GKDConfig  # the benchmark extra: imported in a TRL run's processes only

    return GKDConfig(
        output_dir=output_dir, max_steps=spec["max_steps"], seed=spec["seed"],
        per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        learning_rate=spec["learning_rate"], weight_decay=spec["weight_decay"], max_grad_norm=spec["max_grad_norm"],
        lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        bf16=spec["bf16"], gradient_checkpointing=False, use_cpu=use_cpu,
        model_init_kwargs={"dtype": "float32"},
        teacher_model_init_kwargs={"dtype": "bfloat16" if spec["bf16"] else "float32"},
        lmbda=spec["lmbda"], beta=0.0, temperature=1.0, max_new_tokens=spec["new_tokens"],
        max_length=spec["max_length"], ddp_find_unused_parameters=False, dataloader_num_workers=0,
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True)


def worker(spec_file: str) -> int:
    """One process of a TRL GKDTrainer run (under torchrun); writes its step times, tokens per step and peak
    memory to rank<r>.json next to the spec."""
    from functools import partial

    from datasets import Dataset
    from deepspeed.accelerator import get_accelerator
    from torch.utils.data import DataLoader
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDTrainer

    # heavy (torch): imported in a TRL run's processes only
    from okd_scale import data, models, perf

    spec = json.loads(Path(spec_file).read_text())
    accel = get_accelerator()
    config = gkd_config(spec, str(Path(spec_file).parent), use_cpu=accel.device_name() == "cpu")
    tokenizer = models.load_tokenizer(spec["student"])
    examples, _ = data.load_dataset(spec["data"], tokenizer, spec["max_length"])
    rank, world, pad = config.process_index, config.world_size, tokenizer.pad_token_id
    times, tokens = [], []

    class StepClock(TrainerCallback):
        """Wall time of each optimizer step, the accelerator synchronised at both ends."""

        def on_step_begin(self, args, state, control, **kwargs):
            accel.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            accel.synchronize()
            times.append(time.perf_counter() - self.start)

    class Bench(GKDTrainer):
        def get_train_dataloader(self):
            """okd_scale's sampler for this rank; batches already on the device, as accelerate's loader gives them."""
            sampler = data.build_dataloader(examples, batch_size=spec["batch_size"], pad_token_id=pad, rank=rank,
                                            world_size=world, seed=spec["seed"]).sampler
            return DataLoader(examples, batch_size=spec["batch_size"], sampler=sampler, drop_last=True,
                              collate_fn=partial(gkd_batch, pad_id=pad, device=self.args.device))

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            tokens.append(int(inputs["attention_mask"].sum()))  # GKD puts the sampled batch in `inputs`
            return loss

    trainer = Bench(model=spec["student"], teacher_model=spec["teacher"], args=config,
                    train_dataset=Dataset.from_list(examples), processing_class=tokenizer, callbacks=[StepClock()])
    trainer.train()
    result = {"step_s": times, "tokens": tokens, "peak_bytes": perf.peak_memory_bytes(), "device": perf.device_name()}
    (Path(spec_file).parent / f"rank{rank}.json").write_text(json.dumps(result))
    return 0


def run_trl(name: str, args, cfg, out: Path) -> dict:
    """One TRL GKDTrainer run in `out/name`; its measured steps, like bench_methods.run_method's."""
    run = out / name
    run.mkdir(parents=True, exist_ok=True)
    for old in run.glob("rank*.json"):
        old.unlink()
    spec = {"teacher": args.teacher, "student": args.student, "data": args.data, "lmbda": TRL_LMBDA[name],
            "max_steps": args.warmup + args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
            "new_tokens": args.new_tokens, "bf16": args.bf16, "seed": cfg.seed,
            "learning_rate": cfg.train.learning_rate, "weight_decay": cfg.train.weight_decay,
            "max_grad_norm": cfg.train.max_grad_norm}
    (run / "spec.json").write_text(json.dumps(spec, indent=2))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           "-m", "tools.bench.peers", "--worker", str(run / "spec.json")]
    clock = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(args.nproc), capture_output=True, text=True)
    (run / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"bench_peers: {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    ranks = [json.loads((run / f"rank{r}.json").read_text()) for r in range(args.nproc)]
    steps = args.warmup + args.steps
    if any(len(r["step_s"]) != steps or len(r["tokens"]) != steps for r in ranks):
        raise SystemExit(f"bench_peers: {name} measured {[len(r['step_s']) for r in ranks]} steps per rank, "
                         f"expected {steps}; see {run / 'log.txt'}")
    times = ranks[0]["step_s"][args.warmup:]
    tokens = [sum(r["tokens"][i] for r in ranks) for i in range(args.warmup, steps)]
    return {"method": name, "step_s": statistics.median(times), "tokens_per_s": sum(tokens) / sum(times),
            "tokens_per_step": statistics.mean(tokens), "peak_gib_per_rank": [r["peak_bytes"] / 2**30 for r in ranks],
            "device": ranks[0]["device"], "run_s": time.perf_counter() - clock}


# --------------------------------------------------------------------------------------------- the table

MEDIANS = ("step_s", "tokens_per_s", "tokens_per_step", "ratio")


def summarise(repeats: list[list[dict]]) -> list[dict]:
    """One row per run from the same run of every repeat: the median of each of MEDIANS with its (min, max) as
    `<key>_range`, the largest peak memory per rank, and the repeats' own rows under `repeats`."""
    rows = []
    for same in zip(*repeats):
        row = {**same[0], "repeats": list(same),
               "peak_gib_per_rank": [max(g) for g in zip(*(r["peak_gib_per_rank"] for r in same))]}
        for key in MEDIANS:
            values = [r[key] for r in same]
            if None not in values:
                row[key], row[f"{key}_range"] = statistics.median(values), (min(values), max(values))
        rows.append(row)
    return rows


def _cell(row: dict, key: str, fmt: str) -> str:
    """`row[key]` in `fmt`, with its range when it has one from several repeats."""
    lo, hi = row.get(f"{key}_range", (row[key], row[key]))
    text = format(row[key], fmt)
    return text if len(row.get("repeats", [])) < 2 else f"{text} ({format(lo, fmt)}-{format(hi, fmt)})"


def table(results: list[dict]) -> str:
    """The markdown table of `results` (each with its label, precision, nproc and pair ratio; with several repeats,
    medians and ranges), then the targets."""
    head = ["trainer / method", "precision", "nproc", "step s (median)", "tokens/s", "tokens/step", "peak GiB/rank",
            "tokens/s x TRL pair"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["label"], r["precision"], str(r["nproc"]), _cell(r, "step_s", ".3f"),
                 _cell(r, "tokens_per_s", ".0f"),
                 f"{r['tokens_per_step']:.0f}", "/".join(f"{g:.2f}" for g in r["peak_gib_per_rank"]),
                 "-" if r["ratio"] is None else _cell(r, "ratio", ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    by = {r["method"]: r for r in results}
    kd, okd, sgo = by.get("kd"), by.get("okd"), by.get("sgo")
    checks = []
    if kd:
        checks.append(f"okd_scale kd / TRL GKD lmbda=0 tokens/s = {kd['ratio']:.2f} (target >= 1.2): "
                      f"{'PASS' if kd['ratio'] >= 1.2 else 'FAIL'}")
    if sgo:
        checks.append(f"okd_scale sgo / TRL GKD lmbda=1 tokens/s = {sgo['ratio']:.2f} (target >= 1.2): "
                      f"{'PASS' if sgo['ratio'] >= 1.2 else 'FAIL'}")
    if okd and kd:  # within each repeat, then the median
        ratio = statistics.median(o["step_s"] / k["step_s"] for o, k in zip(okd.get("repeats", [okd]),
                                                                            kd.get("repeats", [kd])))
        checks.append(f"okd_scale okd / kd step time = {ratio:.2f} (target <= 1.25): "
                      f"{'PASS' if ratio <= 1.25 else 'FAIL'}")
    return "\n".join(lines + [""] + checks)


SETTINGS = ("nproc", "steps", "warmup", "batch_size", "max_length", "new_tokens", "bf16", "teacher_config")


def cell_settings(args) -> dict:
    """What a cell's numbers depend on besides the code: the flags, the models' and rows' file names, the overrides."""
    return {**{key: getattr(args, key) for key in SETTINGS}, "overrides": list(args.overrides),
            **{key: Path(getattr(args, key)).name for key in ("teacher", "student", "data")}}


def cached_run(args, name: str, k: int, run) -> dict:
    """`run()`'s row, kept as the cell --cells/repeat<k+1>/<name>.json when --cells is given: a cell already there
    (a previous, interrupted invocation's, with the same settings) is read instead of run again."""
    if not args.cells:
        return run()
    path = Path(args.cells) / f"repeat{k + 1}" / f"{name}.json"
    want = cell_settings(args)
    if path.exists():
        cell = json.loads(path.read_text())
        if cell.get("settings") != want:
            raise SystemExit(f"bench_peers: {path} was measured with {cell.get('settings')}, not {want}: "
                             "remove it or give another --cells")
        print(f"bench_peers: {path} kept", file=sys.stderr, flush=True)
        return cell["row"]
    from okd_scale.checkpoint import write_atomic
    from tools.proof.cells import git_commit

    row = run()
    path.parent.mkdir(parents=True, exist_ok=True)
    cell = {"settings": want, "row": row, "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M")}
    write_atomic(path, json.dumps(cell, indent=2))
    return row


def run_all(args, cfg, out: Path, extra: list[str], precision: str, k: int) -> list[dict]:
    """Repeat k's five runs in `out`, in RUNS' order: their rows, each with its label and pair ratio."""
    results = []
    for name, label, pair in RUNS:
        print(f"bench_peers: {label}{f' (repeat {k + 1}/{args.repeat})' if args.repeat > 1 else ''} ...",
              file=sys.stderr, flush=True)
        r = dict(cached_run(args, name, k, lambda: run_trl(name, args, cfg, out) if name in TRL_LMBDA
                            else run_method(name, args, out, extra)))
        paired = next((x for x in results if x["method"] == pair), None)
        r.update(label=label, trainer="trl" if name in TRL_LMBDA else "okd_scale", precision=precision,
                 nproc=args.nproc, pairs_with=pair,
                 ratio=r["tokens_per_s"] / paired["tokens_per_s"] if paired else None)
        results.append(r)
    return results


def main(argv=None) -> int:
    # heavy (torch): imported when the command runs, not when the module is imported
    from okd_scale.config import ConfigError, DeepSpeedArgs
    from okd_scale.configure import load_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pair_arguments(p)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="measured steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4, help="per process")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128, help="tokens sampled per sequence (TRL lmbda=1, sgo)")
    p.add_argument("--bf16", action="store_true", help="every run in bf16 (default: fp32)")
    p.add_argument("--repeat", type=int, default=1, help="run the five N times: medians and ranges")
    p.add_argument("--teacher-config", default=DeepSpeedArgs().teacher_config,
                   help="okd_scale's deepspeed.teacher_config (default: okd_scale's, %(default)s)")
    p.add_argument("--out", help="run directory (default: a temporary one)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--cells", help="a directory that keeps each run's row (repeat<k>/<run>.json) as it finishes; "
                   "an interrupted invocation given the same directory and flags runs only what is missing")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one process of a TRL run: its spec file
    p.add_argument("overrides", nargs="*", help="more key=value for okd_scale's runs")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    for flag in ("steps", "warmup", "nproc", "batch_size", "max_length", "new_tokens", "repeat"):
        if getattr(args, flag) < (0 if flag == "warmup" else 1):
            p.error(f"--{flag.replace('_', '-')} must be a {'non-negative' if flag == 'warmup' else 'positive'} "
                    f"integer, got {getattr(args, flag)}")
    if importlib.util.find_spec("trl") is None:
        raise SystemExit("bench_peers: TRL is not installed; install the benchmark extra: pip install -e .[bench]")
    demo_pair(args)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_peers_"))
    out.mkdir(parents=True, exist_ok=True)
    args.data = bench_rows(args.data, args.nproc * args.batch_size * (args.warmup + args.steps), out, p)
    try:  # the settings TRL copies: seed (data order), learning rate, weight decay, clipping
        cfg = load_config(args.config, [f"model.teacher={args.teacher}", f"model.student={args.student}",
                                        f"data.train_file={args.data}", "data.eval_file=null", *args.overrides])
    except ConfigError as e:
        p.error(str(e))
    # what bench_methods.run_method reads besides the flags above
    args.divergence, args.sgo_new_tokens = "fkl", args.new_tokens
    extra = SAME_LOSS + (["train.profile_phases=false"] if has_config_key("train.profile_phases") else [])
    precision = "bf16" if args.bf16 else "fp32"
    repeats = [run_all(args, cfg, out / f"repeat{k + 1}" if args.repeat > 1 else out, extra, precision, k)
               for k in range(args.repeat)]
    results = summarise(repeats)
    print(f"\n{args.nproc} processes, {args.batch_size} sequences/process of at most {args.max_length} tokens, "
          f"{args.steps} measured steps after {args.warmup}, {args.repeat} repeat(s), forward KL, "
          f"{args.new_tokens} new tokens on sampling runs, {precision}; device {results[0]['device']}\n")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
