"""Training with real DeepSpeed engines on CPU: every method on 1 and 2 processes (the `deepspeed` launcher's path
is tests/test_demo.py's)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny
from okd_scale.methods import METHODS
from tiny import assert_same_runs, comparable, write_config


def student_ce(model_dir: Path, data_file: Path, tokenizer) -> float:
    """Mean response-token cross-entropy of a saved model over a data file (plain transformers, no DeepSpeed)."""
    from transformers import AutoModelForCausalLM

    from okd_scale.data import collate, load_dataset

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    examples, _ = load_dataset(data_file, tokenizer, 64)
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        return float(model(**batch).loss)


def check_run(out: Path, pair: Path, method: str, tokenizer) -> dict:
    report = json.loads((out / "report.json").read_text())
    history = report["history"]
    assert len(history) == 6 and all(torch.isfinite(torch.tensor(r["student/loss"])) for r in history)
    # the student learned: its loss on what it trained on fell (exported model, loaded by transformers)
    entry = METHODS[method]
    target = out / "seqkd" / "teacher_responses.jsonl" if entry.teacher_data else pair / "train.jsonl"
    assert student_ce(out / "student", target, tokenizer) < student_ce(pair / "student", target, tokenizer)
    if entry.teacher == "none":
        assert not (out / "teacher_after.safetensors").exists()
        return report
    before = load_file(str(pair / "teacher" / "model.safetensors"))
    after = load_file(str(out / "teacher_after.safetensors"))
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in after.items() if "lora_" not in k}
    assert set(base) == set(before)
    changed = [k for k in before if not torch.equal(before[k], base[k])]
    assert changed == [], f"teacher base weights changed: {changed[:3]}"
    lora_b = {k: v for k, v in after.items() if "lora_B" in k}
    if entry.online:
        # zero-initialised B matrices on the last 2 blocks only, and they moved
        assert lora_b and all(".layers.2." in k or ".layers.3." in k for k in lora_b)
        assert max(float(v.abs().max()) for v in lora_b.values()) > 0
        assert "teacher/loss" in history[0] and (out / "online_module" / "adapter_config.json").is_file()
    else:
        assert not lora_b and "teacher/loss" not in history[0]
    return report


@pytest.mark.parametrize("method", list(METHODS))
def test_one_process(tmp_path, pair, tokenizer, method):
    from dist_worker import run_and_dump

    from okd_scale.configure import load_config

    cfg = load_config(write_config(tmp_path / "cfg.yaml", pair, method))
    run_and_dump(cfg)
    report = check_run(Path(cfg.output_dir), pair, method, tokenizer)
    assert report["metrics"]["world_size"] == 1 and report["metrics"]["eval/student_ce"] > 0


def test_same_seed_same_losses(tmp_path, pair):
    from dist_worker import run_and_dump

    from okd_scale.configure import load_config

    runs = []
    for i in range(2):
        cfg = load_config(write_config(tmp_path / f"cfg{i}.yaml", pair, "okd"),
                          [f"output_dir={tmp_path / f'run{i}'}", "train.gradient_accumulation_steps=2"])
        runs.append([{k: v for k, v in r.items() if "/" in k and not k.startswith(("time", "tokens_"))}
                     for r in run_and_dump(cfg)["history"]])
    assert runs[0] == runs[1]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, pair):
    """Every method trained on 2 processes, one run after another in one launch: (its directory, the launch)."""
    d = tmp_path_factory.mktemp("two_processes")
    zero3 = [write_config(d / "zero3.yaml", pair, "okd", deepspeed={"student_config": "ds_configs/student_zero3.json"}),
             f"output_dir={d / 'out-okd-zero3-student'}"]
    return d, tiny.launch_runs([[write_config(d / f"{method}.yaml", pair, method)] for method in METHODS] + [zero3])


@pytest.mark.xdist_group("two_processes")
@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes(two_process_runs, pair, tokenizer, method):
    d, proc = two_process_runs
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = check_run(d / f"out-{method}", pair, method, tokenizer)
    assert report["metrics"]["world_size"] == 2


@pytest.mark.xdist_group("two_processes")
def test_two_processes_zero3_student(two_process_runs, pair, tokenizer):
    """ZeRO-3 student: trains, and its consolidated export loads in transformers and improved."""
    d, proc = two_process_runs
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_run(d / "out-okd-zero3-student", pair, "okd", tokenizer)


def test_gradient_accumulation_is_a_global_batch_mean(tmp_path, pair):
    """4 examples as one micro-batch or as 2 x 2 accumulated: the same losses and the same weights."""
    from dist_worker import run_and_dump

    from okd_scale.configure import load_config

    runs = {}
    for bs, gas in ((4, 1), (2, 2)):
        cfg = load_config(write_config(tmp_path / f"cfg{bs}.yaml", pair, "okd"),
                          [f"output_dir={tmp_path / f'bs{bs}'}", f"train.per_device_train_batch_size={bs}",
                           f"train.gradient_accumulation_steps={gas}", "data.eval_file=null"])
        runs[bs] = run_and_dump(cfg)["history"]
    for a, b in zip(runs[4], runs[2]):
        for key in ("student/loss", "student/kd", "teacher/loss", "tokens/counted"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    wa = load_file(str(tmp_path / "bs4" / "student" / "model.safetensors"))
    wb = load_file(str(tmp_path / "bs2" / "student" / "model.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4


def test_bf16_one_process(tmp_path, pair, tokenizer):
    """The GPU recipe (bf16) runs through the same code path on CPU."""
    from dist_worker import run_and_dump

    from okd_scale.configure import load_config

    cfg = load_config(write_config(tmp_path / "cfg.yaml", pair, "okd"), ["train.bf16=true", "train.max_steps=6"])
    history = run_and_dump(cfg)["history"]
    assert all(torch.isfinite(torch.tensor([r["student/loss"], r["teacher/loss"]])).all() for r in history)
    from safetensors import safe_open
    with safe_open(str(Path(cfg.output_dir) / "student" / "model.safetensors"), "pt") as f:
        assert f.get_tensor(f.keys()[0]).dtype == torch.bfloat16
    assert student_ce(Path(cfg.output_dir) / "student", pair / "train.jsonl", tokenizer) < \
        student_ce(pair / "student", pair / "train.jsonl", tokenizer)


@pytest.mark.parametrize("from_hidden", [True, False])
def test_gradient_equals_float64_global_token_mean(tmp_path, pair, from_hidden):
    """After 2 accumulated micro-batches, DeepSpeed's student gradient equals the float64 gradient of
    LS = sum over counted tokens of [kd_ratio * KL(pT || pS) + (1 - kd_ratio) * CE] / (counted tokens),
    whether the losses read hidden states and lm_head rows (the default) or logits."""
    from deepspeed.utils import safe_get_full_grad
    from transformers import AutoModelForCausalLM

    from okd_scale.configure import load_config
    from okd_scale.process import init_distributed
    from okd_scale.methods import StepContext, kd_step, loss_normaliser, targets
    from okd_scale.scorers import HiddenScorer, make_scorer
    from okd_scale.trainer import build

    cfg = load_config(write_config(tmp_path / "cfg.yaml", pair, "kd"),
                      ["train.per_device_train_batch_size=3", "train.gradient_accumulation_steps=2",
                       "train.max_grad_norm=0", "loss.kd_ratio=0.3", f"loss.from_hidden={str(from_hidden).lower()}",
                       "loss.chunk_size=7"])
    init_distributed()
    tokenizer, loader, _, teacher, student = build(cfg, 0, 1)
    it = iter(loader)
    micro = [next(it), next(it)]
    counted = sum(float(targets(b)[1].sum()) for b in micro)
    assert float(targets(micro[0])[1].sum()) != float(targets(micro[1])[1].sum())  # unequal micro-batches
    scorer = make_scorer(cfg, teacher, student, len(tokenizer), 0, 1)
    assert isinstance(scorer, HiddenScorer) == from_hidden
    ctx = StepContext(cfg=cfg, student=student, teacher=teacher, num_tokens=loss_normaliser(counted, 1, 2),
                      vocab_size=len(tokenizer), scorer=scorer)
    kd_step(micro[0], ctx)
    student.step()  # not a boundary: accumulates
    kd_step(micro[1], ctx)
    got = {n: safe_get_full_grad(p).double() for n, p in student.module.named_parameters()}

    ref_s = AutoModelForCausalLM.from_pretrained(str(pair / "student"), dtype=torch.float64)
    ref_t = AutoModelForCausalLM.from_pretrained(str(pair / "teacher"), dtype=torch.float64)
    total = 0.0
    for b in micro:
        labels, mask = targets(b)
        zs = ref_s(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1][mask]
        with torch.no_grad():
            zt = ref_t(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1][mask]
        log_q, log_p = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        ce = -log_q.gather(-1, labels[mask][:, None]).squeeze(-1)
        total = total + (0.3 * kl + 0.7 * ce).sum()
    (total / counted).backward()
    for n, p in ref_s.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_padded_vocab_sizes_are_aligned_to_the_tokenizer(tmp_path, pair, tokenizer):
    """One tokenizer, a teacher padded by 32 entries and a student to 384: both distributions are
    taken over the tokenizer's real vocabulary, and training runs."""
    from dist_worker import run_and_dump

    from okd_scale.configure import load_config

    n = len(tokenizer)
    tiny.make_llama(tmp_path / "teacher", tokenizer, num_layers=2, hidden=32, vocab_size=n + 32)
    tiny.make_llama(tmp_path / "student", tokenizer, num_layers=1, hidden=32, vocab_size=384)
    cfg = load_config(write_config(tmp_path / "cfg.yaml", pair, "okd"),
                      [f"model.teacher={tmp_path / 'teacher'}", f"model.student={tmp_path / 'student'}",
                       "online.num_blocks=1", "train.max_steps=3"])
    history = run_and_dump(cfg)["history"]
    assert all(torch.isfinite(torch.tensor(r["student/kd"])) for r in history)
    sizes = {json.loads((tmp_path / m / "config.json").read_text())["vocab_size"] for m in ("teacher", "student")}
    assert len(sizes | {n}) == 3  # three different sizes: the shapes only meet through the alignment


