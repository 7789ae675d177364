"""report.md (the table as Markdown, with a caption saying what each test is) and write_report, which writes the
whole report of a set of runs: tables, CSVs and figures."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ..errors import VBShareError
from ..files import atomic_write
from ..metrics import TEXT_METRICS
from ..rundir import RunDir
from .examples import MCNEMAR, WILCOXON
from .plots import _direction, bar_plot, curves_plot, pareto_plot, stages_plot
from .runs import split_groups
from .table import DEFAULT_CONTROL, pareto_front, stage_table, summarise


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
                WILCOXON: (f"Wilcoxon signed-rank test on each example's {metric}" if metric in TEXT_METRICS else
                           "Wilcoxon signed-rank test on the per-example losses, not on the metric itself")}
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
        spread = f" ± {row['metric_std']:.4f}" if row["n_seeds"] > 1 else ""  # one seed: no spread to show
        lines.append(f"| {row['label']} | {row['n_seeds']} | {row['metric_mean']:.4f}{spread} | {ci} | "
                     f"{diff} | {_p_text(row['p_vs_control'])} | {paired} | {_p_text(row['p_examples_vs_control'])} | "
                     f"{count_text(row['stored_params'])} | {pct} | "
                     f"{count_text(row['trainable_params'])} | {count_text(row['adapter_bytes'])} | {wall} | {memory} | "
                     f"{'✓' if front[i] else ''} |")
    return "\n".join(lines) + "\n"


def reference_score(run_dir: str | Path, task: str, metric: str, split: str) -> float | None:
    """A reference run's final `split` score on `metric`, when that run scored `task` (else None): e.g. the
    untrained model, scored by a run that trained nothing (docs/comparing.md)."""
    summary = RunDir(run_dir).read_summary()
    if summary.get("task") != task:
        return None
    value = summary.get("final", {}).get(split, {}).get(metric)
    if not isinstance(value, (int, float)):
        raise VBShareError(f"the reference run {run_dir} has no final {split} {metric} in its summary.json; give a "
                           f"finished run of {task} scored on {split}")
    return float(value)


def write_report(runs: pd.DataFrame, out: str | Path, control: str = DEFAULT_CONTROL,
                 references: dict[str, str | Path] | None = None) -> list[Path]:
    """report.md, report.csv, pareto.png, bars.png and curves.png in `out`, plus stages.csv and
    sparsity_stages.png when some run went through sparsifying stages; with several (task, metric) groups, the
    same set in one sub-folder `<task>-<metric>` per group. `references` ({label: run folder}) are finished runs
    whose score (same task, metric and split as a group's) is drawn as a line on that group's plots and listed under
    its table; one that matches no group is refused. Returns the files written."""
    out = Path(out)
    groups = split_groups(runs)
    written = []
    unmatched = set(references or {})
    for (task, metric), group in groups.items():
        folder = out if len(groups) == 1 else out / f"{task}-{metric}"
        folder.mkdir(parents=True, exist_ok=True)
        table = summarise(group, control)
        split = str(group["split"].mode().iloc[0])  # the split the group's scores come from (test unless none has it)
        lines = {}
        for label, run_dir in (references or {}).items():
            value = reference_score(run_dir, task, metric, split)
            if value is not None:
                lines[label] = value
                unmatched.discard(label)
        text = markdown_table(table) + "".join(f"\nReference: {label}, {metric} = {value:.4f}.\n"
                                               for label, value in lines.items())
        atomic_write(folder / "report.md", text.encode())
        csv = table.assign(pareto=pareto_front(table)).drop(columns="config_key").to_csv(index=False)
        atomic_write(folder / "report.csv", csv.encode())
        written += [folder / "report.md", folder / "report.csv", pareto_plot(table, folder / "pareto.png", lines),
                    bar_plot(table, folder / "bars.png", lines)]
        curves = curves_plot(group, table, folder / "curves.png")
        written += [curves] if curves else []
        stages = stage_table(group)
        if len(stages):
            atomic_write(folder / "stages.csv", stages.to_csv(index=False).encode())
            written += [folder / "stages.csv", stages_plot(stages, folder / "sparsity_stages.png")]
        else:  # an earlier report into this folder may have had stages: do not leave them beside this one
            for stale in ("stages.csv", "sparsity_stages.png"):
                (folder / stale).unlink(missing_ok=True)
    if unmatched:
        label = sorted(unmatched)[0]
        raise VBShareError(f"the reference {label}={references[label]} scored another task than these runs "
                           f"({', '.join(sorted({t for t, _ in groups}))}); give a run of the same task")
    return written

