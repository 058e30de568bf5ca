"""okd_scale.data: row formats, loss masks, truncation, errors, collation and distributed loading."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import tiny

from okd_scale.data import (IGNORE_INDEX, DataError, DataStats, alpaca_prompt, build_dataloader, collate,
                            load_dataset, read_rows, tokenize_rows)

EVAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"
EOS = "<|im_end|>"


def dec(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def enc(tokenizer, text) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def one(tokenizer, row, max_length=256, **kw) -> dict:
    examples, stats = tokenize_rows([row], tokenizer, max_length, **kw)
    assert stats.num_examples == len(examples) == 1
    return examples[0]


def label_runs(ex) -> list[list[int]]:
    """Contiguous runs of trained tokens."""
    runs, cur = [], []
    for tok, lab in zip(ex["input_ids"], ex["labels"]):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == tok
            cur.append(tok)
    return runs + ([cur] if cur else [])


# ------------------------------------------------------------------------------------- prompt/output rows

def test_prompt_output_row_tokens_and_mask(tokenizer):
    prompt, output = "please tell me about the cat\n", "the cat eats fish"
    ex = one(tokenizer, {"prompt": prompt, "output": output})
    assert dec(tokenizer, ex["input_ids"]) == prompt + output + EOS
    n = len(enc(tokenizer, prompt))
    assert ex["input_ids"][:n] == enc(tokenizer, prompt)
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    assert ex["labels"][n:] == ex["input_ids"][n:]
    assert ex["labels"][-1] == tokenizer.eos_token_id
    assert len(ex["labels"]) == len(ex["input_ids"])


def test_eos_not_doubled_and_add_eos_false(tokenizer):
    ex = one(tokenizer, {"prompt": "who", "output": "the dog" + EOS})
    assert dec(tokenizer, ex["input_ids"]) == "who" + "the dog" + EOS
    ex = one(tokenizer, {"prompt": "who", "output": "the dog"}, add_eos=False)
    assert dec(tokenizer, ex["input_ids"]) == "who" + "the dog"
    assert tokenizer.eos_token_id not in ex["input_ids"]


def test_reference_list_uses_first_non_empty(tokenizer):
    ex = one(tokenizer, {"prompt": "name a pet: ", "output": ["", "  ", "the dog", "the cat"]})
    assert dec(tokenizer, [t for t in ex["labels"] if t != IGNORE_INDEX]) == "the dog" + EOS


def test_response_alias(tokenizer):
    a = one(tokenizer, {"prompt": "p: ", "response": "the bird"})
    b = one(tokenizer, {"prompt": "p: ", "output": "the bird"})
    assert a == b


def test_make_rows_via_jsonl(tokenizer, tmp_path):
    rows = tiny.make_rows(10)
    examples, stats = load_dataset(tiny.write_jsonl(tmp_path / "train.jsonl", rows), tokenizer, 256)
    assert (stats.num_examples, stats.num_truncated, stats.num_skipped) == (10, 0, 0)
    for row, ex in zip(rows, examples):
        out = row["output"][0] if isinstance(row["output"], list) else row["output"]
        assert dec(tokenizer, ex["input_ids"]) == row["prompt"] + out + EOS


def _eval_rows(name: str) -> list[dict]:
    path = EVAL_DIR / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name", ["dolly.jsonl", "selfinst.jsonl"])
def test_alpaca_template_matches_eval_sets(name):
    rows = _eval_rows(name)
    assert any(r["input"] for r in rows) and any(not r["input"] for r in rows)
    for r in rows:
        assert alpaca_prompt(r["instruction"], r["input"]) == r["prompt"]


def test_instruction_rows_rebuild_dolly_prompt(tokenizer):
    rows = _eval_rows("dolly.jsonl")
    picked = [r for r in rows if r["input"]][:4] + [r for r in rows if not r["input"]][:4]
    stripped = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in picked]
    stripped[-1].pop("input")  # an absent input is the same as an empty one
    examples, _ = tokenize_rows(stripped, tokenizer, 100_000)
    for r, ex in zip(picked, examples):
        n = next(i for i, t in enumerate(ex["labels"]) if t != IGNORE_INDEX)
        assert dec(tokenizer, ex["input_ids"][:n]) == r["prompt"]
        assert dec(tokenizer, ex["input_ids"][n:]) == r["output"] + EOS


def test_prompt_wins_over_instruction(tokenizer):
    ex = one(tokenizer, {"prompt": "verbatim: ", "instruction": "ignored", "output": "the fish"})
    assert dec(tokenizer, ex["input_ids"]) == "verbatim: the fish" + EOS


# ---------------------------------------------------------------------------------------------- chat rows

CONVERSATION = [
    {"role": "system", "content": "be nice"},
    {"role": "user", "content": "what is the cat"},
    {"role": "assistant", "content": "the cat is small"},
    {"role": "user", "content": "and the dog"},
    {"role": "assistant", "content": "the dog\nis large"},
]


def test_messages_loss_covers_assistant_turns_only(tokenizer):
    ex = one(tokenizer, {"messages": CONVERSATION})
    assert dec(tokenizer, ex["input_ids"]) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    runs = label_runs(ex)
    # Exactly each assistant content followed by <|im_end|>; the "\n" ChatML puts after <|im_end|>
    # and the "<|im_start|>assistant\n" header are not trained on.
    assert [dec(tokenizer, r) for r in runs] == ["the cat is small" + EOS, "the dog\nis large" + EOS]
    assert dec(tokenizer, ex["input_ids"][-1:]) == "\n" and ex["labels"][-1] == IGNORE_INDEX


def test_messages_after_last_assistant_are_dropped(tokenizer):
    ex = one(tokenizer, {"messages": CONVERSATION[:3] + [{"role": "user", "content": "bye"}]})
    assert dec(tokenizer, ex["input_ids"]) == tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert [dec(tokenizer, r) for r in label_runs(ex)] == ["the cat is small" + EOS]


def test_messages_win_over_prompt(tokenizer):
    ex = one(tokenizer, {"prompt": "what is the cat", "messages": CONVERSATION[1:3]})
    assert [dec(tokenizer, r) for r in label_runs(ex)] == ["the cat is small" + EOS]


def test_no_chat_template(tokenizer_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        tokenize_rows([{"messages": CONVERSATION}], tok, 256, on_error="skip")
    # prompt/output rows still work without one
    assert tokenize_rows([{"prompt": "a", "output": "b"}], tok, 256)[1].num_examples == 1


def test_template_not_prefix_stable(tokenizer_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    # The generation prompt says "assistant" but the rendered turn says "bot": no exact boundary exists.
    tok.chat_template = tiny.CHATML.replace("message['role'] + '\n'",
                                            "(message['role'] if message['role'] != 'assistant' else 'bot') + '\n'")
    with pytest.raises(DataError, match="prefix-stable"):
        tokenize_rows([{"messages": CONVERSATION}], tok, 256)


# ---------------------------------------------------------------------------------------------- truncation

def _text(n_words: int, seed: int) -> str:
    import random
    return tiny.sentence(random.Random(seed), n_words)


def test_long_prompt_cut_from_left(tokenizer):
    prompt, output = _text(60, 1), "the cat"
    p, r = enc(tokenizer, prompt), enc(tokenizer, output) + [tokenizer.eos_token_id]
    L = 32
    assert len(p) > L and len(r) < L // 2
    examples, stats = tokenize_rows([{"prompt": prompt, "output": output}, {"prompt": "a", "output": "b"}],
                                    tokenizer, L)
    ex = examples[0]
    assert stats.num_truncated == 1 and stats.num_examples == 2
    assert len(ex["input_ids"]) == L
    assert ex["input_ids"] == p[-(L - len(r)):] + r  # whole response, the prompt's last tokens
    assert ex["labels"][: L - len(r)] == [IGNORE_INDEX] * (L - len(r))


def test_long_response_keeps_whole_short_prompt(tokenizer):
    prompt, output = "tell me", _text(60, 2)
    p, r = enc(tokenizer, prompt), enc(tokenizer, output)
    L = 32
    assert len(p) < L // 2 and len(r) > L
    ex = one(tokenizer, {"prompt": prompt, "output": output}, max_length=L)
    assert ex["input_ids"] == p + r[: L - len(p)]  # response = first L - P tokens (>= L // 2)
    assert ex["labels"] == [IGNORE_INDEX] * len(p) + r[: L - len(p)]


def test_both_long_split_in_half(tokenizer):
    prompt, output = _text(60, 3), _text(60, 4)
    p, r = enc(tokenizer, prompt), enc(tokenizer, output)
    L = 33
    ex = one(tokenizer, {"prompt": prompt, "output": output}, max_length=L)
    assert ex["input_ids"] == p[-(L - L // 2):] + r[: L // 2]
    assert sum(t != IGNORE_INDEX for t in ex["labels"]) == L // 2


def test_long_chat_truncated(tokenizer):
    ex_full = one(tokenizer, {"messages": CONVERSATION}, max_length=10_000)
    L = len(ex_full["input_ids"]) - 5
    examples, stats = tokenize_rows([{"messages": CONVERSATION}], tokenizer, L)
    assert stats.num_truncated == 1 and len(examples[0]["input_ids"]) == L
    assert examples[0]["input_ids"] == ex_full["input_ids"][:L]  # the response part is long: its tail goes
    assert examples[0]["labels"] == ex_full["labels"][:L]


def test_bad_max_length(tokenizer):
    with pytest.raises(ValueError, match="max_length"):
        tokenize_rows([{"prompt": "a", "output": "b"}], tokenizer, 1)


# ----------------------------------------------------------------------------------------------- collate

def test_collate_pads_right():
    feats = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
             {"input_ids": [1, 2, 3, 4, 9], "labels": [IGNORE_INDEX, IGNORE_INDEX, 3, 4, 9]}]
    b = collate(feats, pad_token_id=0)
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    for v in b.values():
        assert v.shape == (2, 5) and v.dtype == torch.int64
    assert b["input_ids"].tolist() == [[5, 6, 7, 0, 0], [1, 2, 3, 4, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert b["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX],
                                    [IGNORE_INDEX, IGNORE_INDEX, 3, 4, 9]]
    with pytest.raises(ValueError):
        collate(feats, pad_token_id=None)


# ------------------------------------------------------------------------------------------- dataloaders

def _examples(n):
    return [{"input_ids": [i, i], "labels": [IGNORE_INDEX, i]} for i in range(n)]


def _rank_indices(n, world_size=2, epoch=0, seed=0, **kw):
    out = []
    for rank in range(world_size):
        dl = build_dataloader(_examples(n), batch_size=2, pad_token_id=0, rank=rank, world_size=world_size,
                              seed=seed, **kw)
        dl.sampler.set_epoch(epoch)
        out.append(list(dl.sampler))
        batches = list(dl)
        seen = [row[0] for b in batches for row in b["input_ids"].tolist()]
        if kw.get("drop_last", True):
            assert len(batches) == len(dl) == len(out[-1]) // 2
            assert all(b["input_ids"].shape == (2, 2) for b in batches)
            assert seen == out[-1][: len(seen)]
        else:
            assert seen == out[-1]
    return out


def test_dataloader_ranks_disjoint_and_cover():
    a, b = _rank_indices(10)
    assert len(a) == len(b) == 5 and not set(a) & set(b) and set(a) | set(b) == set(range(10))
    a, b = _rank_indices(11)  # drop_last: the uneven tail goes, ranks stay disjoint
    assert len(a) == len(b) == 5 and not set(a) & set(b) and len(set(a) | set(b)) == 10
    a, b = _rank_indices(11, drop_last=False)  # padded by repetition: every example is seen
    assert len(a) == len(b) == 6 and set(a) | set(b) == set(range(11))


def test_dataloader_epochs_reproducible():
    e0, e1 = _rank_indices(40, epoch=0), _rank_indices(40, epoch=1)
    assert e0 != e1
    assert _rank_indices(40, epoch=1) == e1
    assert _rank_indices(40, epoch=1, seed=7) != e1
    assert _rank_indices(10, shuffle=False)[0] == [0, 2, 4, 6, 8]


def test_dataloader_too_small():
    with pytest.raises(ValueError, match="fewer than one batch"):
        build_dataloader(_examples(3), batch_size=2, pad_token_id=0, rank=0, world_size=2, seed=0)


# ----------------------------------------------------------------------------------------------- formats

ROWS = [{"prompt": "who is ", "output": "the cat"}, {"prompt": "what is ", "output": "a dog"},
        {"prompt": "where is ", "output": "the river"}]


def _check_rows(tokenizer, examples):
    assert [dec(tokenizer, e["input_ids"]) for e in examples] == [r["prompt"] + r["output"] + EOS for r in ROWS]


def test_read_rows_jsonl_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\r\n")
    assert read_rows(path) == [(1, ROWS[0]), (4, ROWS[1])]


def test_json_array(tokenizer, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=2))
    assert read_rows(path) == [(i + 1, r) for i, r in enumerate(ROWS)]
    _check_rows(tokenizer, load_dataset(path, tokenizer, 64)[0])
    path.write_text(json.dumps([ROWS[0], {"prompt": "x", "output": ""}]))
    with pytest.raises(DataError, match=r"d\.json row 2: field \"output\" is empty"):
        load_dataset(path, tokenizer, 64)
    path.write_text(json.dumps({"train": ROWS}))
    with pytest.raises(DataError, match="expected a JSON array"):
        read_rows(path)


def test_json_lines_in_dot_json(tokenizer, tmp_path):
    path = tmp_path / "d.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    _check_rows(tokenizer, load_dataset(path, tokenizer, 64)[0])


def test_saved_dataset_and_dataset_dict(tokenizer, tmp_path):
    import datasets
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "ds"))
    _check_rows(tokenizer, load_dataset(tmp_path / "ds", tokenizer, 64)[0])
    assert [n for n, _ in read_rows(tmp_path / "ds")] == [1, 2, 3]

    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    _check_rows(tokenizer, load_dataset(tmp_path / "dd", tokenizer, 64)[0])

    datasets.DatasetDict({"validation": ds, "test": ds}).save_to_disk(str(tmp_path / "nt"))
    with pytest.raises(DataError, match="validation, test"):
        load_dataset(tmp_path / "nt", tokenizer, 64)

    chat = datasets.Dataset.from_list([{"messages": CONVERSATION}, {"messages": CONVERSATION[:2]}])
    chat.save_to_disk(str(tmp_path / "chat"))
    with pytest.raises(DataError, match=r"chat row 2: \"messages\" has no assistant message"):
        load_dataset(tmp_path / "chat", tokenizer, 256)

    (tmp_path / "junk").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        load_dataset(tmp_path / "junk", tokenizer, 64)


# ------------------------------------------------------------------------------------------------ errors

GOOD = json.dumps(ROWS[0])
BAD_LINES = {
    "malformed": ('{"prompt": oops}', "not valid JSON"),
    "not_object": ("[1, 2]", "expected a JSON object, got list"),
    "missing_output": ('{"prompt": "a"}', 'missing field "output"'),
    "neither": ('{"text": "a"}', 'has neither "prompt"\\+"output" nor "messages" \\(fields: text\\)'),
    "empty_output": ('{"prompt": "a", "output": "  "}', 'field "output" is empty'),
    "empty_refs": ('{"prompt": "a", "output": ["", ""]}', 'field "output" is empty'),
    "output_int": ('{"prompt": "a", "output": 5}', 'field "output" must be a string or a list of strings, got int'),
    "output_list_int": ('{"prompt": "a", "output": [1]}', 'field "output" .* got a list containing int'),
    "prompt_int": ('{"prompt": 3, "output": "b"}', 'field "prompt" must be a string, got int'),
    "response_dict": ('{"prompt": "a", "response": {}}', 'field "response" must be .* got object'),
    "no_assistant": ('{"messages": [{"role": "user", "content": "hi"}]}', '"messages" has no assistant message'),
    "bad_message": ('{"messages": [{"role": "assistant"}]}', r'"messages"\[0\] field "content" must be a string'),
    "empty_assistant": ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}',
                        r'"messages"\[1\] \(assistant\) has empty "content"'),
    "messages_str": ('{"messages": "hi"}', 'field "messages" must be a list'),
}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_bad_row_raises_with_file_and_line(tokenizer, tmp_path, kind):
    line, reason = BAD_LINES[kind]
    path = tmp_path / "train.jsonl"
    path.write_text(f"{GOOD}\n\n{GOOD}\n{line}\n{GOOD}\n")
    with pytest.raises(DataError, match=f"train\\.jsonl line 4: {reason}"):
        load_dataset(path, tokenizer, 64)
    examples, stats = load_dataset(path, tokenizer, 64, on_error="skip")
    assert (stats.num_examples, stats.num_skipped) == (3, 1) and len(examples) == 3


def test_raise_stops_at_first_bad_row(tokenizer, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(f"{GOOD}\n{BAD_LINES['empty_output'][0]}\n{BAD_LINES['malformed'][0]}\n")
    with pytest.raises(DataError, match="line 2: field \"output\" is empty"):
        load_dataset(path, tokenizer, 64)
    with pytest.raises(DataError, match="line 3: not valid JSON"):
        read_rows(path)


def test_skip_counts_and_all_bad(tokenizer, tmp_path):
    bad = [BAD_LINES[k][0] for k in ("malformed", "empty_output", "no_assistant", "output_int")]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([GOOD, bad[0], GOOD, bad[1], bad[2], json.dumps({"messages": CONVERSATION}), bad[3]]))
    examples, stats = load_dataset(path, tokenizer, 256, on_error="skip")
    assert (stats.num_examples, stats.num_skipped, stats.num_truncated) == (3, 4, 0)
    assert "3 examples" in stats.summary() and "4 rows skipped" in stats.summary()
    path.write_text("\n".join(bad))
    with pytest.raises(DataError, match=r"mixed\.jsonl: no usable example left \(4 of 4 rows skipped\)"):
        load_dataset(path, tokenizer, 256, on_error="skip")


def test_missing_empty_and_unsupported_files(tokenizer, tmp_path):
    with pytest.raises(DataError, match="not found: .*nope.jsonl"):
        load_dataset(tmp_path / "nope.jsonl", tokenizer, 64)
    with pytest.raises(DataError, match="not found"):
        read_rows(tmp_path / "nope.jsonl")
    for name, text in [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", "[]")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=f"{name}: no rows"):
            load_dataset(tmp_path / name, tokenizer, 64)
    (tmp_path / "d.txt").write_text(GOOD)
    with pytest.raises(DataError, match="unsupported"):
        load_dataset(tmp_path / "d.txt", tokenizer, 64)
    (tmp_path / "broken.json").write_text('[{"prompt": "a",')
    with pytest.raises(DataError, match="broken.json is not valid JSON"):
        load_dataset(tmp_path / "broken.json", tokenizer, 64)


def test_bad_on_error(tokenizer, tmp_path):
    path = tiny.write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(ValueError, match="on_error"):
        load_dataset(path, tokenizer, 64, on_error="ignore")
    with pytest.raises(ValueError, match="on_error"):
        tokenize_rows(ROWS, tokenizer, 64, on_error="warn")


def test_stats_summary():
    s = DataStats(num_examples=7, num_truncated=2, num_skipped=1).summary()
    assert s == "7 examples, 2 truncated to max_length, 1 rows skipped"
