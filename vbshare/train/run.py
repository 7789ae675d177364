"""`Run`: everything the loop carries between setup, train and save (built by `setup.setup`)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from ..data.encoding import Encoded
from ..data.examples import Task
from .engine import Engine
from .modes import RunMode
from .settings import Settings


@dataclass
class Run:
    """Everything the loop carries between setup, train and save."""

    cfg: DictConfig
    run_dir: Path
    task: Task
    data: dict[str, Encoded]
    model: nn.Module  # the model itself (adapters, hooks, evaluation, saving); engine.wrapped trains
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    engine: Engine
    mode: RunMode
    logger: Any
    settings: Settings  # cfg's settings, checked (read_settings): what the loop reads
    step: int = 0  # optimiser steps completed
    skipped_steps: int = 0  # steps whose update was dropped for a non-finite loss or gradient (trainer.nonfinite=skip_step)
    best: dict[str, Any] | None = None  # {"step", "split", metric: value}
    train_seconds: float = 0.0  # summed over resumptions
    earlier_wall_seconds: float = 0.0  # wall time of the segments before this resumption (up to their checkpoint)
    segment_started: float = field(default_factory=time.perf_counter)  # this segment's start (perf_counter)
    last_validation: tuple[int, dict[str, float]] | None = None  # (step, scores) of the latest validation
    logger_id: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    rank_diff: float | None = None  # data parallel: largest trained-value difference between processes at the end
    forgetting_before: float | None = None  # trainer.forgetting_eval with full fine-tuning: general-text loss at step 0
    sparsify: dict[str, Any] | None = None  # trainer.sparsify: the stage records' numbers, for the summary

    def wall_seconds(self) -> float:
        """Wall time of the whole run so far: earlier segments plus this one."""
        return self.earlier_wall_seconds + time.perf_counter() - self.segment_started

    @property
    def is_main(self) -> bool:
        return self.engine.is_main

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    @property
    def eval_splits(self) -> list[str]:
        """Splits evaluated at the end: the task's, without test when trainer.eval_test is false."""
        splits = self.task.eval_splits
        return splits if self.settings.trainer.eval_test else [s for s in splits if s != "test"]
