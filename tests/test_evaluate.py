"""okd_scale/evaluate.py: ROUGE-L arithmetic, eval-set reading, generation on the accelerator, CLI outputs."""
import json
import statistics
from pathlib import Path

import pytest

import tiny
from okd_scale import evaluate as ev

ROOT = Path(__file__).resolve().parents[1]
EVAL_DIR = ROOT.parent / "shared" / "data" / "eval"


def test_rouge_l_hand_computed():
    # tokens (lower-cased, alphanumeric): pred = the cat sat on the mat (6), ref = the cat is on the mat (6)
    # LCS = "the cat on the mat" = 5 -> P = 5/6, R = 5/6, F = 2PR/(P+R) = 5/6 = 83.33
    assert ev.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(500 / 6)
    # pred = the cat (2), ref = the cat is on the mat (6): LCS = 2 -> P = 1, R = 1/3, F = 2/3 / (4/3) = 50
    assert ev.rouge_l("the cat", "the cat is on the mat") == pytest.approx(50.0)
    # pred = mat the on (3), ref = the cat is on the mat (6): LCS = "the on" = 2 (or "on the"/"the mat"),
    # P = 2/3, R = 2/6 -> F = 2 * (2/9) / (1) = 4/9 = 44.44
    assert ev.rouge_l("mat the on", "the cat is on the mat") == pytest.approx(400 / 9)
    # case and punctuation are ignored by the rouge-score tokenizer; the Porter stemmer maps cats->cat, running->run
    assert ev.rouge_l("The CAT, sat!", "the cat sat") == pytest.approx(100.0)
    assert ev.rouge_l("cats running", "cat run") == pytest.approx(100.0)
    # no common token
    assert ev.rouge_l("dog", "the cat") == 0.0


def test_rouge_l_references_and_empty():
    refs = ["completely different words", "the cat is on the mat", "the cat"]
    # best of: 0, 83.33, F(LCS=2, P=2/6, R=1) = 50
    assert ev.rouge_l("the cat sat on the mat", refs) == pytest.approx(500 / 6)
    assert ev.rouge_l("the cat sat on the mat", refs[::-1]) == pytest.approx(500 / 6)
    assert ev.rouge_l("", "the cat is on the mat") == 0.0
    assert ev.rouge_l("", ["a", "b"]) == 0.0
    assert ev.rouge_l("   ", "the cat") == 0.0


def test_read_eval_set(tmp_path):
    p = tiny.write_jsonl(tmp_path / "x.jsonl", [
        {"prompt": "P1\n", "output": "ref one"},
        {"prompt": "P2", "output": ["a", "b"], "instruction": "i", "input": ""},
        {"instruction": "Do it", "input": "", "output": "done\u2028with a line separator"},
        {"instruction": "Do it", "input": "ctx", "output": "x"},
    ])
    rows = ev.read_eval_set(p)
    assert [r["references"] for r in rows] == [["ref one"], ["a", "b"], ["done\u2028with a line separator"], ["x"]]
    assert rows[0]["prompt"] == "P1\n"
    assert rows[2]["prompt"].endswith("### Instruction:\nDo it\n\n### Response:\n")
    assert "### Input:\nctx\n\n### Response:\n" in rows[3]["prompt"]
    assert len(ev.read_eval_set(p, max_examples=2)) == 2
    with pytest.raises(ev.EvaluateError, match="not found"):
        ev.read_eval_set(tmp_path / "missing.jsonl")
    bad = tiny.write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    with pytest.raises(ev.EvaluateError, match="bad.jsonl:1"):
        ev.read_eval_set(bad)


@pytest.mark.skipif(not (EVAL_DIR / "dolly.jsonl").is_file(), reason=f"{EVAL_DIR} not found")
def test_reads_shared_eval_sets():
    for name, n in (("dolly", 500), ("selfinst", 242)):
        raw = [json.loads(line) for line in (EVAL_DIR / f"{name}.jsonl").read_text().split("\n") if line]
        rows = ev.read_eval_set(EVAL_DIR / f"{name}.jsonl")
        assert len(rows) == n
        assert all(r["prompt"] == x["prompt"] for r, x in zip(rows, raw))  # verbatim
        assert all(r["prompt"].endswith("### Response:\n") for r in rows)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer, device):
    d = tmp_path_factory.mktemp("tinylm")
    model = tiny.make_llama(d, tokenizer, num_layers=2, hidden=32, heads=4, intermediate=64, seed=1).to(device).eval()
    return d, model


