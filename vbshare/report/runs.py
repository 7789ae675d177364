"""Finished runs as table rows: one row per run folder (vbshare.rundir), each with what tells its configuration
apart (every setting but the seed) and a label for it. Reads JSON and YAML only; imports nothing of the
training app."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from ..errors import VBShareError
from ..records import flatten
from ..rundir import CONFIG, FULL_FINETUNE, SUMMARY, RunDir, find_runs
from ..search_spaces import read_search

# Trainer settings that define a configuration (runs differing only in seed are pooled; threads, device,
# progress bars and checkpoints do not change what is trained).
TRAINER_KEYS = ("max_steps", "batch_size", "max_examples")
# trainer.sparsify keys that change nothing trained (snapshots are copies of the adapter along the way)
SPARSIFY_OUTPUT_KEYS = ("snapshots",)
# data keys that follow the run seed (data/*.yaml sets them to ${seed}): part of the seed, not the configuration
SEED_FOLLOWING_DATA_KEYS = ("train_subset_seed",)
# adapter config keys of runs made before the comparison's search spaces moved to configs/search/: not
# hyperparameters of the trained adapter
COMPARE_ONLY_KEYS = ("search", "size_key")


def _headline(summary: dict[str, Any], split: str | None) -> tuple[str | None, float]:
    """(split, value) of the task metric: the final test score, else the final validation score."""
    metric, final = summary.get("metric"), summary.get("final") or {}
    for name in ([split] if split else ["test", "validation"]):
        if metric in (final.get(name) or {}):
            return name, float(final[name][metric])
    return None, math.nan


def sharing_numbers(sharing: Any) -> dict[str, float]:
    """The plain numbers among the top-level entries of a summary's `sharing` (the adapter's own
    `sharing_pattern()`: e.g. SoRA's retained_rank, ASLoRA's merges), copied as they are; the report gives each
    its own column without knowing what it means."""
    if not isinstance(sharing, dict):
        return {}
    return {str(k): float(v) for k, v in sharing.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _sparsify_text(spec: Any) -> str:
    """A short name of a run's sparsifying schedule (trainer.sparsify) for labels: `off`, or e.g. `linear 5x10 to 20`
    (schedule, stages x steps per stage, the last stage's knob)."""
    if not isinstance(spec, dict):
        return "off"
    return f"{spec.get('schedule')} {spec.get('num_stages')}x{spec.get('stage_steps')} to {format_value(spec.get('max'))}"


def _model_label(summary: dict[str, Any]) -> Any:
    """The run's model as the report names it: the loader's name, with the frozen base's quantization when it
    had one ("smollm2_135m nf4"), so quantized and full-precision runs are told apart."""
    quantization = summary.get("base_quantization")
    return f"{summary.get('model')} {quantization}" if quantization else summary.get("model")


def _run_row(folder: RunDir, split: str | None) -> dict[str, Any]:
    run_dir = folder.path
    summary, config = folder.read_summary(), folder.read_config()
    sections = [(CONFIG, key, config.get(key)) for key in ("trainer", "adapter", "data", "optim")]
    for file_name, key, section in sections + [(SUMMARY, "hyperparameters", summary.get("hyperparameters"))]:
        if section is not None and not isinstance(section, dict):
            raise VBShareError(f"cannot read the run in {run_dir}: {key!r} in {file_name} is not a mapping; fix the "
                               "file or leave the run out")
    trainer = config.get("trainer") or {}
    adapter = config.get("adapter") or {}
    hyper = {k: v for k, v in (summary.get("hyperparameters") or {}).items() if k not in COMPARE_ONLY_KEYS}
    # the method's size knob: recorded in the config of older runs, else its comparison search space's
    size_key = adapter.get("size_key") or read_search(str(adapter.get("method"))).size_key
    used_split, value = _headline(summary, split)
    spec = trainer.get("sparsify")  # the sparsifying stages' schedule, or None
    identity = {
        "method": summary.get("method"), "model": _model_label(summary), "task": summary.get("task"),
        "hyperparameters": {k: v for k, v in hyper.items() if k != "targets"},
        "targets": hyper.get("targets"),
        "trainer": {k: trainer.get(k) for k in TRAINER_KEYS},
        "sparsify": {k: v for k, v in spec.items() if k not in SPARSIFY_OUTPUT_KEYS} if spec else None,
        "data": {k: v for k, v in (config.get("data") or {}).items()
                 if k != "_target_" and k not in SEED_FOLLOWING_DATA_KEYS},
        "full_finetune_lr": (config.get("optim") or {}).get("full_finetune_lr")
        if summary.get("method") == FULL_FINETUNE else None,
    }
    return {
        "run_dir": str(run_dir),
        "method": summary.get("method"),
        "model": _model_label(summary),
        "task": summary.get("task"),
        "metric": summary.get("metric"),
        "split": used_split,
        "metric_value": value,
        "seed": config.get("seed"),
        "size_key": size_key,
        "size": hyper.get(size_key) if size_key else None,
        "stored_params": float(summary.get("stored_parameters") or 0),
        "trainable_params": summary.get("trainable_parameters"),
        "head_params": summary.get("head_parameters"),
        "adapter_bytes": summary.get("adapter_bytes"),
        "wall_time_s": summary.get("wall_time_s"),
        "peak_memory_mb": summary.get("peak_memory_mb"),
        "steps": summary.get("steps"),
        "sharing": sharing_numbers(summary.get("sharing")),
        "sparsify": _sparsify_text(spec),
        "stages": (summary.get("sparsify") or {}).get("stages") or None,
        "hparams": flatten(identity["hyperparameters"]),
        "config_key": json.dumps(identity, sort_keys=True, default=str),
    }


def collect_runs(root: str | Path | Iterable[str | Path], split: str | None = None) -> pd.DataFrame:
    """One row per finished run: every run folder holding a summary under `root`, or the run folders given.

    Columns: run_dir, method, model, task, metric, split, metric_value, seed, size_key, size, stored_params,
    trainable_params, head_params, adapter_bytes, wall_time_s, peak_memory_mb, steps, sharing (the plain
    numbers of the adapter's sharing pattern: sharing_numbers), sparsify (the sparsifying schedule's short name,
    `off` without one), stages (the summary's sparsify.stages:
    one dict of numbers per stage, or None), hparams (dict), config_key (every setting but the seed), label
    (method plus what tells its configurations apart: the size when that alone does, else the hyperparameters
    that vary, else the model, task or sparsifying schedule).
    """
    if isinstance(root, (str, Path)):
        root = Path(root)
        if not root.is_dir():
            raise VBShareError(f"{root} is not a folder; give a comparison, sweep or runs folder (e.g. multirun/...)")
        run_dirs = find_runs(root)
        where = str(root)
    else:
        run_dirs = [RunDir(p) for p in root]
        missing = [str(p) for p in run_dirs if not p.finished]
        if missing:
            raise VBShareError(f"no {SUMMARY} in {missing[0]}: that run has not finished")
        where = "the given run folders"
    if not run_dirs:
        raise VBShareError(f"no finished runs in {where}: no {SUMMARY} found (runs still going, or the wrong folder?)")
    rows = []
    for run_dir in run_dirs:
        try:
            rows.append(_run_row(run_dir, split))
        except VBShareError:
            raise
        except (OSError, ValueError) as err:  # JSON errors are ValueErrors, one line each
            raise VBShareError(f"cannot read the run in {run_dir}: {' '.join(str(err).split())}") from None
    runs = pd.DataFrame(rows)
    runs["label"] = _labels(runs)
    return runs


def format_value(value: Any) -> str:
    """A setting's value as a label shows it: floats in %g, lists as [a,b]."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def _labels(runs: pd.DataFrame) -> list[str]:
    """`method` alone when a method has one configuration; `method size_key=value` when its size alone tells
    them apart (e.g. `lora r=8`); else `method k=v ...` over the keys that differ between its configurations
    (e.g. `vblora num_vectors=64 r=2`, `aslora pairing=random`)."""
    labels = []
    for _, row in runs.iterrows():
        same = runs[runs["method"] == row["method"]]
        configs = same.drop_duplicates("config_key")
        parts: list[str] = []
        sizes = configs["size"].map(format_value)
        if len(configs) > 1 and row["size_key"] and configs["size_key"].nunique() == 1 and sizes.is_unique:
            parts = [f"{row['size_key']}={format_value(row['size'])}"]
        elif len(configs) > 1:
            all_keys = set().union(*(h.keys() for h in configs["hparams"]))
            keys = {k for k in all_keys if len({format_value(h.get(k)) for h in configs["hparams"]}) > 1}
            parts = [f"{k.rsplit('.', 1)[-1] if not k.startswith('lr.') else k}={format_value(row['hparams'].get(k))}"
                     for k in sorted(keys)]
            if not parts:  # differ outside the hyperparameters (model, steps, data...)
                for other in ("model", "task", "sparsify"):
                    if configs[other].nunique() > 1:
                        parts.append(f"{other}={row[other]}")
            if not parts:
                parts.append(f"config {list(configs['config_key']).index(row['config_key']) + 1}")
        labels.append(" ".join([str(row["method"]), *parts]))
    # configurations the differing keys above do not tell apart (e.g. two sparsifying schedules with the same
    # short name) get their number as well, so no two rows of a report share a label
    keys = list(runs["config_key"])
    order = {key: n for n, key in enumerate(dict.fromkeys(keys), start=1)}
    shared = {label for label in labels if len({k for k, l in zip(keys, labels) if l == label}) > 1}
    return [f"{label} config {order[key]}" if label in shared else label for label, key in zip(labels, keys)]


def split_groups(runs: pd.DataFrame) -> dict[tuple[str, str], pd.DataFrame]:
    """The runs per (task, metric), in first-seen order: each group is one table, never mixed with another."""
    keys = list(dict.fromkeys(zip(runs["task"], runs["metric"])))
    return {(task, metric): runs[(runs["task"] == task) & (runs["metric"] == metric)].copy() for task, metric in keys}

