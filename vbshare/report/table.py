"""The report's tables: one row per configuration (seed statistics, the comparison with the control, the
per-example test), the Pareto front, and one row per run and sparsifying stage."""
from __future__ import annotations

import functools
import math
import re

import numpy as np
import pandas as pd

from ..errors import VBShareError
from ..metrics import higher_is_better
from ..registry import METHODS
from ..rundir import FULL_FINETUNE, HEAD_ONLY
from .examples import examples_or_warn, read_predictions
from .runs import split_groups
from .stats import mean_ci, paired_p

DEFAULT_CONTROL = "lora"
BASELINE_ORDER = (HEAD_ONLY, FULL_FINETUNE)  # listed before the registered methods, which follow METHODS' order
SUMMARY_COLUMNS = ["method", "label", "model", "task", "metric", "higher_is_better", "size_key", "size", "n_seeds",
                   "seeds", "metric_mean", "metric_std", "ci95_low", "ci95_high", "control", "n_pairs",
                   "diff_vs_control", "diff_ci95_low", "diff_ci95_high", "p_vs_control", "examples_test",
                   "examples_paired", "examples_better", "examples_worse", "p_examples_vs_control", "stored_params",
                   "pct_of_control", "trainable_params", "head_params", "adapter_bytes", "wall_time_s",
                   "peak_memory_mb"]  # then the methods' own sharing columns, then config_key
STAGE_COLUMNS = ["label", "method", "seed", "stage", "knob", "lam", "retained_rank", "r_max", "nonzero_params",
                 "metric", "generalisation", "memorisation", "run_dir"]


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
    test examples, each averaged over the shared seeds, from runs scored on test that kept their predictions;
    empty otherwise, for the control itself, and, with a warning, for data that does not pair with the
    control's). stored_params, adapter_bytes, wall_time_s, peak_memory_mb: means over seeds;
    then one column per plain number of the methods' sharing patterns (e.g. retained_rank, merges: means over
    the seeds that report it, NaN for configurations that do not);
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
    # the methods' own numbers (runs.sharing_numbers), one column each, named as the method names them
    sharing_keys = [k for k in dict.fromkeys(k for numbers in runs["sharing"] for k in numbers)
                    if k not in SUMMARY_COLUMNS and k != "config_key"]
    rows, seed_scores, test_runs = [], [], []
    for key, group in runs.groupby("config_key", sort=False):
        first = group.iloc[0]
        scores = group.groupby("seed", dropna=False)["metric_value"].mean()  # seed -> score
        scored = group[group["split"] == "test"].dropna(subset=["seed"]).sort_values("run_dir")
        scored = scored.drop_duplicates("seed")  # a seed run twice: its first run's examples
        test_runs.append(dict(zip(scored["seed"], scored["run_dir"])))  # seed -> run directory with test predictions
        mean, std, low, high = mean_ci(scores.to_numpy(float))
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
            **{name: _mean(group["sharing"].map(lambda numbers: numbers.get(name))) for name in sharing_keys},
            "config_key": key,
        })
        seed_scores.append(scores)
    table = pd.DataFrame(rows)
    reference = _control_reference(table, control)
    against = []
    read = functools.cache(read_predictions)  # each run's predictions parsed once (the control's serve every row)
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
            **examples_or_warn(test_runs[i], test_runs[ref] if shared else {}, table.at[i, "label"], read),
        })
    table = pd.concat([table, pd.DataFrame(against, index=table.index)], axis=1)
    for column in ("examples_paired", "examples_better", "examples_worse"):
        table[column] = table[column].astype("Int64")  # counts; <NA> (an empty cell in the CSV) without pairs

    def rank(i: int) -> tuple:  # method order, stored parameters, then the label with numbers compared as numbers
        pieces = re.split(r"(-?\d+(?:\.\d+)?(?:e-?\d+)?)", str(table.at[i, "label"]))
        natural = tuple((0, float(x), "") if n % 2 else (1, 0.0, x) for n, x in enumerate(pieces) if x)
        return method_rank(table.at[i, "method"]), table.at[i, "stored_params"], natural

    table = table.loc[sorted(table.index, key=rank)].reset_index(drop=True)
    return table[SUMMARY_COLUMNS + sharing_keys + ["config_key"]]


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
    """One row per run and sparsifying stage (the summary's sparsify.stages, `trainer.sparsify`); empty when no
    run went through stages.

    Columns: label (the run's configuration), method, seed, stage (0: the dense training), knob (the
    name the method's stage record gives its sparsity knob, e.g. SoRA's `lambda` or `xi`; `knob` when the record
    names none) and lam (its value in the stage), retained_rank (kept rank-one
    components, summed over the adapted modules), r_max (per module), nonzero_params, metric (the task's),
    generalisation (that metric on the held-out split: validation, else the first evaluation split) and
    memorisation (on the fixed training subset) after the stage, run_dir. Ordered like the report's table, then
    by seed and stage."""
    rows = []
    for _, run in runs.iterrows():
        metric = str(run["metric"])
        for record in run["stages"] or []:
            rows.append({"label": run["label"], "method": run["method"], "seed": run["seed"],
                         "stage": record.get("stage"), "knob": record.get("knob", "knob"), "lam": record.get("lam"),
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

