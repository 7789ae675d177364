"""One writer per folder and one run per folder: a second `vbshare.train` / `vbshare.compare` into a folder that
another process writes is refused in one line naming that process, a lock left by a killed process is taken
over, a fresh run refuses a folder holding another run, a torn metrics.jsonl tail is dropped on resume, and a
comparison retrains a run that did not finish from an empty folder.

The first writer of each concurrency test is stopped (SIGSTOP) once it holds its folder, so the second one
certainly runs while the first is alive; it then finishes, and its folder is checked against its own settings.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import initialize_config_dir

from vbshare import locks
from vbshare.compare import Runner, start_afresh
from vbshare.errors import VBShareError
from vbshare.records import read_jsonl
from vbshare.train import CONFIG_DIR, app, run_training
from helpers import compose_config

TINY = ["model=tiny_bert", "trainer=debug", "data.max_length=32"]
SPAWN_TIMEOUT_S = 180
ENV = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "VBSHARE_DEBUG")}


def spawn(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_until_held(folder: Path, process: subprocess.Popen) -> None:
    """Until `process` has recorded itself as the holder of `folder`."""
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while time.monotonic() < deadline:
        owner = folder / locks.OWNER_FILE
        if owner.is_file() and json.loads(owner.read_text())["pid"] == process.pid:
            return
        if process.poll() is not None:
            raise AssertionError(f"exited {process.returncode} before holding {folder}: {process.communicate()}")
        time.sleep(0.02)
    raise AssertionError(f"{folder} never held")


def refused_while_stopped(first: subprocess.Popen, folder: Path, second: list[str], cwd: Path) -> str:
    """Stop `first` once it holds `folder`, run `second` to its end, let `first` go on; the second's one line."""
    wait_until_held(folder, first)
    first.send_signal(signal.SIGSTOP)
    try:
        done = subprocess.run([sys.executable, *second], cwd=cwd, env=ENV, capture_output=True, text=True,
                              timeout=SPAWN_TIMEOUT_S)
    finally:
        first.send_signal(signal.SIGCONT)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "split" not in r]


