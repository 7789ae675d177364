"""The Hydra training app (vbshare/train): end-to-end runs, resume equality, bad input.

In-process runs use Hydra's compose API (fast); CLI behaviour (module entry, one-line errors) uses a
subprocess. Everything runs on `trainer=debug` (a few steps on a few examples).
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from safetensors.torch import load_file

from vbshare.analysis import demo
from vbshare.analysis.common import list_snapshots
from vbshare.analysis.vblora import selection_drift
from vbshare.errors import VBShareError
from vbshare.registry import METHODS
from vbshare.train import evaluation
from vbshare.train import loop as train_loop
from vbshare.train import outputs as train_outputs
from vbshare.train import setup as train_setup
from vbshare.train.batches import batch_indices
from vbshare.train.checkpoints import read_trainer_state
from vbshare.train.loop import lr_factor
from vbshare.train.settings import read_settings
from vbshare.train.setup import set_threads
from helpers import compose_config, read_jsonl, read_metrics, train

REPO = Path(__file__).resolve().parents[1]
FAST = ["trainer=debug", "data.max_length=32"]
# Per-method overrides that make the method's after-step machinery act within a debug run.
ACTIVE = {"aslora": ["adapter.merge_start=1", "adapter.merge_every=2"]}


def check_run_dir(run_dir: Path, method: str) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("method", "hyperparameters", "final", "best", "trainable_parameters", "stored_parameters",
                "adapter_bytes", "wall_time_s", "steps_per_s", "peak_memory_mb"):
        assert key in summary, key
    assert summary["method"] == method
    assert (run_dir / "config.yaml").is_file()
    assert any("loss" in r and "split" not in r for r in read_metrics(run_dir))
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "adapter" / "modules.safetensors").is_file()  # the classifier head rides along
    if method == "vblora":
        assert (run_dir / "adapter_topk" / "adapter_config.json").is_file()
    return summary


@pytest.mark.parametrize("model", ["tiny_bert", "minilm"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_adapter_end_to_end(method, model, tmp_path):
    summary = train([f"+adapter={method}", f"model={model}", *FAST], tmp_path)
    check_run_dir(tmp_path, method)
    assert summary["steps"] == 4
    rows = read_jsonl(tmp_path / "predictions.jsonl")  # the accuracy, counted by hand from the predictions
    assert summary["final"]["test"]["accuracy"] == sum(r["prediction"] == r["label"] for r in rows) / len(rows)
    assert summary["best"]["step"] in (2, 4)
    assert summary["trainable_parameters"] > 0 and summary["adapter_bytes"] > 0


def test_full_finetune_baseline(tmp_path):
    summary = train(["model=tiny_bert", *FAST], tmp_path)
    assert summary["method"] == "full_finetune"
    assert (tmp_path / "model" / "config.json").is_file()


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["review", "stars"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def small_csv(tmp_path: Path, rows: int = 40) -> Path:
    words = {"good": "a lovely great film", "bad": "a dull awful film"}
    data = [{"review": f"{words[s]} number {i}", "stars": s} for i in range(rows) for s in ("good", "bad")]
    return write_csv(tmp_path / "reviews.csv", data)


def test_files_csv(tmp_path):
    csv_path = small_csv(tmp_path)
    summary = train(["+adapter=lora", "model=tiny_bert", "data=files", f"data.path={csv_path}",
                     "data.text_column=review", "data.label_column=stars", *FAST], tmp_path / "run")
    check_run_dir(tmp_path / "run", "lora")
    assert summary["task"] == "reviews"


@pytest.mark.decoder
def test_decoder_smollm2_perplexity(tmp_path):
    summary = train(["+adapter=lora", "model=smollm2_135m", "data=bbc_lm", "trainer=debug", "data.max_length=32",
                     "trainer.max_examples=3", "trainer.max_steps=2", "trainer.batch_size=2",
                     "trainer.eval_every=2"], tmp_path)
    assert summary["metric"] == "perplexity"
    ppl = summary["final"]["validation"]["perplexity"]
    assert math.isfinite(ppl) and ppl > 1.0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    nats, tokens = sum(r["loss"] * r["tokens"] for r in rows), sum(r["tokens"] for r in rows)  # per-example rows
    assert math.exp(nats / tokens) == pytest.approx(summary["final"]["test"]["perplexity"], rel=1e-9)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_logs_identical_losses(method, tmp_path):
    """A run stopped at step 3 and resumed logs exactly the losses of an uninterrupted run."""
    common = [f"+adapter={method}", "model=tiny_bert", *FAST, *ACTIVE.get(method, []),
              "trainer.max_steps=6", "trainer.checkpoint_every=3", "trainer.eval_every=3"]
    full = train(common, tmp_path / "full")
    assert train([*common, "trainer.stop_at_step=3"], tmp_path / "cut") is None
    resumed = train([*common, f"trainer.resume={tmp_path / 'cut'}"], tmp_path / "elsewhere")

    def losses(run_dir: Path) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "split" not in r]

    assert losses(tmp_path / "full") == losses(tmp_path / "cut")
    assert [s for s, _ in losses(tmp_path / "cut")] == list(range(1, 7))
    assert full["final"] == resumed["final"]
    assert (tmp_path / "full" / "adapter" / "adapter_config.json").read_text() == \
        (tmp_path / "cut" / "adapter" / "adapter_config.json").read_text()  # incl. ASLoRA ties / SoRA state


def test_typo_rejected_by_struct_mode():
    with pytest.raises(ConfigCompositionException):
        compose_config(["trainer.max_step=3"])
    with pytest.raises(ConfigCompositionException):
        compose_config(["+adapter=vblora", "adapter.vector_lenght=64"])


def test_schedule_and_data_order():
    steps, warmup = 10, 0.2
    factors = [lr_factor(s, steps, warmup) for s in range(steps)]
    assert factors[0] == 0.5 and factors[1] == 1.0 and factors[-1] == pytest.approx(0.125)
    first_epoch = [batch_indices(10, 3, s, seed=0).tolist() for s in range(3)]
    assert len({i for b in first_epoch for i in b}) == 9  # one epoch: disjoint batches
    assert batch_indices(10, 3, 4, seed=0).tolist() == batch_indices(10, 3, 4, seed=0).tolist()


@pytest.mark.parametrize("n, batch_size", [(8, 16), (5, 8), (3, 16)])
def test_a_split_smaller_than_the_batch_repeats_each_example_evenly(n, batch_size):
    for step in range(3):
        batch = batch_indices(n, batch_size, step, seed=1).tolist()
        counts = [batch.count(i) for i in range(n)]
        assert len(batch) == batch_size and sum(counts) == batch_size
        assert min(counts) == batch_size // n and max(counts) == -(-batch_size // n)
    assert batch_indices(n, batch_size, 0, seed=1).tolist() != batch_indices(n, batch_size, 1, seed=1).tolist()


# -- command line ---------------------------------------------------------------------------------------------------
def cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "VBSHARE_DEBUG")}
    return subprocess.run([sys.executable, "-m", "vbshare.train", *args, f"hydra.run.dir={tmp_path / 'cli'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_module_entry(tmp_path):
    done = cli(["+adapter=lora", "model=tiny_bert", *FAST], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    check_run_dir(tmp_path / "cli", "lora")
    assert (tmp_path / "cli" / ".hydra" / "config.yaml").is_file()


BAD_INPUT = {
    "unknown_adapter": (["+adapter=nope"], "adapter"),
    "unknown_model": (["model=nope"], "model"),
    "unknown_data": (["data=nope"], "data"),
    "vector_length": (["+adapter=vblora", "model=tiny_bert", "adapter.vector_length=48"], "vector_length"),
    "missing_label_column": (["+adapter=lora", "model=tiny_bert", "data=files", "data.path={csv}",
                              "data.text_column=review", "data.label_column=nope"], "nope"),
    "empty_dataset": (["+adapter=lora", "model=tiny_bert", "data=files", "data.path={empty}"], "no rows"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_cli_bad_input_one_line_error(case, tmp_path):
    args, needle = BAD_INPUT[case]
    csv_path, empty = small_csv(tmp_path), write_csv(tmp_path / "empty.csv", [])
    done = cli([a.format(csv=csv_path, empty=empty) for a in args] + FAST, tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert needle in lines[0]


def test_wandb_offline_logger(tmp_path, monkeypatch):
    """logger=wandb runs offline by default: no account, a local run folder under the run directory."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    train(["+adapter=lora", "model=tiny_bert", "logger=wandb", *FAST], tmp_path / "run")
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert (tmp_path / "run" / "summary.json").is_file()


