"""The teacher's online module family (online.placement) and its losses (online.objective), with real engines."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny
from tiny import assert_same_runs, write_config

PLACEMENTS = ("blocks", "head", "temperature")


def _teacher_with_module(pair: Path, placement: str, dtype=torch.float32, tie: bool = False, tmp: Path = None):
    from transformers import AutoModelForCausalLM

    from okd_scale.config import OnlineArgs
    from okd_scale.models import add_online_module

    path = pair / "teacher"
    if tie:
        from transformers import AutoTokenizer

        tiny.make_llama(tmp / "tied", AutoTokenizer.from_pretrained(str(path)), num_layers=2, hidden=32, tie=True)
        path = tmp / "tied"
    base = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    original = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return add_online_module(base, OnlineArgs(placement=placement)), original  # blocks: the paper's module


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_zero_initialised_module_is_the_given_teacher(tmp_path, pair, placement, tie):
    """At step 0 the adapted teacher's logits and lm_head rows are the given teacher's; only the module trains,
    and without it (``disabled``) the teacher is the given one after the module moved."""
    from okd_scale.models import ONLINE_MODULES

    model, original = _teacher_with_module(pair, placement, tie=tie, tmp=tmp_path)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = original(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n) or ("online_temperature" in n) for n in trainable)
    module = ONLINE_MODULES[placement]
    w = original.get_output_embeddings().weight.detach()
    if module.head_rows is not None:
        torch.testing.assert_close(module.head_rows(model, w[5:40], 5, 40), w[5:40], rtol=0, atol=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.5)
        assert not torch.allclose(model(input_ids=ids).logits, want)
        with module.disabled(model):
            torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)
    # the tied input embeddings are untouched by a module on the lm_head
    torch.testing.assert_close(model.get_input_embeddings().weight, original.get_input_embeddings().weight)


def _reference_losses(teacher, student, batch, cfg):
    """Float64 LS and LT over the batch's counted tokens, from full logits (design: the OKD step)."""
    from okd_scale.methods import targets

    lo, on = cfg.loss, cfg.online
    labels, mask = targets(batch)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    zt = teacher(**inputs).logits[:, :-1][mask]
    zs = student(**inputs).logits[:, :-1][mask]
    y = labels[mask]
    logp, logq = torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)

    def kl(a, b):  # KL(a || b) per token from log-probs
        return (a.exp() * (a - b)).sum(-1)

    ce_t = -logp.gather(-1, y[:, None]).squeeze(-1)
    ce_s = -logq.gather(-1, y[:, None]).squeeze(-1)
    ls = (lo.kd_ratio * kl(logp.detach(), logq) + (1 - lo.kd_ratio) * ce_s).sum()
    if on.objective == "joint":  # the student's own divergence reaches the teacher
        lt = (on.divergence_weight * lo.kd_ratio * kl(logp, logq.detach()) + on.ce_weight * ce_t).sum()
    else:
        lt = (on.divergence_weight * kl(logq.detach(), logp) + on.ce_weight * ce_t).sum()
    stats = {"teacher/entropy": -(logp.exp() * logp).sum(), "student/entropy": -(logq.exp() * logq).sum(),
             "teacher/top1": (zt.argmax(-1) == y).sum()}
    return ls, lt, stats, float(mask.sum())


