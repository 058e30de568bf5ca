"""tools/proof/reproduce.py at a tiny size: two methods and the teacher, a few steps, one small set; the
table files exist with a number in every cell, and a rerun skips finished cells."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tiny import ROOT, TORCH_ADAM_JSON, clean_env


@pytest.mark.slow
def test_sweep_table_and_resume(tmp_path, pair):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "tools.proof.reproduce", "--preset", "cpu-small",
           "--teacher", str(pair / "teacher"), "--student", str(pair / "student"),
           "--train-data", str(pair / "train.jsonl"), "--eval-sets", str(pair / "eval.jsonl"),
           "--prompt-format", "as-is", "--methods", "sft,okd", "--nproc", "1", "--steps", "3",
           "--eval-examples", "4", "--gen-seeds", "1,2", "--out", str(out),
           "data.max_length=64", "online.num_blocks=2", f"deepspeed.teacher_overrides={TORCH_ADAM_JSON}",
           f"deepspeed.student_overrides={TORCH_ADAM_JSON}"]
    first = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert first.stdout.count("ROUGE-L average") == 3  # teacher, sft, okd
    table = json.loads((out / "table.json").read_text())
    assert table["sets"] == ["eval"] and list(table["rows"]) == ["teacher", "sft", "okd"]
    for name, row in table["rows"].items():
        assert 0 <= row["eval"]["mean"] <= 100 and row["eval"]["std"] >= 0 and row["eval"]["n"] == 4
        assert (row["train_s"] is None) == (name == "teacher")
    md = (out / "TABLE.md").read_text()
    assert all(f"| {name} |" in md for name in ("teacher", "sft", "okd"))
    cell = json.loads((out / "cells" / "okd.json").read_text())
    assert cell["eval"]["sets"]["eval"]["seeds"] == [1, 2]

    logs = {p.name: p.stat().st_mtime for p in (out / "logs").iterdir()}
    (out / "cells" / "sft.json").unlink()  # one unfinished cell: only it runs again
    second = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("done before, skipped") == 2 and second.stdout.count("ROUGE-L average") == 1
    assert (out / "logs" / "okd.log").stat().st_mtime == logs["okd.log"]  # okd was not trained again
    # a finished cell's training state is dropped once its JSON is written: without the JSON it trains anew
    assert not (out / "runs" / "sft" / "checkpoints").exists()
    assert (out / "logs" / "sft.log").read_text().count("saved the student to") == 2
    assert json.loads((out / "table.json").read_text())["rows"].keys() == table["rows"].keys()


@pytest.mark.parametrize("preset", ["cpu-small", "cpu-proof", "cpu-okd-search", "cpu-paper", "gpu-proof",
                                    "gpu-paper"])
def test_presets_resolve(preset, pair):
    """Every preset's trainer settings, with each method's and the heal stage's, load as a valid run config."""
    from tools.demo import make_student
    from tools.proof import experiments
    from okd_scale.configure import load_config

    spec = experiments.presets()[preset]
    paths = [f"model.teacher={pair / 'teacher'}", f"model.student={pair / 'student'}",
             f"data.train_file={pair / 'train.jsonl'}", f"data.eval_file={pair / 'eval.jsonl'}"]
    for method, variant in experiments.variants().items():
        cfg = load_config(ROOT / spec["config"], [*paths, *spec["train"], *variant["set"]])
        assert cfg.method == method.split("_")[0]
    if preset == "cpu-okd-search":  # OKD variants only, chosen on the validation rows alone, from cpu-proof's init
        assert spec["methods"] and all(experiments.variants()[m]["set"][0] == "method=okd" for m in spec["methods"])
        assert spec["shared_sets"] == [] and spec["init_from"] == "cpu-proof"
    if preset == "cpu-paper":  # fp32 on this machine, the rate chosen on validation: never set by the preset
        assert "train.bf16=false" in spec["train"] and "train.bf16=false" in spec["heal"]["set"]
        assert not any(x.startswith("train.learning_rate=") for x in spec["train"])
        for rate in spec["select_lr"]["grid"]:
            cfg = load_config(ROOT / spec["config"], [*paths, *spec["train"], *spec["select_lr"]["set"],
                                                      f"train.learning_rate={rate}"])
            assert cfg.train.learning_rate == rate and not cfg.train.bf16
        assert spec["baseline"] in spec["methods"] and set(spec["seeds_for"]) <= set(spec["methods"])
        assert all(experiments.variants()[m].get("teacher_from", m) in spec["methods"] for m in spec["methods"])
    if "heal" in spec:
        cfg = load_config(ROOT / spec["config"], [*paths, *make_student.HEAL_METHODS[spec["heal"]["method"]],
                                                  *spec["heal"]["set"]])
        assert spec["heal"]["steps"] % spec["heal"]["eval_every"] == 0


