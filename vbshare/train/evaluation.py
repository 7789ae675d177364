"""Evaluation of a split and the best score so far.

`evaluate` scores one split in eval mode, in the run's precision, without touching the RNG. With several
processes the examples are dealt out in rounds of `eval_batch_size` per process and the outputs gathered, so
every process ends with the same scores; every process runs the same number of forward passes (one past the
end repeats a batch it discards), as a model with sharded weights requires.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import metrics as M
from .batches import IGNORE_INDEX, collate, forward_loss, lm_targets

if TYPE_CHECKING:
    from .run import Run


@torch.no_grad()
def evaluate(run: "Run", split: str) -> dict[str, float]:
    """The task's metrics on one split: perplexity and mean loss (nats per target token) for a language
    model; accuracy, F1s, MCC or correlations for classification (metrics.classification_metrics)."""
    model, task, data, engine = run.model, run.task, run.data[split], run.engine
    was_training = model.training
    model.eval()
    size, processes, me = run.cfg.trainer.eval_batch_size, engine.num_processes, engine.process_index
    rounds = math.ceil(len(data) / (size * processes))
    rows: list[tuple[int, list[float]]] = []  # (example index, its outputs) for classification
    total_nll = torch.zeros((), dtype=torch.float64, device=engine.device)
    tokens = torch.zeros((), dtype=torch.float64, device=engine.device)
    for round_no in range(rounds):
        start = (round_no * processes + me) * size
        indices = range(start, min(start + size, len(data)))
        keep = len(indices) > 0
        batch = collate(data, indices if keep else range(min(size, len(data))), run.pad_id, engine.device)
        with engine.autocast():
            nll, logits = forward_loss(model, batch, task, reduction="sum")
        if not keep:
            continue
        if task.kind == "lm":
            total_nll += nll.double()
            tokens += (lm_targets(batch) != IGNORE_INDEX).sum()
        else:
            rows.extend(zip(indices, logits.float().cpu().tolist()))
    model.train(was_training)
    if task.kind == "lm":
        total_nll, tokens = engine.sum_over_processes(total_nll), engine.sum_over_processes(tokens)
        nll_sum, count = float(total_nll), int(tokens)
        return {"loss": nll_sum / max(count, 1), "perplexity": M.perplexity(nll_sum, count)}
    rows = sorted(engine.gather_objects(rows))
    outputs = np.asarray([values for _, values in rows], dtype=np.float32)  # (N, C)
    return M.classification_metrics(outputs, np.asarray(data.labels), task.num_labels)


def update_best(run: "Run", scores: dict[str, float]) -> None:
    metric = run.task.metric
    if metric not in scores:
        return
    better = M.higher_is_better(metric)
    best = run.best
    if best is None or (scores[metric] > best[metric] if better else scores[metric] < best[metric]):
        run.best = {"step": run.step, "split": "validation", **scores}


def format_scores(scores: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in scores.items())
