"""`python -m vbshare.report <folder> [--control lora]`: the side-by-side table and plots of finished runs.

Reads only what every run directory holds (summary.json, config.yaml, metrics.jsonl and the test split's
predictions.jsonl, written by vbshare.train), so it works on runs made on another machine. Runs are grouped by
(task, metric) and groups are never mixed: a folder holding several is reported as one sub-folder per group.
Writes, into `--out` (default <folder>/report):
  report.md / report.csv  one row per method configuration (runs equal in every setting but the seed): metric
                          mean, sample std and 95 % t-interval over seeds, the paired t-test against the control
                          over shared seeds, the per-example paired test against the control over the test
                          examples, each averaged over the shared seeds (exact sign test on correctness for
                          classification, Wilcoxon signed-rank on per-example losses otherwise), stored /
                          trainable parameters, adapter bytes, wall time, peak memory
  pareto.png              metric against stored parameters (log axis) with 95 % CIs, one line per method across
                          its sizes; configurations storing 0 parameters (head-only) as horizontal lines
  bars.png                the metric per configuration from 0, with 95 % CIs
  curves.png              validation metric against step per configuration (mean over seeds, metrics.jsonl)
  stages.csv              only when some run went through sparsifying stages (`trainer.sparsify`, SoRA): one
                          row per run and stage: the knob (λ or ξ), retained rank, the stage's scores
  sparsity_stages.png     the same runs: held-out score against retained rank, one line per run

Python API (used by vbshare.compare and the notebooks): collect_runs(root or run dirs) -> one row per run;
split_groups(runs) -> {(task, metric): runs}; summarise(runs, control) -> one row per configuration (one
task and metric only); mean_ci / paired_p / mcnemar_p / wilcoxon_p (the statistics); read_predictions and
paired_examples (the per-example pairs); stage_table (the sparsifying stages); pareto_front, pareto_plot,
bar_plot, curves_plot, stages_plot; write_report(runs, out, control).
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from .files import atomic_write
from .errors import VBShareError
from .records import flatten, read_jsonl
from .registry import METHODS
from .train.modes import FULL_FINETUNE, HEAD_ONLY
from .train.metrics import higher_is_better

log = logging.getLogger(__name__)

SUMMARY, CONFIG, METRICS = "summary.json", "config.yaml", "metrics.jsonl"
PREDICTIONS = "predictions.jsonl"  # the test split's per-example rows (vbshare.train.evaluation.prediction_rows)
DEFAULT_CONTROL = "lora"
CONFIDENCE = 0.95
POINTS_PER_INCH = 72  # annotation offsets are in points, window extents in pixels (fig.dpi per inch)
# Trainer settings that define a configuration (runs differing only in seed are pooled; threads, device,
# progress bars and checkpoints do not change what is trained).
TRAINER_KEYS = ("max_steps", "batch_size", "max_examples")
# trainer.sparsify keys that change nothing trained (snapshots are copies of the adapter along the way)
SPARSIFY_OUTPUT_KEYS = ("snapshots",)
# data keys that follow the run seed (data/*.yaml sets them to ${seed}): part of the seed, not the configuration
SEED_FOLLOWING_DATA_KEYS = ("train_subset_seed",)
# adapter config keys for the compare app, not hyperparameters of the trained adapter
COMPARE_ONLY_KEYS = ("search", "size_key")
BASELINE_ORDER = (HEAD_ONLY, FULL_FINETUNE)  # listed before the registered methods, which follow METHODS' order
SUMMARY_COLUMNS = ["method", "label", "model", "task", "metric", "higher_is_better", "size_key", "size", "n_seeds",
                   "seeds", "metric_mean", "metric_std", "ci95_low", "ci95_high", "control", "n_pairs",
                   "diff_vs_control", "diff_ci95_low", "diff_ci95_high", "p_vs_control", "examples_test",
                   "examples_paired", "examples_better", "examples_worse", "p_examples_vs_control", "stored_params",
                   "pct_of_control", "trainable_params", "head_params", "adapter_bytes", "wall_time_s",
                   "peak_memory_mb", "retained_rank", "merges", "config_key"]
EXAMPLE_COLUMNS = ["examples_test", "examples_paired", "examples_better", "examples_worse", "p_examples_vs_control"]
MCNEMAR, WILCOXON = "mcnemar", "wilcoxon"
STAGE_COLUMNS = ["label", "method", "seed", "stage", "knob", "lam", "retained_rank", "r_max", "nonzero_params",
                 "metric", "generalisation", "memorisation", "run_dir"]


# ================================================================================================ statistics
def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """(mean, sample std (ddof=1), CI low, CI high) of seed scores: mean ± t_{(1+c)/2, n-1} · std / sqrt(n).

    One value: std 0 and the interval NaN (no spread to estimate)."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, 0.0, math.nan, math.nan
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, len(x) - 1)) * std / math.sqrt(len(x))
    return mean, std, mean - half, mean + half