@pytest.mark.slow
def test_proof_sweep_heals_once_and_pools_seeds(tmp_path, pair):
    """cpu-proof at tiny size: the student is healed once (validation CE below the pruned one's), each method
    trains from it at two seeds (it is among the best 3), the table pools the seeds and gives validation scores, the
    training state is dropped once a cell is written, and a new machine (no healed student) re-heals only
    for the cells it still has to train."""
    data = tmp_path / "data"
    data.mkdir()
    for name, src in (("train", "train.jsonl"), ("eval", "eval.jsonl"), ("heal", "train.jsonl")):
        (data / f"{name}.jsonl").write_text((pair / src).read_text())
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "tools.proof.reproduce", "--preset", "cpu-proof",
           "--teacher", str(pair / "teacher"), "--data-dir", str(data), "--eval-sets", str(pair / "eval.jsonl"),
           "--prompt-format", "as-is", "--methods", "kd_fkl", "--train-seeds", "1,2", "--nproc", "1",
           "--steps", "3", "--heal-steps", "6", "--eval-examples", "4", "--out", str(out),
           "data.max_length=64", "train.learning_rate=5e-3", "train.bf16=false",
           f"deepspeed.teacher_overrides={TORCH_ADAM_JSON}", f"deepspeed.student_overrides={TORCH_ADAM_JSON}"]
    first = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    cells = sorted(p.stem for p in (out / "cells").glob("*.json"))
    assert cells == ["init", "kd_fkl-seed1", "kd_fkl-seed2", "teacher"]
    init = json.loads((out / "cells" / "init.json").read_text())
    heal = init["heal"]
    assert heal["validation_ce"][str(heal["best_step"])] < heal["pruned_validation_ce"]
    assert init["validation_ce"] == min(heal["validation_ce"].values())
    table = json.loads((out / "table.json").read_text())
    assert table["sets"] == ["eval"] and table["selection"] == "validation"
    rows = table["rows"]
    assert list(rows) == ["teacher", "init", "kd_fkl"] and rows["kd_fkl"]["seeds"] == [1, 2]
    seeds = rows["kd_fkl"]["per_seed_average"]
    assert rows["kd_fkl"]["average"] == pytest.approx(sum(seeds) / 2)
    assert rows["kd_fkl"]["average_std"] == pytest.approx(abs(seeds[0] - seeds[1]) / 2)
    for name, row in rows.items():
        assert row["validation_ce"] > 0 and 0 <= row["validation_rougeL"] <= 100
        assert (row["train_s"] is None) == (name in ("teacher", "init"))
    assert "best method:" in (out / "TABLE.md").read_text()
    assert not list((out / "runs").glob("*/checkpoints")) and (out / "runs" / "kd_fkl-seed1" / "student").is_dir()

    again = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0 and again.stdout.count("done before, skipped") == 4
    assert "healed student" not in again.stdout  # nothing left to train: no healing either

    shutil.rmtree(out / "student_init")  # a new machine: the committed cells, no weights
    (out / "cells" / "kd_fkl-seed2.json").unlink()
    third = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-3000:]
    assert "the committed init cell had" in third.stdout and third.stdout.count("done before, skipped") == 3
    assert (out / "cells" / "kd_fkl-seed2.json").is_file()