def test_generate_deterministic_and_max_new_tokens(tiny_model, tokenizer, monkeypatch):
    _, model = tiny_model
    prompts = [r["prompt"] for r in tiny.make_rows(5)]
    calls = []
    real = model.generate

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append((k["input_ids"].shape[1], out.shape[1], k["generation_config"].max_new_tokens))
        return out
    monkeypatch.setattr(model, "generate", spy)

    g1 = ev.generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    assert len(g1) == 5 and all(isinstance(g, str) for g in g1)
    assert len(calls) == 3  # batches of 2, 2, 1
    assert all(out_w - in_w <= 6 and m == 6 for in_w, out_w, m in calls)
    assert ev.generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=2) == g1  # greedy
    # greedy: a shorter budget gives a prefix of the longer generation
    short = ev.generate(model, tokenizer, prompts, max_new_tokens=2, batch_size=2)
    assert all(s1.startswith(s0) or s0 == "" for s0, s1 in zip(short, g1))
    # sampling: reproducible for a seed, different for another
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=1.0, batch_size=4)
    s1 = ev.generate(model, tokenizer, prompts, seed=1, **kw)
    assert ev.generate(model, tokenizer, prompts, seed=1, **kw) == s1
    assert ev.generate(model, tokenizer, prompts, seed=2, **kw) != s1


