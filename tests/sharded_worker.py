"""2-rank gloo worker for tests/test_sharded.py: runs every case on this rank's vocabulary slice and
saves the values and this rank's gradients to OUT_DIR/rank{r}.pt; the test compares them with the
dense single-process computation. Inputs are built by `case_inputs`, shared with the test.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from okd_scale.divergences import DivergenceParams  # noqa: E402
from okd_scale.process import run_and_exit  # noqa: E402

PARAMS = dict(beta=0.3, alpha=0.2, mu=0.6)  # non-default values


def tp(temperature: float) -> DivergenceParams:
    """The divergences' settings of these tests at ``temperature``."""
    return DivergenceParams(temperature=temperature, **PARAMS)


P = DivergenceParams(**PARAMS)
SPLIT_WEIGHTS = (0.4, 0.9)  # how the "hidden_split" cases weight their [divergence, CE] terms
DP_ROWS = [(0, 7), (7, 10)]  # the "dp_rows" cases: rank r owns these of the 10 flattened token rows


def case_inputs(case: dict) -> dict:
    """Full (unsharded) inputs of a case, identical in every process: logits [2, 5, V] (or hidden
    states and lm_head weights), labels, mask."""
    g = torch.Generator().manual_seed(case["seed"])
    vocab, dtype = case["vocab"], case.get("dtype", torch.float64)
    shape = (2, 5)
    out = {
        "p": (torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * 3).to(dtype),
        "q": (torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * 3).to(dtype),
        "labels": torch.randint(0, vocab, shape, generator=g),
        "mask": (torch.rand(*shape, generator=g) > 0.4).long() if case.get("masked") else None,
    }
    out["labels"][0, 1] = -100
    if case.get("masked") == "empty":
        out["mask"] = torch.zeros(shape, dtype=torch.long)
    if case.get("pad_from") is not None:  # padded vocabulary: -inf logits at the end, in both models
        out["p"][..., case["pad_from"]:] = float("-inf")
        out["q"][..., case["pad_from"]:] = float("-inf")
    if case.get("hidden"):
        out["ph"] = torch.randn(*shape, 12, generator=g, dtype=dtype)
        out["pw"] = torch.randn(vocab, 12, generator=g, dtype=dtype) * 0.5
        out["qh"] = torch.randn(*shape, 8, generator=g, dtype=dtype)
        out["qw"] = torch.randn(vocab, 8, generator=g, dtype=dtype) * 0.5
    return out


def run_case(case: dict, group=None) -> dict:
    """Runs one case with okd_scale.sharded on this rank; returns the value and gradients (of this
    rank's shards, or of the replicated hidden states)."""
    import torch.distributed as dist

    from okd_scale import sharded

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    x = case_inputs(case)
    vocab = case["vocab"]
    start, end = sharded.vocab_range(vocab, rank, world)
    kind = case["kind"]
    extra = {}
    if kind == "gather":
        full = sharded.all_gather_shards(sharded.shard_logits(x["p"]), vocab)
        return {"full": full}
    if kind == "hidden":
        leaves = {"ph": x["ph"], "qh": x["qh"], "pw": x["pw"][start:end], "qw": x["qw"][start:end]}
        leaves = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        value = sharded.sharded_divergence_from_hidden(
            case["name"], leaves["ph"], leaves["pw"], leaves["qh"], leaves["qw"], x["mask"], vocab_size=vocab,
            chunk_size=case.get("chunk"), labels=x["labels"], ce_weight=0.7,
            div_weight=1.3, params=tp(case["temperature"]))
    elif kind == "hidden_split":  # the two terms as a vector, weighted by the caller
        leaves = {"ph": x["ph"], "qh": x["qh"], "pw": x["pw"][start:end], "qw": x["qw"][start:end]}
        leaves = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        terms = sharded.sharded_divergence_from_hidden(
            case["name"], leaves["ph"], leaves["pw"], leaves["qh"], leaves["qw"], x["mask"], vocab_size=vocab,
            chunk_size=case.get("chunk"), labels=x["labels"], ce_weight=1.0,
            split=True, params=tp(case["temperature"]))
        value = SPLIT_WEIGHTS[0] * terms[0] + SPLIT_WEIGHTS[1] * terms[1]
        extra["terms"] = terms.detach()
    elif kind == "ce_hidden":
        leaves = {"qh": x["qh"].clone().requires_grad_(), "qw": x["qw"][start:end].clone().requires_grad_()}
        value = sharded.sharded_ce_from_hidden(leaves["qh"], leaves["qw"], x["labels"], x["mask"], vocab_size=vocab,
                                               chunk_size=case.get("chunk"))
    elif kind == "dp_rows":  # each rank its own, uneven rows; gathered onto the group, vocabulary split
        lo, hi = DP_ROWS[rank]
        rows = {k: x[k].reshape(-1, x[k].shape[-1])[lo:hi] for k in ("ph", "qh")}
        leaves = {"ph": rows["ph"], "qh": rows["qh"], "pw": x["pw"][start:end], "qw": x["qw"][start:end]}
        leaves = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        ph, qh, labels = sharded.gather_rows(leaves["ph"], leaves["qh"], x["labels"].reshape(-1)[lo:hi],
                                             pad_values=(0, 0, -100))
        value = sharded.sharded_divergence_from_hidden(
            case["name"], ph, leaves["pw"], qh, leaves["qw"], vocab_size=vocab, chunk_size=case.get("chunk"),
            labels=labels, ce_weight=0.7, div_weight=1.3, params=tp(case["temperature"]))
    elif kind == "logits_from_hidden":  # logits shards from replicated hidden states: copy_to_group
        leaves = {"ph": x["ph"], "qh": x["qh"], "pw": x["pw"][start:end], "qw": x["qw"][start:end]}
        leaves = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        ph, qh = sharded.copy_to_group(leaves["ph"], leaves["qh"])
        value = sharded.sharded_divergence_sum(case["name"], ph @ leaves["pw"].t(), qh @ leaves["qw"].t(), x["mask"],
                                               vocab_size=vocab, chunk_size=case.get("chunk"),
                                               params=tp(case["temperature"]))
    elif kind == "ce":
        leaves = {"q": sharded.shard_logits(x["q"]).clone().requires_grad_()}
        value = sharded.sharded_ce_sum(leaves["q"], x["labels"], x["mask"], vocab_size=vocab,
                                       chunk_size=case.get("chunk"))
    else:
        leaves = {k: sharded.shard_logits(x[k]).clone().requires_grad_() for k in ("p", "q")}
        value = sharded.sharded_divergence_sum(case["name"], leaves["p"], leaves["q"], x["mask"], vocab_size=vocab,
                                               chunk_size=case.get("chunk"),
                                               params=tp(case["temperature"]))
    value.backward()
    return {"value": value.detach(), **extra, **{f"grad_{k}": v.grad for k, v in leaves.items()}}


def _work(rank: int, world: int, port: int, out_dir: str, cases: list) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from okd_scale.divergences import DIVERGENCES
    import tiny

    DIVERGENCES["hellinger"] = tiny.hellinger_divergence()  # this process's own registry: the toy divergence
    torch.save([run_case(case) for case in cases], Path(out_dir) / f"rank{rank}.pt")


def main(rank: int, world: int, port: int, out_dir: str, cases: list) -> None:
    """torch.multiprocessing.spawn entry point."""
    run_and_exit(_work, rank, world, port, out_dir, cases)
