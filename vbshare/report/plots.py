"""The report's figures, drawn outside pyplot (files only; a notebook's own backend is left alone) and written
atomically as PNG."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..errors import VBShareError
from ..files import atomic_write
from ..metrics import higher_is_better
from ..rundir import RunDir
from .runs import format_value as _format
from .table import pareto_front

POINTS_PER_INCH = 72  # annotation offsets are in points, window extents in pixels (fig.dpi per inch)


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


def _reference_lines(ax, references: dict[str, float]) -> None:
    """A grey dash-dot line per reference score (e.g. the untrained model's), labelled for the legend."""
    for label, value in references.items():
        ax.axhline(value, color="0.35", ls="-.", lw=1.2, label=f"{label}: {value:.4g}")


def pareto_plot(table: pd.DataFrame, path: str | Path, references: dict[str, float] | None = None) -> Path:
    """Metric (mean, 95 % CI) against stored parameters on a log axis, one line per method through its sizes.

    A configuration storing 0 parameters (head-only) has no place on a log axis: it is a horizontal line at its
    mean with its CI as a band, labelled "0 stored". The Pareto front of the other configurations is dashed (when
    it joins two or more of them). `references` ({label: score}) are grey dash-dot lines."""
    colours = _colours(table)
    positive = table[table["stored_params"] > 0]
    fig, ax = _figure((8.5, 5.5))
    _reference_lines(ax, references or {})
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
        on_front = positive[pareto_front(positive)].sort_values("stored_params")
        if len(on_front) > 1:  # a front of one configuration is no line: the legend names only what is drawn
            ax.plot(on_front["stored_params"], on_front["metric_mean"], "k--", lw=0.8, alpha=0.6, label="Pareto front")
        ax.set_xscale("log")
    ax.set_xlabel("stored parameters (log scale)")
    ax.set_ylabel(_metric_axis_label(table))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _place_labels(fig, texts)
    return _save(fig, path)


def bar_plot(table: pd.DataFrame, path: str | Path, references: dict[str, float] | None = None) -> Path:
    """One bar per configuration from 0: metric mean with its 95 % CI (none drawn for a single seed);
    `references` ({label: score}) are grey dash-dot lines across the bars."""
    fig, ax = _figure((max(6.0, 0.7 * len(table) + 2), 4.5))
    colours = _colours(table)
    ax.bar(range(len(table)), table["metric_mean"], yerr=_ci_errors(table), capsize=3,
           color=[colours[m] for m in table["method"]])
    ax.set_xticks(range(len(table)), table["label"], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(bottom=0.0)
    if references:
        _reference_lines(ax, references)
        ax.legend(fontsize=8, loc="lower right")
    ax.set_ylabel(_metric_axis_label(table))
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def validation_curve(run_dirs: Iterable[str | Path], metric: str) -> pd.Series:
    """Validation `metric` per step (mean over the runs that logged it) from the runs' metrics logs."""
    rows = []
    for run_dir in run_dirs:
        rows += [{"step": r["step"], "value": r[metric]} for r in RunDir(run_dir).read_metrics()
                 if r.get("split") == "validation" and metric in r]
    if not rows:
        return pd.Series(dtype=float)
    return pd.DataFrame(rows).groupby("step")["value"].mean()


def curves_plot(runs: pd.DataFrame, table: pd.DataFrame, path: str | Path) -> Path | None:
    """Validation metric against step, one line per configuration (mean over seeds); None when no run logged
    validation scores. A colour per method; each line its own line style and hollow marker, half transparent, so
    configurations whose curves coincide all stay visible. Steps are whole numbers on the axis."""
    metric = str(table["metric"].iloc[0])
    colours = _colours(table)
    styles, markers = ["-", "--", ":", "-."], ["o", "s", "^", "D", "v", "P", "X"]
    fig, ax = _figure((8.5, 5.0))
    drawn = 0
    for _, row in table.iterrows():
        curve = validation_curve(runs.loc[runs["config_key"] == row["config_key"], "run_dir"], metric)
        if curve.empty:
            continue
        ax.plot(curve.index, curve.to_numpy(), styles[drawn % len(styles)], marker=markers[drawn % len(markers)],
                ms=7 - (drawn % 3), mfc="none", alpha=0.75, color=colours[row["method"]], label=row["label"])
        drawn += 1
    if not drawn:
        return None
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # optimiser steps: no fractional ticks
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

