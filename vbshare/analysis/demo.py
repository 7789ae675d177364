"""Small runs for the notebooks when no run directory is given (seconds on a CPU, `model=tiny_bert trainer=debug`).

* `train_run(method, run_dir, snapshot_every=N)`: the training app in-process (Hydra compose API); with
  `trainer.snapshot_every=N` it keeps the training-form adapter of every N-th step (and of the last) in
  `snapshots/step_<N>/`.
* `sora_sparsify_run(run_dir)`: the app's setup (model, data, optimiser) driven through
  `vbshare.sora.sparsify`, which the app itself does not run; writes `sora_stages.jsonl`, a gate snapshot per
  stage in `snapshots/stage_<i>/` and the pruned adapter in `adapter/`.
* `sweep(root, methods, seeds)`: one finished run per (method, seed) under `root/<method>/seed<k>/`.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from ..adapters.sora import SparsifySchedule, sparsify
from ..checkpoint import save_adapter
from ..errors import VBShareError
from ..files import atomic_write
from ..train import CONFIG_DIR, run_training
from ..data.batching import collate
from ..train.batches import batch_indices, forward_loss
from ..train.evaluation import evaluate
from ..train.setup import setup
from ..train.step import train_step
from .common import SNAPSHOTS, PathLike

DEMO = ("model=tiny_bert", "trainer=debug", "data.max_length=32")
# Per method: hyperparameters that make the sharing machinery act within a few dozen steps.
ACTIVE = {"aslora": {"merge_start": 5, "merge_every": 3, "share_ratio": 0.5}}
# SoRA demo: τ = lr_gate · λ per step, so a gate lr of 5e-2 lets λ = 1..4 prune within a few steps per stage.
SORA_SCHEDULE = {"schedule": "linear", "num_stages": 5, "max": 2.5, "dense_steps": 40, "stage_steps": 3}
SORA_OVERRIDES = ("adapter.lr.gate=5.0e-2", "adapter.lr.default=1.0e-2", "adapter.lr.head=1.0e-2")


@contextlib.contextmanager
def _quiet(quiet: bool) -> Iterator[None]:
    logger = logging.getLogger("vbshare.train")
    level = logger.level
    if quiet:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def compose(overrides: Sequence[str]):
    """The training app's config composed from `configs/` with Hydra overrides."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


def hparam_overrides(method: str, values: dict[str, Any]) -> list[str]:
    """`adapter.<key>=value` overrides for the method's hyperparameters, wherever its config keeps them
    (`adapter.hparams.<key>` in older configs, `adapter.<key>` in flat ones)."""
    if not values:
        return []
    adapter = compose([f"+adapter={method}"]).adapter
    prefix = "adapter.hparams." if "hparams" in adapter else "adapter."
    return [f"{prefix}{k}={'null' if v is None else v}" for k, v in values.items()]


def train_run(method: str | None, run_dir: PathLike, overrides: Sequence[str] = (), hparams: dict[str, Any] | None = None,
              snapshot_every: int | None = None, quiet: bool = True) -> Path:
    """Train one run of the app into `run_dir` (tiny BERT, debug trainer unless overridden) and return it.

    `hparams` are the method's hyperparameters (placed by `hparam_overrides`; default: ACTIVE's for the method);
    `snapshot_every`: keep the training-form adapter in `snapshots/step_<N>/` every that many steps
    (`trainer.snapshot_every`).
    """
    run_dir = Path(run_dir)
    if (run_dir / "summary.json").exists():
        raise VBShareError(f"{run_dir} already holds a finished run; give an empty folder")
    values = dict(ACTIVE.get(method, {}) if hparams is None else hparams)
    base = [*DEMO, *overrides]
    if method:
        base[len(DEMO):len(DEMO)] = [f"+adapter={method}", *hparam_overrides(method, values)]
    if snapshot_every:
        base.append(f"trainer.snapshot_every={snapshot_every}")
    with _quiet(quiet):
        run_training(compose(base), run_dir)
    return run_dir


def sora_sparsify_run(run_dir: PathLike, schedule: dict[str, Any] | None = None, overrides: Sequence[str] = (),
                      hparams: dict[str, Any] | None = None, quiet: bool = True) -> Path:
    """SoRA through the sparsifying scheduler on the app's task and model (constant learning rates).

    Memorisation = the task metric on the training split (the debug trainer keeps a few examples, a fixed
    subset), generalisation = on the validation split. Writes `sora_stages.jsonl`, `config.yaml`,
    `snapshots/stage_<i>/` (training form, with gates) and `adapter/` (pruned).
    """
    run_dir = Path(run_dir)
    schedule = SparsifySchedule(**(schedule or SORA_SCHEDULE))
    cfg = compose([*DEMO, "+adapter=sora", *SORA_OVERRIDES, *hparam_overrides("sora", hparams or {}), *overrides])
    with _quiet(quiet):
        run = setup(cfg, run_dir)
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
    train_data = run.data["train"]
    metric = run.task.metric
    done = {"steps": 0}

    def train_steps(n_steps: int, lam: float) -> None:
        run.model.train()
        for _ in range(n_steps):
            indices = batch_indices(len(train_data), cfg.trainer.batch_size, done["steps"], cfg.seed)
            batch = collate(train_data, indices, run.pad_id, run.device)
            done["steps"] += 1
            train_step(run.model, run.optimizer, lambda: forward_loss(run.model, batch, run.task)[0], done["steps"])

    stage = {"i": 0}

    def score(split: str) -> dict[str, float]:
        scores = evaluate(run, "train" if split == "train" else "validation")
        if split != "train":  # the second call of a stage: snapshot the gates it ended with
            save_adapter(run.model, run_dir / SNAPSHOTS / f"stage_{stage['i']:02d}", stored_form=False)
            stage["i"] += 1
        return {metric: scores[metric], **{k: v for k, v in scores.items() if k != metric}}

    torch.manual_seed(cfg.seed)
    try:
        sparsify(run.model, train_steps, score, schedule, out=run_dir / "sora_stages.jsonl")
        save_adapter(run.model, run_dir / "adapter", modules=run.mode.head_modules)
    finally:
        run.engine.end()
    return run_dir


def sweep(root: PathLike, methods: Sequence[str] = ("lora", "vblora", "aslora", "sora"), seeds: Sequence[int] = (0,),
          overrides: Sequence[str] = (), quiet: bool = True) -> Path:
    """One finished run per (method, seed) under `root/<method>/seed<k>/`; returns root."""
    root = Path(root)
    for method in methods:
        for seed in seeds:
            train_run(method, root / method / f"seed{seed}", overrides=[f"seed={seed}", *overrides], quiet=quiet)
    return root
