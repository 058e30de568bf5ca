"""A teacher whose size matters: `kd` and the paper's `okd` from a random-weight Llama-2-7B or -13B shape.

    python -m tools.bench.big_teacher --shape llama2-7b --nvme-path /var/tmp/okd_nvme      # build, run, table
    python -m tools.bench.big_teacher --hidden 1024 --layers 4 --vocab 32000 --placements auto,zero3

Builds (once, in --dir) the teacher as sharded safetensors one block at a time, so that it is never whole in
memory, a student of the same vocabulary (hidden 768, 12 blocks: about 134M parameters) and word-level rows;
then runs each method under each teacher placement (`auto`: the trainer's own choice) for --steps optimizer
steps on --nproc processes (tools.bench.methods.run_method: torchrun and okd_scale/train.py), sampling the
resident memory and the disk reads of all the run's processes. Per run: the placement, `okd plan`'s memory for
the node against the measured peak of anonymous memory (less the processes' base before their models; the
resident pages of the memory-mapped checkpoint are page cache the kernel drops under pressure, so they are shown
beside it, not planned), step time, tokens/s, and the
bytes read from disk per step against the teacher's size and the disk's read rate (one shard read once with
O_DIRECT). Run by hand, alone on the machine, never in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tools.bench import memory
from tools.bench import methods as bench

SHAPES = {  # hidden, layers, heads, intermediate, vocab: the published Llama-2 configurations
    "llama2-7b": (4096, 32, 32, 11008, 32000),
    "llama2-13b": (5120, 40, 40, 13824, 32000),
}
STUDENT = (768, 12, 12, 2048)  # hidden, layers, heads, intermediate
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GIB = 2 ** 30


def word_tokenizer(out_dir: Path, vocab_size: int):
    """A word-level tokenizer of exactly `vocab_size` entries (the special tokens, then "w0", "w1", ...) with a
    ChatML template, saved as a PreTrainedTokenizerFast directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    vocab.update({f"w{i}": len(SPECIAL) + i for i in range(vocab_size - len(SPECIAL))})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(str(out_dir))
    return fast


def _normal(gen, dtype, *shape):
    """A normal(0, 0.02) matrix (the Llama initialisation) in `dtype`."""
    import torch

    return torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).to(dtype)


def _block(i: int, hidden: int, kv: int, inter: int, dtype, gen) -> dict:
    """Block i's tensors (HF Llama names), normal(0, 0.02) matrices and unit norms."""
    import torch

    def normal(*shape):
        return _normal(gen, dtype, *shape)

    p = f"model.layers.{i}."
    return {p + "self_attn.q_proj.weight": normal(hidden, hidden), p + "self_attn.k_proj.weight": normal(kv, hidden),
            p + "self_attn.v_proj.weight": normal(kv, hidden), p + "self_attn.o_proj.weight": normal(hidden, hidden),
            p + "mlp.gate_proj.weight": normal(inter, hidden), p + "mlp.up_proj.weight": normal(inter, hidden),
            p + "mlp.down_proj.weight": normal(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype)}


def build_llama(out: Path, hidden: int, layers: int, heads: int, inter: int, vocab: int, dtype: str,
                seed: int = 0) -> int:
    """A random-weight LlamaForCausalLM in `out` (config, one safetensors shard per block plus one for the
    embeddings, final norm and lm_head, the index, a word-level tokenizer), never whole in memory; its bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    tok = word_tokenizer(out, vocab)
    LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                tie_word_embeddings=False, torch_dtype=dtype).save_pretrained(str(out))
    gen, dt = torch.Generator().manual_seed(seed), getattr(torch, dtype)
    shards = [lambda i=i: _block(i, hidden, hidden, inter, dt, gen) for i in range(layers)]
    shards.append(lambda: {"model.embed_tokens.weight": _normal(gen, dt, vocab, hidden),
                           "model.norm.weight": torch.ones(hidden, dtype=dt),
                           "lm_head.weight": _normal(gen, dt, vocab, hidden)})
    weight_map, total = {}, 0
    for n, make in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = make()
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: name for k in tensors})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    return total


def write_rows(path: Path, n: int, vocab: int, words: int, seed: int = 0) -> None:
    """`n` prompt/output rows of `words` words each half, drawn from the word tokenizer's vocabulary."""
    rng = random.Random(seed)

    def text(k):
        return " ".join(f"w{rng.randrange(vocab - len(SPECIAL))}" for _ in range(k))

    path.write_text("".join(json.dumps({"prompt": text(words), "output": text(words)}) + "\n" for _ in range(n)))


