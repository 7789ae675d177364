"""What a task is: `Split` (one split's raw examples) and `Task` (the splits, the model kind and the metric)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from ..errors import VBShareError


@dataclass
class Split:
    """One split's raw examples: text (and optional second text) with an int label (float for regression),
    or, for instruction data, one chat per example in `messages` (a list of {"role", "content"} dicts whose
    "assistant" turns are the targets; `text` is then empty)."""

    text: list[str] = field(default_factory=list)
    label: list[Any] = field(default_factory=list)
    text_pair: list[str] | None = None
    messages: list[list[dict[str, str]]] | None = None

    def __len__(self) -> int:
        return len(self.messages) if self.messages is not None else len(self.text)

    def take(self, indices: Iterable[int]) -> "Split":
        """The examples at these indices, in the order given."""
        keep = list(indices)
        pick = lambda values: None if values is None else [values[i] for i in keep]  # noqa: E731
        return Split(pick(self.text) if self.text else [], pick(self.label) if self.label else [],
                     pick(self.text_pair), pick(self.messages))

    def sample(self, n: int, seed: int = 0) -> "Split":
        """n examples drawn without replacement by a seeded shuffle (kept in their original order)."""
        if n >= len(self):
            return self
        return self.take(sorted(np.random.default_rng(seed).permutation(len(self))[:n].tolist()))

    def per_class(self, n: int, seed: int) -> "Split":
        """Exactly n examples of every label, each class drawn by a seeded shuffle (kept in original order)."""
        if not self.label:
            raise VBShareError("data.train_per_class needs labelled examples; leave it null for this data")
        if n < 1:
            raise VBShareError(f"data.train_per_class must be a positive integer or null, got {n!r}")
        rng = np.random.default_rng(seed)
        labels = np.asarray(self.label)
        keep: list[int] = []
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            if len(members) < n:
                raise VBShareError(f"label {label} has only {len(members)} training examples, fewer than "
                                   f"data.train_per_class={n}; use at most {len(members)}")
            keep.extend(rng.permutation(members)[:n].tolist())
        return self.take(sorted(keep))


GENERATION_METRICS = ("rouge_l", "rouge1", "rouge2", "bleu", "chrf", "exact_match")  # vbshare.train.text_metrics


@dataclass
class Decoding:
    """How a generation task is decoded and scored (vbshare.train.generation): greedy unless do_sample (then
    seeded by `seed`), at most max_new_tokens per answer, cut at the first of the `stop` strings; `metrics`
    are computed on every evaluated split, the first is the task's headline metric."""

    metrics: tuple[str, ...] = ("rouge_l", "rouge1", "rouge2", "bleu")
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ()
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.metrics, self.stop = tuple(self.metrics), tuple(self.stop)
        unknown = [m for m in self.metrics if m not in GENERATION_METRICS]
        if unknown or not self.metrics:
            raise VBShareError(f"data.metrics={list(self.metrics)} must name at least one of: {', '.join(GENERATION_METRICS)}")
        if self.max_new_tokens < 1:
            raise VBShareError(f"data.max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise VBShareError(f"sampling needs data.temperature > 0 and 0 < data.top_p <= 1; got {self.temperature}, "
                               f"{self.top_p}")


@dataclass
class Task:
    """kind: "classification" or "lm". metric: the headline metric ("accuracy", "f1", "mcc", "pearson",
    "perplexity", or a generation metric); higher is better except perplexity. num_labels: 1 means regression
    (GLUE STS-B). decoding: set for a generation task (instruction data whose test is the generated answer):
    its splits are chats ending on the reference answer, the loss falls on it, and every evaluated split is
    also decoded and scored by decoding.metrics."""

    name: str
    kind: str
    splits: dict[str, Split]
    metric: str
    label_names: list[str] = field(default_factory=list)
    max_length: int = 128
    packing: bool = False  # instruction data: several chats per sequence of max_length tokens
    chat_template: bool = True  # instruction data: render chats with the tokenizer's template when it has one
    decoding: Decoding | None = None  # generation tasks only

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def eval_splits(self) -> list[str]:
        """Splits with labels to evaluate on at the end (GLUE test labels are hidden)."""
        return [s for s in ("validation", "test") if s in self.splits and len(self.splits[s])]
