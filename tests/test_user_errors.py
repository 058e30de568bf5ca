"""Bad input a new user gives, each a named error with exit 2 and nothing written: an output directory that is a
file, read-only, or in use by another run (one run per output_dir); `latest` naming a path; a model directory whose
config.json is not JSON, that holds only pickled weights, or whose code would have to run; out-of-range evaluate
flags; a config that is not UTF-8; a chat row with a role the template does not take."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tiny
from tiny import ROOT, write_config


# --------------------------------------------------------------------------- the output directory and its lock

def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, caplog):
    from okd_scale import rundir

    out = tmp_path / "run"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = rundir.Holder(socket.gethostname(), sleeper.pid, rundir._pid_started(sleeper.pid), "then")
        out.mkdir()
        (out / rundir.LOCK).write_text(json.dumps(vars(holder)))
        with pytest.raises(rundir.RunDirError, match=rf"in use by another run \(host .*, pid {sleeper.pid}, started "
                                                     r"then; lock .*\.okd_scale\.lock\)"):
            rundir.acquire(out)
        # the same PID started at another time is another process: its lock is stale
        (out / rundir.LOCK).write_text(json.dumps({**vars(holder), "pid_started": holder.pid_started - 100}))
        lock = rundir.acquire(out)
        assert json.loads((out / rundir.LOCK).read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        sleeper.kill()
        sleeper.wait()
    (out / rundir.LOCK).write_text(json.dumps(vars(holder)))  # its process is gone now
    with caplog.at_level("WARNING", logger="okd_scale"):
        lock = rundir.acquire(out)
    assert "took over the lock of a run that is gone" in caplog.text
    assert rundir.acquire(out).holder == lock.holder  # this process's own lock (a run before in it) is its own
    lock.release()
    assert not (out / rundir.LOCK).exists() and list(out.iterdir()) == []
    (out / rundir.LOCK).write_text(json.dumps({**vars(holder), "host": "another-host"}))  # never broken
    with pytest.raises(rundir.RunDirError, match="host another-host"):
        rundir.acquire(out)


def test_output_dir_a_file_or_read_only(tmp_path):
    from okd_scale import rundir

    (tmp_path / "file").write_text("x")
    with pytest.raises(rundir.RunDirError, match='"output_dir": .*file is a file, not a directory'):
        rundir.acquire(tmp_path / "file")
    with pytest.raises(rundir.RunDirError, match='"output_dir": cannot write in .*file/run'):
        rundir.acquire(tmp_path / "file" / "run")
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        with pytest.raises(rundir.RunDirError, match="cannot write in .*ro: Read-only file system"):
            rundir.acquire(ro)
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def _train(cfg: Path, *overrides: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "okd_scale" / "train.py"), "--config", str(cfg), *overrides],
                            env=tiny.subprocess_env(1, **env), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_runs_in_one_output_dir(tmp_path, pair):
    """A second run in a live run's output_dir exits 2 naming it and writes nothing; once that run is killed, the
    next run takes its lock over (a warning) and resumes it exactly; an output_dir that is a file exits 2."""
    cfg = write_config(tmp_path / "cfg.yaml", pair, "kd", data={"eval_file": None},
                       train={"max_steps": 8, "save_every": 1})
    out = tmp_path / "out-kd"
    first = _train(cfg, OKD_SCALE_FAULT="hang_rank@3")  # holds the directory, stuck in step 3
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "global_step2").is_dir() and time.monotonic() < deadline:
        assert first.poll() is None, first.communicate()[1][-3000:]
        time.sleep(0.2)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    second = _train(cfg)
    _, err = second.communicate(timeout=300)
    assert second.returncode == 2, err[-2000:]
    assert f'"output_dir": {out} is in use by another run (host {socket.gethostname()}, pid {first.pid}' in err
    assert "Traceback" not in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing written
    first.kill()
    first.communicate()
    third = _train(cfg)
    _, err = third.communicate(timeout=600)
    assert third.returncode == 0, err[-3000:]
    assert f"took over the lock of a run that is gone (host {socket.gethostname()}, pid {first.pid}" in err
    steps = [json.loads(line)["step"] for line in (out / "log_history.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    assert not (out / ".okd_scale.lock").exists()

    (tmp_path / "afile").write_text("keep me")
    fourth = _train(cfg, f"output_dir={tmp_path / 'afile'}")
    _, err = fourth.communicate(timeout=300)
    assert fourth.returncode == 2 and "afile is a file, not a directory" in err and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "keep me"


def test_latest_names_only_a_tag_of_its_own_directory(tmp_path):
    from okd_scale.checkpoint import CheckpointError, find_checkpoint

    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "global_step3").mkdir(parents=True)
    (ckpt / "latest").write_text("global_step3\n")
    assert find_checkpoint(tmp_path / "run", "auto") == ckpt / "global_step3"
    other = tmp_path / "other" / "checkpoints" / "global_step9"
    other.mkdir(parents=True)
    for name in (str(other), "../../other/checkpoints/global_step9", "global_step3/../../x", "", "step3"):
        (ckpt / "latest").write_text(name)
        with pytest.raises(CheckpointError, match=r"latest names .*, not a tag of this checkpoint directory"):
            find_checkpoint(tmp_path / "run", "auto")


# --------------------------------------------------------------------------- models

def test_model_directories_that_cannot_be_used(tmp_path, pair, tokenizer):
    import torch

    from okd_scale import evaluate as ev
    from okd_scale.models import ModelError, load_causal_lm, load_tokenizer

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (pair / "student").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=f"cannot load a causal LM from {broken}"):
        load_causal_lm(str(broken))
    with pytest.raises(ModelError, match=f"cannot load a tokenizer from {broken}"):
        load_tokenizer(str(broken))
    with pytest.raises(ev.EvaluateError, match=f"cannot load a causal LM from {broken}"):
        ev.load_model(broken, device="cpu")

    pickled = tmp_path / "pickled"  # only a pytorch_model.bin: refused unless asked, then read weights-only
    model = tiny.make_llama(pickled, tokenizer, num_layers=1, hidden=32, seed=3)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="it has PyTorch .bin weights: convert them to safetensors, or set "
                                         "model.use_safetensors=false"):
        load_causal_lm(str(pickled))
    loaded = load_causal_lm(str(pickled), use_safetensors=False)
    ids = torch.tensor([[1, 5, 9]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ev.EvaluateError, match="--no-use-safetensors"):
        ev.load_model(pickled, device="cpu")


def test_evaluate_refuses_custom_code_and_bad_flags(tmp_path, pair, capsys):
    from okd_scale import evaluate as ev

    custom = tmp_path / "custom"
    custom.mkdir()
    for f in (pair / "student").iterdir():
        (custom / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "code_ran"
    (custom / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = json.loads((custom / "config.json").read_text())
    cfg["model_type"] = "evil"  # a type only its own code knows
    cfg["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (custom / "config.json").write_text(json.dumps(cfg))
    data = tiny.write_jsonl(tmp_path / "e.jsonl", tiny.make_rows(2))
    assert ev.main(["--model", str(custom), "--data", str(data), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"evaluate: error: cannot load a causal LM from {custom}" in err and "Traceback" not in err
    assert not marker.exists()
    for flags, words in ((["--max-examples", "-3"], "--max-examples: expected a positive integer, got '-3'"),
                         (["--max-new-tokens", "0"], "--max-new-tokens: expected a positive integer, got '0'"),
                         (["--top-p", "1.5"], "--top-p: expected a number in (0, 1], got '1.5'")):
        with pytest.raises(SystemExit) as e:
            ev.main(["--model", str(pair / "student"), "--data", str(data), *flags])
        assert e.value.code == 2 and words in capsys.readouterr().err


# --------------------------------------------------------------------------- configs and data

def test_a_config_that_is_not_utf8(tmp_path):
    from okd_scale.config import ConfigError
    from okd_scale.configure import load_config

    bad = tmp_path / "run.yaml"
    bad.write_bytes("method: kd\noutput_dir: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"{bad}: not a UTF-8 text file \(byte 26"):
        load_config(bad, [])


def test_a_chat_row_with_an_unknown_role(tmp_path, tokenizer):
    from okd_scale.data import DataError, load_dataset

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
            {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    path = tiny.write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError, match=r'chat.jsonl line 2: "messages"\[0\] has role "wizard"; expected one of '
                                        r"system, user, assistant"):
        load_dataset(path, tokenizer, 64)
    examples, stats = load_dataset(path, tokenizer, 64, on_error="skip")
    assert len(examples) == 1 and stats.num_skipped == 1
