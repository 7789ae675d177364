"""Experiment trackers behind one tiny interface: `log(metrics, step)`, `finish(summary)`.

The metrics log and the summary (vbshare.rundir) are written by the loop whatever the logger; these only mirror them.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class NullLogger:
    """`logger=none`: nothing beyond the run directory's own files."""

    def start(self, run_dir: Path, config: dict[str, Any], resume_id: str | None = None) -> str | None:
        return None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass


class WandbLogger(NullLogger):
    """Weights & Biases; `mode="offline"` (default) needs no account and writes under <run dir>/wandb."""

    def __init__(self, project: str = "vbshare", entity: str | None = None, mode: str = "offline",
                 name: str | None = None, tags: list[str] | None = None):
        self.project, self.entity, self.mode, self.name, self.tags = project, entity, mode, name, list(tags or [])
        self.run = None

    def start(self, run_dir: Path, config: dict[str, Any], resume_id: str | None = None) -> str | None:
        import wandb  # lazily: importing wandb is slow and only this logger needs it

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=self.project, entity=self.entity, mode=self.mode, name=self.name or run_dir.name,
            tags=self.tags, config=config, dir=str(run_dir), id=resume_id,
            resume="allow" if resume_id else None,
        )
        log.info("wandb run %s (%s mode) in %s", self.run.id, self.mode, run_dir / "wandb")
        return self.run.id

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        if self.run is None:
            return
        for key, value in summary.items():
            if isinstance(value, (int, float, str)):
                self.run.summary[key] = value
        self.run.finish()
        self.run = None