def _pair_arrays(values: Sequence[float], control: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The two samples of a paired test as float arrays, refused unless they pair one to one."""
    x, c = np.asarray(values, dtype=float), np.asarray(control, dtype=float)
    if len(x) != len(c):
        raise VBShareError(f"a paired test needs one control value per value, got {len(x)} and {len(c)}")
    return x, c


def paired_p(values: Sequence[float], control: Sequence[float]) -> float:
    """Two-sided paired t-test p-value of values[i] against control[i] (the same seed's runs).

    NaN when fewer than two pairs or when the differences do not vary (the t statistic is undefined)."""
    x, c = _pair_arrays(values, control)
    if len(x) < 2 or float(np.std(x - c, ddof=1)) == 0.0:
        return math.nan
    return float(stats.ttest_rel(x, c).pvalue)


def mcnemar_p(better: int, worse: int) -> float:
    """Exact two-sided McNemar p-value from the discordant pairs of two classifiers scored on the same examples.

    better: examples this one gets right and the other wrong; worse: the reverse. Under the null each discordant
    example falls either way with probability 1/2: the two-sided binomial test of `better` in better + worse
    trials, min(1, 2 · P(X ≤ min(better, worse))). 1.0 when there is no discordant example (the two agree)."""
    better, worse = int(better), int(worse)
    if better < 0 or worse < 0:
        raise VBShareError(f"McNemar's test needs counts >= 0, got better={better} and worse={worse}")
    if better + worse == 0:
        return 1.0
    return float(stats.binomtest(better, better + worse, 0.5).pvalue)


def wilcoxon_p(values: Sequence[float], control: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of values[i] - control[i] (the same example's losses or errors).

    scipy.stats.wilcoxon with its defaults (zero differences dropped; scipy chooses the exact null distribution
    for small samples and the normal approximation for large ones, hundreds of examples always being large).
    1.0 when every difference is zero (the two agree on every example), NaN without pairs."""
    x, c = _pair_arrays(values, control)
    if len(x) == 0:
        return math.nan
    if not np.any(x != c):
        return 1.0
    return float(stats.wilcoxon(x, c).pvalue)


# ================================================================================================= collecting
def _headline(summary: dict[str, Any], split: str | None) -> tuple[str | None, float]:
    """(split, value) of the task metric: the final test score, else the final validation score."""
    metric, final = summary.get("metric"), summary.get("final") or {}
    for name in ([split] if split else ["test", "validation"]):
        if metric in (final.get(name) or {}):
            return name, float(final[name][metric])
    return None, math.nan


def _retained_rank(sharing: Any) -> float | None:
    ranks = (sharing or {}).get("retained_ranks") if isinstance(sharing, dict) else None
    if not ranks:
        return None
    values = ranks.values() if isinstance(ranks, dict) else ranks
    return float(sum(v if isinstance(v, (int, float)) else len(v) for v in values))


def _sparsify_text(spec: Any) -> str:
    """A short name of a run's sparsifying schedule (trainer.sparsify) for labels: `off`, or e.g. `linear 5x10 to 20`
    (schedule, stages x steps per stage, the last stage's knob)."""
    if not isinstance(spec, dict):
        return "off"
    return f"{spec.get('schedule')} {spec.get('num_stages')}x{spec.get('stage_steps')} to {_format(spec.get('max'))}"


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML prints it over several lines with a caret)."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{err.problem or err.context or 'invalid YAML'}{where}"
    return " ".join(str(err).split())


def _run_row(run_dir: Path, split: str | None) -> dict[str, Any]:
    summary = json.loads((run_dir / SUMMARY).read_text())
    if not isinstance(summary, dict):
        raise VBShareError(f"cannot read the run in {run_dir}: {SUMMARY} is not a JSON object; the run's files were "
                           "edited, run it again")
    try:
        config = yaml.safe_load((run_dir / CONFIG).read_text()) if (run_dir / CONFIG).is_file() else {}
    except yaml.YAMLError as err:
        raise VBShareError(f"cannot read the run in {run_dir}: {CONFIG} is not valid YAML ({_yaml_problem(err)}); "
                           "fix the file or leave the run out") from None
    config = config or {}
    if not isinstance(config, dict):
        raise VBShareError(f"cannot read the run in {run_dir}: {CONFIG} is not a mapping of settings; fix the file "
                           "or leave the run out")
    sections = [(CONFIG, key, config.get(key)) for key in ("trainer", "adapter", "data", "optim")]
    for file_name, key, section in sections + [(SUMMARY, "hyperparameters", summary.get("hyperparameters"))]:
        if section is not None and not isinstance(section, dict):
            raise VBShareError(f"cannot read the run in {run_dir}: {key!r} in {file_name} is not a mapping; fix the "
                               "file or leave the run out")
    trainer = config.get("trainer") or {}
    adapter = config.get("adapter") or {}
    hyper = {k: v for k, v in (summary.get("hyperparameters") or {}).items() if k not in COMPARE_ONLY_KEYS}
    size_key = adapter.get("size_key")
    used_split, value = _headline(summary, split)
    spec = trainer.get("sparsify")  # the sparsifying stages' schedule, or None
    identity = {
        "method": summary.get("method"), "model": summary.get("model"), "task": summary.get("task"),
        "hyperparameters": {k: v for k, v in hyper.items() if k != "targets"},
        "targets": hyper.get("targets"),
        "trainer": {k: trainer.get(k) for k in TRAINER_KEYS},
        "sparsify": {k: v for k, v in spec.items() if k not in SPARSIFY_OUTPUT_KEYS} if spec else None,
        "data": {k: v for k, v in (config.get("data") or {}).items()
                 if k != "_target_" and k not in SEED_FOLLOWING_DATA_KEYS},
        "full_finetune_lr": (config.get("optim") or {}).get("full_finetune_lr")
        if summary.get("method") == FULL_FINETUNE else None,
    }
    sharing = summary.get("sharing")
    return {
        "run_dir": str(run_dir),
        "method": summary.get("method"),
        "model": summary.get("model"),
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
        "retained_rank": _retained_rank(sharing),
        "merges": sharing.get("merges") if isinstance(sharing, dict) else None,
        "sparsify": _sparsify_text(spec),
        "stages": (summary.get("sparsify") or {}).get("stages") or None,
        "hparams": flatten(identity["hyperparameters"]),
        "config_key": json.dumps(identity, sort_keys=True, default=str),
    }


def collect_runs(root: str | Path | Iterable[str | Path], split: str | None = None) -> pd.DataFrame:
    """One row per finished run: every folder holding summary.json under `root`, or the run folders given.

    Columns: run_dir, method, model, task, metric, split, metric_value, seed, size_key, size, stored_params,
    trainable_params, head_params, adapter_bytes, wall_time_s, peak_memory_mb, steps, retained_rank, merges,
    sparsify (the sparsifying schedule's short name, `off` without one), stages (summary.json's sparsify.stages:
    one dict of numbers per stage, or None), hparams (dict), config_key (every setting but the seed), label
    (method plus what tells its configurations apart: the size when that alone does, else the hyperparameters
    that vary, else the model, task or sparsifying schedule).
    """
    if isinstance(root, (str, Path)):
        root = Path(root)
        if not root.is_dir():
            raise VBShareError(f"{root} is not a folder; give a comparison, sweep or runs folder (e.g. multirun/...)")
        run_dirs = sorted({p.parent for p in root.rglob(SUMMARY)})
        where = str(root)
    else:
        run_dirs = [Path(p) for p in root]
        missing = [str(p) for p in run_dirs if not (p / SUMMARY).is_file()]
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


def _format(value: Any) -> str:
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
        sizes = configs["size"].map(_format)
        if len(configs) > 1 and row["size_key"] and configs["size_key"].nunique() == 1 and sizes.is_unique:
            parts = [f"{row['size_key']}={_format(row['size'])}"]
        elif len(configs) > 1:
            all_keys = set().union(*(h.keys() for h in configs["hparams"]))
            keys = {k for k in all_keys if len({_format(h.get(k)) for h in configs["hparams"]}) > 1}
            parts = [f"{k.rsplit('.', 1)[-1] if not k.startswith('lr.') else k}={_format(row['hparams'].get(k))}"
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


# ====================================================================================== per-example pairing
def read_predictions(run_dir: str | Path) -> pd.DataFrame | None:
    """The test split's per-example rows of a run (predictions.jsonl), indexed by the example's index in the split.

    Columns, as the run wrote them: loss (classification: cross-entropy in nats; regression: squared error; language
    model: nats per target token), label and correct (classification; regression has label only), tokens (language
    model: target tokens). None when the run has no predictions.jsonl (not scored on test)."""
    path = Path(run_dir) / PREDICTIONS
    if not path.is_file():
        return None
    try:
        frame = pd.DataFrame(read_jsonl(path))
    except (OSError, ValueError) as err:
        raise VBShareError(f"cannot read {path}: {err}") from None
    if "index" not in frame or "loss" not in frame:
        raise VBShareError(f"{path} has no index and loss per row: not a predictions file written by vbshare.train")
    if frame["index"].duplicated().any():
        raise VBShareError(f"{path} lists example {frame.loc[frame['index'].duplicated(), 'index'].iloc[0]} twice, "
                           "so vbshare.train did not write it; remove it to leave this run out of the per-example test")
    keep = [c for c in ("index", "label", "correct", "score", "loss", "tokens") if c in frame]
    return frame[keep].set_index("index").sort_index()


def paired_examples(runs: dict[Any, str | Path], control: dict[Any, str | Path],
                    read: Callable[[str | Path], pd.DataFrame | None] = read_predictions) -> pd.DataFrame:
    """The test examples of two configurations paired by (seed, example index), for every seed both ran.

    runs / control: {seed: run directory} of each configuration. Seeds where either run has no predictions.jsonl
    are left out. Columns: seed, index, loss, loss_control, and correct, correct_control when both are
    classifiers (one row per seed and example; empty when nothing pairs). The two runs of a seed must have
    scored the same examples: other example indices, or a label (for a language model, the target-token count)
    that differs at the same index, are refused as different data. `read` reads one run's predictions
    (summarise passes a cached read_predictions, so the control's files are parsed once, not once per row)."""
    pairs = []
    for seed in [s for s in runs if s in control]:
        mine, theirs = read(runs[seed]), read(control[seed])
        if mine is None or theirs is None:
            continue
        if not mine.index.equals(theirs.index):
            raise VBShareError(
                f"different data: seed {seed} scored {len(mine)} test examples in {runs[seed]} but {len(theirs)} "
                f"(or other indices) in {control[seed]}; per-example tests need the configurations scored on the "
                "same test set (same data settings and trainer.max_examples)")
        joined = mine.join(theirs, suffixes=("", "_control"))  # (examples, columns of both)
        for column in ("label", "tokens"):
            if column in mine and column in theirs:
                differ = joined[column] != joined[f"{column}_control"]
                if differ.any():
                    i = differ.idxmax()
                    raise VBShareError(
                        f"different data: test example {i} of seed {seed} has {column} {joined.at[i, column]} in "
                        f"{runs[seed]} but {joined.at[i, f'{column}_control']} in {control[seed]}; per-example tests "
                        "need the configurations scored on the same test set (same data settings)")
        keep = ["loss", "loss_control"]
        if "correct" in mine and "correct" in theirs:
            keep += ["correct", "correct_control"]
        elif "score" in mine and "score" in theirs:  # generation: the headline metric per example (higher is better)
            keep += ["score", "score_control"]
        pairs.append(joined[keep].rename_axis("index").reset_index().assign(seed=seed))
    columns = ["seed", "index", "loss", "loss_control"]
    if not pairs:
        return pd.DataFrame(columns=columns)
    table = pd.concat(pairs, ignore_index=True)
    return table[columns + [c for c in ("correct", "correct_control", "score", "score_control") if c in table]]


def examples_vs_control(pairs: pd.DataFrame) -> dict[str, Any]:
    """The per-example test of paired_examples' rows, with the test EXAMPLE as the unit: every seed scores the
    same test set, so each example's values are first averaged over the shared seeds (counting an example once
    per seed would treat k copies of it as k independent draws and shrink the p-value).

    Classifiers (correct in both): an example is better when this configuration is right on more of the seeds
    than the control, worse in the reverse case; the exact two-sided sign test on those counts (McNemar's exact
    test when there is one seed); a generation task scored by exact match has `correct` too. Generated text scored
    otherwise (a `score` per example, e.g. ROUGE-L): better when higher, the Wilcoxon signed-rank test over the
    examples. Otherwise: the per-example mean losses, better when lower, and the Wilcoxon signed-rank test. The test covers which examples were drawn, not the training seeds' spread
    (p_vs_control covers that). Returns examples_test, examples_paired (distinct examples), examples_better,
    examples_worse and p_examples_vs_control; every value None / NaN when nothing pairs."""
    if pairs.empty:
        return {"examples_test": None, "examples_paired": None, "examples_better": None, "examples_worse": None,
                "p_examples_vs_control": math.nan}
    per_example = pairs.drop(columns="seed").groupby("index").mean()  # (examples, columns): means over the seeds
    if "correct" in per_example:
        lead = (per_example["correct"] - per_example["correct_control"]).to_numpy(float)  # (examples,) in [-1, 1]
        better, worse = int((lead > 0).sum()), int((lead < 0).sum())
        test, p = MCNEMAR, mcnemar_p(better, worse)
    elif "score" in per_example:  # generated text: the headline metric per example (e.g. ROUGE-L), higher is better
        score, control = per_example["score"].to_numpy(float), per_example["score_control"].to_numpy(float)  # (examples,)
        better, worse = int((score > control).sum()), int((score < control).sum())
        test, p = WILCOXON, wilcoxon_p(score, control)
    else:
        loss, control = per_example["loss"].to_numpy(float), per_example["loss_control"].to_numpy(float)  # (examples,)
        better, worse = int((loss < control).sum()), int((loss > control).sum())
        test, p = WILCOXON, wilcoxon_p(loss, control)
    return {"examples_test": test, "examples_paired": len(per_example), "examples_better": better,
            "examples_worse": worse, "p_examples_vs_control": p}


def _examples_or_warn(runs: dict[Any, str | Path], control: dict[Any, str | Path], label: str,
                      read: Callable[[str | Path], pd.DataFrame | None]) -> dict[str, Any]:
    """examples_vs_control for one configuration; data that does not pair with the control's leaves its columns
    empty with a warning instead of stopping the whole report."""
    try:
        return examples_vs_control(paired_examples(runs, control, read))
    except VBShareError as err:
        log.warning("%s: no per-example test against the control: %s", label, err)
        return examples_vs_control(pd.DataFrame())


# ================================================================================================ summarising
def method_rank(method: str) -> tuple[int, str]:
    """Sort order: the baselines, then the registered methods in registration order, then any other name."""
    order = [*BASELINE_ORDER, *METHODS]
    return (order.index(method), "") if method in order else (len(order), str(method))


def _control_reference(table: pd.DataFrame, control: str) -> dict[str, int]:
    """Per model: the index of the control configuration every row is compared with (most seeds; ties: the
    best mean score)."""
    reference = {}
    sign = 1.0 if higher_is_better(str(table["metric"].iloc[0])) else -1.0
    for model, group in table[table["method"] == control].groupby("model", dropna=False, sort=False):
        ranked = group.assign(score=sign * group["metric_mean"]).sort_values(["n_seeds", "score"], ascending=False)
        reference[model] = ranked.index[0]
    return reference


def summarise(runs: pd.DataFrame, control: str = DEFAULT_CONTROL) -> pd.DataFrame:
    """One row per method configuration (runs equal in every setting but the seed), for ONE task and metric.

    metric_mean / metric_std / ci95_low / ci95_high: mean_ci over the seeds' final scores (the interval is NaN
    for one seed). control / n_pairs / diff_vs_control / p_vs_control: the control method's configuration for
    the same model (most seeds, ties: best mean) and, over the seeds both ran, the mean paired difference
    (this minus the control), its 95 % t-interval (diff_ci95_low / diff_ci95_high; NaN below 2 pairs) and
    the paired t-test's two-sided p (NaN for the control itself, fewer than 2 shared seeds, or constant
    differences). examples_test / examples_paired / examples_better / examples_worse / p_examples_vs_control:
    the per-example test against the same control configuration (examples_vs_control over paired_examples: the
    test examples, each averaged over the shared seeds, from runs scored on test that kept predictions.jsonl;
    empty otherwise, for the control itself, and, with a warning, for data that does not pair with the
    control's). stored_params, adapter_bytes, wall_time_s, peak_memory_mb: means over seeds;
    pct_of_control: stored parameters as % of the control's. Ordered by method (baselines, then the registry),
    then stored parameters.
    """
    if runs.empty:
        raise VBShareError("no runs to summarise")
    groups = split_groups(runs)
    if len(groups) > 1:
        found = ", ".join(f"{task}/{metric} ({len(g)} runs)" for (task, metric), g in groups.items())
        raise VBShareError(f"these runs mix tasks or metrics ({found}); summarise one group at a time "
                           "(vbshare.report.split_groups) or use write_report, which writes one table per group")
    rows, seed_scores, test_runs = [], [], []
    for key, group in runs.groupby("config_key", sort=False):
        first = group.iloc[0]
        scores = group.groupby("seed", dropna=False)["metric_value"].mean()  # seed -> score
        scored = group[group["split"] == "test"].dropna(subset=["seed"]).sort_values("run_dir")
        scored = scored.drop_duplicates("seed")  # a seed run twice: its first run's examples
        test_runs.append(dict(zip(scored["seed"], scored["run_dir"])))  # seed -> run directory with test predictions
        mean, std, low, high = mean_ci(scores.to_numpy(float))
        ranks, merges = group["retained_rank"].dropna(), group["merges"].dropna()
        rows.append({
            "method": first["method"], "label": first["label"], "model": first["model"], "task": first["task"],
            "metric": first["metric"], "higher_is_better": higher_is_better(str(first["metric"])),
            "size_key": first["size_key"], "size": first["size"], "n_seeds": int(len(scores)),
            "seeds": ",".join(str(s) for s in sorted(scores.index.dropna().tolist())),
            "metric_mean": mean, "metric_std": std, "ci95_low": low, "ci95_high": high,
            "stored_params": float(group["stored_params"].mean()),
            "trainable_params": float(pd.to_numeric(group["trainable_params"]).mean()),
            "head_params": float(pd.to_numeric(group["head_params"]).fillna(0).mean()),
            "adapter_bytes": _mean(group["adapter_bytes"]),
            "wall_time_s": _mean(group["wall_time_s"]),
            "peak_memory_mb": _mean(group["peak_memory_mb"]),
            "retained_rank": float(ranks.mean()) if len(ranks) else math.nan,
            "merges": float(merges.mean()) if len(merges) else math.nan,
            "config_key": key,
        })
        seed_scores.append(scores)
    table = pd.DataFrame(rows)
    reference = _control_reference(table, control)
    against = []
    read = functools.cache(read_predictions)  # each run's predictions.jsonl parsed once (the control's serve every row)
    for i in table.index:
        ref = reference.get(table.at[i, "model"])
        shared = [] if ref is None or ref == i else sorted(set(seed_scores[i].index) & set(seed_scores[ref].index))
        values = seed_scores[i].reindex(shared).to_numpy(float)  # (pairs,)
        controls = seed_scores[ref].reindex(shared).to_numpy(float) if shared else np.array([])  # (pairs,)
        against.append({
            "control": None if ref is None else table.at[ref, "label"],
            "pct_of_control": 100.0 * table.at[i, "stored_params"] / table.at[ref, "stored_params"]
            if ref is not None and table.at[ref, "stored_params"] else math.nan,
            "n_pairs": len(shared),
            "diff_vs_control": float((values - controls).mean()) if shared else math.nan,
            # the 95 % t-interval of the paired difference: what "within x of the control" claims are judged by
            **dict(zip(("diff_ci95_low", "diff_ci95_high"),
                       mean_ci(values - controls)[2:] if shared else (math.nan, math.nan))),
            "p_vs_control": paired_p(values, controls) if shared else math.nan,
            **_examples_or_warn(test_runs[i], test_runs[ref] if shared else {}, table.at[i, "label"], read),
        })
    table = pd.concat([table, pd.DataFrame(against, index=table.index)], axis=1)
    for column in ("examples_paired", "examples_better", "examples_worse"):
        table[column] = table[column].astype("Int64")  # counts; <NA> (an empty cell in the CSV) without pairs

    def rank(i: int) -> tuple:  # method order, stored parameters, then the label with numbers compared as numbers
        pieces = re.split(r"(-?\d+(?:\.\d+)?(?:e-?\d+)?)", str(table.at[i, "label"]))
        natural = tuple((0, float(x), "") if n % 2 else (1, 0.0, x) for n, x in enumerate(pieces) if x)
        return method_rank(table.at[i, "method"]), table.at[i, "stored_params"], natural

    table = table.loc[sorted(table.index, key=rank)].reset_index(drop=True)
    return table[SUMMARY_COLUMNS]


def _mean(column: pd.Series) -> float:
    values = pd.to_numeric(column)
    return float(values.mean()) if values.notna().any() else math.nan


def pareto_front(table: pd.DataFrame) -> pd.Series:
    """True for the configurations no other one beats: none has ≤ stored parameters and a ≥ metric mean
    (≤ for perplexity / loss) with at least one of the two strictly better."""
    sign = 1.0 if higher_is_better(str(table["metric"].iloc[0])) else -1.0
    params, score = table["stored_params"].to_numpy(float), sign * table["metric_mean"].to_numpy(float)
    front = []
    for i in range(len(table)):
        dominated = any(params[j] <= params[i] and score[j] >= score[i] and (params[j] < params[i] or score[j] > score[i])
                        for j in range(len(table)) if j != i)
        front.append(not dominated)
    return pd.Series(front, index=table.index, name="pareto")


# ========================================================================================= sparsifying stages
def stage_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run and sparsifying stage (summary.json's sparsify.stages, `trainer.sparsify`); empty when no
    run went through stages.

    Columns: label (the run's configuration), method, seed, stage (0: the dense training), knob (`lambda`, or
    `xi` for SoRA's threshold=constant) and lam (its value in the stage), retained_rank (kept rank-one
    components, summed over the adapted modules), r_max (per module), nonzero_params, metric (the task's),
    generalisation (that metric on the held-out split: validation, else the first evaluation split) and
    memorisation (on the fixed training subset) after the stage, run_dir. Ordered like the report's table, then
    by seed and stage."""
    rows = []
    for _, run in runs.iterrows():
        metric = str(run["metric"])
        knob = "xi" if run["hparams"].get("threshold") == "constant" else "lambda"
        for record in run["stages"] or []:
            rows.append({"label": run["label"], "method": run["method"], "seed": run["seed"],
                         "stage": record.get("stage"), "knob": knob, "lam": record.get("lam"),
                         "retained_rank": record.get("retained_rank"), "r_max": record.get("r_max"),
                         "nonzero_params": record.get("nonzero_params"), "metric": metric,
                         "generalisation": record.get(f"generalisation_{metric}", math.nan),
                         "memorisation": record.get(f"memorisation_{metric}", math.nan), "run_dir": run["run_dir"]})
    if not rows:
        return pd.DataFrame(columns=STAGE_COLUMNS)
    table = pd.DataFrame(rows, columns=STAGE_COLUMNS)

    def rank(i: int) -> tuple:
        seed = table.at[i, "seed"]
        return (method_rank(table.at[i, "method"]), str(table.at[i, "label"]), pd.isna(seed),
                0 if pd.isna(seed) else seed, table.at[i, "stage"])

    order = sorted(table.index, key=rank)
    return table.loc[order].reset_index(drop=True)


# ================================================================================================== plotting
def _figure(figsize: tuple[float, float]) -> tuple[Figure, Any]:
    """A figure with one axes, outside pyplot: files only, and a notebook's own backend is left alone."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)  # an off-screen canvas of its own (text extents for label placement, savefig)
    return fig, fig.subplots()


def _direction(metric: str) -> str:
    """Which way `metric` is better, "higher" or "lower", for axis labels and captions."""
    return "higher" if higher_is_better(metric) else "lower"


def _save(fig: Figure, path: str | Path) -> Path:
    """Render the figure as PNG and write it atomically (a reader never sees half a plot)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write(path, buffer.getvalue())
    return Path(path)


def _ci_errors(table: pd.DataFrame) -> np.ndarray:
    """(2, N) distances from the mean to the CI ends; 0 where the interval is undefined (one seed)."""
    below = (table["metric_mean"] - table["ci95_low"]).fillna(0.0).to_numpy(float)
    above = (table["ci95_high"] - table["metric_mean"]).fillna(0.0).to_numpy(float)
    return np.stack([below, above])  # (2, N)


def _metric_axis_label(table: pd.DataFrame) -> str:
    metric = str(table["metric"].iloc[0])
    direction = _direction(metric)
    return f"{metric} ({direction} is better; mean, 95 % CI)"


def _colours(table: pd.DataFrame, key: str = "method") -> dict[str, str]:
    """One colour per value of `key` (a method, or a configuration's label), in order of appearance."""
    return {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(table[key]))}


def _place_labels(fig, texts: list) -> None:
    """Move point labels up, one label height at a time, until none overlaps an earlier one (display space)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    placed = []
    for text in texts:
        box = text.get_window_extent(renderer)
        while any(box.overlaps(other) for other in placed):
            dx, dy = text.xyann  # offset from the point, in points
            text.xyann = (dx, dy + box.height * POINTS_PER_INCH / fig.dpi)
            box = text.get_window_extent(renderer)
        placed.append(box)


def pareto_plot(table: pd.DataFrame, path: str | Path) -> Path:
    """Metric (mean, 95 % CI) against stored parameters on a log axis, one line per method through its sizes.

    A configuration storing 0 parameters (head-only) has no place on a log axis: it is a horizontal line at its
    mean with its CI as a band, labelled "0 stored". The Pareto front of the other configurations is dashed."""
    colours = _colours(table)
    positive = table[table["stored_params"] > 0]
    fig, ax = _figure((8.5, 5.5))
    for _, row in table[table["stored_params"] <= 0].iterrows():
        colour = colours[row["method"]]
        ax.axhline(row["metric_mean"], color=colour, ls=":", lw=1.5, label=f"{row['label']} (0 stored)")
        if not math.isnan(row["ci95_low"]):
            ax.axhspan(row["ci95_low"], row["ci95_high"], color=colour, alpha=0.12)
    texts = []
    for method, group in positive.groupby("method", sort=False):
        group = group.sort_values("stored_params")
        sized = len(group) > 1 and group["size_key"].nunique() == 1 and group["size"].map(_format).is_unique
        name = f"{method} ({group['size_key'].iloc[0]})" if sized else str(method)
        ax.errorbar(group["stored_params"], group["metric_mean"], yerr=_ci_errors(group), fmt="o-", capsize=3,
                    color=colours[method], label=name)
        if len(group) > 1:  # the legend names the method (and its size knob); each point says its size
            for _, row in group.iterrows():
                text = _format(row["size"]) if sized else row["label"][len(str(method)):].strip()
                texts.append(ax.annotate(text, (row["stored_params"], row["metric_mean"]), textcoords="offset points",
                                         xytext=(5, 4), fontsize=7, color=colours[method]))
    if len(positive):
        front = pareto_front(positive)
        on_front = positive[front].sort_values("stored_params")
        ax.plot(on_front["stored_params"], on_front["metric_mean"], "k--", lw=0.8, alpha=0.6, label="Pareto front")
        ax.set_xscale("log")
    ax.set_xlabel("stored parameters (log scale)")
    ax.set_ylabel(_metric_axis_label(table))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _place_labels(fig, texts)
    return _save(fig, path)


def bar_plot(table: pd.DataFrame, path: str | Path) -> Path:
    """One bar per configuration from 0: metric mean with its 95 % CI (none drawn for a single seed)."""
    fig, ax = _figure((max(6.0, 0.7 * len(table) + 2), 4.5))
    colours = _colours(table)
    ax.bar(range(len(table)), table["metric_mean"], yerr=_ci_errors(table), capsize=3,
           color=[colours[m] for m in table["method"]])
    ax.set_xticks(range(len(table)), table["label"], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(bottom=0.0)
    ax.set_ylabel(_metric_axis_label(table))
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def validation_curve(run_dirs: Iterable[str | Path], metric: str) -> pd.Series:
    """Validation `metric` per step (mean over the runs that logged it) from the runs' metrics.jsonl."""
    rows = []
    for run_dir in run_dirs:
        path = Path(run_dir) / METRICS
        if path.is_file():
            rows += [{"step": r["step"], "value": r[metric]} for r in read_jsonl(path)
                     if r.get("split") == "validation" and metric in r]
    if not rows:
        return pd.Series(dtype=float)
    return pd.DataFrame(rows).groupby("step")["value"].mean()


def curves_plot(runs: pd.DataFrame, table: pd.DataFrame, path: str | Path) -> Path | None:
    """Validation metric against step, one line per configuration (mean over seeds); None when no run logged
    validation scores."""
    metric = str(table["metric"].iloc[0])
    colours = _colours(table)
    styles = ["-", "--", ":", "-."]
    fig, ax = _figure((8.5, 5.0))
    drawn, seen = 0, {}
    for _, row in table.iterrows():
        curve = validation_curve(runs.loc[runs["config_key"] == row["config_key"], "run_dir"], metric)
        if curve.empty:
            continue
        style = styles[seen.setdefault(row["method"], 0) % len(styles)]
        seen[row["method"]] += 1
        ax.plot(curve.index, curve.to_numpy(), style, marker=".", color=colours[row["method"]], label=row["label"])
        drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("optimiser step")
    direction = _direction(metric)
    ax.set_ylabel(f"validation {metric} ({direction} is better; mean over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def stages_plot(stages: pd.DataFrame, path: str | Path) -> Path:
    """The held-out score after each sparsifying stage against the retained rank, one line per run (stage_table's
    rows): a colour per configuration, a line style per seed, the knob's value beside the first seed's points.
    Both axes from 0 (the score's lower down when it is negative)."""
    metrics = stages["metric"].unique()
    if len(metrics) != 1:
        raise VBShareError(f"these stages mix metrics ({', '.join(map(str, metrics))}); plot one task and metric "
                           "at a time (vbshare.report.split_groups)")
    metric = str(metrics[0])
    colours, styles = _colours(stages, "label"), ["-", "--", ":", "-."]
    symbols = {"lambda": "λ", "xi": "ξ"}
    fig, ax = _figure((8.5, 5.5))
    texts, seeds_drawn = [], {}
    for (label, seed), run in stages.groupby(["label", "seed"], sort=False, dropna=False):
        run = run.sort_values("stage")
        drawn = seeds_drawn.setdefault(label, 0)
        seeds_drawn[label] += 1
        ax.plot(run["retained_rank"], run["generalisation"], styles[drawn % len(styles)], marker="o", ms=4,
                color=colours[label], label=f"{label} seed {_format(seed)}" if pd.notna(seed) else f"{label} (no seed)")
        if drawn == 0:  # the knob's values once per configuration: the seeds share the schedule
            for _, row in run[run["lam"].notna()].iterrows():
                texts.append(ax.annotate(f"{symbols.get(row['knob'], row['knob'])}={_format(float(row['lam']))}",
                                         (row["retained_rank"], row["generalisation"]), textcoords="offset points",
                                         xytext=(4, 4), fontsize=7, color=colours[label],
                                         bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8}))
    scores, ranks = pd.to_numeric(stages["generalisation"]), pd.to_numeric(stages["retained_rank"])
    low, high = (float(scores.min()), float(scores.max())) if scores.notna().any() else (0.0, 1.0)
    bottom = min(0.0, low)
    ax.set_xlim(0.0, 1.1 * float(ranks.max()) if ranks.max() > 0 else 1.0)  # room for the labels on the right
    ax.set_ylim(bottom, high + 0.1 * (high - bottom) if high > bottom else bottom + 1.0)
    ax.set_xlabel("retained rank after the stage (rank-one components kept, summed over adapted modules)")
    direction = _direction(metric)
    ax.set_ylabel(f"held-out {metric} after the stage ({direction} is better)")
    ax.set_title("Sparsifying stages: the knob rises stage by stage, the rank falls", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    _place_labels(fig, texts)
    return _save(fig, path)


# ==================================================================================================== tables
def count_text(value: float) -> str:
    """A parameter count: an integer with thousands separators, one decimal only when it is a fractional mean."""
    if math.isnan(value):
        return ""
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.1f}"


def _p_text(p: float) -> str:
    return "" if math.isnan(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def markdown_table(table: pd.DataFrame) -> str:
    metric, front = table["metric"].iloc[0], pareto_front(table)
    control = next((c for c in table["control"] if isinstance(c, str)), None)
    direction = _direction(str(metric))
    tests = set(table["examples_test"].dropna())
    examples = {MCNEMAR: "exact McNemar (sign) test on correctness, not on the metric itself",
                WILCOXON: "Wilcoxon signed-rank test on the per-example losses, not on the metric itself"}
    per_example = (f" Per-example: each test example's result averaged over the shared seeds (pairs: distinct "
                   f"examples); better / worse: examples where the configuration beats the control / the reverse; p: "
                   f"{' or '.join(examples[t] for t in sorted(tests))}." if tests else "")
    lines = [f"{table['task'].iloc[0]}, {metric} ({direction} is better); 95 % CI: t-interval over seeds; "
             f"p: paired t-test over shared seeds against {control or 'no control (none among these runs)'}."
             + per_example,
             "",
             f"| configuration | seeds | {metric} mean ± std | 95 % CI | Δ vs control [95 % CI] | p vs control | "
             "examples better / worse (pairs) | p examples | stored params | % of control | trainable params | "
             "adapter bytes | wall time (s) | peak memory (MiB) | Pareto |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |"]
    for i, row in table.iterrows():
        ci = "" if math.isnan(row["ci95_low"]) else f"[{row['ci95_low']:.4f}, {row['ci95_high']:.4f}]"
        diff = "" if math.isnan(row["diff_vs_control"]) else f"{row['diff_vs_control']:+.4f}"
        if not math.isnan(row["diff_ci95_low"]):
            diff += f" [{row['diff_ci95_low']:+.4f}, {row['diff_ci95_high']:+.4f}]"
        pct = "" if math.isnan(row["pct_of_control"]) else f"{row['pct_of_control']:.1f} %"
        wall = "" if math.isnan(row["wall_time_s"]) else f"{row['wall_time_s']:.0f}"
        memory = "" if math.isnan(row["peak_memory_mb"]) else f"{row['peak_memory_mb']:,.0f}"
        paired = "" if pd.isna(row["examples_paired"]) else \
            f"{row['examples_better']:,} / {row['examples_worse']:,} ({row['examples_paired']:,})"
        lines.append(f"| {row['label']} | {row['n_seeds']} | {row['metric_mean']:.4f} ± {row['metric_std']:.4f} | {ci} | "
                     f"{diff} | {_p_text(row['p_vs_control'])} | {paired} | {_p_text(row['p_examples_vs_control'])} | "
                     f"{count_text(row['stored_params'])} | {pct} | "
                     f"{count_text(row['trainable_params'])} | {count_text(row['adapter_bytes'])} | {wall} | {memory} | "
                     f"{'✓' if front[i] else ''} |")
    return "\n".join(lines) + "\n"


def write_report(runs: pd.DataFrame, out: str | Path, control: str = DEFAULT_CONTROL) -> list[Path]:
    """report.md, report.csv, pareto.png, bars.png and curves.png in `out`, plus stages.csv and
    sparsity_stages.png when some run went through sparsifying stages; with several (task, metric) groups, the
    same set in one sub-folder `<task>-<metric>` per group. Returns the files written."""
    out = Path(out)
    groups = split_groups(runs)
    written = []
    for (task, metric), group in groups.items():
        folder = out if len(groups) == 1 else out / f"{task}-{metric}"
        folder.mkdir(parents=True, exist_ok=True)
        table = summarise(group, control)
        atomic_write(folder / "report.md", markdown_table(table).encode())
        csv = table.assign(pareto=pareto_front(table)).drop(columns="config_key").to_csv(index=False)
        atomic_write(folder / "report.csv", csv.encode())
        written += [folder / "report.md", folder / "report.csv", pareto_plot(table, folder / "pareto.png"),
                    bar_plot(table, folder / "bars.png")]
        curves = curves_plot(group, table, folder / "curves.png")
        written += [curves] if curves else []
        stages = stage_table(group)
        if len(stages):
            atomic_write(folder / "stages.csv", stages.to_csv(index=False).encode())
            written += [folder / "stages.csv", stages_plot(stages, folder / "sparsity_stages.png")]
        else:  # an earlier report into this folder may have had stages: do not leave them beside this one
            for stale in ("stages.csv", "sparsity_stages.png"):
                (folder / stale).unlink(missing_ok=True)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vbshare.report", description=__doc__.split("\n")[0])
    parser.add_argument("root", help="a comparison or sweep folder, or any folder holding run directories")
    parser.add_argument("--out", help="where to write the report (default <root>/report)")
    parser.add_argument("--split", choices=["test", "validation"], help="score split (default: test, else validation)")
    parser.add_argument("--control", default=DEFAULT_CONTROL, help="method of the paired test's reference runs")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.root) / "report"
    try:
        runs = collect_runs(args.root, args.split)
        written = write_report(runs, out, args.control)
    except VBShareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        if path.name == "report.md":
            print(path.read_text())
    groups = split_groups(runs)
    configs = sum(runs.loc[g.index, "config_key"].nunique() for g in groups.values())
    where = out if len(groups) == 1 else f"{out} (one folder per task and metric: {len(groups)})"
    print(f"{len(runs)} runs, {configs} configurations; report.md, report.csv and plots in {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