# -- threads, resume records, snapshots, the final evaluation, help ------------------------------------------------
def test_num_threads_auto_follows_affinity_not_load(monkeypatch):
    """auto = the cores this process may run on, whatever the load average says."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    try:
        assert set_threads("auto") == 3 and torch.get_num_threads() == 3
        assert set_threads(2) == 2 and torch.get_num_threads() == 2
        assert set_threads(None) == 2  # null: leave torch's setting
        with pytest.raises(VBShareError, match="trainer.num_threads must be a positive integer, auto or null"):
            read_settings(compose_config(["trainer.num_threads=0"]))  # checked with every setting, before setup
    finally:
        torch.set_num_threads(threads)


def test_stop_at_step_checkpoints_there_and_wall_time_sums(tmp_path):
    """stop_at_step=3 with no periodic checkpoints still checkpoints step 3, so the resumption redoes nothing;
    summary.json's wall time covers both segments."""
    common = ["+adapter=lora", "model=tiny_bert", *FAST, "trainer.max_steps=6", "trainer.checkpoint_every=null"]
    assert train([*common, "trainer.stop_at_step=3"], tmp_path) is None
    state = read_trainer_state(tmp_path)
    assert state["step"] == 3
    started = time.perf_counter()
    summary = train([*common, f"trainer.resume={tmp_path}"], tmp_path)
    second = time.perf_counter() - started
    assert [r["step"] for r in read_metrics(tmp_path) if "split" not in r] == list(range(1, 7))
    assert state["wall_seconds"] + 0.5 * second < summary["wall_time_s"] < state["wall_seconds"] + second


