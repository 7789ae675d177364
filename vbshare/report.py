"""`python -m vbshare.report <sweep or runs dir>`: the side-by-side table and plots of finished runs.

Reads only what every run directory holds (summary.json and config.yaml, written by vbshare.train), so it
works on runs made on another machine. Writes, into `--out` (default <dir>/report):
  report.md / report.csv  one row per method configuration: metric mean ± std over seeds, stored parameters,
                          % of LoRA's stored parameters, adapter bytes, wall time
  pareto.png              metric against stored parameters (log axis), Pareto front highlighted
  bars.png                the metric per method configuration, with the spread over seeds

Python API (used by the notebooks): collect_runs(root) -> one row per run; summarise(runs) -> one row per
method configuration; pareto_front(table) -> bool mask; pareto_plot(table, path); bar_plot(table, path).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import yaml

from .errors import VBShareError
from .records import flatten
from .train.metrics import higher_is_better

SUMMARY, CONFIG = "summary.json", "config.yaml"
# Trainer settings that define a configuration (runs differing only in seed are pooled; threads, device,
# progress bars and checkpoints do not change what is trained).
TRAINER_KEYS = ("max_steps", "batch_size", "max_examples")
NO_STORED_PARAMS_X = 1.0  # where head-only (0 stored parameters) sits on the log axis
SUMMARY_COLUMNS = ["method", "label", "model", "task", "metric", "n_seeds", "seeds", "metric_mean", "metric_std",
                   "stored_params", "pct_of_lora", "trainable_params", "head_params", "adapter_bytes",
                   "wall_time_s", "retained_rank", "merges", "config_key"]


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


def _run_row(run_dir: Path, split: str | None) -> dict[str, Any]:
    summary = json.loads((run_dir / SUMMARY).read_text())
    config = yaml.safe_load((run_dir / CONFIG).read_text()) if (run_dir / CONFIG).is_file() else {}
    config = config or {}
    trainer = config.get("trainer") or {}
    hyper = summary.get("hyperparameters") or {}
    used_split, value = _headline(summary, split)
    identity = {
        "method": summary.get("method"), "model": summary.get("model"), "task": summary.get("task"),
        "hyperparameters": {k: v for k, v in hyper.items() if k != "targets"},
        "targets": hyper.get("targets"),
        "trainer": {k: trainer.get(k) for k in TRAINER_KEYS},
        "data": {k: v for k, v in (config.get("data") or {}).items() if k != "_target_"},
        "full_finetune_lr": (config.get("optim") or {}).get("full_finetune_lr")
        if summary.get("method") == "full_finetune" else None,
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
        "stored_params": float(summary.get("stored_parameters") or 0),
        "trainable_params": summary.get("trainable_parameters"),
        "head_params": summary.get("head_parameters"),
        "adapter_bytes": summary.get("adapter_bytes"),
        "wall_time_s": summary.get("wall_time_s"),
        "steps": summary.get("steps"),
        "retained_rank": _retained_rank(sharing),
        "merges": sharing.get("merges") if isinstance(sharing, dict) else None,
        "hparams": flatten(identity["hyperparameters"]),
        "config_key": json.dumps(identity, sort_keys=True, default=str),
    }


def collect_runs(root: str | Path, split: str | None = None) -> pd.DataFrame:
    """One row per finished run (a folder holding summary.json) anywhere under `root`, sorted by folder.

    Columns: run_dir, method, model, task, metric, split, metric_value, seed, stored_params, trainable_params,
    head_params, adapter_bytes, wall_time_s, steps, retained_rank, merges, hparams (dict), config_key (every
    setting but the seed), label (method plus the hyperparameters that vary between its configurations).
    """
    root = Path(root)
    if not root.is_dir():
        raise VBShareError(f"{root} is not a folder; give a sweep or runs folder (e.g. multirun/compare/...)")
    run_dirs = sorted({p.parent for p in root.rglob(SUMMARY)})
    if not run_dirs:
        raise VBShareError(f"no finished runs under {root}: no {SUMMARY} found (runs still going, or the wrong folder?)")
    rows = []
    for run_dir in run_dirs:
        try:
            rows.append(_run_row(run_dir, split))
        except (OSError, ValueError, yaml.YAMLError) as err:
            raise VBShareError(f"cannot read the run in {run_dir}: {err}") from None
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
    """`method` alone when a method has one configuration, else `method k=v ...` over the keys that differ
    between its configurations (e.g. `vblora r=2 num_vectors=64`, `aslora pairing=random`)."""
    labels = []
    for _, row in runs.iterrows():
        same = runs[runs["method"] == row["method"]]
        configs = same.drop_duplicates("config_key")
        keys: set[str] = set()
        if len(configs) > 1:
            all_keys = set().union(*(h.keys() for h in configs["hparams"]))
            keys = {k for k in all_keys if len({_format(h.get(k)) for h in configs["hparams"]}) > 1}
        parts = [f"{k.rsplit('.', 1)[-1] if not k.startswith('lr.') else k}={_format(row['hparams'].get(k))}"
                 for k in sorted(keys)]
        if len(configs) > 1 and not parts:  # differ outside the hyperparameters (model, steps, data...)
            for other in ("model", "task"):
                if configs[other].nunique() > 1:
                    parts.append(f"{other}={row[other]}")
            if not parts:
                parts.append(f"config {list(configs['config_key']).index(row['config_key']) + 1}")
        labels.append(" ".join([str(row["method"]), *parts]))
    return labels


# ================================================================================================ summarising
def _lora_reference(table: pd.DataFrame) -> dict[tuple[str, str], float]:
    """Stored parameters of LoRA per (model, task): the LoRA configuration with most seeds (ties: the largest)."""
    reference = {}
    lora = table[table["method"] == "lora"]
    for (model, task), group in lora.groupby(["model", "task"], dropna=False):
        best = group.sort_values(["n_seeds", "stored_params"], ascending=False).iloc[0]
        reference[(model, task)] = float(best["stored_params"])
    return reference


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per method configuration (runs equal in every setting but the seed).

    metric_mean / metric_std: mean and sample standard deviation (ddof=1; 0 for a single seed) of the final
    test metric over seeds; stored_params, adapter_bytes, wall_time_s: means over seeds; pct_of_lora: stored
    parameters as % of LoRA's for the same model and task (NaN without a LoRA run). Ordered by method, then
    stored parameters.
    """
    if runs.empty:
        raise VBShareError("no runs to summarise")
    rows = []
    for key, group in runs.groupby("config_key", sort=False):
        values = group["metric_value"].astype(float)
        first = group.iloc[0]
        ranks = group["retained_rank"].dropna()
        merges = group["merges"].dropna()
        rows.append({
            "method": first["method"], "label": first["label"], "model": first["model"], "task": first["task"],
            "metric": first["metric"], "n_seeds": int(len(group)),
            "seeds": ",".join(str(s) for s in sorted(group["seed"].dropna().tolist())),
            "metric_mean": float(values.mean()),
            "metric_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "stored_params": float(group["stored_params"].mean()),
            "trainable_params": float(pd.to_numeric(group["trainable_params"]).mean()),
            "head_params": float(pd.to_numeric(group["head_params"]).fillna(0).mean()),
            "adapter_bytes": float(pd.to_numeric(group["adapter_bytes"]).mean())
            if group["adapter_bytes"].notna().any() else math.nan,
            "wall_time_s": float(pd.to_numeric(group["wall_time_s"]).mean()),
            "retained_rank": float(ranks.mean()) if len(ranks) else math.nan,
            "merges": float(merges.mean()) if len(merges) else math.nan,
            "config_key": key,
        })
    table = pd.DataFrame(rows)
    reference = _lora_reference(table)
    table["pct_of_lora"] = [100.0 * s / reference[(m, t)] if (m, t) in reference and reference[(m, t)] else math.nan
                            for s, m, t in zip(table["stored_params"], table["model"], table["task"])]
    order = {"head_only": 0, "full_finetune": 1, "lora": 2, "vblora": 3, "aslora": 4, "sora": 5}
    def rank(i: int) -> tuple:  # method order, then the label with its numbers compared as numbers
        pieces = re.split(r"(-?\d+(?:\.\d+)?(?:e-?\d+)?)", str(table.at[i, "label"]))
        natural = tuple((0, float(x), "") if n % 2 else (1, 0.0, x) for n, x in enumerate(pieces) if x)
        return order.get(table.at[i, "method"], 9), str(table.at[i, "method"]), natural

    table = table.loc[sorted(table.index, key=rank)].reset_index(drop=True)
    return table[SUMMARY_COLUMNS]


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


