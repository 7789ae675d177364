"""SoRA's sharing pattern: the rank each module keeps (docs/methods.md §2, §4).

Sources: the sparsifying scheduler's stage records (`<run>/sora_stages.jsonl`, written by the training app with
`+trainer/sparsify=default`, or by `vbshare.sora.sparsify(..., out=...)`; read with `vbshare.sora.read_records`),
adapter folders along a run (training form with gates in `snapshots/stage_<i>/`, or the pruned LoRA form whose
`rank_pattern` holds the ranks) and the run summary's `sharing.retained_ranks`.

Figures: the rank heatmap (modules × stages), the trade-off against λ, and score against retained rank and
against retained adapter parameters, one point per stage (`plot_score_vs_retained`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import VBShareError
from ..sora import read_records
from ..targets import layer_index
from .common import AdapterFolder, PathLike, adapter_dir, module_kind, read_adapter, short_name

STAGES_FILES = ("sora_stages.jsonl", "sparsify.jsonl")


def stage_records(source: PathLike | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Stage records from a list, a JSONL file or a run directory holding one of STAGES_FILES."""
    if not isinstance(source, (str, Path)):
        return [dict(r) for r in source]
    path = Path(source)
    if not path.exists():
        raise VBShareError(f"{path} does not exist; give SoRA stage records (a JSONL file or a run directory)")
    if path.is_dir():
        found = [path / name for name in STAGES_FILES if (path / name).is_file()]
        if not found:
            raise VBShareError(f"{path} has no SoRA stage records ({' or '.join(STAGES_FILES)}); train with "
                               "+adapter=sora +trainer/sparsify=default (or run vbshare.sora.sparsify with "
                               "out=<run>/sora_stages.jsonl)")
        path = found[0]
    return read_records(path)


def score_name(records: Sequence[Mapping[str, Any]], metric: str | None = None) -> str:
    """The metric the tables and figures show: `metric`, else the first of the records' score dicts (the
    training app puts the task metric first), else "score" for records holding plain numbers."""
    if metric is not None:
        return metric
    first = records[0].get("generalisation") if records else None
    return next(iter(first)) if isinstance(first, Mapping) and first else "score"


def _score(value: Any, metric: str | None) -> float | None:
    """A record's memorisation / generalisation: a number, or one metric of a dict of them."""
    if value is None or isinstance(value, (int, float)):
        return value
    if metric is None:
        metric = next(iter(value))
    return value.get(metric)


def stage_table(records: Sequence[Mapping[str, Any]], metric: str | None = None) -> pd.DataFrame:
    """One row per stage: stage, lam, total_steps, retained_rank, rank_fraction, nonzero_params, param_fraction,
    memorisation, generalisation and their ratios to the dense stage (`metric` picks one of a dict of scores)."""
    rows = []
    for rec in records:
        full = rec["r_max"] * len(rec["ranks"])
        mem, gen = _score(rec.get("memorisation"), metric), _score(rec.get("generalisation"), metric)
        rows.append({"stage": rec["stage"], "lam": rec["lam"], "total_steps": rec["total_steps"],
                     "retained_rank": rec["retained_rank"], "rank_fraction": rec["retained_rank"] / full if full else 0.0,
                     "nonzero_params": rec["nonzero_params"], "param_fraction": rec["param_fraction"],
                     "memorisation": mem, "generalisation": gen})
    table = pd.DataFrame(rows)
    if len(table):
        dense = table.iloc[0]
        for col in ("memorisation", "generalisation"):
            table[f"{col}_rel"] = [v / dense[col] if v is not None and dense[col] else None for v in table[col]]
    return table


def rank_table(records: Sequence[Mapping[str, Any]], by: str = "module") -> pd.DataFrame:
    """Retained rank, rows = modules (or summed per `by` = "layer" / "kind"), columns = stages."""
    data = {rec["stage"]: rec["ranks"] for rec in records}
    table = pd.DataFrame(data)  # modules x stages, in the records' module order
    table.columns.name = "stage"
    return _group_modules(table, by)


def _group_modules(table: pd.DataFrame, by: str) -> pd.DataFrame:
    if by == "module":
        return table
    if by == "short":
        table = table.copy()
        table.index = [short_name(n) for n in table.index]
        return table
    if by not in ("layer", "kind"):
        raise VBShareError(f"by must be module, short, layer or kind, got {by!r}")
    key = pd.Series([layer_index(n) if by == "layer" else module_kind(n) for n in table.index], index=table.index,
                    name=by)
    return table.groupby(key, sort=by == "layer").sum()


def ranks_of_adapter(source: PathLike | AdapterFolder) -> dict[str, int]:
    """Module -> retained rank of a SoRA adapter folder: from the gates (training form, non-zero entries) or,
    after pruning (the stored form is a LoRA), from the LoRA rank pattern (modules pruned to rank 0 are absent
    there; `rank_history` fills them with 0)."""
    folder = source if isinstance(source, AdapterFolder) else read_adapter(adapter_dir(source))
    if folder.method == "sora":
        ranks = {}
        for name in folder.targets:
            gate = folder.tensors.get(f"{name}.gate")
            if gate is None:
                raise VBShareError(f"{folder.path} has no gate for {name}")
            ranks[name] = int((gate != 0).sum())
        return ranks
    if folder.method == "lora":
        config = folder.config
        pattern = config.get("rank_pattern") or {}
        return {name: int(pattern.get(name, config["r"])) for name in folder.targets}
    raise VBShareError(f"{folder.path} holds a {folder.method} adapter; retained ranks exist for sora (and its pruned lora)")


