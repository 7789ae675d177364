"""The Hydra training app: `python -m vbshare.train +adapter=vblora` (see app.py; configs/ at the repo root).

`run_training(cfg, run_dir)` is the programmatic entry; `train_step` the one optimiser-step recipe that every
loop of the project shares.
"""
from .app import CONFIG_DIR, main, run_training
from .modes import NON_HPARAM_KEYS
from .step import StepStats, train_step

__all__ = ["CONFIG_DIR", "NON_HPARAM_KEYS", "StepStats", "main", "run_training", "train_step"]