def _assert_grad_close(got, want, name):
    """Float32 against float64: each entry within 1e-4 relative, or 1e-4 of the tensor's largest entry."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()), msg=name)


def paper_config(path: Path, pair: Path) -> Path:
    """An okd run config on the tiny pair with no loss.* or online.* key: the package's own defaults."""
    import yaml

    cfg = yaml.safe_load(write_config(path, pair, "okd").read_text())
    del cfg["online"], cfg["loss"]
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_okd_defaults_are_the_papers(tmp_path, pair):
    """method okd with no loss.* or online.* key is the paper's OKD: LS = KL(pT' || pS) alone, LT = 0.5 KL(sg[pS] ||
    pT') + 0.5 CE, a rank-32 LoRA with scale 1 on q_proj and v_proj of every block, at the student's learning rate
    and schedule. The registry's defaults sit under the config file and the command line, for okd alone."""
    import re

    import yaml
    from transformers import AutoModelForCausalLM

    from okd_scale.config import online_learning_rate
    from okd_scale.configure import load_config
    from okd_scale.models import add_online_module

    path = paper_config(tmp_path / "paper.yaml", pair)
    cfg = load_config(path)
    lo, on = cfg.loss, cfg.online
    assert (lo.divergence, lo.kd_ratio) == ("fkl", 1.0)
    assert (on.placement, on.num_blocks, on.target_modules, on.r, on.lora_alpha / on.r) == (
        "blocks", None, ["q_proj", "v_proj"], 32, 1.0)
    assert (on.objective, on.divergence, on.divergence_weight, on.ce_weight) == ("decoupled", "fkl", 0.5, 0.5)
    assert online_learning_rate(cfg) == cfg.train.learning_rate and on.warmup_steps is None
    assert load_config(path, ["loss.kd_ratio=0.3"]).loss.kd_ratio == 0.3
    assert load_config(path, ["method=kd"]).loss.kd_ratio == 0.5
    from_file = yaml.safe_load(path.read_text())
    from_file["loss"] = {"kd_ratio": 0.2, "divergence": "rkl"}
    (tmp_path / "set.yaml").write_text(yaml.safe_dump(from_file))
    assert (load_config(tmp_path / "set.yaml").loss.kd_ratio, load_config(tmp_path / "set.yaml").loss.divergence) == (
        0.2, "rkl")
    model = add_online_module(AutoModelForCausalLM.from_pretrained(str(pair / "teacher")), on)
    carried = {re.search(r"layers\.(\d+)\..*\.(\w+_proj)\.lora_", n).groups() for n, p in model.named_parameters()
               if p.requires_grad}
    assert carried == {(str(i), proj) for i in range(4) for proj in ("q_proj", "v_proj")}


def test_paper_module_trains_at_the_students_rate(tmp_path, pair):
    """The paper's module follows the student's learning rate at every step, warm-up and decay included, and moves
    the teacher away from the original."""
    from dist_worker import run_and_dump

    from okd_scale.configure import load_config

    cfg = load_config(paper_config(tmp_path / "paper.yaml", pair),
                      ["train.max_steps=4", "train.lr_scheduler_type=cosine", "train.warmup_steps=2",
                       "online.drift_every=3", "data.eval_file=null"])
    history = run_and_dump(cfg)["history"]
    assert [r["lr/online"] for r in history] == pytest.approx([r["lr/student"] for r in history], rel=1e-12)
    assert [r["lr/student"] for r in history] == pytest.approx([2.5e-3, 5e-3, 2.5e-3, 0.0], abs=1e-12)  # after each
    assert history[0]["teacher/drift"] == 0 and history[3]["teacher/drift"] > 0


CUSTOM = ["loss.kd_ratio=0.6", "online.divergence_weight=0.7", "online.ce_weight=0.4", "online.divergence=fkl"]
PAPER = ["online.num_blocks=null", "loss.kd_ratio=1"]  # the paper's OKD (tiny's kd_ratio and num_blocks undone)
OBJECTIVES = [pytest.param(p, o, CUSTOM, id=f"{p}-{o}") for p in PLACEMENTS for o in ("decoupled", "joint")] + [
    pytest.param("blocks", "decoupled", PAPER, id="paper-hidden"),
    pytest.param("blocks", "decoupled", PAPER + ["loss.from_hidden=false"], id="paper-logits")]