def test_left_padding_matches_unbatched(tiny_model, tokenizer):
    """With left padding, a batched greedy generation equals generating each prompt alone (fp32)."""
    _, model = tiny_model
    prompts = ["please tell me", "please tell me about the quick red fox near the river"]
    alone = [ev.generate(model, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert ev.generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=2) == alone
    assert tokenizer.padding_side == "right"  # tokenizer left untouched


def test_batches_by_prompt_length_answers_in_order(tiny_model, tokenizer, monkeypatch):
    """Prompts are batched by length (each batch's width no larger than the next one's) and every answer comes
    back at its prompt's place: batched greedy answers equal each prompt generated alone."""
    _, model = tiny_model
    prompts = [r["prompt"] for r in tiny.make_rows(7, seed=5)]
    assert len({len(p) for p in prompts}) > 3  # mixed lengths, not already sorted
    alone = [ev.generate(model, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    widths, real = [], model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: widths.append(k["input_ids"].shape[1]) or real(*a, **k))
    assert ev.generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=3) == alone
    assert widths == sorted(widths) and len(widths) == 3


def test_decoding_head_equals_the_plain_head(tiny_model, device):
    """generation.decoding_head: the lm_head's values for few rows and many, as (W x^T)^T, against float64;
    the module is its plain self afterwards."""
    import torch

    from okd_scale.generation import decoding_head

    _, model = tiny_model
    head = model.get_output_embeddings()
    for shape in ((4, 1, 32), (2, 3, 32), (40, 32)):
        x = torch.randn(*shape, device=device)
        want = x.double() @ head.weight.double().t()
        with decoding_head(model):
            assert "forward" in vars(head)
            got = head(x)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(head)


def test_evaluate_model_and_table(tiny_model, tokenizer, tmp_path):
    _, model = tiny_model
    a = tiny.write_jsonl(tmp_path / "a.jsonl", tiny.make_rows(6, seed=1))
    b = tiny.write_jsonl(tmp_path / "b.jsonl", tiny.make_rows(4, seed=2))
    res = ev.evaluate_model(model, tokenizer, {"a": a, "b": b}, seeds=(1, 2), max_examples=5, max_new_tokens=4,
                            do_sample=True, batch_size=3, keep_generations=True)
    assert set(res["sets"]) == {"a", "b"}
    assert res["sets"]["a"]["n"] == 5 and res["sets"]["b"]["n"] == 4
    for v in res["sets"].values():
        assert v["seeds"] == [1, 2] and len(v["per_seed"]) == 2
        assert v["rougeL"] == pytest.approx(statistics.fmean(v["per_seed"]))
        assert v["std"] == pytest.approx(statistics.pstdev(v["per_seed"]))
        assert 0 <= v["rougeL"] <= 100 and len(v["samples"]) == 3
    # per-seed value = mean of the per-example ROUGE-L of that seed's generations
    rows = ev.read_eval_set(a, max_examples=5)
    gens = ev.generate(model, tokenizer, [r["prompt"] for r in rows], seed=2, max_new_tokens=4, do_sample=True,
                       batch_size=3)
    want = statistics.fmean(ev.rouge_l(g, r["references"]) for g, r in zip(gens, rows))
    assert res["sets"]["a"]["per_seed"][1] == pytest.approx(want)
    # per prompt: the mean over the seeds of that prompt's ROUGE-L; every answer of the first seed is kept
    first = ev.generate(model, tokenizer, [r["prompt"] for r in rows], seed=1, max_new_tokens=4, do_sample=True,
                        batch_size=3)
    assert res["sets"]["a"]["generations"] == first
    assert res["sets"]["a"]["per_prompt"] == pytest.approx(
        [(ev.rouge_l(g1, r["references"]) + ev.rouge_l(g2, r["references"])) / 2
         for g1, g2, r in zip(first, gens, rows)])
    assert statistics.fmean(res["sets"]["a"]["per_prompt"]) == pytest.approx(res["sets"]["a"]["rougeL"])
    assert res["average"] == pytest.approx((res["sets"]["a"]["rougeL"] + res["sets"]["b"]["rougeL"]) / 2)

    table = ev.format_table({"tiny": res, "other": {"sets": {"a": {"n": 5, "rougeL": 12.345, "std": 0.0,
                                                                    "per_seed": [12.345]}}}})
    lines = table.strip().split("\n")
    assert lines[0] == "| model | a (n=5) | b (n=4) | average |"
    a_, b_ = res["sets"]["a"], res["sets"]["b"]
    assert lines[2] == (f"| tiny | {a_['rougeL']:.2f} ± {a_['std']:.2f} | {b_['rougeL']:.2f} ± {b_['std']:.2f} "
                        f"| {res['average']:.2f} |")
    assert lines[3] == "| other | 12.35 | - | 12.35 |"


def test_cli_outputs_match_evaluate_model(tiny_model, tokenizer, tmp_path, capsys, device):
    model_dir, _ = tiny_model
    a = tiny.write_jsonl(tmp_path / "seta.jsonl", tiny.make_rows(5, seed=3))
    b = tiny.write_jsonl(tmp_path / "setb.jsonl", tiny.make_rows(5, seed=4))
    out_json, out_md = tmp_path / "r" / "res.json", tmp_path / "r" / "res.md"
    rc = ev.main(["--model", str(model_dir), "--data", str(a), "--data", str(b), "--max-examples", "4",
                  "--max-new-tokens", "5", "--do-sample", "--seeds", "3,4", "--batch-size", "2",
                  "--out-json", str(out_json), "--out-md", str(out_md), "--name", "tinyLM"])
    assert rc == 0
    got = json.loads(out_json.read_text())
    model, tok = ev.load_model(model_dir)
    assert next(model.parameters()).device == device and got["device"] == str(device)  # the accelerator by default
    want = ev.evaluate_model(model, tok, {"seta": a, "setb": b}, seeds=(3, 4), max_examples=4, max_new_tokens=5,
                             do_sample=True, temperature=1.0, top_p=1.0, batch_size=2)
    assert got["name"] == "tinyLM"
    assert got["settings"]["seeds"] == [3, 4] and got["settings"]["do_sample"] is True
    for name in ("seta", "setb"):
        assert got["sets"][name]["n"] == 4
        assert got["sets"][name]["per_seed"] == pytest.approx(want["sets"][name]["per_seed"])
        assert got["sets"][name]["rougeL"] == pytest.approx(want["sets"][name]["rougeL"])
        assert got["sets"][name]["std"] == pytest.approx(want["sets"][name]["std"])
        s = got["sets"][name]["samples"][0]
        assert set(s) >= {"prompt", "references", "generation"}
    md = out_md.read_text()
    assert md == ev.format_table({"tinyLM": want})
    assert f"{want['sets']['seta']['rougeL']:.2f} ± {want['sets']['seta']['std']:.2f}" in md
    assert md in capsys.readouterr().out


def test_cli_missing_model(tmp_path, capsys):
    data = tiny.write_jsonl(tmp_path / "d.jsonl", tiny.make_rows(2))
    missing = tmp_path / "no_such_model"
    assert ev.main(["--model", str(missing), "--data", str(data)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_load_model_on_the_host_when_asked(tiny_model):
    """device="cpu" keeps the model on the host whatever the accelerator; a bad device is named."""
    model_dir, _ = tiny_model
    model, _ = ev.load_model(model_dir, device="cpu")
    assert next(model.parameters()).device.type == "cpu" and not model.training
    with pytest.raises(ev.EvaluateError, match="device must be a torch device.*'gpu9'"):
        ev.load_model(model_dir, device="gpu9")


def test_teacher_forced_analysis_against_float64(tiny_model, tokenizer, tmp_path, device):
    """Every number of the teacher-forced analysis (batched, padded, fp32) against a float64 computation one row at a
    time on the full logits; the teacher against itself agrees everywhere with KL 0."""
    import copy

    import torch

    from okd_scale.data import collate, load_dataset

    _, teacher = tiny_model
    student = tiny.make_llama(tmp_path / "s", tokenizer, num_layers=1, hidden=32, seed=7).to(device).eval()
    data = tiny.write_jsonl(tmp_path / "val.jsonl", tiny.make_rows(7, seed=5))
    got = ev.teacher_forced(student, teacher, tokenizer, data, max_length=48, batch_size=3)

    s64, t64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    cols = {k: [] for k in ("u", "agree", "kl", "std", "ce")}
    examples, _ = load_dataset(data, tokenizer, 48)
    with torch.no_grad():
        for ex in examples:
            b = {k: v.to(device) for k, v in collate([ex], tokenizer.pad_token_id).items()}
            mask = b["labels"][0, 1:] != -100
            y = b["labels"][0, 1:][mask]
            zs = s64(input_ids=b["input_ids"]).logits[0, :-1][mask][:, :len(tokenizer)]
            zt = t64(input_ids=b["input_ids"]).logits[0, :-1][mask][:, :len(tokenizer)]
            ls, lt = zs.log_softmax(-1), zt.log_softmax(-1)
            cols["u"].append(1 - lt.gather(1, y[:, None]).squeeze(1).exp())
            cols["agree"].append((zs.argmax(-1) == zt.argmax(-1)).double())
            cols["kl"].append((lt.exp() * (lt - ls)).sum(-1))
            cols["std"].append(zs.std(-1))
            cols["ce"].append(-ls.gather(1, y[:, None]).squeeze(1))
    t = {k: torch.cat(v).cpu() for k, v in cols.items()}
    edges = torch.quantile(t["u"], torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    assert got["tokens"] == len(t["u"]) and got["ce"] == pytest.approx(float(t["ce"].mean()), rel=1e-4)
    assert got["edges"] == pytest.approx(edges.tolist(), rel=1e-4)
    which = torch.bucketize(t["u"], edges, right=True)
    assert sum(v["tokens"] for v in got["terciles"].values()) == len(t["u"])
    for i, name in enumerate(ev.TERCILES):
        m = which == i
        g = got["terciles"][name]
        assert g["tokens"] == int(m.sum()) > 0
        for key, col in (("u", "u"), ("agreement", "agree"), ("kl", "kl"), ("logit_std", "std")):
            assert g[key] == pytest.approx(float(t[col][m].mean()), rel=1e-4, abs=1e-6), (name, key)
    assert got["terciles"]["confident"]["u"] < got["terciles"]["uncertain"]["u"]

    itself = ev.teacher_forced(teacher, teacher, tokenizer, data, max_length=48, batch_size=3)
    assert all(v["agreement"] == 1.0 and abs(v["kl"]) < 1e-5 for v in itself["terciles"].values())