@pytest.mark.parametrize("online", [[], ["online.placement=head", "online.objective=joint"],
                                    ["online.placement=temperature", "online.drift_every=2",
                                     "online.learning_rate=5e-2"]])  # a drift well above float32's noise
def test_hidden_path_equals_logits_path(tmp_path, pair, online):
    """okd from hidden states and lm_head rows, chunked (default) = okd from full logits: the same
    losses (entropies, top-1 and drift included) and the same student and online-module weights after 6 steps,
    for each placement of the online module."""
    from dist_worker import run_and_dump

    from okd_scale.configure import load_config

    for name, hidden in (("hidden", "true"), ("logits", "false")):
        run_and_dump(load_config(write_config(tmp_path / f"{name}.yaml", pair, "okd"),
                                 [f"output_dir={tmp_path / name}", f"loss.from_hidden={hidden}", "loss.chunk_size=5",
                                  "loss.divergence=js", "online.divergence=rkl", "data.eval_file=null", *online]))
    assert_same_runs(tmp_path / "hidden", tmp_path / "logits", rtol=1e-4)


def test_vocab_shards_on_two_processes_equal_unsharded(tmp_path, pair):
    """loss.vocab_shards=2 on 2 ranks (each rank scores both ranks' tokens on half the vocabulary,
    uneven rows gathered) trains exactly as vocab_shards=1 on 2 ranks. (The teacher is pinned to ZeRO-3 with
    offload: Adam magnifies float-order noise in a LoRA A entry whose gradient is near zero, 3.7e-6 there
    and 1.5e-5 with the replica's ZeRO-1 optimizer, over this test's 1e-5.)"""
    cfg = write_config(tmp_path / "cfg.yaml", pair, "okd",
                       deepspeed={"teacher_config": "ds_configs/teacher_zero3_offload.json"})
    proc = tiny.launch_runs([[cfg, f"output_dir={tmp_path / f'shards{shards}'}", f"loss.vocab_shards={shards}",
                              "loss.chunk_size=9", "data.eval_file=null"] for shards in (1, 2)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_runs(tmp_path / "shards1", tmp_path / "shards2", rtol=1e-4)


def test_vocab_shards_must_divide_the_world_size(tmp_path, pair):
    from okd_scale.config import ConfigError
    from okd_scale.configure import load_config
    from okd_scale.trainer import train

    cfg = load_config(write_config(tmp_path / "cfg.yaml", pair, "sft"), ["loss.vocab_shards=2"])
    with pytest.raises(ConfigError, match="loss.vocab_shards.*world size 1"):
        train(cfg)


# --------------------------------------------------------------------------- baselines: sgo and seqkd


def test_sgo_with_lambda_0_equals_kd(tmp_path, pair):
    """sgo never sampling (lambda=0) is kd: the same losses and weights on the same seed."""
    from dist_worker import run_and_dump

    from okd_scale.configure import load_config

    for method in ("kd", "sgo"):
        run_and_dump(load_config(write_config(tmp_path / f"{method}.yaml", pair, method),
                                 [f"output_dir={tmp_path / method}", "sgo.lambda=0", "data.eval_file=null"]))
    ra, rb = (json.loads((tmp_path / m / "report.json").read_text())["history"] for m in ("kd", "sgo"))
    assert all(r["sgo/on_policy"] == 0.0 for r in rb)
    for a, b in zip(comparable(ra), comparable(rb), strict=True):
        assert a == {k: v for k, v in b.items() if k != "sgo/on_policy"}
    wa, wb = (load_file(str(tmp_path / m / "student" / "model.safetensors")) for m in ("kd", "sgo"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sgo_with_lambda_1_trains_on_student_samples(tmp_path, pair, tokenizer, monkeypatch):
    """lambda=1: every step's responses are sampled from the student (decoded, they are not the data's
    responses), the loss mask covers exactly the sampled tokens, and the loss is the divergence alone."""
    from dist_worker import run_and_dump

    from okd_scale import generation, methods
    from okd_scale.configure import load_config
    from okd_scale.data import IGNORE_INDEX, load_dataset

    seen = []
    real_sample, real_sgo = generation.sample_responses, methods.METHODS["sgo"]

    def spy_sample(engine, batch, **kw):
        out = real_sample(engine, batch, **kw)
        seen.append((batch, out, kw))
        return out

    def spy_step(batch, ctx):
        assert ctx.on_policy
        logs = real_sgo.step(batch, ctx)
        torch.testing.assert_close(logs["student/loss"], logs["student/kd"])  # no CE on own samples
        return logs

    monkeypatch.setattr(generation, "sample_responses", spy_sample)
    monkeypatch.setitem(methods.METHODS, "sgo", dataclasses.replace(real_sgo, step=spy_step))
    cfg = load_config(write_config(tmp_path / "cfg.yaml", pair, "sgo"),
                      ["sgo.lambda=1", "sgo.max_new_tokens=12", "train.max_steps=3", "data.eval_file=null"])
    history = run_and_dump(cfg)["history"]
    assert [r["sgo/on_policy"] for r in history] == [1.0, 1.0, 1.0] and len(seen) == 3
    data_responses = {tokenizer.decode([t for t in e["labels"] if t != IGNORE_INDEX])
                      for e in load_dataset(pair / "train.jsonl", tokenizer, 64)[0]}
    for before, after, kw in seen:
        assert kw["max_new_tokens"] == 12
        prompts = generation.prompts_of(before)
        assert generation.prompts_of(after) == prompts  # the same prompts, new responses
        for i, prompt in enumerate(prompts):
            n = int(after["attention_mask"][i].sum())
            ids, labels = after["input_ids"][i, :n].tolist(), after["labels"][i, :n].tolist()
            response = ids[len(prompt):]
            assert 1 <= len(response) <= 12
            assert labels == [IGNORE_INDEX] * len(prompt) + response  # the mask covers the sampled tokens
            assert after["labels"][i, n:].eq(IGNORE_INDEX).all()
        sampled = {tokenizer.decode(ids[len(p):int(m.sum())]) for p, ids, m in
                   zip(prompts, after["input_ids"].tolist(), after["attention_mask"])}
        assert not sampled <= data_responses  # student samples, not the data's responses


def test_seqkd_generates_once_then_reads_the_cache(tmp_path, pair, tokenizer, monkeypatch):
    """seqkd: the first run generates the teacher's responses and caches them; the second run (a new
    output directory, the same cache) reads them and generates nothing; both train on them."""
    from dist_worker import run_and_dump

    from okd_scale import generation, seqkd
    from okd_scale.configure import load_config

    calls = []
    real = generation.generate_ids

    def counting(*a, **kw):
        calls.append(len(a[1]))
        return real(*a, **kw)

    monkeypatch.setattr(seqkd, "generate_ids", counting)
    cache = tmp_path / "cache" / "teacher.jsonl"
    reports = []
    for i in range(2):
        cfg = load_config(write_config(tmp_path / f"cfg{i}.yaml", pair, "seqkd"),
                          [f"output_dir={tmp_path / f'run{i}'}", f"seqkd.cache_file={cache}",
                           "seqkd.max_new_tokens=8", "data.eval_file=null"])
        reports.append(run_and_dump(cfg))
        assert sum(calls) == 32, calls  # generated in the first run only, a batch at a time
    first, second = (r["metrics"]["data"]["seqkd"] for r in reports)
    assert (first["generated"], first["cached"]) == (32, 0) and first["seconds"] > 0
    assert (second["generated"], second["cached"], second["seconds"]) == (0, 32, 0.0)
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(rows) == 32 and all(1 <= len(r["output_ids"]) <= 8 for r in rows)
    assert comparable(reports[0]["history"]) == comparable(reports[1]["history"])  # the same data, either way
    # a different generation setting makes the cache stale: generated again
    cfg = load_config(write_config(tmp_path / "cfg2.yaml", pair, "seqkd"),
                      [f"output_dir={tmp_path / 'run2'}", f"seqkd.cache_file={cache}", "seqkd.max_new_tokens=5",
                       "data.eval_file=null", "train.max_steps=1"])
    run_and_dump(cfg)
    assert sum(calls) == 64


def test_seqkd_stop_keeps_what_was_generated(tmp_path, pair, monkeypatch):
    """A stop signal in the middle of seqkd's generation (after 2 of 4 batches) ends the run as a stop; the next
    run generates only the 2 missing batches, and the cache equals an uninterrupted run's."""
    from dist_worker import run_and_dump

    from okd_scale import generation, seqkd, trainer
    from okd_scale.configure import load_config

    calls = []
    real = generation.generate_ids
    monkeypatch.setattr(seqkd, "generate_ids", lambda *a, **kw: calls.append(len(a[1])) or real(*a, **kw))
    caches = {}
    for name in ("straight", "stopped"):
        caches[name] = tmp_path / name / "teacher.jsonl"
        cfg = load_config(write_config(tmp_path / f"{name}.yaml", pair, "seqkd"),
                          [f"output_dir={tmp_path / f'run_{name}'}", f"seqkd.cache_file={caches[name]}",
                           "seqkd.max_new_tokens=6", "seqkd.batch_size=8", "data.eval_file=null", "train.max_steps=1"])
        if name == "stopped":
            monkeypatch.setenv("OKD_SCALE_FAULT", "signal_in_generation@2")
            result = trainer.train(cfg)
            assert result.stopped_by == "SIGUSR1" and not caches[name].exists()
            assert sum(calls) == 32 + 16
            monkeypatch.delenv("OKD_SCALE_FAULT")
        report = run_and_dump(cfg)
        assert report["metrics"]["data"]["seqkd"]["kept_batches"] == (2 if name == "stopped" else 0)
    assert sum(calls) == 32 + 32  # the stopped run and its resumption generated each batch once
    rows = {k: [json.loads(line)["output_ids"] for line in v.read_text().splitlines()] for k, v in caches.items()}
    assert len(rows["straight"]) == 32 and rows["stopped"] == rows["straight"]


def test_seqkd_copy_and_engine_generate_the_same_responses(tmp_path, pair):
    """seqkd.generate_with: a whole copy of the teacher and its ZeRO-3 engine give the same greedy responses."""
    from dist_worker import run_and_dump

    from okd_scale.configure import load_config

    rows = {}
    for way in ("copy", "engine"):
        cache = tmp_path / way / "teacher.jsonl"
        cfg = load_config(write_config(tmp_path / f"{way}.yaml", pair, "seqkd"),
                          [f"output_dir={tmp_path / f'run_{way}'}", f"seqkd.cache_file={cache}",
                           f"seqkd.generate_with={way}", "seqkd.max_new_tokens=6", "data.eval_file=null",
                           "train.max_steps=1"])
        assert run_and_dump(cfg)["metrics"]["data"]["seqkd"]["generated"] == 32
        rows[way] = [json.loads(line)["output_ids"] for line in cache.read_text().splitlines()]
    assert len(rows["copy"]) == 32 and rows["copy"] == rows["engine"]


def test_phase_timers_add_up_to_the_step_time(tmp_path, pair):
    """With train.profile_phases, okd's per-phase timers cover the step: their sum is within 10% of the
    measured step time; without it (the default) no phase is timed, and step time, tokens/s and memory stay."""
    from dist_worker import run_and_dump

    from okd_scale.configure import load_config

    report = run_and_dump(load_config(write_config(tmp_path / "cfg.yaml", pair, "okd"),
                                      ["data.eval_file=null", "train.profile_phases=true"]))
    for row in report["history"][1:]:
        phases = {k: v for k, v in row.items() if k.startswith("time/") and k != "time/step_s"}
        assert {"time/data_s", "time/teacher_forward_s", "time/student_forward_s", "time/loss_s",
                "time/student_backward_s", "time/online_backward_s", "time/optimizer_s",
                "time/comm_s"} <= phases.keys()
        assert sum(phases.values()) == pytest.approx(row["time/step_s"], rel=0.10)
    m = report["metrics"]
    assert set(m["time_per_phase_s"]) >= {"teacher_forward", "online_backward"}
    assert m["flops_per_step"] > 0 and m["peak_memory_gib_per_rank"][0] > 0
    # on the CPU both are the process's lifetime high-water mark (ru_maxrss): an earlier test in this process may
    # already have set it, so the models need not raise it
    assert 0 < m["base_memory_gib_per_rank"][0] <= m["peak_memory_gib_per_rank"][0]

    plain = run_and_dump(load_config(write_config(tmp_path / "cfg2.yaml", pair, "okd"),
                                     ["data.eval_file=null", f"output_dir={tmp_path / 'plain'}", "train.max_steps=2"]))
    assert all(k == "time/step_s" for r in plain["history"] for k in r if k.startswith("time/"))
    assert plain["history"][-1]["tokens_per_s"] > 0 and plain["metrics"]["peak_memory_gib_per_rank"][0] > 0


def test_evaluation_during_training(tmp_path, pair):
    """train.eval_every: validation loss and ROUGE-L of the student every N steps, in the step's row and
    TensorBoard, and once more at the end (with the teacher's loss)."""
    from dist_worker import run_and_dump

    from okd_scale.configure import load_config

    cfg = load_config(write_config(tmp_path / "cfg.yaml", pair, "okd"),
                      ["train.eval_every=2", "data.eval_rouge_examples=4", "data.eval_max_new_tokens=6"])
    report = run_and_dump(cfg)
    evaluated = [r["step"] for r in report["history"] if "eval/student_ce" in r]
    assert evaluated == [2, 4]  # and step 6 is the final evaluation
    for r in report["history"]:
        if "eval/student_ce" in r:
            assert r["eval/student_ce"] > 0 and 0 <= r["eval/student_rougeL"] <= 100
    m = report["metrics"]
    assert m["eval/student_ce"] > 0 and m["eval/teacher_ce"] > 0 and 0 <= m["eval/student_rougeL"] <= 100
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(cfg.output_dir) / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/student_rougeL")] == [2, 4, 6]


def test_keep_best_keeps_the_lowest_validation_loss_checkpoint(tmp_path, pair):
    """train.keep_best with keep_last=1: the newest tag and the one of the evaluated step with the lowest
    eval/student_ce survive; keep_best without a validation file or with unsaved evaluations is refused."""
    from dist_worker import run_and_dump

    from okd_scale.config import ConfigError
    from okd_scale.configure import load_config

    common = ["train.eval_every=2", "train.save_every=2", "train.keep_last=1", "data.eval_rouge_examples=0"]
    history = run_and_dump(load_config(write_config(tmp_path / "cfg.yaml", pair, "sft"),
                                       ["train.keep_best=true", *common]))["history"]
    ces = {r["step"]: r["eval/student_ce"] for r in history if "eval/student_ce" in r}
    assert sorted(ces) == [2, 4]
    best = min(ces, key=ces.get)
    tags = sorted(p.name for p in (tmp_path / "out-sft" / "checkpoints").glob("global_step*"))
    assert tags == sorted({f"global_step{best}", "global_step6"})
    state = json.loads((tmp_path / "out-sft" / "checkpoints" / "global_step6" / "trainer_state.json").read_text())
    assert state["best"] == {"step": best, "eval/student_ce": ces[best]}
    for bad, key in ((["data.eval_file=null"], "data.eval_file"), (["train.save_every=3"], "train.eval_every")):
        with pytest.raises(ConfigError, match=key):
            load_config(write_config(tmp_path / "bad.yaml", pair, "sft"), ["train.keep_best=true", *common, *bad])


def test_online_learning_rate_ratio_and_own_warmup(tmp_path, pair):
    """online.learning_rate ratio:R is R x the student's peak rate, and online.warmup_steps is the module's own
    warm-up: with none, its rate is at its peak from the first step while the student's still warms up."""
    from dist_worker import run_and_dump

    from okd_scale.configure import load_config

    cfg = load_config(write_config(tmp_path / "cfg.yaml", pair, "okd"),
                      ["train.max_steps=3", "train.lr_scheduler_type=constant_with_warmup", "train.warmup_steps=4",
                       "train.learning_rate=1e-3", "online.learning_rate=ratio:0.5", "online.warmup_steps=0"])
    history = run_and_dump(cfg)["history"]
    assert [r["lr/online"] for r in history] == pytest.approx([5e-4] * 3)
    assert [r["lr/student"] for r in history] == pytest.approx([1e-3 * k / 4 for k in (1, 2, 3)])  # after each step


def test_a_new_method_and_divergence_are_registry_lines(tmp_path, pair, monkeypatch):
    """A method and a divergence registered at run time (a step function and a registry line for the method, a
    function and a registry line for the divergence: nothing else) are accepted by the config and train: "toy",
    the divergence alone from a frozen teacher, with loss.divergence=hellinger (tests/tiny.py), equals kd with
    loss.kd_ratio=1 and the same divergence (losses and student weights)."""
    from dist_worker import run_and_dump

    from okd_scale import methods
    from okd_scale.configure import load_config
    from okd_scale.divergences import DIVERGENCES, Mix

    def toy_step(batch, ctx):
        return methods.student_step(batch, ctx, Mix(ctx.cfg.loss.divergence, 1.0, 0.0))

    monkeypatch.setitem(methods.METHODS, "toy", methods.Method(toy_step, teacher="frozen"))
    monkeypatch.setitem(DIVERGENCES, "hellinger", tiny.hellinger_divergence())
    settings = ["train.max_steps=2", "data.eval_file=null", "loss.divergence=hellinger", "loss.kd_ratio=1"]
    for method in ("kd", "toy"):
        run_and_dump(load_config(write_config(tmp_path / f"{method}.yaml", pair, "kd"),
                                 [f"method={method}", f"output_dir={tmp_path / method}", *settings]))
    ra, rb = (json.loads((tmp_path / m / "report.json").read_text())["history"] for m in ("kd", "toy"))
    assert ra[0]["student/kd"] > 0 and comparable(ra) == comparable(rb)
    wa, wb = (load_file(str(tmp_path / m / "student" / "model.safetensors")) for m in ("kd", "toy"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((tmp_path / "toy" / "metrics.json").read_text())["method"] == "toy"