# ================================================================================================== plotting
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def pareto_plot(table: pd.DataFrame, path: str | Path) -> Path:
    """Metric mean (± std) against stored parameters on a log axis, the Pareto front joined by a line."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    front = pareto_front(table)
    x = table["stored_params"].clip(lower=NO_STORED_PARAMS_X)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for method, group in table.groupby("method", sort=False):
        ax.errorbar(x[group.index], group["metric_mean"], yerr=group["metric_std"], fmt="o", capsize=3, label=method)
    for i in table.index:
        ax.annotate(table.at[i, "label"], (x[i], table.at[i, "metric_mean"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    on_front = table[front].assign(x=x[front]).sort_values("x")
    ax.plot(on_front["x"], on_front["metric_mean"], "k--", lw=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("stored parameters (log; head-only's 0 drawn at 1)")
    ax.set_ylabel(f"{table['metric'].iloc[0]} (mean ± std over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def bar_plot(table: pd.DataFrame, path: str | Path) -> Path:
    """One bar per method configuration: metric mean with the standard deviation over seeds."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(table) + 2), 4.5))
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(table["method"]))}
    ax.bar(range(len(table)), table["metric_mean"], yerr=table["metric_std"], capsize=3,
           color=[colours[m] for m in table["method"]])
    ax.set_xticks(range(len(table)), table["label"], rotation=45, ha="right", fontsize=8)
    low = float((table["metric_mean"] - table["metric_std"]).min())
    ax.set_ylim(max(0.0, low - 0.05) if higher_is_better(str(table["metric"].iloc[0])) else 0.0, None)
    ax.set_ylabel(f"{table['metric'].iloc[0]} (mean ± std)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ==================================================================================================== tables
def markdown_table(table: pd.DataFrame) -> str:
    metric = table["metric"].iloc[0]
    front = pareto_front(table)
    lines = [f"| configuration | seeds | {metric} (mean ± std) | stored params | % of LoRA | adapter bytes | wall time (s) | Pareto |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: |"]
    for i, row in table.iterrows():
        pct = "" if math.isnan(row["pct_of_lora"]) else f"{row['pct_of_lora']:.1f} %"
        size = "" if math.isnan(row["adapter_bytes"]) else f"{row['adapter_bytes']:,.0f}"
        lines.append(f"| {row['label']} | {row['n_seeds']} | {row['metric_mean']:.4f} ± {row['metric_std']:.4f} | "
                     f"{row['stored_params']:,.0f} | {pct} | {size} | {row['wall_time_s']:.0f} | "
                     f"{'✓' if front[i] else ''} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vbshare.report", description=__doc__.split("\n")[0])
    parser.add_argument("root", help="a sweep folder (multirun/...) or any folder holding run directories")
    parser.add_argument("--out", help="where to write report.md/.csv and the plots (default <root>/report)")
    parser.add_argument("--split", choices=["test", "validation"], help="score split (default: test, else validation)")
    args = parser.parse_args(argv)
    try:
        runs = collect_runs(args.root, args.split)
        table = summarise(runs)
    except VBShareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.root) / "report"
    out.mkdir(parents=True, exist_ok=True)
    text = markdown_table(table)
    (out / "report.md").write_text(text)
    table.assign(pareto=pareto_front(table)).drop(columns="config_key").to_csv(out / "report.csv", index=False)
    pareto_plot(table, out / "pareto.png")
    bar_plot(table, out / "bars.png")
    print(text, end="")
    print(f"{len(runs)} runs, {len(table)} configurations; report.md, report.csv, pareto.png, bars.png in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
