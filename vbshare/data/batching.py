"""Padded batches from tokenised splits: `collate` (used by the training app) and `batches` (the public way
to get training or evaluation batches of a task in a few lines, ready for `model(**batch)`).

    task = vbshare.data.tasks.bbc_news(max_length=64)
    for batch in vbshare.data.batches(task, tokenizer, batch_size=16, steps=30):
        loss = model(**batch).loss
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from .chat import IGNORE_INDEX
from .encoding import Encoded, tokenize_task
from .examples import Task


def collate(split: Encoded, indices: list[int] | Tensor | range, pad_id: int, device: torch.device | str) -> dict[str, Tensor]:
    """Right-pad the chosen examples to the longest one: input_ids / attention_mask (B, T), labels (B,);
    for instruction data also lm_labels (B, T), padded with IGNORE_INDEX (the training loop's LM targets;
    not a model argument)."""
    rows = [split.input_ids[int(i)] for i in indices]
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
        mask[b, :len(row)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if split.token_type_ids is not None:
        types = torch.zeros_like(ids)  # (B, T)
        for b, i in enumerate(indices):
            row = split.token_type_ids[int(i)]
            types[b, :len(row)] = torch.tensor(row)
        batch["token_type_ids"] = types
    if split.lm_labels is not None:
        targets = torch.full_like(ids, IGNORE_INDEX)  # (B, T)
        for b, i in enumerate(indices):
            row = split.lm_labels[int(i)]
            targets[b, :len(row)] = torch.tensor(row)
        batch["lm_labels"] = targets
    if split.labels is not None:
        labels = [split.labels[int(i)] for i in indices]
        batch["labels"] = torch.tensor(labels, dtype=torch.float if isinstance(labels[0], float) else torch.long)
    return {k: v.to(device) for k, v in batch.items()}


def model_inputs(batch: dict[str, Tensor], task: Task) -> dict[str, Tensor]:
    """A collated batch as transformers models take it: for LM tasks `labels` (B, T) are the token targets
    (lm_labels, else the input ids with padding set to IGNORE_INDEX; the model shifts them by one itself)."""
    if task.kind != "lm":
        return batch
    batch = dict(batch)
    targets = batch.pop("lm_labels", None)
    if targets is None:
        targets = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)  # (B, T)
    batch["labels"] = targets
    return batch


def batches(
    task: Task,
    tokenizer,
    split: str = "train",
    batch_size: int = 16,
    steps: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Iterator[dict[str, Tensor]]:
    """Batches of one split of `task`, each a dict ready for `model(**batch)` (so `.loss` is the task loss).

    steps=None: one pass over the split in order, the last batch possibly smaller (evaluation).
    steps=N: N batches of exactly batch_size (or the whole split, if smaller) from seeded epoch-wise
    shuffles, a partial batch at an epoch's end dropped (training). The split is tokenised once, up front.
    """
    data = tokenize_task(task, tokenizer, splits=[split])[split]
    pad_id = tokenizer.pad_token_id or 0
    if steps is None:
        for start in range(0, len(data), batch_size):
            yield model_inputs(collate(data, range(start, min(start + batch_size, len(data))), pad_id, device), task)
        return
    generator = torch.Generator().manual_seed(seed)
    per_epoch = max(1, len(data) // batch_size)
    for step in range(steps):
        position = step % per_epoch
        if position == 0:
            order = torch.randperm(len(data), generator=generator)  # (n,)
        indices = order[position * batch_size:(position + 1) * batch_size]  # (batch_size,)
        yield model_inputs(collate(data, indices, pad_id, device), task)
