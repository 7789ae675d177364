"""Ctrl-C / SIGTERM during a run: a checkpoint of the current step, one line saying how to continue, the
shell's exit status, and a resumption that makes the interrupted run equal to an uninterrupted one.

The reference is always a separate, uninterrupted run of the same config (dropout off, one thread), never the
interrupted run's own records.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


from vbshare.train import run_training
from vbshare.train import loop as train_loop
from vbshare.train.checkpoints import read_trainer_state
from vbshare.train.interrupt import TrainingInterrupted
from helpers import compose_config, read_metrics

COMMON = ["+adapter=lora", "model=tiny_bert", "trainer=debug", "data.max_length=32", "trainer.dropout=0",
          "trainer.checkpoint_every=null", "trainer.eval_every=1000"]
SPAWN_TIMEOUT_S = 120
DATA_PARALLEL_TOLERANCE = 1e-4  # 2 processes vs 1 over 200 steps (tests/test_ddp.py: 1e-5 over 6 steps)


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "split" not in r]


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(run_a: Path, run_b: Path) -> None:
    a, b = adapter_tensors(run_a), adapter_tensors(run_b)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_sigint_in_process_checkpoints_and_resumes(tmp_path, monkeypatch):
    """A real SIGINT delivered while step 3 is logged: the run stops after step 3 with exit code 130 and a
    checkpoint of step 3; resuming gives the uninterrupted run's losses and adapter."""
    overrides = [*COMMON, "trainer.max_steps=8"]
    before = signal.getsignal(signal.SIGINT)  # default, or SIG_IGN under a background shell
    reference = run_training(compose_config(overrides), tmp_path / "reference")
    logged = train_loop.write_metrics

    def write_and_interrupt(run, record):
        logged(run, record)
        if record["step"] == 3 and "split" not in record:
            os.kill(os.getpid(), signal.SIGINT)  # handled in this (main) thread before the step ends

    monkeypatch.setattr(train_loop, "write_metrics", write_and_interrupt)
    with pytest.raises(TrainingInterrupted) as stopped:
        run_training(compose_config(overrides), tmp_path / "cut")
    monkeypatch.setattr(train_loop, "write_metrics", logged)
    assert stopped.value.step == 3 and stopped.value.exit_code == 130
    assert read_trainer_state(tmp_path / "cut")["step"] == 3
    assert signal.getsignal(signal.SIGINT) == before  # the run's own handler removed, the earlier one restored

    resumed = run_training(compose_config([*overrides, f"trainer.resume={tmp_path / 'cut'}"]), tmp_path / "unused")
    assert not (tmp_path / "unused").exists()
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "reference")
    assert resumed["final"] == reference["final"]
    assert_same_adapter(tmp_path / "cut", tmp_path / "reference")


