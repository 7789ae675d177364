"""Data-parallel training at four CPU processes (gloo) on a tiny Llama: DDP (every process holds the whole
model) and FSDP (`trainer.strategy=fsdp`: the frozen weights sharded four ways, per decoder block), each against
the same run in one process. Four processes each see a quarter of every global batch; the adapters they save
must be the one-process adapter up to float summation order (1e-5).

Slow: each case starts four processes (torchrun) besides the in-process reference.
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

PROCESSES = 4
FAST = ["model=tiny_llama", "data=bbc_lm", "trainer=debug", "data.max_length=16", "trainer.max_steps=4",
        "trainer.eval_every=100", "trainer.checkpoint_every=100", "trainer.batch_size=8", "trainer.max_examples=8",
        "trainer.dropout=0"]  # no dropout: a sharded batch then computes exactly what the whole one does
TOLERANCE = 1e-5  # float summation order differs between a whole batch and four quarters


def torchrun(args: list[str], run_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "VBSHARE_DEBUG")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}",
               "-m", "vbshare.train", *args, f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def one_process(args: list[str], run_dir: Path) -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        run_training(compose("train", overrides=args), run_dir, args)


@pytest.mark.slow
@pytest.mark.parametrize("strategy, adapter", [("ddp", ["+adapter=lora"]),
                                               ("fsdp", ["+adapter=vblora", "adapter.vector_length=32"])],
                         ids=["ddp-lora", "fsdp-vblora"])
def test_four_processes_train_what_one_does(strategy, adapter, tmp_path):
    """VB-LoRA under FSDP: its bank, shared by every layer, stays whole while the blocks' frozen weights shard
    (vector length 32: the key / value projections are 2 KV heads × 16 wide)."""
    args = [*adapter, *FAST]
    torchrun([*args, f"trainer.strategy={strategy}"], tmp_path / strategy)
    one_process(args, tmp_path / "single")
    summary = json.loads((tmp_path / strategy / "summary.json").read_text())
    assert summary["distributed"] == {"world_size": PROCESSES, "backend": "gloo", "strategy": strategy,
                                      "max_param_diff_across_ranks": 0.0}
    if strategy == "fsdp":
        assert "FSDP: frozen weights sharded" in (tmp_path / strategy / "train.log").read_text()
    assert [loss for _, loss in losses(tmp_path / strategy)] == pytest.approx(
        [loss for _, loss in losses(tmp_path / "single")], abs=TOLERANCE)
    assert_same_adapter(tmp_path / strategy, tmp_path / "single", TOLERANCE)
