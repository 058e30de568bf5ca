"""TAID (method taid): its loss and t schedule against float64 references, t_start = 1 equal to kd with forward
KL bitwise, and t carried exactly through a checkpoint."""
from __future__ import annotations

import json
import math

import pytest
import torch

from okd_scale.divergences import Mix, distill_from_hidden, divergence_sum, interpolated_target
from okd_scale.methods import TAIDSchedule
from tiny import write_config


def _reference(zt, zs, y, t, div_weight, ce_weight):
    """float64: div_weight * sum KL(p_t || q) + ce_weight * sum CE, p_t = softmax((1 - t) sg[zs] + t zt)."""
    logp = torch.log_softmax((1 - t) * zs.detach() + t * zt, -1)
    logq = torch.log_softmax(zs, -1)
    kl = (logp.exp() * (logp - logq)).sum()
    ce = -logq.gather(-1, y[:, None]).sum()
    return div_weight * kl + ce_weight * ce, kl


@pytest.mark.parametrize("t", [0.0, 0.4, 0.93])
def test_loss_and_gradients_against_float64(t, device):
    torch.manual_seed(0)
    n, h, v = 23, 8, 41
    ht, wt = torch.randn(n, h, device=device), torch.randn(v, h, device=device)
    hs = torch.randn(n, h, device=device, requires_grad=True)
    ws = torch.randn(v, h, device=device, requires_grad=True)
    y = torch.randint(0, v, (n,), device=device)
    ls, _, terms = distill_from_hidden(ht, wt, hs, ws, y, student=Mix("fkl", 0.7, 0.3, target_t=t), chunk_size=5)
    ls.backward()

    hs64, ws64 = hs.detach().double().requires_grad_(), ws.detach().double().requires_grad_()
    want, kl = _reference(ht.double() @ wt.double().t(), hs64 @ ws64.t(), y, t, 0.7, 0.3)
    want.backward()
    torch.testing.assert_close(ls.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms[0].double(), kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hs.grad.double(), hs64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ws.grad.double(), ws64.grad, rtol=1e-4, atol=1e-6)
    # the logits path (a ZeRO-3 student) reads the same target
    zs = (hs.detach() @ ws.detach().t()).requires_grad_()
    zt = ht @ wt.t()
    got = divergence_sum("fkl", interpolated_target(zt, zs, t), zs, chunk_size=5)
    torch.testing.assert_close(got.double(), kl, rtol=1e-5, atol=1e-5)


def test_interpolated_target_at_t_1_is_the_teacher_itself():
    zt, zs = torch.randn(3, 7), torch.randn(3, 7)
    assert interpolated_target(zt, zs, 1.0) is zt


def _schedule_reference(losses, t_start, t_end, alpha, beta, max_steps, adaptive=True):
    """The t before each step, in float64 by hand."""
    t, m, prev, ts = t_start, 0.0, None, []
    for step, loss in enumerate(losses, start=1):
        ts.append(t)
        if prev is None:
            prev = loss
            continue
        m = beta * m + (1 - beta) * (prev - loss) / (prev + 1e-15)
        floor = t_start + (t_end - t_start) * step / max_steps
        grown = t + alpha * (1 / (1 + math.exp(-m))) * (1 - t)
        t = min(t_end, max(floor, grown) if adaptive else floor)
        prev = loss
    return ts, t


@pytest.mark.parametrize("adaptive, alpha", [(True, 5e-4), (True, 0.2), (False, 0.2)])
def test_schedule_against_a_hand_computed_sequence(adaptive, alpha):
    losses = [5.0, 4.0, 3.5, 3.6, 2.0, 1.9, 1.9, 1.0, 0.5, 0.45]
    sched = TAIDSchedule(0.4, 0.95, alpha, 0.9, adaptive, max_steps=20)
    got = []
    for step, loss in enumerate(losses, start=1):
        row = {"student/kd": loss, "skipped": 0.0}
        sched.after_step(row, step)
        got.append(row["taid/t"])
    want, last = _schedule_reference(losses, 0.4, 0.95, alpha, 0.9, 20, adaptive)
    assert got == pytest.approx(want, rel=1e-12) and sched.t == pytest.approx(last, rel=1e-12)
    assert all(b >= a for a, b in zip(got, got[1:])) and got[-1] <= 0.95
    if adaptive and alpha == 0.2:  # the adaptive step lifts t above the linear floor
        assert sched.t > 0.4 + 0.55 * len(losses) / 20
    skipped = TAIDSchedule(0.4, 1.0, 0.2, 0.9, True, max_steps=20, t=0.5, momentum=0.1, prev_loss=2.0)
    skipped.after_step({"student/kd": float("nan"), "skipped": 1.0}, 3)
    assert skipped.state_dict() == {"t": 0.5, "momentum": 0.1, "prev_loss": 2.0}


def test_t_start_1_equals_kd_with_forward_kl_bitwise(tmp_path, pair):
    from dist_worker import run_and_dump
    from safetensors.torch import load_file

    from okd_scale.configure import load_config

    runs = {"taid": ["taid.t_start=1"], "kd": ["loss.divergence=fkl"]}
    for method, extra in runs.items():
        run_and_dump(load_config(write_config(tmp_path / f"{method}.yaml", pair, method),
                                 [f"output_dir={tmp_path / method}", "data.eval_file=null", *extra]))
    a, b = (json.loads((tmp_path / m / "report.json").read_text())["history"] for m in runs)
    assert [r["taid/t"] for r in a] == [1.0] * 6
    for x, y in zip(a, b, strict=True):
        assert {k: x[k] for k in ("student/loss", "student/kd", "student/ce")} == \
               {k: y[k] for k in ("student/loss", "student/kd", "student/ce")}
    wa, wb = (load_file(str(tmp_path / m / "student" / "model.safetensors")) for m in runs)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_t_rises_and_resumes_exactly(tmp_path, pair):
    """t rises from t_start; a run resumed from the step-3 checkpoint continues with the same t and losses."""
    from dist_worker import run_and_dump

    from okd_scale.configure import load_config

    common = ["data.eval_file=null", "taid.alpha=0.3", "train.save_every=3"]
    straight = run_and_dump(load_config(write_config(tmp_path / "a.yaml", pair, "taid"),
                                        [f"output_dir={tmp_path / 'a'}", *common]))["history"]
    ts = [r["taid/t"] for r in straight]
    assert ts[0] == 0.4 and ts[-1] > ts[0] and all(b >= a for a, b in zip(ts, ts[1:]))
    saved = json.loads((tmp_path / "a" / "checkpoints" / "global_step3" / "trainer_state.json").read_text())
    assert saved["method_state"]["t"] == ts[3]
    resumed = run_and_dump(load_config(write_config(tmp_path / "b.yaml", pair, "taid"),
                                       [f"output_dir={tmp_path / 'b'}", *common,
                                        f"resume={tmp_path / 'a' / 'checkpoints' / 'global_step3'}"]))["history"]
    keys = ("taid/t", "student/loss", "student/kd", "student/ce")
    assert [{k: r[k] for k in keys} for r in resumed[-3:]] == [{k: r[k] for k in keys} for r in straight[3:]]