class Sampler(threading.Thread):
    """The summed resident memory and disk reads of the ranks among this process's children (LOCAL_RANK in their
    environment, not in their parent's: not the launcher, nor a rank's own children such as DeepSpeed's op builds),
    every `interval` seconds: the node's peak, its anonymous part (RSS less the file-backed and shared pages:
    memory-mapped weights count in RSS until the kernel drops them) and each rank's peak RSS with its file-backed part
    at that moment, by LOCAL_RANK."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.done = interval, threading.Event()
        self.peak_rss, self.peak_anon, self.read_bytes, self.rank_peak = 0, 0, {}, {}

    @staticmethod
    def _rank(process) -> str | None:
        """The process's LOCAL_RANK when it is a rank (its parent is not one), else None."""
        rank = process.environ().get("LOCAL_RANK")
        parent = process.parent()
        return None if rank is None or (parent is not None and "LOCAL_RANK" in parent.environ()) else rank

    def run(self):
        import psutil  # the benchmark's extra: not needed to read --help

        me = psutil.Process()
        while not self.done.is_set():
            rss = anon = 0
            for child in me.children(recursive=True):
                try:
                    rank = self._rank(child)
                    if rank is None:
                        continue
                    mem = child.memory_info()
                    rss, anon = rss + mem.rss, anon + mem.rss - mem.shared
                    if mem.rss > self.rank_peak.get(rank, (0, 0))[0]:
                        self.rank_peak[rank] = (mem.rss, mem.shared)
                    self.read_bytes[child.pid] = child.io_counters().read_bytes
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
            self.done.wait(self.interval)

    def stop(self) -> "Sampler":
        self.done.set()
        self.join()
        return self


def disk_read_rate(path: Path) -> float:
    """Bytes per second of one read of `path` that bypasses the page cache (dd, O_DIRECT)."""
    start = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M", "iflag=direct"], check=True, capture_output=True)
    return path.stat().st_size / (time.perf_counter() - start)


def measure(args, method: str, placement: str, out: Path) -> dict:
    """One run and its plan: a table row."""
    from okd_scale import plan as okd_plan

    path = "auto" if placement == "auto" else next(p.ds_config for p in okd_plan.PLACEMENTS if p.name == placement)
    extra = [f"deepspeed.teacher_config={path}", "train.profile_phases=false",
             *([f"deepspeed.nvme_path={args.nvme_path}"] if args.nvme_path else [])]
    sampler = Sampler()
    sampler.start()
    run = bench.run_method(method, args, out / placement, extra)
    sampler.stop()
    metrics = json.loads((out / placement / method / "metrics.json").read_text())
    engine = metrics["teacher_engine"]  # the placement the run used: the one okd_scale.plan's spec matches
    chosen = next(p for p in okd_plan.PLACEMENTS if (p.engine.zero == 3) == (engine["zero_stage"] == 3)
                  and p.engine.offload == engine["offload_param"])
    plan = memory.planned(args, method, [*extra, f"deepspeed.teacher_config={chosen.ds_config}"])
    planned_node = plan.gpu_total * args.nproc + plan.cpu_node_total
    base = sum(metrics["base_memory_gib_per_rank"]) * GIB
    return {"method": method, "placement": placement if placement != "auto" else f"auto: {chosen.name}",
            "step_s": run["step_s"], "tokens_per_s": run["tokens_per_s"], "run_s": run["run_s"],
            "node_peak_gib": sampler.peak_rss / GIB, "node_base_gib": base / GIB,
            "node_peak_anon_gib": sampler.peak_anon / GIB,
            "rank_rss_file_gib": [(rss / GIB, shared / GIB) for _, (rss, shared) in sorted(sampler.rank_peak.items())],
            "rank_peak_gib": metrics["peak_memory_gib_per_rank"],
            "planned_node_gib": planned_node / GIB, "ratio": planned_node / max(sampler.peak_anon - base, 1),
            "ratio_rss": planned_node / max(sampler.peak_rss - base, 1),
            "read_gib": sum(sampler.read_bytes.values()) / GIB, "steps": args.warmup + args.steps}