@pytest.mark.slow
def test_second_train_into_a_held_folder_is_refused_and_the_first_is_intact(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    train = ["-m", "vbshare.train", "+adapter=lora", *TINY, f"hydra.run.dir={run_dir}"]
    first = spawn([*train, "seed=3"], tmp_path)
    line = refused_while_stopped(first, run_dir, [*train, "seed=4"], tmp_path)
    assert f"{run_dir} is being written by pid {first.pid} " in line and "hydra.run.dir=" in line
    out, err = first.communicate(timeout=SPAWN_TIMEOUT_S)
    assert first.returncode == 0, err[-3000:]

    # the first's folder holds the first run alone: its settings, its steps once each, its Hydra record and log
    assert "seed: 3" in (run_dir / "config.yaml").read_text()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2, 3, 4]
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "seed=3" in overrides and "seed=4" not in overrides
    assert (run_dir / "train.log").read_text().count("done in") == 1
    assert not (run_dir / locks.OWNER_FILE).exists()  # let go at the end

    # a fresh run into the finished folder, from the command line: refused before Hydra writes anything
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    monkeypatch.setattr(sys, "argv", ["vbshare.train", *train[2:], "seed=5"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    with pytest.raises(SystemExit) as stop:
        app.main()
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "already holds a run (config.yaml, metrics.jsonl, summary.json, checkpoint, " \
        "adapter)" in lines[0] and f"trainer.resume={run_dir}" in lines[0], lines
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_second_compare_into_a_held_out_is_refused_and_the_first_is_intact(tmp_path):
    out = tmp_path / "cmp"
    comparison = ["-m", "vbshare.compare", *TINY, "compare.methods=[lora]", "compare.trials=1",
                  "compare.seeds=[0]", "compare.isolate=false", f"compare.out={out}"]
    first = spawn(comparison, tmp_path)
    line = refused_while_stopped(first, out, [*comparison, "compare.sampler_seed=7"], tmp_path)
    assert f"{out} is being written by pid {first.pid} " in line and "use another compare.out" in line
    _, err = first.communicate(timeout=SPAWN_TIMEOUT_S)
    assert first.returncode == 0, err[-3000:]

    assert "compare.sampler_seed=7" not in (out / ".hydra" / "overrides.yaml").read_text()
    assert (out / "compare.log").read_text().count("runs trained") == 1
    runs = [out / "stage1" / "lora" / "trial_000", out / "stage2" / "lora" / "trial_000" / "seed_0"]
    for run_dir in runs:
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4
        assert [r["step"] for r in train_rows(run_dir)] == [1, 2, 3, 4]
    assert (out / "report" / "report.csv").is_file()
    assert not any(p.name == locks.OWNER_FILE for p in out.rglob("*"))


@pytest.mark.slow
def test_a_killed_holders_lock_is_taken_over(tmp_path):
    """A process killed with SIGKILL while holding a folder: while it lives, the folder is refused (also to a
    comparison that would empty it); once it is dead, the next writer takes the folder over, although the dead
    process's owner file is still there."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    holder = spawn(["-c", "import sys, time; from vbshare import locks; locks.acquire(sys.argv[1], 'x'); "
                          "print('held', flush=True); time.sleep(600)", str(folder)], tmp_path)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(locks.FolderBusy, match=rf"{folder} is being written by pid {holder.pid} on "):
            locks.acquire(folder, "choose another folder")
        with pytest.raises(locks.FolderBusy, match=rf"pid {holder.pid} .*end that training"):
            start_afresh(folder)  # a training left running by a killed comparison: its files stay
        assert (folder / "metrics.jsonl").is_file()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=SPAWN_TIMEOUT_S)
    assert json.loads((folder / locks.OWNER_FILE).read_text())["pid"] == holder.pid  # left behind by kill -9

    held = locks.acquire(folder, "choose another folder")
    assert json.loads((folder / locks.OWNER_FILE).read_text())["pid"] == os.getpid()
    assert locks.acquire(folder, "choose another folder") == held  # this process again: counted, not refused
    locks.release(held)
    assert (folder / locks.OWNER_FILE).is_file()
    locks.release(held)
    assert not (folder / locks.OWNER_FILE).exists()


def test_torn_metrics_tail_resumes_with_the_right_rows_and_a_finished_folder_refuses_a_fresh_run(tmp_path, caplog):
    """A run killed while appending to metrics.jsonl past its checkpoint: the rows after the checkpointed step
    and the torn line go, one warning says so, and the resumed run logs the losses of an uninterrupted one."""
    common = ["+adapter=lora", *TINY, "trainer.max_steps=6", "trainer.checkpoint_every=null", "trainer.dropout=0"]
    reference = run_training(compose_config(common), tmp_path / "reference")
    run_dir = tmp_path / "run"
    assert run_training(compose_config([*common, "trainer.stop_at_step=3"]), run_dir) is None
    with (run_dir / "metrics.jsonl").open("a") as handle:  # what the killed run wrote after step 3's checkpoint
        handle.write('{"step": 4, "loss": 99.0}\n{"step": 5, "lo')
    with caplog.at_level(logging.WARNING, logger="vbshare"):
        resumed = run_training(compose_config([*common, f"trainer.resume={run_dir}"]), run_dir)
    torn = [r for r in caplog.records if "dropped its last line" in r.getMessage()]
    assert len(torn) == 1 and str(run_dir / "metrics.jsonl") in torn[0].getMessage()

    def losses(folder: Path) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in train_rows(folder)]

    assert [step for step, _ in losses(run_dir)] == list(range(1, 7))
    assert losses(run_dir) == losses(tmp_path / "reference")
    assert resumed["final"] == reference["final"]

    before = (run_dir / "summary.json").read_bytes()
    with pytest.raises(VBShareError, match=rf"{run_dir} already holds a run \(config.yaml, .*trainer.resume={run_dir}"):
        run_training(compose_config(common), run_dir)
    assert (run_dir / "summary.json").read_bytes() == before


def test_read_jsonl_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"step": 1}\n\n{"step": 2}')  # a whole last row without its newline is kept
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_bytes(b'{"step": 1}\n{"step": 2, "lo')
    assert read_jsonl(path) == [{"step": 1}]
    path.write_bytes(b'{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')  # torn in the middle: damaged
    with pytest.raises(VBShareError, match=rf"{path} line 2 is not JSON"):
        read_jsonl(path)
    path.write_bytes(b'{"step": 1}\n[2]\n')
    with pytest.raises(VBShareError, match=rf"{path} line 2 is not a JSON object"):
        read_jsonl(path)


def test_compare_retrains_a_run_that_did_not_finish_from_an_empty_folder(tmp_path):
    overrides = ["+adapter=lora", *TINY]
    run_dir = tmp_path / "stage1" / "lora" / "trial_000"
    run_dir.mkdir(parents=True)
    (run_dir / "request.json").write_text(json.dumps({"overrides": overrides}))
    # the dead attempt: rows of 3 steps (one torn), a config, a checkpoint folder, a failure note
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n{"step": 3, "lo')
    (run_dir / "config.yaml").write_text("seed: 99\n")
    (run_dir / "checkpoint").mkdir()
    (run_dir / "checkpoint" / "trainer_state.pt").write_bytes(b"not a checkpoint")
    (run_dir / "failure.txt").write_text("killed\n")

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        summary = Runner(isolate=False).run(overrides, run_dir)
    assert summary["steps"] == 4
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] != 9.0 for r in rows)
    assert "seed: 0" in (run_dir / "config.yaml").read_text() and not (run_dir / "failure.txt").exists()
    assert json.loads((run_dir / "request.json").read_text())["overrides"] == overrides