def test_table_pools_seeds_and_gives_the_verdict():
    """Hand-made cells: per-seed averages pooled (mean, population std), greedy and validation columns, and
    the verdict's spread against 3 x the largest seed std and the best student's share of the teacher."""
    from tools.proof import table

    def cell(name, method, seed, a, b, greedy=None):
        c = {"name": name, "eval": {"sets": {"x": {"rougeL": a, "std": 0.0, "n": 2},
                                              "y": {"rougeL": b, "std": 0.0, "n": 2},
                                              "validation": {"rougeL": a, "std": 0.0, "n": 1}}},
             "validation_ce": 2.0 + a / 100, "train_s": 10.0 if method else None}
        if method:
            c.update(method=method, seed=seed)
        if greedy is not None:
            c["greedy"] = {"sets": {"x": {"rougeL": greedy}, "y": {"rougeL": greedy}}}
        return c

    cells = {"teacher": cell("teacher", None, None, 20, 10, greedy=15),
             "kd_rkl-seed1": cell("kd_rkl-seed1", "kd_rkl", 1, 10, 6, greedy=8),
             "kd_rkl-seed2": cell("kd_rkl-seed2", "kd_rkl", 2, 12, 6, greedy=10),
             "sft-seed1": cell("sft-seed1", "sft", 1, 4, 2, greedy=3)}
    text, rows = table.table(cells, ["x", "y"], "validation")
    kd = rows["kd_rkl"]
    assert kd["per_seed_average"] == [8.0, 9.0] and kd["average"] == 8.5 and kd["average_std"] == 0.5
    assert kd["x"] == {"mean": 11.0, "std": 1.0, "n": 2} and kd["greedy_average"] == 9.0
    assert kd["validation_rougeL"] == 11.0 and kd["validation_ce"] == pytest.approx(2.11)
    assert "| kd_rkl | 11.00 ± 1.00 | 6.00 ± 0.00 | 8.50 ± 0.50 | 9.00 | 11.00 | 2.110 | 10 | - | 2 |" in text
    lines = table.verdict(rows)
    assert lines[0].startswith("- best method: kd_rkl (8.50); worst: sft (3.00); spread 5.50")
    assert "separate (spread > 3 x 0.50)" in lines[1] and "57% of the teacher's 15.00" in lines[2]


def test_later_seeds_for_the_best_by_validation():
    """cpu-proof's plan: every method at the first seed; the second seed, once those cells are all in, only
    for the 3 best by validation ROUGE-L (never by the evaluation sets); --reseed: these too, outside the ranking;
    --all-seeds: every method."""
    import argparse

    from tools.proof import experiments, reproduce
    preset = experiments.presets()["cpu-proof"]
    methods = ["sft", "kd_fkl", "kd_rkl", "taid", "okd"]
    args = argparse.Namespace(train_seeds=[42, 43], all_seeds=False, reseed=[], seeds_given=False)
    first = [(f"{m}-seed42", m, 42) for m in methods]
    assert reproduce.cell_plan(args, preset, methods, {}) == first
    score = {"sft": 1.0, "kd_fkl": 4.0, "kd_rkl": 3.0, "taid": 5.0, "okd": 2.0}
    test = {"sft": 9.0, "kd_fkl": 0.0, "kd_rkl": 0.0, "taid": 0.0, "okd": 9.0}  # must not matter
    cells = {f"{m}-seed42": {"eval": {"sets": {"validation": {"rougeL": score[m]}, "dolly": {"rougeL": test[m]}}}}
             for m in methods}
    partial = {k: v for k, v in cells.items() if not k.startswith("okd")}
    assert reproduce.cell_plan(args, preset, methods, partial) == first
    assert reproduce.cell_plan(args, preset, methods, cells) == first + [
        ("taid-seed43", "taid", 43), ("kd_fkl-seed43", "kd_fkl", 43), ("kd_rkl-seed43", "kd_rkl", 43)]
    args.reseed = ["okd"]  # outside the ranking: the 3 best of the others stay the same
    assert reproduce.cell_plan(args, preset, methods, cells) == first + [
        ("taid-seed43", "taid", 43), ("kd_fkl-seed43", "kd_fkl", 43), ("kd_rkl-seed43", "kd_rkl", 43),
        ("okd-seed43", "okd", 43)]
    args.reseed = ["taid"]  # ranked first: kd_fkl, kd_rkl and okd are the 3 best of the others
    assert reproduce.cell_plan(args, preset, methods, cells) == first + [
        ("kd_fkl-seed43", "kd_fkl", 43), ("kd_rkl-seed43", "kd_rkl", 43), ("okd-seed43", "okd", 43),
        ("taid-seed43", "taid", 43)]
    args.reseed, args.all_seeds = [], True
    assert reproduce.cell_plan(args, preset, methods, {}) == first + [(f"{m}-seed43", m, 43) for m in methods]


def test_paper_plan_every_seed_and_more_for_okd_and_kd():
    """cpu-paper: every method at both seeds, then the third seed for okd and kd_fkl; given seeds replace all that."""
    import argparse

    from tools.proof import experiments, reproduce
    preset = experiments.presets()["cpu-paper"]
    methods = preset["methods"]
    args = argparse.Namespace(train_seeds=preset["train_seeds"], all_seeds=False, reseed=[], seeds_given=False)
    plan = reproduce.cell_plan(args, preset, methods, {})
    assert plan == ([(f"{m}-seed42", m, 42) for m in methods] + [(f"{m}-seed43", m, 43) for m in methods]
                    + [("okd-seed44", "okd", 44), ("kd_fkl-seed44", "kd_fkl", 44)])
    assert [m for _, m, s in plan if s == 42].index("okd_a0") < [m for _, m, s in plan if s == 42].index("kd_fkl_ft")
    args = argparse.Namespace(train_seeds=[7], all_seeds=False, reseed=[], seeds_given=True)
    assert reproduce.cell_plan(args, preset, ["okd", "sft"], {}) == [("okd", "okd", 7), ("sft", "sft", 7)]


