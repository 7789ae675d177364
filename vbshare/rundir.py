"""The run folder of `python -m vbshare.train`: the one place that names its files.

    summary.json        the finished run's numbers (written last: a folder holding it is a finished run)
    config.yaml         the resolved config it trained with (plain YAML, read with safe_load)
    overrides.json      {"overrides": [...]}: what the config was composed with from configs/ (vbshare.evaluate)
    metrics.jsonl       one JSON object per logged step and split, appended as training goes
    predictions.jsonl   the test split's per-example rows (when scored on test)
    adapter/            the trained adapter in its stored form (vbshare.save_adapter; head-only: the head)
    model/              full fine-tuning: the fine-tuned model (save_pretrained)
    checkpoint/         resumable state (.checkpoint.tmp / .checkpoint.old while it is swapped in)
    <name>.jsonl        a method's own records (merge_history, sora_stages: AdapterState.run_records, stages)
    snapshots/          step_<N>/ (trainer.snapshot_every) and stage_<i>/ (sparsifying stages): training-form
                        adapter folders, what vbshare.analysis reads

The training app writes through `RunDir`; vbshare.evaluate, vbshare.compare, vbshare.report and vbshare.analysis
read through it. It imports nothing of the training app, so reading finished runs never loads it. Everything
read here is data: JSON, JSON lines and YAML through safe_load, nothing unpickled or instantiated.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import VBShareError
from .records import read_jsonl

SUMMARY = "summary.json"
CONFIG = "config.yaml"
OVERRIDES = "overrides.json"
METRICS = "metrics.jsonl"
PREDICTIONS = "predictions.jsonl"
ADAPTER = "adapter"
FULL_MODEL = "model"
CHECKPOINT = "checkpoint"
SNAPSHOTS = "snapshots"
# The method a summary reports for the two baselines (every other run reports its adapter method's name).
FULL_FINETUNE = "full_finetune"  # `+adapter=full` (or no adapter): every weight trains
HEAD_ONLY = "head_only"  # `+adapter=head_only`: only the task head (model.head_modules) trains
SNAPSHOT_NAME = re.compile(r"^(?:step|stage)_(\d+)$")  # snapshots/step_<N> or snapshots/stage_<i>
# What a run leaves in its folder as soon as it starts, or later: any of them means the folder holds a run.
RUN_RECORDS = (CONFIG, METRICS, SUMMARY, CHECKPOINT, f".{CHECKPOINT}.old", ADAPTER, FULL_MODEL)


@dataclass(frozen=True)
class RunDir:
    """One run folder: its files' paths and readers. `RunDir(path)`; `str()` is the folder."""

    path: Path

    def __init__(self, path: str | os.PathLike):
        object.__setattr__(self, "path", Path(path))

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------------------------------------ paths
    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def overrides(self) -> Path:
        return self.path / OVERRIDES

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def predictions(self) -> Path:
        return self.path / PREDICTIONS

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER

    @property
    def full_model(self) -> Path:
        return self.path / FULL_MODEL

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def checkpoint_tmp(self) -> Path:
        """Where a checkpoint is built before it is swapped in."""
        return self.path / f".{CHECKPOINT}.tmp"

    @property
    def checkpoint_old(self) -> Path:
        """The previous checkpoint while a new one is swapped in (a crash mid-swap leaves it)."""
        return self.path / f".{CHECKPOINT}.old"

    @property
    def snapshots(self) -> Path:
        return self.path / SNAPSHOTS

    def snapshot(self, step: int) -> Path:
        """trainer.snapshot_every: the training-form adapter after optimiser step `step`."""
        return self.snapshots / f"step_{step:06d}"

    def stage_snapshot(self, stage: int) -> Path:
        """trainer.sparsify.snapshots: the training-form adapter after sparsifying stage `stage`."""
        return self.snapshots / f"stage_{stage:02d}"

    def record(self, name: str) -> Path:
        """A method's own JSON-lines record, `<name>.jsonl` (AdapterState.run_records: ASLoRA's merge_history;
        the sparsifying stages: `<method>_stages`, e.g. sora_stages)."""
        return self.path / f"{name}.jsonl"

    def records(self) -> list[str]:
        """The RUN_RECORDS this folder holds (any of them: the folder holds a run)."""
        return [name for name in RUN_RECORDS if os.path.lexists(self.path / name)]

    @property
    def finished(self) -> bool:
        return self.summary.is_file()

    # ---------------------------------------------------------------------------------------------- readers
    def read_summary(self) -> dict[str, Any]:
        """The finished run's summary as a dict; a missing or damaged file is one VBShareError line."""
        if not self.summary.is_file():
            raise VBShareError(f"no {SUMMARY} in {self.path}: that run has not finished")
        try:
            summary = json.loads(self.summary.read_text())
        except (OSError, ValueError) as err:  # JSON errors are ValueErrors
            raise VBShareError(f"cannot read the run in {self.path}: {' '.join(str(err).split())}") from None
        if not isinstance(summary, dict):
            raise VBShareError(f"cannot read the run in {self.path}: {SUMMARY} is not a JSON object; the run's files "
                               "were edited, run it again")
        return summary

    def read_config(self, missing_ok: bool = True) -> dict[str, Any]:
        """The resolved config as plain data (yaml.safe_load: a Python tag is refused, never run); {} when the
        file is missing and `missing_ok`."""
        if not self.config.is_file():
            if missing_ok:
                return {}
            raise VBShareError(f"{self.config} is missing; the folder must be a run written by python -m vbshare.train")
        try:
            config = yaml.safe_load(self.config.read_text())
        except yaml.YAMLError as err:
            raise VBShareError(f"cannot read the run in {self.path}: {CONFIG} is not valid YAML ({yaml_problem(err)}); "
                               "fix the file or leave the run out") from None
        except (OSError, UnicodeDecodeError) as err:
            raise VBShareError(f"cannot read the run in {self.path}: {CONFIG} is not readable text ({err}); fix the "
                               "file or leave the run out") from None
        config = config or {}
        if not isinstance(config, dict):
            raise VBShareError(f"cannot read the run in {self.path}: {CONFIG} is not a mapping of settings; fix the "
                               "file or leave the run out")
        return config

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every logged record (records.read_jsonl); [] when the run logged nothing yet."""
        return read_jsonl(self.metrics) if self.metrics.is_file() else []

    def list_snapshots(self) -> list[tuple[int, Path]]:
        """(step or stage, folder) of every snapshots/step_<N> or stage_<i>, in order."""
        if not self.snapshots.is_dir():
            return []
        found = [(int(m.group(1)), child) for child in self.snapshots.iterdir()
                 if child.is_dir() and (m := SNAPSHOT_NAME.match(child.name))]
        return sorted(found)


def find_runs(root: str | os.PathLike) -> list[RunDir]:
    """Every finished run under `root` (each folder holding a summary), sorted by path."""
    return [RunDir(p) for p in sorted({p.parent for p in Path(root).rglob(SUMMARY)})]


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML prints it over several lines with a caret)."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{err.problem or err.context or 'invalid YAML'}{where}"
    return " ".join(str(err).split())
