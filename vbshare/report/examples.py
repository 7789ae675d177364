"""Per-example pairing: each configuration's test predictions against the control's, example by example."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from ..errors import VBShareError
from ..records import read_jsonl
from ..rundir import RunDir
from .stats import mcnemar_p, wilcoxon_p

log = logging.getLogger("vbshare.report")

MCNEMAR, WILCOXON = "mcnemar", "wilcoxon"


def read_predictions(run_dir: str | Path) -> pd.DataFrame | None:
    """The test split's per-example rows of a run (its predictions file), indexed by the example's index in the split.

    Columns, as the run wrote them: loss (classification: cross-entropy in nats; regression: squared error; language
    model: nats per target token), label and correct (classification; regression has label only), tokens (language
    model: target tokens). None when the run kept no predictions (not scored on test)."""
    path = RunDir(run_dir).predictions
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

    runs / control: {seed: run directory} of each configuration. Seeds where either run kept no predictions
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
    examples. Otherwise: the per-example mean losses, better when lower, and the Wilcoxon signed-rank test. The
    test covers which examples were drawn, not the training seeds' spread (p_vs_control covers that). Returns
    examples_test, examples_paired (distinct examples), examples_better, examples_worse and
    p_examples_vs_control; every value None / NaN when nothing pairs."""
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


def examples_or_warn(runs: dict[Any, str | Path], control: dict[Any, str | Path], label: str,
                      read: Callable[[str | Path], pd.DataFrame | None]) -> dict[str, Any]:
    """examples_vs_control for one configuration; data that does not pair with the control's leaves its columns
    empty with a warning instead of stopping the whole report."""
    try:
        return examples_vs_control(paired_examples(runs, control, read))
    except VBShareError as err:
        log.warning("%s: no per-example test against the control: %s", label, err)
        return examples_vs_control(pd.DataFrame())