def gate_table(source: PathLike | AdapterFolder) -> pd.DataFrame:
    """One row per (module, component) of a training-form SoRA adapter: module, short, layer, kind, component, gate."""
    folder = source if isinstance(source, AdapterFolder) else read_adapter(adapter_dir(source, ("checkpoint/adapter", "adapter")))
    if folder.method != "sora":
        raise VBShareError(f"{folder.path} holds a {folder.method} adapter; gates exist in sora's training form "
                           "(checkpoint/adapter or a snapshot)")
    rows = []
    for name in folder.targets:
        for i, g in enumerate(folder.tensors[f"{name}.gate"].float().tolist()):
            rows.append({"module": name, "short": short_name(name), "layer": layer_index(name),
                         "kind": module_kind(name), "component": i, "gate": g})
    return pd.DataFrame(rows)


def rank_history(snapshots: Sequence[tuple[int, PathLike | AdapterFolder]], by: str = "module") -> pd.DataFrame:
    """Retained rank per module (rows) at each snapshot step (columns), from `(step, adapter folder)` pairs."""
    if not snapshots:
        raise VBShareError("rank_history needs at least one (step, adapter folder) snapshot")
    table = pd.DataFrame({step: ranks_of_adapter(src) for step, src in snapshots}).fillna(0).astype(int)
    table.columns.name = "step"
    return _group_modules(table, by)


# -- figures ----------------------------------------------------------------------------------------------------
def plot_rank_heatmap(table: pd.DataFrame, r_max: int | None = None, xlabel: str | None = None,
                      title: str | None = None):
    """Modules (rows) × stages or steps (columns), coloured by the retained rank, each cell labelled."""
    from matplotlib.figure import Figure

    values = table.to_numpy(dtype=float)
    fig = Figure(figsize=(2.5 + 0.7 * table.shape[1], 1.2 + 0.28 * table.shape[0]), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values, aspect="auto", cmap="Blues", vmin=0, vmax=r_max or max(values.max(), 1),
                      interpolation="nearest")
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:g}", ha="center", va="center", fontsize=7,
                color="white" if v > 0.6 * (r_max or values.max() or 1) else "black")
    ax.set_yticks(range(table.shape[0]), [short_name(str(i)) for i in table.index], fontsize=7)
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns], fontsize=8)
    ax.set_xlabel(xlabel or str(table.columns.name or ""))
    ax.set_title(title or "SoRA: retained rank per module")
    fig.colorbar(image, ax=ax, label="retained rank")
    return fig


def plot_tradeoff(stages: pd.DataFrame, title: str | None = None):
    """Left: retained rank and non-zero parameters against λ. Right: memorisation and generalisation (relative to
    the dense stage) against the fraction of non-zero adapter parameters."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(stages["lam"], stages["rank_fraction"], marker="o", label="retained rank / r_max·modules")
    left.plot(stages["lam"], stages["param_fraction"], marker="s", label="non-zero params / dense")
    for row in stages.itertuples():
        left.annotate(f"s{row.stage}", (row.lam, row.rank_fraction), textcoords="offset points", xytext=(3, 3), fontsize=7)
    left.set_xlabel("λ of the stage")
    left.set_ylabel("fraction kept")
    left.set_ylim(-0.02, 1.05)
    left.legend(fontsize=8)
    for col, marker in (("memorisation_rel", "o"), ("generalisation_rel", "s")):
        if col in stages and stages[col].notna().any():
            right.plot(stages["param_fraction"], stages[col], marker=marker, label=col.replace("_rel", " (÷ dense)"))
    right.axhline(1.0, color="grey", lw=0.8, ls=":")
    right.invert_xaxis()
    right.set_xlabel("non-zero adapter parameters (fraction of dense) — pruning goes right")
    right.set_ylabel("score relative to the dense stage")
    right.legend(fontsize=8)
    fig.suptitle(title or "SoRA: sparsifying stages")
    return fig


def plot_score_vs_retained(stages: pd.DataFrame, metric: str = "score", title: str | None = None):
    """One point per stage, labelled with its λ: memorisation (fixed training subset) and generalisation
    (validation) against the retained rank summed over modules (left) and against the non-zero adapter
    parameters (right). Both x axes start at 0; the dotted lines are the dense stage's scores."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    scores = [c for c in ("memorisation", "generalisation") if c in stages and stages[c].notna().any()]
    for ax, x, label in ((axes[0], "retained_rank", "retained rank (sum over modules)"),
                         (axes[1], "nonzero_params", "non-zero adapter parameters")):
        for col, marker in zip(scores, ("o", "s")):
            line, = ax.plot(stages[x], stages[col], marker=marker, label=col)
            ax.axhline(stages[col].iloc[0], color=line.get_color(), lw=0.8, ls=":")
        for row in stages.itertuples():
            top = max(getattr(row, c) for c in scores) if scores else 0
            ax.annotate(f"λ={row.lam:g}", (getattr(row, x), top), textcoords="offset points", xytext=(0, 6),
                        fontsize=7, ha="center")
        ax.set_xlim(left=0, right=max(stages[x].max(), 1) * 1.08)
        ax.set_xlabel(label)
    values = stages[scores].to_numpy(dtype=float) if scores else np.zeros(1)
    if np.nanmin(values) >= 0 and np.nanmax(values) <= 1:  # a rate (accuracy, F1): the whole 0..1 scale
        axes[0].set_ylim(0, 1.08)
    axes[0].set_ylabel(metric)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title or f"SoRA: {metric} vs what each stage retains (dotted: the dense stage)")
    return fig
