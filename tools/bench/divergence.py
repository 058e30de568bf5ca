"""Peak memory and time (forward + backward) of one divergence over [tokens, V] logits, four ways.

  dense           logits = hidden @ W.T for both models, then divergences.divergence_sum
  chunked         divergences.chunked_divergence_from_hidden (logits one token chunk at a time)
  sharded         2 gloo ranks, each with its half of both W: logits shard = hidden @ W_shard.T (all
                  tokens), then sharded.sharded_divergence_sum (token-chunked)
  sharded_hidden  2 gloo ranks: sharded.sharded_divergence_from_hidden (vocab-sharded and token-chunked:
                  no [tokens, V / 2] logits shard either)

Token chunks: --chunk-size, by default per V the largest power of two <= 2**24 / V (about 64 MiB per
float32 [chunk, V] intermediate, as Liger's chunked losses size their chunks from V).

The setting is the student loss: p (teacher: hidden, W) is frozen, q (student: hidden and lm_head W)
gets gradients. Inputs are float32; every process uses --threads threads (default 1: the sharded
ranks then use one core each). Times are the best of --repeats runs (for sharded: the slower rank).

Peak memory: the most bytes held by tensors created during the call (forward and backward,
including the gradients it produces; the inputs hidden and W themselves are not counted). On CUDA:
torch.cuda.max_memory_allocated above the level before the call. On CPU: a TorchDispatchMode sees
every tensor an op creates and counts its storage until the storage is freed (a weakref finalizer);
its cost is per op, not per element. For the sharded rows it is the larger of the two ranks' peaks.

Targets (PASS/FAIL columns): chunked peak <= 1/4 of dense; sharded per-rank peak <= 60% of chunked;
every value within 1e-5 relative of the float32 dense value. The "sharded" row holds the logits
shards and their gradient for all tokens ([tokens, V / 2] each), which the token-chunked loss never
does, so at these token counts it misses the 60% target; "sharded_hidden" is the comparable one.

  python -m tools.bench.divergence                       # V = 32000, 49152 at 4096 tokens, 151936 at 2048
  python -m tools.bench.divergence --quick               # tiny smoke run
  python -m tools.bench.divergence --vocab 151936 --tokens 2048 --divergences fkl,akl
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import socket
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


from okd_scale import sharded
from okd_scale.process import run_and_exit
from okd_scale.divergences import DIVERGENCES, chunked_divergence_from_hidden, divergence_sum

FULL_SIZES = ((32000, 4096), (49152, 4096), (151936, 2048))  # (vocab, tokens)
QUICK_SIZES = ((512, 64), (1001, 48))
METHODS = ("dense", "chunked", "sharded", "sharded_hidden")
WORLD = 2
ROW_BLOCK = 4096  # W is generated in seeded row blocks, so a rank can build just its own rows
MIB = 2 ** 20
CHUNK_ELEMENTS = 2 ** 24  # default token chunk: about this many [chunk, V] elements (64 MiB in float32)


# --------------------------------------------------------------------------- peak memory


class CpuPeak(TorchDispatchMode):
    """Live and peak bytes of the storages of tensors created by ops run under this mode (storages
    that existed before, such as the inputs', are not counted, nor are views of them)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # an output sharing an input's storage (a view, an in-place or out= result) is no new memory
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._seen and key not in inputs:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def measure(step, device: torch.device, repeats: int) -> tuple[float, float, int]:
    """(value, best time in s, peak bytes) of ``step()`` (returns the loss, does the backward)."""
    best, peak, value = math.inf, 0, None
    for _ in range(repeats):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            value = step()
            torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            peak = max(peak, torch.cuda.max_memory_allocated(device) - base)
        else:
            with CpuPeak() as tracker:
                start = time.perf_counter()
                value = step()
                elapsed = time.perf_counter() - start
            peak = max(peak, tracker.peak)
        best = min(best, elapsed)
    return value, best, peak


# --------------------------------------------------------------------------- inputs and steps


def lm_head_rows(vocab: int, hidden: int, start: int, end: int, seed: int, device) -> torch.Tensor:
    """Rows [start, end) of a [vocab, hidden] lm_head weight (std 2 / sqrt(hidden): logits of std ~2),
    the same rows whichever slice is asked for."""
    blocks = []
    for b in range(start // ROW_BLOCK, -(-end // ROW_BLOCK)):
        g = torch.Generator().manual_seed(seed * 100003 + b)
        rows = min(ROW_BLOCK, vocab - b * ROW_BLOCK)
        block = torch.randn(rows, hidden, generator=g) * (2 / math.sqrt(hidden))
        lo, hi = max(start - b * ROW_BLOCK, 0), min(end - b * ROW_BLOCK, rows)
        blocks.append(block[lo:hi])
    return torch.cat(blocks).to(device) if blocks else torch.empty(0, hidden, device=device)


def make_inputs(vocab: int, tokens: int, hidden: int, device, rows: tuple[int, int] | None = None) -> dict:
    """Teacher (p) and student (q) hidden states [tokens, hidden] and lm_head rows (all, or ``rows``)."""
    start, end = rows or (0, vocab)
    g = torch.Generator().manual_seed(vocab + tokens)
    return {
        "ph": torch.randn(tokens, hidden, generator=g).to(device),
        "qh": torch.randn(tokens, hidden, generator=g).to(device).requires_grad_(),
        "pw": lm_head_rows(vocab, hidden, start, end, 1, device),
        "qw": lm_head_rows(vocab, hidden, start, end, 2, device).requires_grad_(),
    }


def chunk_for(vocab: int, chunk_size: int | None) -> int:
    """--chunk-size, or the largest power of two <= CHUNK_ELEMENTS / vocab (at least 1)."""
    if chunk_size is not None:
        return chunk_size
    return 2 ** max(0, (CHUNK_ELEMENTS // vocab).bit_length() - 1)


def make_step(method: str, name: str, x: dict, vocab: int, chunk_size: int | None):
    """A function doing one forward + backward of ``method``; returns the loss value (a float)."""
    chunk = chunk_for(vocab, chunk_size)

    def step() -> float:
        x["qh"].grad = x["qw"].grad = None
        if method == "dense":
            loss = divergence_sum(name, x["ph"] @ x["pw"].t(), x["qh"] @ x["qw"].t())
        elif method == "chunked":
            loss = chunked_divergence_from_hidden(name, x["ph"], x["pw"], x["qh"], x["qw"], chunk_size=chunk)
        elif method == "sharded":
            (qh,) = sharded.copy_to_group(x["qh"])
            loss = sharded.sharded_divergence_sum(name, x["ph"] @ x["pw"].t(), qh @ x["qw"].t(), vocab_size=vocab,
                                                  chunk_size=chunk)
        elif method == "sharded_hidden":
            loss = sharded.sharded_divergence_from_hidden(name, x["ph"], x["pw"], x["qh"], x["qw"],
                                                          vocab_size=vocab, chunk_size=chunk)
        else:
            raise ValueError(method)
        loss.backward()
        value = loss.item()
        del loss
        x["qh"].grad = x["qw"].grad = None  # the gradients were counted in the peak; free them
        return value

    return step


def run_local(configs, names, methods, args, device) -> list[dict]:
    """dense and chunked rows, in this process."""
    return _measure_rows(configs, names, methods, args, device)


def _measure_rows(configs, names, methods, args, device, rank_world=None) -> list[dict]:
    """One row per (config, divergence, method): value, time and peak memory; `rank_world` = (rank, world)
    builds this rank's vocabulary slice of the lm_head."""
    rows = []
    for vocab, tokens in configs:
        shard = sharded.vocab_range(vocab, *rank_world) if rank_world else None
        x = make_inputs(vocab, tokens, args.hidden, device, rows=shard)
        for name in names:
            for method in methods:
                value, seconds, peak = measure(make_step(method, name, x, vocab, args.chunk_size), device,
                                               args.repeats)
                rows.append(dict(divergence=name, vocab=vocab, tokens=tokens, method=method, value=value,
                                 time_s=seconds, peak_bytes=peak, chunk=chunk_for(vocab, args.chunk_size)))
        del x
    return rows


def _sharded_rows(rank: int, world: int, port: int, out_dir: str, configs, names, methods, args) -> None:
    """The sharded rows on this rank, saved to out_dir."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    rows = _measure_rows(configs, names, methods, args, device, rank_world=(rank, world))
    torch.save(rows, Path(out_dir) / f"rank{rank}.pt")


def _sharded_worker(*args) -> None:
    """torch.multiprocessing.spawn entry point: `_sharded_rows`, then a clean exit."""
    run_and_exit(_sharded_rows, *args)


def run_sharded(configs, names, methods, args) -> list[dict]:
    """The sharded rows on WORLD spawned ranks; per row the larger peak and time of the ranks."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_sharded_worker, args=(WORLD, port, out, configs, names, methods, args), nprocs=WORLD, join=True)
        per_rank = [torch.load(Path(out) / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    rows = []
    for group in zip(*per_rank):
        row = dict(group[0])
        row["time_s"] = max(r["time_s"] for r in group)
        row["peak_bytes"] = max(r["peak_bytes"] for r in group)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- table


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("PASS" if ok else "FAIL")


def add_checks(rows: list[dict]) -> None:
    """Per row: relative difference to the dense value and the PASS/FAIL targets."""
    by_key = {(r["divergence"], r["vocab"], r["tokens"], r["method"]): r for r in rows}
    for r in rows:
        key = (r["divergence"], r["vocab"], r["tokens"])
        dense, chunked = by_key.get((*key, "dense")), by_key.get((*key, "chunked"))
        r["max_rel_diff"] = (abs(r["value"] - dense["value"]) / max(abs(dense["value"]), 1e-30)
                             if dense else float("nan"))
        r["value_ok"] = None if r["method"] == "dense" or not dense else r["max_rel_diff"] <= 1e-5
        r["peak_ratio"], r["memory_ok"] = None, None
        if r["method"] == "chunked" and dense:
            r["peak_ratio"] = r["peak_bytes"] / dense["peak_bytes"]
            r["memory_ok"] = r["peak_ratio"] <= 0.25
        elif r["method"].startswith("sharded") and chunked:
            r["peak_ratio"] = r["peak_bytes"] / chunked["peak_bytes"]
            r["memory_ok"] = r["peak_ratio"] <= 0.60


def format_table(rows: list[dict]) -> str:
    lines = ["| divergence | V | tokens | method | chunk | peak MiB | time s | max rel diff | peak / ref | "
             "memory target | value target |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        ratio = "—" if r["peak_ratio"] is None else f"{r['peak_ratio']:.1%}"
        lines.append(f"| {r['divergence']} | {r['vocab']} | {r['tokens']} | {r['method']} | "
                     f"{'—' if r['method'] == 'dense' else r['chunk']} | {r['peak_bytes'] / MIB:.1f} | "
                     f"{r['time_s']:.2f} | {r['max_rel_diff']:.1e} | {ratio} | "
                     f"{_verdict(r['memory_ok'])} | {_verdict(r['value_ok'])} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes (default: 32000 49152 151936)")
    ap.add_argument("--tokens", type=int, nargs="+",
                    help="tokens per vocab size (one value for all, or one per --vocab; default 4096 4096 2048)")
    ap.add_argument("--hidden", type=int, default=None, help="hidden size (default 1024; --quick: 32)")
    ap.add_argument("--divergences", default=",".join(DIVERGENCES), help="comma-separated names")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="tokens per chunk (default: per V, the largest power of two <= 2**24 / V, i.e. about "
                         "64 MiB per float32 [chunk, V] intermediate; --quick: 16)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per row; the best time is reported")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda: dense/chunked on GPU 0, sharded on GPUs 0 and 1 with nccl")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = ap.parse_args(argv)
    if args.hidden is None:
        args.hidden = 32 if args.quick else 1024
    if args.chunk_size is None and args.quick:
        args.chunk_size = 16
    return args


def configurations(args) -> list[tuple[int, int]]:
    if args.vocab is None and args.tokens is None:
        return list(QUICK_SIZES if args.quick else FULL_SIZES)
    vocabs = args.vocab or [v for v, _ in FULL_SIZES]
    tokens = args.tokens or [4096]
    if len(tokens) == 1:
        tokens = tokens * len(vocabs)
    if len(tokens) != len(vocabs):
        raise SystemExit("--tokens takes one value or one per --vocab")
    return list(zip(vocabs, tokens))


def main(argv=None) -> list[dict]:
    """Runs the benchmark, prints the markdown table, returns its rows."""
    args = parse_args(argv)
    names = [n.strip() for n in args.divergences.split(",") if n.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for n in names:
        if n not in DIVERGENCES:
            raise SystemExit(f"unknown divergence {n!r}; valid: {', '.join(DIVERGENCES)}")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; valid: {', '.join(METHODS)}")
    configs = configurations(args)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    local = [m for m in methods if not m.startswith("sharded")]
    remote = [m for m in methods if m.startswith("sharded")]
    rows = run_local(configs, names, local, args, device) if local else []
    if remote:
        if args.device == "cuda" and torch.cuda.device_count() < WORLD:
            print(f"(sharded rows skipped: they need {WORLD} GPUs)")
        else:
            rows += run_sharded(configs, names, remote, args)
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: ([c for c in configs].index((r["vocab"], r["tokens"])), names.index(r["divergence"]),
                             order[r["method"]]))
    add_checks(rows)
    chunks = ", ".join(f"V={v}: {chunk_for(v, args.chunk_size)}" for v, _ in configs)
    peak = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "live tensor storages (TorchDispatchMode)"
    print(f"hidden {args.hidden}, chunk tokens ({chunks}), {args.threads} thread(s) per process, "
          f"device {args.device}, float32, best of {args.repeats}; peak = {peak}")
    print(format_table(rows))
    sys.stdout.flush()
    return rows


if __name__ == "__main__":
    main()