def test_snapshot_every_feeds_the_drift_analysis(tmp_path):
    """trainer.snapshot_every=2 over 4 steps: training-form adapters of steps 2 and 4 (the latter equal to the
    step-4 checkpoint's), which vbshare.analysis reads; demo.train_run uses the option."""
    run_dir = demo.train_run("vblora", tmp_path / "run", snapshot_every=2)
    snapshots = list_snapshots(run_dir)
    assert [step for step, _ in snapshots] == [2, 4]
    last = load_file(str(snapshots[-1][1] / "adapter_model.safetensors"))
    checkpoint = load_file(str(run_dir / "checkpoint" / "adapter" / "adapter_model.safetensors"))
    assert last.keys() == checkpoint.keys() and all(torch.equal(last[k], checkpoint[k]) for k in last)
    drift = selection_drift(snapshots)
    assert len(drift) > 0


def test_snapshot_every_refused_without_adapter(tmp_path):
    with pytest.raises(VBShareError, match="snapshot_every"):
        train(["+adapter=head_only", "model=tiny_bert", *FAST, "trainer.snapshot_every=2"], tmp_path)
    with pytest.raises(VBShareError, match="snapshot_every"):
        train(["+adapter=lora", "model=tiny_bert", *FAST, "trainer.snapshot_every=0"], tmp_path)


def test_final_validation_reuses_the_last_steps(tmp_path, monkeypatch):
    """The last step evaluated validation already: the final scores are those, not a second pass."""
    calls = []

    def counting(run, split):
        calls.append(split)
        return evaluation.evaluate(run, split)

    monkeypatch.setattr(train_outputs, "evaluate", counting)
    monkeypatch.setattr(train_loop, "evaluate", counting)
    summary = train(["+adapter=lora", "model=tiny_bert", *FAST], tmp_path)
    assert calls == ["validation", "validation"]  # steps 2 and 4 (trainer=debug); none at the end
    last = [r for r in read_metrics(tmp_path) if r.get("split") == "validation"][-1]
    assert summary["final"]["validation"] == {k: v for k, v in last.items() if k not in ("step", "split")}


def test_known_warning_filtered_others_kept(tmp_path, monkeypatch):
    """The deprecated-alias FutureWarning is silenced during a run; any other warning still shows."""
    original = train_setup.set_dropout

    def warn_then_set(model, p):
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed", FutureWarning)
        warnings.warn("a real problem", FutureWarning)
        original(model, p)

    monkeypatch.setattr(train_setup, "set_dropout", warn_then_set)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(["+adapter=lora", "model=tiny_bert", *FAST], tmp_path)
    messages = [str(w.message) for w in seen]
    assert "a real problem" in messages
    assert not any("is_gradient_checkpointing" in m for m in messages)


def test_model_loading_shows_no_progress_bars(capfd):
    from transformers.utils import logging as hf_logging
    hf_logging.enable_progress_bar()  # tests/conftest.py turns them off for every test; the app must do it itself
    try:
        cfg = compose_config(["model=minilm", *FAST])
        train_setup.build_task_and_model(cfg)
    finally:
        hf_logging.disable_progress_bar()
    assert "Loading weights" not in capfd.readouterr().err


@pytest.mark.slow
def test_cli_failed_resume_leaves_no_folder(tmp_path):
    done = cli(["+adapter=lora", "model=tiny_bert", *FAST, f"trainer.resume={tmp_path / 'nothing'}"], tmp_path)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: no checkpoint"), done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no outputs/, no run folder, no resume folder


@pytest.mark.slow
def test_cli_help_names_groups_and_output(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vbshare.train", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0
    for needle in ("+adapter=", "model:", "trainer:", "outputs/", "vbshare.evaluate", "trainer.resume="):
        assert needle in done.stdout, needle