def table(rows: list[dict], teacher_bytes: int, rate: float, tolerance: float) -> str:
    head = ["method", "placement", "step s (median)", "tokens/s", "node peak GiB", "of it anonymous GiB",
            "rank peaks GiB (file-backed)", "node base GiB",
            "planned GiB (node)", "planned / (anonymous peak - base)", f"within {tolerance:.0%}",
            "planned / (RSS peak - base)", "disk read GiB per step",
            "x teacher bytes", "one teacher read at the disk's rate, s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        per_step = r["read_gib"] / r["steps"]
        lines.append("| " + " | ".join([
            r["method"], r["placement"], f"{r['step_s']:.1f}", f"{r['tokens_per_s']:.1f}", f"{r['node_peak_gib']:.2f}",
            f"{r['node_peak_anon_gib']:.2f}", ", ".join(f"{a:.2f} ({f:.2f})" for a, f in r["rank_rss_file_gib"]),
            f"{r['node_base_gib']:.2f}", f"{r['planned_node_gib']:.2f}", f"{r['ratio']:.2f}",
            "PASS" if abs(r["ratio"] - 1) <= tolerance else "FAIL", f"{r['ratio_rss']:.2f}", f"{per_step:.2f}",
            f"{per_step * GIB / teacher_bytes:.2f}", f"{teacher_bytes / rate:.0f}"]) + " |")
    return "\n".join(lines)


def parse_args(argv):
    from okd_scale.plan import PLACEMENTS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), help="a named teacher shape (else --hidden/--layers/...)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the teacher's stored weights (the runs train in bf16 with --bf16)")
    p.add_argument("--dir", default=str(bench.ROOT / "big_teacher"), help="where the models and rows are built")
    p.add_argument("--methods", default="kd,okd")
    names = ["auto", *(p.name for p in PLACEMENTS)]
    p.add_argument("--placements", default="auto", help=f"comma-separated: {','.join(names)}")
    p.add_argument("--nvme-path", help="deepspeed.nvme_path (a directory on a local disk)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1, help="per process")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--tolerance", type=float, default=0.15)
    p.add_argument("--config", default=str(bench.ROOT / "configs" / "demo.yaml"))
    p.add_argument("--out", help="run directory, kept (default: a temporary one, removed at the end)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("overrides", nargs="*", help="more key=value for every run")
    args = p.parse_args(argv)
    if args.shape:
        args.hidden, args.layers, args.heads, args.intermediate, args.vocab = SHAPES[args.shape]
    bad = [x for x in args.placements.split(",") if x not in names]
    if bad:
        p.error(f"--placements: unknown {bad}; expected a subset of {','.join(names)}")
    if "zero3_offload_nvme" in args.placements.split(",") and not args.nvme_path:
        p.error("--placements zero3_offload_nvme needs --nvme-path")
    # what tools.bench.methods.run_method reads besides these flags
    args.warmup, args.divergence, args.sgo_new_tokens, args.teacher_config = 0, "fkl", 1, None
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.dir)
    name = f"teacher_h{args.hidden}_l{args.layers}_v{args.vocab}_{args.dtype}"
    args.teacher, args.student = str(root / name), str(root / f"student_v{args.vocab}")
    args.data = str(root / "rows.jsonl")
    args.overrides = [f"data.train_file={args.data}", "data.eval_file=null", *args.overrides]  # for the plans too
    if not (root / name / "model.safetensors.index.json").exists():
        print(f"big_teacher: building {name} ...", file=sys.stderr, flush=True)
        build_llama(root / name, args.hidden, args.layers, args.heads, args.intermediate, args.vocab, args.dtype)
    if not (Path(args.student) / "model.safetensors.index.json").exists():
        build_llama(Path(args.student), *STUDENT, args.vocab, "float32", seed=1)
    write_rows(Path(args.data), args.nproc * args.batch_size * args.steps, args.vocab, args.max_length // 2)
    index = json.loads((root / name / "model.safetensors.index.json").read_text())
    teacher_bytes = index["metadata"]["total_size"]
    rate = disk_read_rate(root / name / sorted(set(index["weight_map"].values()))[0])
    rows = []
    with tempfile.TemporaryDirectory(prefix="big_teacher_") as scratch:  # the runs' outputs, unless --out keeps them
        out = Path(args.out or scratch)
        for placement in args.placements.split(","):
            for method in args.methods.split(","):
                print(f"big_teacher: {method} / {placement} ...", file=sys.stderr, flush=True)
                rows.append(measure(args, method, placement, out))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"\nteacher {name}: {teacher_bytes / GIB:.2f} GiB of weights; {args.nproc} processes x {args.batch_size} "
          f"sequences of {args.max_length} tokens, {args.steps} steps, {'bf16' if args.bf16 else 'fp32'}; "
          f"disk read rate {rate / 2**20:.0f} MiB/s (O_DIRECT); {os.cpu_count()} cores\n")
    print(table(rows, teacher_bytes, rate, args.tolerance))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