@pytest.mark.parametrize("placement,objective,settings", OBJECTIVES)
def test_objective_matches_float64_reference(tmp_path, pair, placement, objective, settings):
    """One okd step on a moved module: the student's and the module's DeepSpeed gradients, the logged LT and the
    entropies / top-1 equal a float64 autograd reference of the step's losses (with the paper's defaults too, from
    hidden states and from logits); no base weight of the teacher receives a gradient."""
    from deepspeed.utils import safe_get_full_grad
    from transformers import AutoModelForCausalLM

    from okd_scale.configure import load_config
    from okd_scale.process import init_distributed
    from okd_scale.methods import StepContext, loss_normaliser, okd_step
    from okd_scale.models import add_online_module
    from okd_scale.scorers import make_scorer
    from okd_scale.trainer import build

    cfg = load_config(write_config(tmp_path / "cfg.yaml", pair, "okd"),
                      ["train.per_device_train_batch_size=3", "train.max_grad_norm=0", "loss.chunk_size=7",
                       f"online.placement={placement}", f"online.objective={objective}", *settings])
    init_distributed()
    tokenizer, loader, _, teacher, student = build(cfg, 0, 1)
    torch.manual_seed(0)
    with torch.no_grad():  # move the module away from zero, so every one of its parameters has a gradient
        for n, p in teacher.module.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    module_state = {n: p.detach().double().clone() for n, p in teacher.module.named_parameters() if p.requires_grad}
    batch = next(iter(loader))
    scorer = make_scorer(cfg, teacher, student, len(tokenizer), 0, 1)
    counted = float((batch["labels"][:, 1:] != -100).sum())
    ctx = StepContext(cfg=cfg, student=student, teacher=teacher, num_tokens=loss_normaliser(counted, 1, 1),
                      vocab_size=len(tokenizer), scorer=scorer, update_online=True)
    logs = okd_step(batch, ctx)
    got_t = {n: safe_get_full_grad(p).double() for n, p in teacher.module.named_parameters() if p.requires_grad}
    got_s = {n: safe_get_full_grad(p).double() for n, p in student.module.named_parameters()}
    assert all(p.grad is None for p in teacher.module.parameters() if not p.requires_grad)

    ref_t = add_online_module(AutoModelForCausalLM.from_pretrained(str(pair / "teacher"), dtype=torch.float64),
                              cfg.online)
    ref_t.load_state_dict(module_state, strict=False)
    ref_s = AutoModelForCausalLM.from_pretrained(str(pair / "student"), dtype=torch.float64)
    ls, lt, stats, n = _reference_losses(ref_t, ref_s, batch, cfg)
    assert float(logs["teacher/loss"]) == pytest.approx(float(lt), rel=1e-5)
    assert float(logs["student/loss"]) == pytest.approx(float(ls), rel=1e-5)
    for key, want in stats.items():
        assert float(logs[key]) == pytest.approx(float(want), rel=1e-5), key
    (ls / n).backward()
    (lt / n).backward()
    for name, p in ref_t.named_parameters():
        if p.requires_grad:
            assert float(p.grad.abs().max()) > 0
            _assert_grad_close(got_t[name], p.grad, name)
    for name, p in ref_s.named_parameters():
        _assert_grad_close(got_s[name], p.grad, name)


def _saved_by_teacher_forward(tmp_path, pair, overrides: list) -> tuple[list, int]:
    """(numel of each tensor the teacher's forward on an update step saves for backward, the module's numel)."""
    from okd_scale.configure import load_config
    from okd_scale.process import init_distributed
    from okd_scale.methods import forward_counted
    from okd_scale.trainer import build

    cfg = load_config(write_config(tmp_path / "cfg.yaml", pair, "okd"), overrides)
    init_distributed()
    tokenizer, loader, _, teacher, _student = build(cfg, 0, 1)
    batch = next(iter(loader))
    saved = []
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                                       lambda t: t):
        forward_counted(teacher, batch, len(tokenizer), hidden=True)
    return saved, sum(p.numel() for p in teacher.module.parameters() if p.requires_grad)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_teacher_activations_kept_for_backward(tmp_path, pair, placement):
    """The teacher's forward on an update step keeps, for backward, activations of the blocks only when the module
    is in the blocks: with head or temperature it saves nothing larger than the module's own parameters; with
    online.gradient_checkpointing the blocks keep none of their inner activations (recomputed in backward)."""
    saved, module_numel = _saved_by_teacher_forward(tmp_path, pair, [f"online.placement={placement}"])
    big = [k for k in saved if k > module_numel]
    if placement == "blocks":
        assert len(big) > 4  # the last 2 blocks' activations
        ckpt, _ = _saved_by_teacher_forward(tmp_path, pair, ["online.gradient_checkpointing=true"])
        assert len([k for k in ckpt if k > module_numel]) < len(big) / 4
    else:
        assert big == []


