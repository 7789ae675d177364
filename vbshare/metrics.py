"""Evaluation metrics computed from plain lists (no `evaluate` package needed), and which way each is better.
Numpy only: the training app scores with it, vbshare.report and vbshare.compare rank with it; generated text is
scored by vbshare.train.text_metrics."""
from __future__ import annotations

import math

import numpy as np


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float((pred == gold).mean())


def f1_per_class(pred: np.ndarray, gold: np.ndarray, label: int) -> float:
    tp = float(((pred == label) & (gold == label)).sum())
    fp = float(((pred == label) & (gold != label)).sum())
    fn = float(((pred != label) & (gold == label)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def macro_f1(pred: np.ndarray, gold: np.ndarray, num_labels: int) -> float:
    """Unweighted mean of the per-class F1 over every class."""
    return float(np.mean([f1_per_class(pred, gold, c) for c in range(num_labels)]))


def mcc(pred: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation (binary, as GLUE CoLA)."""
    tp = float(((pred == 1) & (gold == 1)).sum()); tn = float(((pred == 0) & (gold == 0)).sum())
    fp = float(((pred == 1) & (gold == 0)).sum()); fn = float(((pred == 0) & (gold == 1)).sum())
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else (tp * tn - fp * fn) / denom


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    if x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of the ranks (ties get their average rank)."""
    def ranks(v: np.ndarray) -> np.ndarray:
        order = v.argsort(kind="stable")
        r = np.empty(len(v)); r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):  # average rank over ties
            tie = v == value
            r[tie] = r[tie].mean()
        return r
    return pearson(ranks(x), ranks(y))


def classification_metrics(outputs: np.ndarray, gold: np.ndarray, num_labels: int) -> dict[str, float]:
    """outputs: logits (N, num_labels), or scores (N, 1) for regression. Returns every metric that applies."""
    if num_labels == 1:  # regression (STS-B)
        scores = outputs[:, 0]
        return {"pearson": pearson(scores, gold), "spearman": spearman(scores, gold)}
    pred = outputs.argmax(-1)  # (N,)
    out = {"accuracy": accuracy(pred, gold), "macro_f1": macro_f1(pred, gold, num_labels)}
    if num_labels == 2:
        out["f1"] = f1_per_class(pred, gold, 1)
        out["mcc"] = mcc(pred, gold)
    return out


def perplexity(total_nll: float, tokens: int) -> float:
    """exp of the mean next-token negative log-likelihood (nats per token)."""
    return float(math.exp(total_nll / max(tokens, 1)))


TEXT_METRICS = ("rouge_l", "rouge1", "rouge2", "bleu", "chrf")  # generated free text (vbshare.train.text_metrics)
LOWER_IS_BETTER = ("perplexity", "loss")  # every other metric is better when higher:
# accuracy, F1s, MCC, correlations, and the generation scores of vbshare.train.text_metrics (ROUGE, BLEU, chrF,
# exact match)


def higher_is_better(metric: str) -> bool:
    """The direction each metric declares: False for those in LOWER_IS_BETTER, True for the others."""
    return metric not in LOWER_IS_BETTER