def spawn(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "VBSHARE_DEBUG")}
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(metrics: Path, steps: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and sum(1 for line in metrics.read_text().splitlines() if '"split"' not in line) >= steps:
            return
        time.sleep(0.02)
    raise AssertionError(f"no progress in {metrics}: {process.communicate()}")


@pytest.mark.slow
def test_sigterm_subprocess_resumes_into_one_record(tmp_path):
    """SIGTERM to `python -m vbshare.train` once metrics.jsonl shows progress: exit 143, no traceback, one line
    with the command that continues; running that command finishes the run in the same folder, with one
    train.log and one metrics.jsonl, wall time summed, and the adapter of an uninterrupted run."""
    steps = 300  # ~4 s of tiny-BERT steps: the signal lands well before the end
    overrides = [*COMMON, f"trainer.max_steps={steps}", "trainer.log_every=1"]
    run_dir = tmp_path / "run"
    process = spawn([sys.executable, "-m", "vbshare.train", *overrides, f"hydra.run.dir={run_dir}"], tmp_path)
    wait_for_steps(run_dir / "metrics.jsonl", 2, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=SPAWN_TIMEOUT_S)
    assert process.returncode == 143, err[-2000:]
    assert "Traceback" not in out + err
    told = [line for line in (out + err).splitlines() if "interrupted at step" in line]
    assert len(told) == 1, out + err
    stopped_at = int(told[0].split("interrupted at step ")[1].split(";")[0])
    assert 2 <= stopped_at < steps
    assert read_trainer_state(run_dir)["step"] == stopped_at
    first_wall = read_trainer_state(run_dir)["wall_seconds"]

    command = shlex.split(told[0].split("continue with: ")[1])
    assert command[:3] == ["python", "-m", "vbshare.train"] and command[-1] == f"trainer.resume={run_dir}"
    started = time.perf_counter()
    resume = spawn([sys.executable, *command[1:]], tmp_path)
    out, err = resume.communicate(timeout=SPAWN_TIMEOUT_S)
    second_wall = time.perf_counter() - started
    assert resume.returncode == 0, err[-2000:]
    assert not (tmp_path / "outputs").exists()  # the resumption wrote nowhere but the run's folder

    losses = train_losses(run_dir)
    assert [step for step, _ in losses] == list(range(1, steps + 1))  # every step once, none redone
    log_text = (run_dir / "train.log").read_text()
    assert log_text.count("interrupted at step") == 1 and log_text.count("done in") == 1
    assert log_text.index("interrupted at step") < log_text.index(f"continuing at step {stopped_at}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert first_wall < summary["wall_time_s"] < first_wall + second_wall

    reference = run_training(compose_config(overrides), tmp_path / "reference")
    assert losses == train_losses(tmp_path / "reference")
    assert summary["final"] == reference["final"]
    assert_same_adapter(run_dir, tmp_path / "reference")


def worker_with_rank(parent: int, rank: int) -> int:
    """The pid of the torchrun worker of `parent` whose environment says RANK=<rank>."""
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ:
                return int(child)
        time.sleep(0.05)
    raise AssertionError("no torchrun worker found")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
def test_sigterm_to_one_process_stops_all_at_one_step(tmp_path):
    """Data parallel (2 CPU processes): SIGTERM to rank 1 alone; both stop at the same step (rank 0 writes the
    checkpoint of that step and prints the resume line), and the resumed run ends with the adapter of an
    uninterrupted one-process run."""
    steps = 200
    overrides = [*COMMON, f"trainer.max_steps={steps}", "trainer.log_every=1", "trainer.max_examples=24"]
    run_dir = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env_overrides = [*overrides, "trainer.num_threads=1"]  # two processes on a small machine
    process = spawn([*torchrun, "-m", "vbshare.train", *env_overrides, f"hydra.run.dir={run_dir}"], tmp_path)
    rank1 = worker_with_rank(process.pid, 1)
    wait_for_steps(run_dir / "metrics.jsonl", 2, process)
    os.kill(rank1, signal.SIGTERM)
    out, err = process.communicate(timeout=SPAWN_TIMEOUT_S)
    assert process.returncode != 0
    told = [line for line in (out + err).splitlines() if "interrupted at step" in line]
    assert len(told) == 1, out + err[-3000:]
    stopped_at = int(told[0].split("interrupted at step ")[1].split(";")[0])
    assert 2 <= stopped_at < steps and read_trainer_state(run_dir)["step"] == stopped_at
    assert "torchrun --nproc_per_node=2 -m vbshare.train" in told[0]

    resume = spawn([*torchrun, "-m", "vbshare.train", *env_overrides, f"trainer.resume={run_dir}"], tmp_path)
    out, err = resume.communicate(timeout=SPAWN_TIMEOUT_S)
    assert resume.returncode == 0, err[-3000:]
    assert [step for step, _ in train_losses(run_dir)] == list(range(1, steps + 1))
    run_training(compose_config(overrides), tmp_path / "reference")
    a, b = adapter_tensors(run_dir), adapter_tensors(tmp_path / "reference")
    assert a.keys() == b.keys()
    for key in a:  # two halves of a batch sum in another order than the whole batch, over 200 steps
        torch.testing.assert_close(a[key], b[key], atol=DATA_PARALLEL_TOLERANCE, rtol=0)
