"""Data-parallel training on CPU (gloo): 2 processes, each on half of every global batch, against the same
run in one process.

Launched both ways the README shows: `accelerate launch --multi_gpu --num_processes 2 -m vbshare.train
trainer.device=cpu ...` (Accelerate's torchrun-based launcher; `--cpu --num_processes 2` would start one
process) and `torchrun --nproc_per_node 2 -m vbshare.train ...`. The one-process reference runs in-process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from vbshare.train import CONFIG_DIR, run_training

from run_checks import assert_same_adapter, losses

FAST = ["model=tiny_bert", "trainer=debug", "data.max_length=32", "trainer.max_steps=6", "trainer.eval_every=3",
        "trainer.checkpoint_every=3", "trainer.batch_size=4", "trainer.max_examples=24",
        "trainer.dropout=0"]  # no dropout: a sharded batch then computes exactly what the whole one does
# Merging from step 1 (ASLoRA), thresholding a good share of the gates (SoRA): their decisions must agree on
# both processes.
ACTIVE = {"aslora": ["adapter.merge_start=1", "adapter.merge_every=2"], "sora": ["adapter.lam=50"], "vblora": []}
TOLERANCE = 1e-5  # float summation order differs between a whole batch and two halves


def launch(launcher: str, args: list[str], run_dir: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "VBSHARE_DEBUG")}
    env["OMP_NUM_THREADS"] = "1"
    starter = {"accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                              "--num_processes=2", "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no"],
               "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]}
    command = [*starter[launcher], "-m", "vbshare.train", *args, f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def one_process(args: list[str], run_dir: Path) -> dict:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return run_training(compose("train", overrides=args), run_dir, args)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("method, launcher", [("aslora", "accelerate"), ("sora", "torchrun")])
def test_two_processes_train_what_one_does(method, launcher, tmp_path):
    """Also: a 2-process run stopped at step 3 and resumed (ASLoRA: ties before and after the stop) ends
    exactly as the uninterrupted 2-process run."""
    args = [f"+adapter={method}", *FAST, *ACTIVE[method]]
    launch(launcher, args, tmp_path / "ddp")
    one = one_process(args, tmp_path / "single")
    two = summary(tmp_path / "ddp")
    # both processes end bit-identical (checked across processes before rank 0 saves)
    assert two["distributed"] == {"world_size": 2, "backend": "gloo", "strategy": "ddp",
                                  "max_param_diff_across_ranks": 0.0}
    assert "distributed" not in one
    # the same global batch split over two processes: the same training up to float summation order
    assert [loss for _, loss in losses(tmp_path / "ddp")] == pytest.approx(
        [loss for _, loss in losses(tmp_path / "single")], abs=TOLERANCE)
    assert_same_adapter(tmp_path / "ddp", tmp_path / "single", TOLERANCE)
    assert two["sharing"] == one["sharing"]  # ASLoRA's merges / SoRA's retained ranks agree
    if method == "aslora":
        assert two["sharing"]["merges"] > 0
        # resumed under two processes: the uninterrupted run's losses and adapter, exactly
        launch(launcher, [*args, "trainer.stop_at_step=3"], tmp_path / "cut")
        launch(launcher, [*args, f"trainer.resume={tmp_path / 'cut'}"], tmp_path / "resumed")
        assert losses(tmp_path / "cut") == losses(tmp_path / "ddp")
        assert_same_adapter(tmp_path / "cut", tmp_path / "ddp", atol=0.0)
    # rank 0 alone writes: one metrics line per logged step, not two
    assert [s for s, _ in losses(tmp_path / "ddp")] == list(range(1, 7))


@pytest.mark.slow
def test_fsdp_with_accumulation_trains_what_one_process_does(tmp_path):
    """FSDP shards the frozen weights; VB-LoRA's bank (shared by every layer) and the logits stay whole. Two
    processes × two micro-batches train the adapter of one process with the whole batch."""
    args = ["+adapter=vblora", *FAST]
    launch("accelerate", [*args, "trainer.strategy=fsdp", "trainer.grad_accum_steps=2"], tmp_path / "fsdp")
    one_process(args, tmp_path / "single")
    assert summary(tmp_path / "fsdp")["distributed"]["strategy"] == "fsdp"
    assert "FSDP: frozen weights sharded" in (tmp_path / "fsdp" / "train.log").read_text()
    assert_same_adapter(tmp_path / "fsdp", tmp_path / "single", TOLERANCE)


@pytest.mark.slow
def test_batch_must_split_evenly(tmp_path):
    done = launch("torchrun", ["+adapter=lora", *FAST, "trainer.batch_size=3"], tmp_path / "r", check=False)
    assert done.returncode != 0
    assert "divisible by the number of processes" in done.stderr
