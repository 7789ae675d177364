"""Small runs for the notebooks when no run directory is given (seconds on a CPU, `model=tiny_bert trainer=debug`).

* `train_run(method, run_dir, snapshot_every=N)`: the training app in-process (Hydra compose API); with
  `trainer.snapshot_every=N` it keeps the training-form adapter of every N-th step (and of the last) in
  `snapshots/step_<N>/`.
* `sora_sparsify_run(run_dir)`: SoRA through the app with its sparsifying stages (`trainer.sparsify`); the run
  holds `sora_stages.jsonl`, a gate snapshot per stage in `snapshots/stage_<i>/` and the pruned adapter in `adapter/`.
* `sweep(root, methods, seeds)`: one finished run per (method, seed) under `root/<method>/seed<k>/`; by default
  every registered method (`vbshare.METHODS`), about two seconds a run on a CPU at `trainer.max_steps=8`.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from ..errors import VBShareError
from ..registry import METHODS
from ..rundir import RunDir
from ..train import CONFIG_DIR, run_training
from .common import PathLike

DEMO = ("model=tiny_bert", "trainer=debug", "data.max_length=32")
# Per method: hyperparameters that make the sharing machinery act within a few dozen steps (and fit tiny BERT:
# Uni-LoRA's default θ of 16,384 entries is longer than its 7,168 factor entries, so most of θ would go unread).
ACTIVE = {"aslora": {"merge_start": 5, "merge_every": 3, "share_ratio": 0.5}, "unilora": {"theta_d_length": 1024}}
# SoRA demo: τ = lr_gate · λ per step, so a gate lr of 5e-2 lets λ up to 2.5 prune within a few steps per stage.
SORA_SCHEDULE = {"schedule": "linear", "num_stages": 5, "max": 2.5, "stage_steps": 3}
SORA_OVERRIDES = ("adapter.lr.gate=5.0e-2", "adapter.lr.default=1.0e-2", "adapter.lr.head=1.0e-2")
SORA_DENSE_STEPS = 40  # the dense stage: the app's normal training, λ = 0
SORA_TRAINER = (f"trainer.max_steps={SORA_DENSE_STEPS}", "adapter.lam=0", "trainer.eval_every=10",
                "trainer.checkpoint_every=null")


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
    if RunDir(run_dir).finished:
        raise VBShareError(f"{run_dir} already holds a finished run; give an empty folder")
    values = dict(ACTIVE.get(method, {}) if hparams is None else hparams)
    base = [*DEMO, *overrides]
    if method:
        base[len(DEMO):len(DEMO)] = [f"+adapter={method}", *hparam_overrides(method, values)]
    if snapshot_every:
        base.append(f"trainer.snapshot_every={snapshot_every}")
    with _quiet(quiet):
        run_training(compose(base), run_dir, base)
    return run_dir


def sora_sparsify_run(run_dir: PathLike, schedule: dict[str, Any] | None = None, overrides: Sequence[str] = (),
                      hparams: dict[str, Any] | None = None, quiet: bool = True) -> Path:
    """SoRA trained by the app with its sparsifying stages (`+trainer/sparsify=default`) into `run_dir`.

    `schedule`: trainer.sparsify keys (schedule, num_stages, max, min, stage_steps, lr_factor, ...; default
    SORA_SCHEDULE); the dense stage is the app's normal training of SORA_DENSE_STEPS steps. Memorisation = the
    task metric on the training split (the debug trainer keeps a few examples, a fixed subset),
    generalisation = on the validation split. The run directory holds `sora_stages.jsonl`,
    `snapshots/stage_<i>/` (training form, with gates), `adapter/` (pruned) and the summary.
    """
    run_dir = Path(run_dir)
    if RunDir(run_dir).finished:
        raise VBShareError(f"{run_dir} already holds a finished run; give an empty folder")
    stages = [f"trainer.sparsify.{k}={'null' if v is None else v}" for k, v in (schedule or SORA_SCHEDULE).items()]
    composed_with = [*DEMO, "+adapter=sora", *SORA_OVERRIDES, *hparam_overrides("sora", hparams or {}),
                     *SORA_TRAINER, "+trainer/sparsify=default", *stages, *overrides]
    with _quiet(quiet):
        run_training(compose(composed_with), run_dir, composed_with)
    return run_dir


def sweep(root: PathLike, methods: Sequence[str] | None = None, seeds: Sequence[int] = (0,),
          overrides: Sequence[str] = (), quiet: bool = True) -> Path:
    """One finished run per (method, seed) under `root/<method>/seed<k>/`; returns root.

    `methods`: adapter configs of the app (`configs/adapter/<name>.yaml`); None: every method registered in
    `vbshare.METHODS` at call time, in registration order. Checked before anything trains.
    """
    root = Path(root)
    methods = list(METHODS) if methods is None else list(methods)
    known = sorted(path.stem for path in (CONFIG_DIR / "adapter").glob("*.yaml"))
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise VBShareError(f"no adapter config for {', '.join(map(repr, unknown))}; methods with a config in "
                           f"{CONFIG_DIR / 'adapter'}: {', '.join(known)}")
    for method in methods:
        for seed in seeds:
            train_run(method, root / method / f"seed{seed}", overrides=[f"seed={seed}", *overrides], quiet=quiet)
    return root
