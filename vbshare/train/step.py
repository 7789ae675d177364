"""One optimiser step with vbshare adapters — the recipe every training loop of the project uses.

    stats = train_step(model, optimizer, lambda: loss_of(batch), step)           # plain PyTorch
    stats = train_step(model, optimizer, micro_losses, step, engine=engine, grad_clip=1.0)  # the training app

In order: the task loss of every micro-batch, backward (gradients synchronised across processes on the last
micro-batch only), the adapters' `extra_loss` once (added to the last micro-batch), gradient clipping,
`optimizer.step()`, the adapters' `after_step` hook once, and the gradients cleared. The training app, the
notebooks' demo runs, scripts/bench.py and the tests all call this one function.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor, nn

import vbshare

MicroLoss = Callable[[], Tensor]


class Engine(Protocol):
    """What `train_step` needs from a distributed / mixed-precision engine (vbshare.train.engine.Engine)."""

    num_processes: int

    def no_sync(self) -> contextlib.AbstractContextManager: ...

    def backward(self, loss: Tensor) -> None: ...

    def clip_grad_norm_(self, parameters: list[Tensor], max_norm: float) -> Tensor: ...


@dataclass
class StepStats:
    """What one step measured (detached scalars on the training device; `.item()` them when logging).

    loss: this process's share of the task loss — summed over the processes it is the global batch's mean
    loss; extra_loss: the adapters' extra term (None without one); grad_norm: the global gradient norm before
    clipping (None when not clipping); parameters_changed: `after_step` changed the set of optimised
    parameters (e.g. two tensors tied into one), so a data-parallel wrapper must be rebuilt."""

    loss: Tensor
    extra_loss: Tensor | None
    grad_norm: Tensor | None
    parameters_changed: bool


def optimised_parameters(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The optimiser's parameters as they are now (a method may remove tied-away tensors from its groups)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_losses: MicroLoss | Sequence[MicroLoss],
               step: int, engine: Engine | None = None, grad_clip: float | None = None) -> StepStats:
    """Run one optimiser step; `step` counts completed steps from 1 (the value `after_step` receives).

    Args:
        model: the model that holds the adapters (`model.vbshare`; the unwrapped one under data parallelism).
            Without adapters (full fine-tuning, head-only) the hooks are skipped.
        micro_losses: one callable per micro-batch (or a single callable), each running its forward pass and
            returning its share of the batch loss: a micro-batch's summed loss divided by the global batch's
            count (`count_targets`), so that all shares of all processes add up to the batch's mean loss.
            A single full batch simply returns its mean loss.
        engine: None for plain single-process PyTorch; else the engine that averages gradients over its
            `num_processes` (each share is multiplied by that number, so the average is the batch's gradient),
            skips synchronisation on all but the last micro-batch, scales losses for fp16 and clips.
        grad_clip: the largest global gradient norm (None: no clipping).
    """
    losses = [micro_losses] if callable(micro_losses) else list(micro_losses)
    processes = engine.num_processes if engine is not None else 1
    has_adapters = vbshare.state_of(model, required=False) is not None
    task_loss, extra = None, None
    for position, micro_loss in enumerate(losses):
        last = position == len(losses) - 1
        with engine.no_sync() if engine is not None and not last else contextlib.nullcontext():
            loss = micro_loss()
            total = loss * processes
            if last and has_adapters:  # once per step; averaged over processes that all add it, it counts once
                extra = vbshare.extra_loss(model)
                total = total if extra is None else total + extra
            if engine is not None:
                engine.backward(total)
            else:
                total.backward()
        task_loss = loss.detach() if task_loss is None else task_loss + loss.detach()

    grad_norm = None
    if grad_clip is not None:
        params = [p for p in optimised_parameters(optimizer) if p.grad is not None]
        grad_norm = (engine.clip_grad_norm_(params, grad_clip) if engine is not None
                     else torch.nn.utils.clip_grad_norm_(params, grad_clip)).detach()
    before = [id(p) for p in optimised_parameters(optimizer)]
    optimizer.step()
    if has_adapters:
        vbshare.after_step(model, optimizer, step)
    optimizer.zero_grad(set_to_none=True)
    changed = [id(p) for p in optimised_parameters(optimizer)] != before
    return StepStats(task_loss, None if extra is None else extra.detach(), grad_norm, changed)