def test_temperature_with_lr_0_equals_kd(tmp_path, pair):
    """okd with a learned temperature that cannot move (online.learning_rate 0) trains the student exactly as kd."""
    from dist_worker import run_and_dump

    from okd_scale.configure import load_config

    runs = {}
    for method, extra in (("kd", []), ("okd", ["online.placement=temperature", "online.learning_rate=0"])):
        runs[method] = run_and_dump(load_config(write_config(tmp_path / f"{method}.yaml", pair, method),
                                                [f"output_dir={tmp_path / method}", "data.eval_file=null", *extra]))
    for a, b in zip(runs["kd"]["history"], runs["okd"]["history"], strict=True):
        for key in ("student/loss", "student/kd", "student/ce", "teacher/entropy", "teacher/top1"):
            assert a[key] == b[key], key
    wa, wb = (load_file(str(tmp_path / m / "student" / "model.safetensors")) for m in ("kd", "okd"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0, msg=key)
    okd = runs["okd"]["history"]
    assert okd[0]["teacher/drift"] == 0 and "teacher/drift" not in okd[1]  # drift_every 10: steps 1, 11, ...
    exported = json.loads((tmp_path / "okd" / "online_module" / "online_config.json").read_text())
    assert exported == {"placement": "temperature", "temperature": 1.0}


@pytest.mark.parametrize("placement", ["head", "temperature"])
def test_output_side_module_trains_and_exports(tmp_path, pair, tokenizer, placement):
    """head / temperature: 6 okd steps move the module and nothing else of the teacher; the teacher drifts from
    the original (logged), and the exported module reloads."""
    from dist_worker import run_and_dump

    from okd_scale.configure import load_config

    cfg = load_config(write_config(tmp_path / "cfg.yaml", pair, "okd"),
                      [f"online.placement={placement}", "online.drift_every=3", "data.eval_file=null"])
    history = run_and_dump(cfg)["history"]
    out = Path(cfg.output_dir)
    drift = [r.get("teacher/drift") for r in history]
    assert drift[0] == 0 and drift[3] > 0 and drift[1] is None  # steps 1 and 4 of 6
    before = load_file(str(pair / "teacher" / "model.safetensors"))
    after = load_file(str(out / "teacher_after.safetensors"))
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in after.items()
            if "lora_" not in k and "online_temperature" not in k}
    assert set(base) == set(before) and all(torch.equal(before[k], base[k]) for k in before)
    moved = {k: v for k, v in after.items() if "lora_B" in k or "online_temperature" in k}
    assert moved and max(float(v.abs().max()) for v in moved.values()) > 0
    if placement == "head":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        assert list(moved) == ["base_model.model.lm_head.lora_B.default.weight"]
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(pair / "teacher")),
                                          str(out / "online_module"))
        torch.testing.assert_close(model.base_model.model.lm_head.lora_B.default.weight,
                                   moved["base_model.model.lm_head.lora_B.default.weight"])
    else:
        exported = json.loads((out / "online_module" / "online_config.json").read_text())
        (log_t,) = moved.values()
        assert exported["temperature"] == pytest.approx(float(log_t.float().exp()), rel=1e-6)


@pytest.mark.slow
def test_head_placement_with_zero3_and_vocab_shards(tmp_path, pair):
    """online.placement=head on 2 ranks with a ZeRO-3 (offloaded) teacher: loss.vocab_shards=2 trains exactly as
    vocab_shards=1 (the joint objective, whose teacher-side divergence and CE take the sharded path of their own;
    the decoupled one shares the blocks placement's, tested in test_train)."""
    for objective in ("joint",):
        cfg = write_config(tmp_path / f"{objective}.yaml", pair, "okd",
                           deepspeed={"teacher_config": "ds_configs/teacher_zero3_offload.json"})
        proc = tiny.launch_runs([[cfg, f"output_dir={tmp_path / f'{objective}{shards}'}", f"loss.vocab_shards={shards}",
                                  "loss.chunk_size=9", "data.eval_file=null", "online.placement=head",
                                  f"online.objective={objective}", "online.drift_every=2"] for shards in (1, 2)])
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert_same_runs(tmp_path / f"{objective}1", tmp_path / f"{objective}2", rtol=1e-4)
        history = json.loads((tmp_path / f"{objective}2" / "report.json").read_text())["history"]
        assert history[2]["teacher/drift"] > 0
