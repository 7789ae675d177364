"""Resumable checkpoints inside a run directory: `<run dir>/checkpoint/`, written atomically by rank 0.

`trainer.snapshot_every=N` also keeps the trained weights of every N-th step (training form) in
`<run dir>/snapshots/step_<N>/`, for analyses along a run.

A checkpoint holds, in `<run dir>/checkpoint/`:

    adapter/ or weights.pt   the trained weights in their training form (through the run mode: the adapter
                             folder with its metadata and the head, or the trained weights by name)
    trainer_state.json       the step (which fixes the data-order position), the best score, the training
                             time so far, the logger's run id, the comparable config and Python's and numpy's
                             RNG states as plain lists
    trainer_tensors.pt       the optimiser state and torch's (CPU, CUDA) RNG states: tensors and plain
                             containers, read with `torch.load(weights_only=True)`

`trainer.resume=<run dir>` continues exactly where it left off: the same batches, the same updates. A checkpoint
is data, never code: the settings are compared from the JSON alone, and the tensors are read only after that
check passed, by a loader that refuses anything but tensors and plain values. The older single pickled
`trainer_state.pt` is refused (it could only be read by unpickling).
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

from ..files import atomic_torch_save, atomic_write, read_tensors
from ..errors import VBShareError
from ..records import flatten, read_jsonl
from ..rundir import RunDir

if TYPE_CHECKING:
    from .run import Run

log = logging.getLogger("vbshare.train")

TRAINER_STATE = "trainer_state.json"  # step, scores, times, logger id, config, Python / numpy RNG states
TRAINER_TENSORS = "trainer_tensors.pt"  # optimiser state, torch / CUDA RNG states (weights_only=True)
PICKLED_STATE = "trainer_state.pt"  # the older, pickled format: refused
# Config keys that may change between an interrupted run and its resumption.
RESUME_FREE_KEYS = ("trainer.resume", "trainer.stop_at_step", "trainer.progress_bar", "trainer.device", "logger")


def rng_states() -> tuple[dict[str, Any], dict[str, Any]]:
    """(plain, tensors): Python's and numpy's generator states as JSON values (lists and numbers), torch's
    CPU state (a uint8 tensor) and, with CUDA, every device's."""
    version, internal, gauss_next = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    plain = {"python": [version, list(internal), gauss_next],
             "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    return plain, tensors


def set_rng_states(plain: dict[str, Any], tensors: dict[str, Any]) -> None:
    version, internal, gauss_next = plain["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, position, has_gauss, cached_gaussian = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])


def comparable_config(cfg: DictConfig) -> dict[str, Any]:
    """The config flattened to {dotted key: value}, minus the keys a resumption may change."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    return {key: value for key, value in flat.items()
            if not any(key == free or key.startswith(free + ".") for free in RESUME_FREE_KEYS)}


def find_checkpoint(run_dir: Path) -> Path:
    folder = RunDir(run_dir)
    for candidate in (folder.checkpoint, folder.checkpoint_old):  # .old: a crash mid-swap
        if (candidate / TRAINER_STATE).is_file():
            return candidate
    for candidate in (folder.checkpoint, folder.checkpoint_old):
        if (candidate / PICKLED_STATE).is_file():
            raise VBShareError(f"the checkpoint in {candidate} is in the older pickled format ({PICKLED_STATE}), which "
                               "cannot be read without running whatever it holds; start the run again in a new folder")
    raise VBShareError(f"no checkpoint in {run_dir}; trainer.resume needs a run directory with a {folder.checkpoint.name}/ folder")


def read_trainer_state(run_dir: Path) -> dict[str, Any]:
    """The checkpoint's trainer_state.json (JSON only: nothing in it can run)."""
    return _read_state(find_checkpoint(run_dir) / TRAINER_STATE)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise VBShareError(f"{path} is not readable JSON ({err}); the checkpoint is damaged") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise VBShareError(f"{path} is not a vbshare trainer state (no config); the checkpoint is damaged")
    return state


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
    folder = RunDir(run.run_dir)
    final, tmp, old = folder.checkpoint, folder.checkpoint_tmp, folder.checkpoint_old
    shutil.rmtree(tmp, ignore_errors=True)
    run.mode.save_weights(run.model, tmp)
    plain_rng, tensor_rng = rng_states()
    atomic_torch_save({"optimizer": run.optimizer.state_dict(), "rng": tensor_rng}, tmp / TRAINER_TENSORS)
    atomic_write(tmp / TRAINER_STATE, json.dumps({
        "step": run.step,
        "rng": plain_rng,
        "best": run.best,
        "train_seconds": run.train_seconds,
        "wall_seconds": run.wall_seconds(),
        "logger_id": run.logger_id,
        "skipped_steps": run.skipped_steps,
        "config": comparable_config(run.cfg),
    }).encode())  # last: a folder with this file is complete
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_weights(run_dir: Path, mode, model: torch.nn.Module) -> dict[str, Any]:
    """Restore the trained weights (adapter metadata such as ASLoRA tie-sets first) into the unwrapped model;
    returns the trainer state (JSON) with the optimiser and RNG tensors under "tensors", for
    `restore_trainer_state`. Call it only after `check_resumable` passed."""
    folder = find_checkpoint(run_dir)
    state = _read_state(folder / TRAINER_STATE)
    mode.load_weights(model, folder)
    state["tensors"] = read_tensors(folder / TRAINER_TENSORS)
    log.info("resumed from %s", folder)
    return state


def restore_trainer_state(run: "Run", state: dict[str, Any]) -> None:
    """Optimiser state (the optimiser was rebuilt over the restored parameters), RNG states, step, best score,
    training time and logger id; the metrics log is trimmed to the checkpointed step."""
    run.optimizer.load_state_dict(state["tensors"]["optimizer"])
    set_rng_states(state["rng"], state["tensors"]["rng"])
    run.step, run.best = state["step"], state["best"]
    run.train_seconds, run.logger_id = state["train_seconds"], state["logger_id"]
    run.skipped_steps = state["skipped_steps"]
    run.earlier_wall_seconds = state.get("wall_seconds", 0.0)
    metrics = RunDir(run.run_dir).metrics
    if metrics.is_file() and run.is_main:  # drop what the interrupted run logged after its last checkpoint
        run.history = [r for r in read_jsonl(metrics) if r["step"] <= run.step]
        atomic_write(metrics, "".join(json.dumps(r) + "\n" for r in run.history).encode())
    log.info("continuing at step %d", run.step)


def save_snapshot(run: "Run") -> None:
    """Copy the trained weights of this step, in training form, to <run dir>/snapshots/step_<N>/ (rank 0;
    built in a temporary folder and renamed into place; a resumed run rewrites a step it redoes)."""
    final = RunDir(run.run_dir).snapshot(run.step)
    tmp = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    run.mode.save_snapshot(run.model, tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
