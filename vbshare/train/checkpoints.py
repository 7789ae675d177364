"""Resumable checkpoints inside a run directory: `<run dir>/checkpoint/`, written atomically by rank 0.

`trainer.snapshot_every=N` also keeps the trained weights of every N-th step (training form) in
`<run dir>/snapshots/step_<N>/`, for analyses along a run.

A checkpoint holds the trained weights in their training form (through the run mode: the adapter folder with
its metadata and the head, or the trained weights by name), the optimiser state, the RNG states, the step
(which fixes the data-order position), the best score, the training time so far, the logger's run id and the
config. `trainer.resume=<run dir>` continues exactly where it left off: the same batches, the same updates.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..files import atomic_torch_save, atomic_write
from ..errors import VBShareError
from ..records import flatten, read_jsonl

if TYPE_CHECKING:
    from .run import Run

log = logging.getLogger("vbshare.train")

CHECKPOINT = "checkpoint"  # resumable state inside a run directory
SNAPSHOTS = "snapshots"  # trainer.snapshot_every: <run dir>/snapshots/step_<N>/ (what vbshare.analysis reads)
TRAINER_STATE = "trainer_state.pt"
# Config keys that may change between an interrupted run and its resumption.
RESUME_FREE_KEYS = ("trainer.resume", "trainer.stop_at_step", "trainer.progress_bar", "trainer.device", "logger")


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def comparable_config(cfg: DictConfig) -> dict[str, Any]:
    """The config flattened to {dotted key: value}, minus the keys a resumption may change."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    return {key: value for key, value in flat.items()
            if not any(key == free or key.startswith(free + ".") for free in RESUME_FREE_KEYS)}


def find_checkpoint(run_dir: Path) -> Path:
    for candidate in (run_dir / CHECKPOINT, run_dir / f".{CHECKPOINT}.old"):  # .old: a crash mid-swap
        if (candidate / TRAINER_STATE).is_file():
            return candidate
    raise VBShareError(f"no checkpoint in {run_dir}; trainer.resume needs a run directory with a {CHECKPOINT}/ folder")


def read_trainer_state(run_dir: Path) -> dict[str, Any]:
    return torch.load(find_checkpoint(run_dir) / TRAINER_STATE, map_location="cpu", weights_only=False)


def check_resumable(resume_dir: Path, cfg: DictConfig) -> None:
    """Refuse to resume with settings other than the interrupted run's (except RESUME_FREE_KEYS)."""
    saved = read_trainer_state(resume_dir)["config"]
    now = comparable_config(cfg)
    for key in sorted(set(saved) | set(now)):
        if saved.get(key, "<absent>") != now.get(key, "<absent>"):
            raise VBShareError(
                f"cannot resume {resume_dir}: {key} was {saved.get(key, '<absent>')!r} there but is "
                f"{now.get(key, '<absent>')!r} now; resume with the same settings"
            )


def save_checkpoint(run: "Run") -> None:
    """Write <run dir>/checkpoint atomically (rank 0): build it in a temporary folder, swap it in by rename."""
    final = run.run_dir / CHECKPOINT
    tmp, old = run.run_dir / f".{CHECKPOINT}.tmp", run.run_dir / f".{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    run.mode.save_weights(run.model, tmp)
    atomic_torch_save({
        "step": run.step,
        "optimizer": run.optimizer.state_dict(),
        "rng": rng_states(),
        "best": run.best,
        "train_seconds": run.train_seconds,
        "wall_seconds": run.wall_seconds(),
        "logger_id": run.logger_id,
        "skipped_steps": run.skipped_steps,
        "config": comparable_config(run.cfg),
    }, tmp / TRAINER_STATE)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_weights(run_dir: Path, mode, model: torch.nn.Module) -> dict[str, Any]:
    """Restore the trained weights (adapter metadata such as ASLoRA tie-sets first) into the unwrapped model;
    returns the trainer state for `restore_trainer_state`."""
    folder = find_checkpoint(run_dir)
    mode.load_weights(model, folder)
    log.info("resumed from %s", folder)
    return torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=False)


def restore_trainer_state(run: "Run", state: dict[str, Any]) -> None:
    """Optimiser state (the optimiser was rebuilt over the restored parameters), RNG states, step, best score,
    training time and logger id; metrics.jsonl is trimmed to the checkpointed step."""
    run.optimizer.load_state_dict(state["optimizer"])
    set_rng_states(state["rng"])
    run.step, run.best = state["step"], state["best"]
    run.train_seconds, run.logger_id = state["train_seconds"], state["logger_id"]
    run.skipped_steps = state["skipped_steps"]
    run.earlier_wall_seconds = state.get("wall_seconds", 0.0)
    metrics = run.run_dir / "metrics.jsonl"
    if metrics.is_file() and run.is_main:  # drop what the interrupted run logged after its last checkpoint
        run.history = [r for r in read_jsonl(metrics) if r["step"] <= run.step]
        atomic_write(metrics, "".join(json.dumps(r) + "\n" for r in run.history).encode())
    log.info("continuing at step %d", run.step)


def snapshot_folder(run_dir: Path, step: int) -> Path:
    return run_dir / SNAPSHOTS / f"step_{step:06d}"


def save_snapshot(run: "Run") -> None:
    """Copy the trained weights of this step, in training form, to <run dir>/snapshots/step_<N>/ (rank 0;
    built in a temporary folder and renamed into place; a resumed run rewrites a step it redoes)."""
    final = snapshot_folder(run.run_dir, run.step)
    tmp = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    run.mode.save_snapshot(run.model, tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
