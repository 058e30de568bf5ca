"""Batched generation from token ids: evaluation, SeqKD's teacher responses and SGO's student samples."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .data import IGNORE_INDEX, collate
from .models import is_partitioned


class GenerationError(ValueError):
    """Generation cannot run as asked (no eos token, a bad batch size)."""


def eos_ids(model, tokenizer) -> list[int]:
    """The ids that end a response: the model's generation_config eos ids, then the tokenizer's."""
    ids = []
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        for i in ([src] if isinstance(src, int) else list(src or [])):
            if i is not None and i not in ids:
                ids.append(int(i))
    if not ids:
        raise GenerationError("neither the tokenizer nor the model's generation_config defines an eos token")
    return ids


def eos_and_pad(model, tokenizer) -> tuple[list[int], int]:
    """(eos ids, the pad id for left padding: the tokenizer's pad token, else the first eos)."""
    eos = eos_ids(model, tokenizer)
    return eos, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]


def needs_synced_gpus(model, world_size: int) -> bool:
    """Whether generation must keep ranks in step: a ZeRO-3-partitioned model on several ranks, where
    every forward is collective."""
    return world_size > 1 and any(is_partitioned(p) for p in model.parameters())


def model_device(model) -> torch.device:
    """Where a plain (not partitioned) model's parameters are."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _few_rows_forward(self, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear's value, computed as (W x^T)^T when x has few rows."""
    rows = x.shape[:-1].numel()
    if rows > 16:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    y = (self.weight @ x.reshape(rows, -1).t()).t().reshape(*x.shape[:-1], -1)
    return y if self.bias is None else y + self.bias


@contextmanager
def decoding_head(model):
    """The lm_head of ``model`` computing a few rows at a time as (W x^T)^T while decoding: each token then
    streams the [V, H] weight once, where a host BLAS packs the transposed right operand of x W^T anew on
    every call (a 49152 x 576 head, 4 rows: 27 ms a token against 9 ms on a 2-core CPU; the blocks' far
    smaller weights gain nothing). The same values up to summation order."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        yield
        return
    head.forward = _few_rows_forward.__get__(head)
    try:
        yield
    finally:
        del head.forward


def generate_ids(model, prompts: list[list[int]], *, eos: list[int], pad_id: int, max_new_tokens: int,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 batch_size: int = 8, device=None, synced_gpus: bool = False,
                 min_new_tokens: int = 0) -> list[list[int]]:
    """Continuations of token-id ``prompts``: each up to and including its first eos, without padding.

    Left-padded batches of ``batch_size`` through ``model.generate`` in eval mode without gradients,
    with only the settings given here (a fresh GenerationConfig; greedy unless ``do_sample``, then
    temperature / top_p / top_k, 0 = off). ``synced_gpus``: for a ZeRO-3 model on several ranks, where
    every forward is collective; then every rank must pass the same number of prompts.
    """
    from transformers import GenerationConfig

    if batch_size < 1:
        raise GenerationError(f"batch_size must be >= 1, got {batch_size}")
    kw = dict(max_new_tokens=int(max_new_tokens), min_new_tokens=int(min_new_tokens), do_sample=bool(do_sample),
              eos_token_id=list(eos), pad_token_id=int(pad_id), num_beams=1)
    if do_sample:
        kw.update(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k or 0))
    config = GenerationConfig(**kw)
    device = device if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    outputs: list[list[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            width = max(len(x) for x in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, ids in enumerate(batch):
                if ids:
                    input_ids[i, width - len(ids):] = torch.as_tensor(ids, dtype=torch.long)
                    attention_mask[i, width - len(ids):] = 1
            with torch.no_grad(), decoding_head(model):
                out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                     generation_config=config, synced_gpus=synced_gpus)
            for row in out[:, width:].tolist():
                ends = [j for j, t in enumerate(row) if t in eos]
                outputs.append(row[:ends[0] + 1] if ends else row)
    finally:
        model.train(was_training)
    return outputs


# --------------------------------------------------------------------------- training batches


def prompt_ids(input_ids: list[int], labels: list[int]) -> list[int]:
    """An example's prompt: its tokens before its first response token (label != IGNORE_INDEX)."""
    return input_ids[:next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(input_ids))]


def prompts_of(batch: dict) -> list[list[int]]:
    """Each example's prompt in a collated (right-padded) batch."""
    return [prompt_ids(ids[:n], labels[:n]) for ids, labels, n in
            zip(batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].sum(1).tolist())]


def response_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict:
    """A collated training batch of prompt + response per example, labels on the response only."""
    return collate([{"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r} for p, r in zip(prompts, responses)],
                   pad_id)


def sample_responses(engine, batch: dict, *, eos: list[int], pad_id: int, max_new_tokens: int, temperature: float,
                     top_p: float, synced_gpus: bool) -> dict:
    """``batch`` with each response replaced by one sampled from ``engine``'s model (one generate call
    for the whole batch), labels on the sampled tokens."""
    prompts = prompts_of(batch)
    responses = generate_ids(engine.module, prompts, eos=eos, pad_id=pad_id, max_new_tokens=max_new_tokens,
                             do_sample=True, temperature=temperature, top_p=top_p, batch_size=len(prompts),
                             device=engine.device, synced_gpus=synced_gpus)
    return response_batch(prompts, responses, pad_id)


def on_policy_sampler(cfg, student, tokenizer, world: int):
    """For a method that samples on policy (sgo): batch -> the batch with responses sampled from the current
    student, with an ``on_policy(step)`` attribute: whether step samples, drawn from (seed, step) alone, so
    every rank and a resumed run draw the same."""
    import random

    eos, pad = eos_and_pad(student.module, tokenizer)
    synced = needs_synced_gpus(student.module, world)
    sg = cfg.sgo

    def sample(batch: dict) -> dict:
        return sample_responses(student, batch, eos=eos, pad_id=pad, max_new_tokens=sg.max_new_tokens,
                                temperature=sg.temperature, top_p=sg.top_p, synced_gpus=synced)

    sample.on_policy = lambda step: random.Random(cfg.seed * 1_000_003 + step).random() < sg.lmbda
    return sample