@pytest.mark.slow
def test_paper_sweep_lr_choice_control_pairs_and_analysis(tmp_path, pair):
    """cpu-paper at tiny size: the learning rate chosen on validation by short kd_fkl and sft runs; the control
    kd_fkl_ft learns from the teacher whose LoRA okd_a0 trained (merged, and not the original); per-prompt scores,
    answers, the teacher-forced analysis and the commit in every cell; paired differences to kd_fkl in the table; a
    rerun with --eval-set scores the finished cells' stored models on it and trains nothing."""
    import gzip

    from safetensors.torch import load_file

    import tiny

    data = tmp_path / "data"
    data.mkdir()
    for name, src in (("train", "train.jsonl"), ("eval", "eval.jsonl"), ("heal", "train.jsonl")):
        (data / f"{name}.jsonl").write_text((pair / src).read_text())
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "tools.proof.reproduce", "--preset", "cpu-paper", "--no-teacher-eval",
           "--teacher", str(pair / "teacher"), "--data-dir", str(data), "--eval-sets", str(pair / "eval.jsonl"),
           "--prompt-format", "as-is", "--methods", "kd_fkl,okd_a0,kd_fkl_ft", "--train-seeds", "1",
           "--lr-grid", "5e-3", "--nproc", "1", "--steps", "2", "--heal-steps", "2", "--eval-examples", "4",
           "--out", str(out), "data.max_length=64",
           f"deepspeed.teacher_overrides={TORCH_ADAM_JSON}", f"deepspeed.student_overrides={TORCH_ADAM_JSON}"]
    first = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    cells = sorted(p.name for p in (out / "cells").glob("*.json"))
    assert cells == ["init.json", "kd_fkl.json", "kd_fkl_ft.json", "lr-kd_fkl-0.005.json", "lr-sft-0.005.json",
                     "okd_a0.json"]
    table = json.loads((out / "table.json").read_text())
    assert table["learning_rate"]["chosen"] == 5e-3 and set(table["learning_rate"]["cells"]) == {
        "lr-kd_fkl-0.005", "lr-sft-0.005"}
    assert set(table["paired"]) == {"okd_a0", "kd_fkl_ft"} and set(table["paired"]["okd_a0"]) == {"eval", "average"}
    md = (out / "TABLE.md").read_text()
    assert "## Paired differences to kd_fkl" in md and "- okd_a0 - kd_fkl: " in md and "## Teacher-forced" in md
    assert "learning rate 0.005 (chosen on validation" in md and "Training seconds per cell: " in md
    control = json.loads((out / "cells" / "kd_fkl_ft.json").read_text())
    assert "okd_a0's online module merged" in control["teacher"]
    merged = out / "runs" / "okd_a0" / "teacher_merged"
    assert f"teacher: {merged}" in (out / "runs" / "kd_fkl_ft" / "run_config.yaml").read_text()
    original, tuned = load_file(pair / "teacher" / "model.safetensors"), load_file(merged / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert original[q].shape == tuned[q].shape and not (original[q] == tuned[q]).all()  # the LoRA moved it
    for name in ("kd_fkl", "okd_a0", "kd_fkl_ft", "init"):
        cell = json.loads((out / "cells" / f"{name}.json").read_text())
        s = cell["eval"]["sets"]["eval"]
        assert len(s["per_prompt"]) == 4 and sum(s["per_prompt"]) / 4 == pytest.approx(s["rougeL"], abs=1e-3)
        answers = json.loads(gzip.decompress((out / "cells" / f"{name}.answers.json.gz").read_bytes()))
        assert len(answers["eval"]["eval"]) == 4 and len(answers["eval"]["validation"]) == 4
        a = cell["analysis"]
        assert a["tokens"] > 0 and set(a["terciles"]) == {"confident", "middle", "uncertain"} and a["ce"] > 0
        assert cell["commit"]

    more = tiny.write_jsonl(tmp_path / "more.jsonl", tiny.make_rows(3, seed=9))
    again = subprocess.run(cmd + ["--eval-set", f"more={more}"], env=clean_env(), capture_output=True, text=True,
                           timeout=900, cwd=ROOT)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert again.stdout.count("done before, skipped") == 4 and "healed student" not in again.stdout
    for name in ("kd_fkl", "okd_a0", "kd_fkl_ft", "init"):
        cell = json.loads((out / "cells" / f"{name}.json").read_text())
        assert cell["eval"]["sets"]["more"]["n"] == 3 and len(cell["eval"]["sets"]["more"]["per_prompt"]) == 3
        answers = json.loads(gzip.decompress((out / "cells" / f"{name}.answers.json.gz").read_bytes()))
        assert len(answers["eval"]["more"]) == 3 and len(answers["eval"]["eval"]) == 4  # added, nothing lost
    assert json.loads((out / "table.json").read_text())["sets"] == ["eval", "more"]


def test_experiment_files_are_checked(tmp_path):
    """Presets and variants are YAML files: `extends` merges, and a bad file is named with its field."""
    from tools.proof.experiments import ExperimentError, load_presets, load_variants

    (tmp_path / "variants").mkdir()
    (tmp_path / "presets").mkdir()
    (tmp_path / "variants" / "a.yaml").write_text("about: a\nset: [method=okd]\n")
    (tmp_path / "variants" / "b.yaml").write_text("about: b\nset: [method=kd]\nteacher_from: a\n")
    base = ("about: base\nconfig: configs/demo.yaml\nnproc: 1\nprompt_format: chat\ntrain: [train.max_steps=1]\n"
            "eval: {seeds: [0]}\nshared_sets: []\ndemo_eval: false\ntrain_seeds: [1]\nmethods: [a, b]\n")
    (tmp_path / "presets" / "base.yaml").write_text(base)
    (tmp_path / "presets" / "more.yaml").write_text("about: more\nextends: base\nnproc: 4\nmethods: [a]\n")
    variants = load_variants(tmp_path)
    presets = load_presets(variants, tmp_path)
    assert variants["b"]["teacher_from"] == "a" and presets["more"]["nproc"] == 4
    assert presets["more"]["train"] == ["train.max_steps=1"] and presets["more"]["methods"] == ["a"]

    def refused(path, text, match):
        path.write_text(text)
        with pytest.raises(ExperimentError, match=match):
            load_presets(load_variants(tmp_path), tmp_path)
        path.unlink()

    presets_dir = tmp_path / "presets"
    refused(presets_dir / "x.yaml", base.replace("nproc", "nprocs"), r"x\.yaml: unknown key 'nprocs'")
    refused(presets_dir / "x.yaml", base.replace("[a, b]", "[a, c]"), r"x\.yaml: methods \['c'\] are not variants")
    refused(presets_dir / "x.yaml", base.replace("[a, b]", "[b, a]"), r"x\.yaml: methods: b learns from a's teacher")
    refused(presets_dir / "x.yaml", base.replace("nproc: 1\n", ""), r"x\.yaml: missing 'nproc'")
    refused(presets_dir / "x.yaml", base.replace("nproc: 1", "nproc: two"), r"x\.yaml: 'nproc' must be a int")
    refused(presets_dir / "x.yaml", "about: x\nextends: more\n", r"x\.yaml: extends 'more', which is not a preset")
    refused(presets_dir / "x.yaml", "- a\n", r"x\.yaml: expected a mapping")
    refused(tmp_path / "variants" / "c.yaml", "about: c\nset: [okd]\n", r"c\.yaml: 'set' entries must be")
    refused(tmp_path / "variants" / "c.yaml", "about: c\nset: [method=kd]\nteacher_from: z\n",
            r"c\.yaml: teacher_from 'z' is not a variant")


def test_every_preset_method_is_a_variant_file():
    """The repository's presets load, every method they name has its variants/<name>.yaml, and the earlier OKD
    variants (the benchmarks' rows) are those of family earlier-okd."""
    from tools.proof import experiments

    presets, variants = experiments.presets(), experiments.variants()
    assert set(presets) == {"cpu-small", "cpu-proof", "cpu-okd-search", "cpu-paper", "gpu-proof", "gpu-paper"}
    for name in {m for p in presets.values() for m in p["methods"]}:
        assert (experiments.EXPERIMENTS / "variants" / f"{name}.yaml").is_file()
    assert variants["okd"]["set"] == ["method=okd"] and "okd" not in experiments.earlier_okd()
    assert set(presets["cpu-okd-search"]["methods"]) < set(experiments.earlier_okd())
    assert experiments.teacher_sources() == {"okd_a0"}
