"""Batches and the task loss: which examples a step sees, how they are padded, and what they cost.

* `batch_indices`: the examples of one optimiser step (the global batch), a pure function of (step, seed).
* `shard_micro_batches`: this process's part of the global batch, cut into `grad_accum_steps` micro-batches.
* `collate` (from vbshare.data.batching): right-padded tensors of chosen examples.
* `count_targets`: what a loss averages over (examples; target tokens for a language model), so
  micro-batches of any size can be weighted into exactly the global batch's mean loss.
* `forward_loss`: the task loss of a batch (cross-entropy, MSE for regression, next-token cross-entropy).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batching import collate
from ..data.chat import IGNORE_INDEX
from ..data.encoding import Encoded
from ..data.examples import Task

__all__ = ["IGNORE_INDEX", "batch_indices", "collate", "count_targets", "forward_loss", "lm_targets",
           "shard_micro_batches"]

DATA_ORDER_SEED_STRIDE = 1_000_003  # epoch e of seed s shuffles with generator seed s * stride + e
NOT_MODEL_INPUTS = ("labels", "lm_labels")  # batch keys the loss reads and the model never sees


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> Tensor:
    """Example indices of optimiser step `step` (from 0): epoch-wise shuffles, last partial batch dropped.

    A pure function of (step, seed), so a resumed run sees exactly the batches the uninterrupted one would,
    and every process of a data-parallel run computes the same global batch without communicating.
    A split smaller than the batch (a smoke test on a few examples) fills each batch with back-to-back
    shuffles of the whole split, so every example appears ⌊batch_size / n⌋ or ⌈batch_size / n⌉ times.
    """
    per_epoch = max(1, n // batch_size)
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * DATA_ORDER_SEED_STRIDE + epoch)
    shuffles = -(-batch_size // n) if batch_size > n else 1
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(shuffles)])  # (shuffles · n,)
    return order[position * batch_size:(position + 1) * batch_size]  # (batch_size,)


def shard_micro_batches(indices: Tensor, process: int, processes: int, micro_batches: int) -> list[Tensor]:
    """This process's contiguous share of the global batch, cut into `micro_batches` equal parts.

    indices: (batch_size,) with batch_size divisible by processes × micro_batches (checked at setup).
    Returns micro_batches tensors of batch_size / (processes × micro_batches) indices each.
    """
    share = indices.numel() // processes
    mine = indices[process * share:(process + 1) * share]  # (batch_size / processes,)
    return list(mine.chunk(micro_batches))


def count_targets(split: Encoded, indices: list[int] | Tensor, kind: str) -> int:
    """What the task loss averages over for these examples: one per example (classification), else the
    target tokens of a language model (positions 1.. of each sequence, minus those labelled IGNORE_INDEX)."""
    if kind != "lm":
        return len(indices)
    if split.lm_labels is None:
        return sum(len(split.input_ids[int(i)]) - 1 for i in indices)
    return sum(sum(1 for label in split.lm_labels[int(i)][1:] if label != IGNORE_INDEX) for i in indices)


def lm_targets(batch: dict[str, Tensor]) -> Tensor:
    """Next-token targets (B, T-1): lm_labels shifted by one when given, else the inputs shifted by one with
    padding ignored."""
    if "lm_labels" in batch:
        return batch["lm_labels"][:, 1:]
    return batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, IGNORE_INDEX)


def forward_loss(model: nn.Module, batch: dict[str, Tensor], task: Task, reduction: str = "mean") -> tuple[Tensor, Tensor]:
    """(task loss, outputs). Classification: cross-entropy (MSE for regression) on logits (B, C).
    LM: next-token cross-entropy over the target positions of logits (B, T, V).

    reduction "mean" averages over what `count_targets` counts; "sum" adds them up.
    """
    inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
    logits = model(**inputs).logits
    if task.kind == "lm":
        targets = lm_targets(batch)  # (B, T-1)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),  # (B·(T-1), V)
                               ignore_index=IGNORE_INDEX, reduction=reduction)
        return loss, logits
    if task.num_labels == 1:
        return F.mse_loss(logits[:, 0].float(), batch["labels"], reduction=reduction), logits
    return F.cross_entropy(logits.float(), batch["labels"], reduction=reduction), logits
