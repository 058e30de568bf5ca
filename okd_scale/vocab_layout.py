"""The vocabulary split across the ranks of a group (contiguous slices, the first ``V % W`` one entry larger) and
the gather of every rank's slice into full-vocabulary rows."""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import Tensor


def vocab_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of ``rank``'s vocabulary slice: V split into W contiguous slices, the first
    ``V % W`` ranks one entry larger than the others."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a group of {world_size}")
    if vocab_size < 0:
        raise ValueError(f"vocab_size must be >= 0, got {vocab_size}")
    base, extra = divmod(vocab_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def rank_world(group) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def my_range(vocab_size: int, group, width: int) -> tuple[int, int]:
    """This rank's slice, checked against the width of the shard it was given."""
    rank, world = rank_world(group)
    start, end = vocab_range(vocab_size, rank, world)
    if width != end - start:
        raise ValueError(f"rank {rank} of {world} holds a logits shard of width {width}, but vocab_size "
                         f"{vocab_size} gives it [{start}, {end}) (width {end - start}); see vocab_range")
    return start, end


def shard_logits(logits: Tensor, group=None) -> Tensor:
    """This rank's slice ``logits[..., start:end]`` of full logits [..., V] (a view)."""
    rank, world = rank_world(group)
    start, end = vocab_range(logits.shape[-1], rank, world)
    return logits[..., start:end]


# torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns); same collective
all_gather_into_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_shards(shard: Tensor, vocab_size: int, group=None, out: Optional[Tensor] = None) -> Tensor:
    """Full [..., V] logits on every rank from each rank's [..., end - start] slice.

    One ``all_gather_into_tensor`` (``all_gather_single`` in torch >= 2.13) into one preallocated
    [W, ..., ceil(V / W)] buffer (every shard padded to the largest width), then each rank's part is copied,
    unpadded, into ``out`` (allocated when None). No autograd: the result is detached.
    """
    rank, world = rank_world(group)
    shard = shard.detach()
    my_range(vocab_size, group, shard.shape[-1])
    lead = shard.shape[:-1]
    if out is None:
        out = shard.new_empty(*lead, vocab_size)
    if out.shape != (*lead, vocab_size):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(*lead, vocab_size)}")
    if world == 1:
        return out.copy_(shard)
    width = -(-vocab_size // world)
    padded = shard.new_zeros(lead.numel(), width)
    padded[:, :shard.shape[-1]] = shard.reshape(-1, shard.shape[-1])
    buffer = shard.new_empty(world * lead.numel(), width)  # the ranks' padded shards, concatenated
    all_gather_into_tensor(buffer, padded, group=group)
    buffer = buffer.view(world, *lead, width)
    for r in range(world):
        start, end = vocab_range(vocab_size, r, world)
        out[..., start:end] = buffer[r, ..., :end - start]
    return out
