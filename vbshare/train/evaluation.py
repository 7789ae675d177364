"""Evaluation of a split, per-example predictions, and the best score so far.

`score_split` (and `evaluate` for a run) scores one split in eval mode, in the run's precision, without touching
the RNG, and returns one row per example as well (the run's predictions file). With several processes the examples are dealt out in rounds of `eval_batch_size` per process and the outputs gathered, so
every process ends with the same scores; every process runs the same number of forward passes (one past the
end repeats a batch it discards), as a model with sharded weights requires.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..data.encoding import Encoded
from ..data.examples import Task
from ..files import atomic_write
from .. import metrics as M
from ..errors import VBShareError
from . import text_metrics
from .batches import IGNORE_INDEX, collate, forward_loss, lm_targets
from .generation import generate_split

if TYPE_CHECKING:
    from .engine import Engine
    from .run import Run


@torch.no_grad()
def score_split(model: nn.Module, task: Task, data: Encoded, engine: "Engine", batch_size: int,
                pad_id: int, tokenizer: Any = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The task's metrics on one tokenised split, and one row per example (see `prediction_rows`).

    Metrics: perplexity and mean loss (nats per target token) for a language model; accuracy, F1s, MCC or
    correlations for classification (metrics.classification_metrics); a generation task (task.decoding) adds
    the scores of the decoded answers (`score_generation`, which needs the tokenizer). `batch_size` is per
    process."""
    was_training = model.training
    model.eval()
    processes, me = engine.num_processes, engine.process_index
    rounds = math.ceil(len(data) / (batch_size * processes))
    rows: list[tuple[int, Any]] = []  # (example index, logits (C,) | (summed nll, target tokens))
    for round_no in range(rounds):
        start = (round_no * processes + me) * batch_size
        indices = range(start, min(start + batch_size, len(data)))
        keep = len(indices) > 0
        batch = collate(data, indices if keep else range(min(batch_size, len(data))), pad_id, engine.device)
        with engine.autocast():
            nll, logits = forward_loss(model, batch, task, reduction="none")
        if not keep:
            continue
        if task.kind == "lm":
            targets = lm_targets(batch)  # (B, T-1)
            per_example = nll.view_as(targets).double().sum(dim=1)  # (B,) summed nats
            counts = (targets != IGNORE_INDEX).sum(dim=1)  # (B,)
            rows.extend(zip(indices, zip(per_example.cpu().tolist(), counts.cpu().tolist())))
        else:
            rows.extend(zip(indices, logits.float().cpu().tolist()))
    model.train(was_training)
    rows = sorted(engine.gather_objects(rows))
    if task.kind == "lm":
        nll_sum = math.fsum(total for _, (total, _) in rows)
        count = sum(tokens for _, (_, tokens) in rows)
        scores = {"loss": nll_sum / max(count, 1), "perplexity": M.perplexity(nll_sum, count)}
    else:
        outputs = np.asarray([values for _, values in rows], dtype=np.float32)  # (N, C)
        scores = M.classification_metrics(outputs, np.asarray(data.labels), task.num_labels)
    predictions = prediction_rows(task, data, rows)
    if task.decoding is not None and data.prompts is not None:
        if tokenizer is None:
            raise VBShareError("scoring a generation task decodes answers and needs the tokenizer")
        generated, per_example = score_generation(model, tokenizer, task, data, engine, batch_size)
        scores.update(generated)
        for row, extra in zip(predictions, per_example):
            row.update(extra)
    return scores, predictions


def score_generation(model: nn.Module, tokenizer: Any, task: Task, data: Encoded, engine: "Engine",
                     batch_size: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Decode the split's prompts (vbshare.train.generation) and score the answers against the references:
    the split's {metric: value} of task.decoding.metrics, and per example {prompt, prediction, reference, each
    metric's value, score (the headline metric's value; higher is better), correct (exact match only)}."""
    decoding = task.decoding
    answers = generate_split(model, tokenizer, data, decoding, engine, batch_size)
    per_example = text_metrics.per_example_scores(answers, data.references, decoding.metrics)
    scores = text_metrics.corpus_scores(answers, data.references, per_example, decoding.metrics)
    rows = []
    for prompt, answer, reference, values in zip(data.prompts, answers, data.references, per_example):
        row = {"prompt": tokenizer.decode(prompt), "prediction": answer, "reference": reference, **values,
               "score": values[task.metric]}
        if task.metric == "exact_match":
            row["correct"] = bool(values["exact_match"])
        rows.append(row)
    return scores, rows


def prediction_rows(task: Task, data: Encoded, rows: list[tuple[int, Any]]) -> list[dict[str, Any]]:
    """One JSON-ready row per example, in split order:
    classification {index, label, prediction, correct, loss (cross-entropy, nats), scores (class
    probabilities)}; regression {index, label, prediction, loss (squared error)}; language model {index,
    loss (nats per target token), tokens}."""
    if task.kind == "lm":
        return [{"index": i, "loss": total / max(tokens, 1), "tokens": tokens} for i, (total, tokens) in rows]
    out = []
    for i, logits in rows:
        label = data.labels[i]
        if task.num_labels == 1:
            out.append({"index": i, "label": float(label), "prediction": logits[0],
                        "loss": (logits[0] - float(label)) ** 2})
            continue
        log_probs = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), dim=0)  # (C,)
        prediction = int(log_probs.argmax())
        out.append({"index": i, "label": int(label), "prediction": prediction, "correct": prediction == int(label),
                    "loss": -float(log_probs[int(label)]), "scores": log_probs.exp().tolist()})
    return out


def evaluate(run: "Run", split: str) -> dict[str, float]:
    """The task's metrics on one split of the run (every process takes part; all get the same scores)."""
    return evaluate_with_predictions(run, split)[0]


def evaluate_with_predictions(run: "Run", split: str) -> tuple[dict[str, float], list[dict[str, Any]]]:
    return score_split(run.model, run.task, run.data[split], run.engine, run.settings.trainer.eval_batch_size, run.pad_id,
                       run.tokenizer)


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    """A predictions file: one `prediction_rows` row per line, written atomically."""
    atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows).encode())


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
