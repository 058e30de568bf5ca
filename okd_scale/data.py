"""Training data: jsonl / json / saved Hugging Face datasets -> token ids with a response-only loss mask.

Two row formats are accepted (one file may mix them):

1. MiniLLM / DistiLLM instruction rows.
   - ``prompt`` (str): the fully formatted prompt, used verbatim (no chat template is applied).
   - ``output`` (str, or a list of reference strings): the response. With a list, training uses the
     FIRST non-empty reference (evaluation may score against all of them; training needs one target).
     ``response`` is accepted as an alias of ``output`` (``output`` wins when both are present).
   - Rows with ``instruction`` (and optional ``input``) but no ``prompt`` get the Alpaca prompt that
     those sets use (see ``alpaca_prompt``).
   Tokens = tokenize(prompt) + tokenize(response) [+ eos]; prompt and response are tokenized
   separately (``add_special_tokens=False``) so the boundary is exact. The eos token is appended unless
   ``add_eos=False`` or the response already ends with it. The loss covers the response and the eos.

2. Chat rows: ``messages`` = list of ``{"role": str, "content": str}``, rendered with the tokenizer's
   chat template. The loss covers every assistant message: its content and the template's
   end-of-turn tokens (ChatML: ``content<|im_end|>``). Whitespace-only tokens that follow the turn's
   last special token (ChatML's ``\\n`` after ``<|im_end|>``) are not trained on; they belong to the
   gap between turns. Messages after the last assistant message carry no loss and are dropped.
   When a row has both ``messages`` and ``prompt`` (as in UltraChat), ``messages`` wins.

Truncation to ``max_length`` (L) when prompt (P tokens) + response (R tokens) > L, where for chat rows
the "prompt" is everything before the first assistant token and the "response" everything after:
the response keeps its first ``min(R, max(L - P, L // 2))`` tokens, i.e. all of it when it fits next
to the whole prompt and never less than ``L // 2`` tokens (when it has them); the prompt keeps its LAST
tokens, as many as fit in the rest. An example is counted once in ``num_truncated`` whichever part
was cut.

Bad rows raise ``DataError`` naming the file, the 1-based line (``row`` for json arrays and saved
datasets) and the reason; with ``on_error="skip"`` they are skipped and counted instead.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch

from .divergences import IGNORE_INDEX  # the label of an uncounted token

log = logging.getLogger(__name__)


PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
_MAX_LOGGED_SKIPS = 10


@dataclass
class DataStats:
    """What loading a data set kept, cut and dropped."""

    num_examples: int = 0   # examples kept
    num_truncated: int = 0  # examples whose prompt or response was cut to fit max_length
    num_skipped: int = 0    # rows skipped (only with on_error="skip")
    seqkd: Optional[dict] = None  # method seqkd: {"generated": n, "cached": n} teacher responses

    def summary(self) -> str:
        """One log line."""
        return (f"{self.num_examples} examples, {self.num_truncated} truncated to max_length, "
                f"{self.num_skipped} rows skipped")


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file, the line or row, and the reason."""


class _RowError(Exception):
    """A reason a single row is unusable (becomes a DataError with its location)."""


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The Alpaca-style prompt of the MiniLLM/DistiLLM sets (the ``input`` section only when input is non-empty)."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


# ----------------------------------------------------------------------------------------------- reading

def _row_unit(path: Path) -> str:
    return "line" if path.is_file() and _is_json_lines(path) else "row"


def _is_json_lines(path: Path) -> bool:
    if path.suffix == ".jsonl":
        return True
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return not head.startswith(b"[")


