"""What each step costs: wall time per phase, FLOPs and model FLOPs utilisation, peak memory.

FLOPs per optimizer step (the usual 2 FLOPs per parameter per token forward, 4 backward; attention's
sequence-quadratic term is left out, as in Kaplan et al. and PaLM's MFU for short sequences):

    student   6 * N_student * tokens                    forward + backward (sft, seqkd, kd, sgo, okd)
    teacher   2 * N_teacher * tokens                    forward (kd, sgo, okd)
    online    2 * N_online * tokens                     okd's backward through the teacher blocks it reaches:
                                                        input gradients only (their weights are frozen; the
                                                        online module's own gradients are left out)
              + 2 * N_online * tokens                   their forward again, when those blocks are checkpointed
                                                        (online.gradient_checkpointing)
    sampling  2 * N_student * (prompt + new tokens)     sgo's generation, per generated sequence batch

where tokens are all non-padding positions of the global batch and N_online is the parameter count of
the teacher blocks the online module's backward reaches (from the lowest block that carries it to the top;
none for a module on the lm_head or a temperature). MFU = FLOPs / (step time * ranks * peak FLOP/s).
"""
from __future__ import annotations

import resource
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

from .process import all_reduce_sum

# Dense bf16 peak FLOP/s per device, matched by name: vendor data sheets without sparsity, except the H200,
# whose rate measured on an 8192^3 product (790 TFLOP/s against the sheet's 989) is the one reached in practice.
PEAK_BF16_FLOPS = {"H200": 790e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "A10G": 70e12, "L40S": 362e12,
                   "L4": 121e12, "MI300X": 1307e12, "MI250X": 383e12}


def _synchronize() -> None:
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()


@dataclass
class PhaseTimer:
    """Wall time per named phase of the current step (`train.profile_phases`). The accelerator is
    synchronised at each phase's edges, so asynchronous device work is counted in the phase that launched
    it; when not ``enabled`` a phase costs nothing and records nothing."""

    enabled: bool = True
    sync: bool = True
    totals: dict = field(default_factory=lambda: defaultdict(float))

    @contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        if self.sync:
            _synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                _synchronize()
            self.totals[name] += time.perf_counter() - start

    def pop(self) -> dict:
        """This step's {phase: seconds}, and a fresh start for the next step."""
        out, self.totals = dict(self.totals), defaultdict(float)
        return out


def num_parameters(model) -> int:
    """Parameter count, including those ZeRO-3 partitioned away (their ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def step_flops(*, n_student: int, n_teacher: int = 0, n_online: int = 0, tokens: int, teacher: bool,
               online: bool, sampled_tokens: int = 0, recompute: bool = False) -> float:
    """FLOPs of one optimizer step (module docstring's formula); `recompute`: the reached teacher blocks are
    checkpointed."""
    flops = 6.0 * n_student * tokens + 2.0 * n_student * sampled_tokens
    if teacher:
        flops += 2.0 * n_teacher * tokens
    if online:
        flops += (4.0 if recompute else 2.0) * n_online * tokens
    return flops


def peak_flops(device_name: str) -> Optional[float]:
    """The device's dense bf16 peak FLOP/s from PEAK_BF16_FLOPS, or None for an unknown device (CPU)."""
    name = device_name.upper()
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def device_name() -> str:
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return accel.device_name()


def peak_memory_bytes() -> int:
    """This process's peak: the accelerator's max allocated bytes on a GPU, the peak RSS on CPU."""
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() != "cpu":
        return int(accel.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_cost(history: list, teacher, student, world: int, sampled_tokens: float, n_online: int,
             online: bool, recompute: bool = False, base_memory: int = 0) -> dict:
    """Median step time, mean time per phase, tokens/s, peak memory per rank (and each rank's `base_memory`, its
    peak before the models were built: on CPU the interpreter's and the libraries' resident memory), FLOPs and (on
    a known GPU) model FLOPs utilisation (the module docstring's formula) over a run's rows of scalars; n_online,
    online and recompute as for step_flops."""
    import torch

    median = sorted(r["time/step_s"] for r in history)[len(history) // 2]
    phases = {k[5:-2]: sum(r.get(k, 0.0) for r in history) / len(history)
              for k in sorted({k for r in history for k in r}) if k.startswith("time/") and k != "time/step_s"}
    rank = torch.distributed.get_rank()
    mine = (float(peak_memory_bytes()), float(base_memory))
    both = all_reduce_sum([x if r == rank else 0.0 for r in range(world) for x in mine], student.device)
    peaks, bases = both[0::2], both[1::2]
    n_student = num_parameters(student.module)
    n_teacher = num_parameters(teacher.module) if teacher is not None else 0
    seen = sum(r["tokens/seen"] for r in history)
    flops = step_flops(n_student=n_student, n_teacher=n_teacher, n_online=n_online, tokens=seen / len(history),
                       teacher=teacher is not None, online=online, sampled_tokens=sampled_tokens / len(history),
                       recompute=recompute)
    total_time = sum(r["time/step_s"] for r in history)
    device = device_name()
    peak = peak_flops(device)
    out = {"median_step_s": median, "time_per_phase_s": phases, "tokens_per_s": seen / total_time,
           "peak_memory_gib_per_rank": [p / 2**30 for p in peaks],
           "base_memory_gib_per_rank": [b / 2**30 for b in bases], "params": {"student": n_student,
           "teacher": n_teacher, "online_blocks": n_online}, "flops_per_step": flops, "device": device}
    if peak is not None:
        out["mfu"] = flops * len(history) / (total_time * world * peak)
    return out


def phase_table(rows: list[dict]) -> str:
    """Markdown table of the mean seconds per step of each phase (keys "time/<phase>_s") and its share
    of the mean step time."""
    if not rows:
        return ""
    phases = sorted({k for r in rows for k in r if k.startswith("time/") and k != "time/step_s"})
    step = sum(r["time/step_s"] for r in rows) / len(rows)
    lines = ["| phase | s/step | % of step |", "|---|---:|---:|"]
    for k in phases:
        mean = sum(r.get(k, 0.0) for r in rows) / len(rows)
        lines.append(f"| {k[5:-2]} | {mean:.4f} | {100 * mean / step:.1f} |")
    lines.append(f"| **step** | {step:.4f} | 100.0 |")
    return "\n".join(lines)