def _read(path: Path) -> list[tuple[int, Any]]:
    """(number, parsed row) pairs; a line that does not parse is carried as a _RowError in its place."""
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        return _read_saved_dataset(path)
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(f"{path}: unsupported data format {path.suffix!r}; expected .jsonl, .json "
                        "or a directory written by datasets.Dataset.save_to_disk")
    if _is_json_lines(path):
        if path.suffix == ".json" and _single_json_value(path):
            raise DataError(f"{path}: expected a JSON array of objects (or JSON lines), got one JSON value")
        return _read_jsonl(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {_type_name(data)}")
    return [(i + 1, row) for i, row in enumerate(data)]


def _single_json_value(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return True


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    rows: list[tuple[int, Any]] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                rows.append((n, _RowError(f"not valid UTF-8: {e}")))
                continue
            if not text.strip():
                continue
            try:
                rows.append((n, json.loads(text)))
            except json.JSONDecodeError as e:
                rows.append((n, _RowError(f"not valid JSON: {e.msg} (column {e.colno})")))
    return rows


def _read_saved_dataset(path: Path) -> list[tuple[int, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any failure means "not a saved dataset"
        raise DataError(f"{path}: not a directory written by datasets save_to_disk: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: saved DatasetDict has no 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    return [(i + 1, row) for i, row in enumerate(ds)]


def read_rows(path: str | Path) -> list[tuple[int, dict]]:
    """Raw rows with their 1-based line number (row index + 1 for json arrays and saved datasets).

    Formats: ``.jsonl`` (one JSON object a line; blank lines ignored), ``.json`` (a JSON array of
    objects; a ``.json`` file holding JSON lines is read as such), or a directory
    written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` gives its ``"train"`` split).
    Raises DataError at the first line that is not a JSON object.
    """
    path = Path(path)
    unit = _row_unit(path) if path.exists() else "line"
    rows = []
    for n, row in _read(path):
        if isinstance(row, _RowError):
            raise DataError(f"{path} {unit} {n}: {row}")
        if not isinstance(row, dict):
            raise DataError(f"{path} {unit} {n}: expected a JSON object, got {_type_name(row)}")
        rows.append((n, row))
    return rows


# -------------------------------------------------------------------------------------------- tokenizing

def _type_name(x: Any) -> str:
    return {dict: "object", list: "list", str: "string", type(None): "null"}.get(type(x), type(x).__name__)


def _present(row: dict, key: str) -> bool:
    return row.get(key) is not None  # saved datasets fill absent columns with None


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _response_text(row: dict) -> str:
    key = "output" if _present(row, "output") else "response"
    value = row[key]
    if isinstance(value, str):
        if not value.strip():
            raise _RowError(f'field "{key}" is empty')
        return value
    if isinstance(value, list):
        bad = [x for x in value if not isinstance(x, str)]
        if bad:
            raise _RowError(f'field "{key}" must be a string or a list of strings, '
                            f"got a list containing {_type_name(bad[0])}")
        for ref in value:
            if ref.strip():
                return ref
        raise _RowError(f'field "{key}" is empty')
    raise _RowError(f'field "{key}" must be a string or a list of strings, got {_type_name(value)}')


def _prompt_text(row: dict) -> str:
    if _present(row, "prompt"):
        if not isinstance(row["prompt"], str):
            raise _RowError(f'field "prompt" must be a string, got {_type_name(row["prompt"])}')
        return row["prompt"]
    instruction, inp = row["instruction"], row.get("input")
    if not isinstance(instruction, str):
        raise _RowError(f'field "instruction" must be a string, got {_type_name(instruction)}')
    if not instruction.strip():
        raise _RowError('field "instruction" is empty')
    if inp is not None and not isinstance(inp, str):
        raise _RowError(f'field "input" must be a string, got {_type_name(inp)}')
    return alpaca_prompt(instruction, inp)


def _tokenize_prompt_row(row: dict, tokenizer, add_eos: bool) -> tuple[list[int], list[int]]:
    if not (_present(row, "output") or _present(row, "response")):
        raise _RowError('missing field "output" (or "response")')
    prompt, response = _prompt_text(row), _response_text(row)
    p_ids, r_ids = _encode(tokenizer, prompt), _encode(tokenizer, response)
    if add_eos:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos token; pass add_eos=False or set tokenizer.eos_token")
        if not r_ids or r_ids[-1] != eos:
            r_ids.append(eos)
    return p_ids, r_ids


CHAT_ROLES = ("system", "user", "assistant")
# roles some chat templates handle besides those: accepted where the template names them
EXTRA_CHAT_ROLES = ("tool", "ipython", "function", "developer")


def chat_roles(tokenizer) -> tuple[str, ...]:
    """The roles a conversation may use with this tokenizer: system, user, assistant, and any of EXTRA_CHAT_ROLES its
    chat template names in quotes."""
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else ""
    return CHAT_ROLES + tuple(r for r in EXTRA_CHAT_ROLES if f"'{r}'" in template or f'"{r}"' in template)


def _check_messages(messages: Any, roles: tuple[str, ...] = CHAT_ROLES) -> int:
    """Validate a conversation (every role one of `roles`); return the index of its last assistant message."""
    if not isinstance(messages, list):
        raise _RowError(f'field "messages" must be a list of messages, got {_type_name(messages)}')
    last = -1
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _RowError(f'"messages"[{i}] must be an object with "role" and "content", got {_type_name(m)}')
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise _RowError(f'"messages"[{i}] field "{key}" must be a string, got {_type_name(m.get(key))}')
        if m["role"] not in roles:
            raise _RowError(f'"messages"[{i}] has role "{m["role"]}"; expected one of {", ".join(roles)} (the roles '
                            "the tokenizer's chat template takes)")
        if m["role"] == "assistant":
            if not m["content"].strip():
                raise _RowError(f'"messages"[{i}] (assistant) has empty "content"')
            last = i
    if last < 0:
        raise _RowError('"messages" has no assistant message')
    return last


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 - template errors (e.g. roles must alternate) are row errors
        raise _RowError(f"chat template failed: {e}") from None


def _tokenize_chat_row(messages: Any, tokenizer) -> tuple[list[int], list[int]]:
    """input_ids and a 0/1 loss mask for one conversation."""
    last = _check_messages(messages, chat_roles(tokenizer))
    messages = [{"role": m["role"], "content": m["content"]} for m in messages[: last + 1]]
    full_text = _render(tokenizer, messages, False)
    ids = _encode(tokenizer, full_text)
    special = set(tokenizer.all_special_ids)
    special.update(i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special)

    def boundary(k: int, generation_prompt: bool) -> int:
        text = _render(tokenizer, messages[:k], generation_prompt)
        what = f"messages[:{k}]" + (" with the generation prompt" if generation_prompt else "")
        if not full_text.startswith(text):
            raise _RowError(f"chat template is not prefix-stable: the rendering of {what} "
                            "is not a prefix of the whole conversation")
        prefix = _encode(tokenizer, text)
        if ids[: len(prefix)] != prefix:
            raise _RowError(f"chat template is not prefix-stable: {what} does not tokenize to a "
                            "prefix of the whole conversation's tokens")
        return len(prefix)

    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = boundary(i, True), boundary(i + 1, False)
        last_special = max((j for j in range(start, end) if ids[j] in special), default=None)
        if last_special is not None:
            while end - 1 > last_special and not tokenizer.decode([ids[end - 1]]).strip():
                end -= 1
        for j in range(start, end):
            mask[j] = 1
    if not any(mask):
        raise _RowError("the assistant messages render to no tokens")
    return ids, mask


def truncate(ids: list[int], mask: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Apply the module's truncation rule; the prompt is everything before the first trained token."""
    if len(ids) <= max_length:
        return ids, mask, False
    p = mask.index(1)
    r = len(ids) - p
    keep_r = min(r, max(max_length - p, max_length // 2))
    keep_p = max_length - keep_r
    return ids[p - keep_p: p + keep_r], mask[p - keep_p: p + keep_r], True


def _tokenize(rows: Iterable, tokenizer, max_length: int, source: str, on_error: str, add_eos: bool,
              unit: str) -> tuple[list[dict], DataStats]:
    if on_error not in ("raise", "skip"):
        raise ValueError(f'on_error must be "raise" or "skip", got {on_error!r}')
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    examples: list[dict] = []
    stats = DataStats()
    for index, item in enumerate(rows):
        n, row = item if isinstance(item, tuple) else (index + 1, item)
        where = f"{source} {unit} {n}"
        try:
            if isinstance(row, _RowError):
                raise row
            if not isinstance(row, dict):
                raise _RowError(f"expected a JSON object, got {_type_name(row)}")
            if _present(row, "messages"):
                if not getattr(tokenizer, "chat_template", None):
                    raise DataError(f'{where}: rows with "messages" need a chat template, '
                                    "and the tokenizer has none")
                ids, mask = _tokenize_chat_row(row["messages"], tokenizer)
            elif _present(row, "prompt") or _present(row, "instruction"):
                p_ids, r_ids = _tokenize_prompt_row(row, tokenizer, add_eos)
                ids, mask = p_ids + r_ids, [0] * len(p_ids) + [1] * len(r_ids)
            else:
                fields = ", ".join(map(str, row)) or "none"
                raise _RowError(f'has neither "prompt"+"output" nor "messages" (fields: {fields})')
        except _RowError as e:
            if on_error == "raise":
                raise DataError(f"{where}: {e}") from None
            stats.num_skipped += 1
            if stats.num_skipped <= _MAX_LOGGED_SKIPS:
                log.warning("skipping %s: %s", where, e)
            elif stats.num_skipped == _MAX_LOGGED_SKIPS + 1:
                log.warning("skipping further bad rows of %s without logging them", source)
            continue
        ids, mask, cut = truncate(ids, mask, max_length)
        stats.num_truncated += cut
        examples.append({"input_ids": ids, "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]})
    stats.num_examples = len(examples)
    return examples, stats


def tokenize_rows(rows, tokenizer, max_length: int, *, source: str = "<data>", on_error: str = "raise",
                  add_eos: bool = True, unit: str = "line") -> tuple[list[dict], DataStats]:
    """Rows -> examples ``{"input_ids": list[int], "labels": list[int]}``, labels IGNORE_INDEX off the response.

    ``rows``: ``(number, row)`` pairs as ``read_rows`` gives them, or plain dicts (numbered from 1).
    ``source`` and ``unit`` ("line" or "row") only name the location in error messages.
    ``on_error``: "raise" stops at the first bad row with a DataError; "skip" drops bad rows and counts
    them in ``num_skipped``. ``add_eos`` applies to prompt/output rows only (chat templates end turns
    themselves). See the module docstring for the formats and the truncation rule.
    """
    return _tokenize(rows, tokenizer, max_length, source, on_error, add_eos, unit)


def load_dataset(path: str | Path, tokenizer, max_length: int, *, on_error: str = "raise",
                 add_eos: bool = True) -> tuple[list[dict], DataStats]:
    """read_rows + tokenize_rows; raises DataError (naming the file) when no example is left."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f'on_error must be "raise" or "skip", got {on_error!r}')
    path = Path(path)
    rows = _read(path)
    if not rows:
        raise DataError(f"{path}: no rows (empty data file or dataset)")
    examples, stats = _tokenize(rows, tokenizer, max_length, str(path), on_error, add_eos, _row_unit(path))
    if not examples:
        raise DataError(f"{path}: no usable example left ({stats.num_skipped} of {len(rows)} rows skipped)")
    return examples, stats


# ---------------------------------------------------------------------------------------------- batching

def collate(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example.

    Returns int64 ``input_ids`` [B, T], ``attention_mask`` [B, T] (1 on tokens, 0 on padding) and
    ``labels`` [B, T] (IGNORE_INDEX on prompt and padding). Labels are NOT shifted (Hugging Face
    convention: the loss compares ``logits[:, :-1]`` with ``labels[:, 1:]``).
    """
    if not features:
        raise ValueError("collate got an empty batch")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to the eos token)")
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    for b, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[b, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
        attention_mask[b, :n] = 1
        labels[b, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def check_one_batch(num_examples: int, world_size: int, batch_size: int, source: str = "data",
                    key: str = "batch_size") -> None:
    """DataError unless ``num_examples`` shared among ``world_size`` ranks (the tail that does not divide
    dropped, as a DistributedSampler with drop_last does) give every rank one batch of ``batch_size``."""
    per_rank = num_examples // world_size
    if per_rank < batch_size:
        raise DataError(f"{source}: {num_examples} usable examples on {world_size} ranks give {per_rank} per rank, "
                        f"fewer than one batch ({key} {batch_size}); add data or lower the batch size")


def build_dataloader(examples, *, batch_size: int, pad_token_id: int, rank: int, world_size: int,
                     seed: int, shuffle: bool = True, drop_last: bool = True) -> torch.utils.data.DataLoader:
    """A DataLoader over this rank's share of ``examples`` (a DistributedSampler), batches made by ``collate``.

    Every rank gets the same number of batches. ``drop_last`` drops both the tail that does not divide
    evenly among ranks and each rank's last incomplete batch (without it the sampler repeats examples to
    even out the ranks, and the last batch may be short). The caller calls
    ``loader.sampler.set_epoch(epoch)`` each epoch; the order depends only on (seed, epoch).
    """
    from torch.utils.data import DataLoader, DistributedSampler

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if drop_last:
        check_one_batch(len(examples), world_size, batch_size)
    sampler = DistributedSampler(examples, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    return DataLoader(examples, batch_size=batch_size, sampler=sampler, num_workers=0, drop_last=drop_last,
                      collate_fn=partial(collate, pad_token_id=pad_token_id))


@dataclass
class DataPosition:
    epoch: int = 0  # the epoch the next batch comes from
    batches: int = 0  # batches already taken from it (by this rank)


def batches_from(loader, pos: DataPosition) -> Iterator[dict]:
    """The loader's batches epoch after epoch from `pos` (skipping the batches a resumed run already used),
    keeping `pos` up to date."""
    while True:
        loader.sampler.set_epoch(pos.epoch)
        for i, batch in enumerate(loader):
            if i >= pos.batches:
                pos.batches = i + 1
                yield batch
        pos.epoch, pos.batches = pos.epoch + 1, 0
