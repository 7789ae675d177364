"""One optimiser step with vbshare adapters — the recipe every training loop of the project uses.

    stats = train_step(model, optimizer, lambda: loss_of(batch), step)           # plain PyTorch
    stats = train_step(model, optimizer, micro_losses, step, engine=engine, grad_clip=1.0)  # the training app

In order: the task loss of every micro-batch, backward (gradients synchronised across processes on the last
micro-batch only), the adapters' `extra_loss` once (added to the last micro-batch), the global gradient norm
(with clipping when asked), `optimizer.step()`, the adapters' `after_step` hook once, and the gradients cleared.
The training app, the notebooks' demo runs, scripts/bench.py and the tests all call this one function.

Numeric guard: a step whose loss (task plus extra, summed over the processes) or global gradient norm is NaN
or infinite never updates anything: its gradients are dropped, neither `optimizer.step()` nor `after_step`
runs. `nonfinite="stop"` (the default) then raises `NonFiniteStep`; `"skip_step"` returns with
`StepStats.skipped` set and training goes on. Under fp16 a gradient scaler skips steps with infinite gradients
by design (and lowers its scale), so there only the loss is checked.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor, nn

import vbshare

from ..errors import VBShareError

MicroLoss = Callable[[], Tensor]
NONFINITE_POLICIES = ("stop", "skip_step")


class NonFiniteStep(VBShareError):
    """A step's loss or gradient norm was NaN or infinite (`nonfinite="stop"`); nothing was updated.

    Attributes: what ("loss" or "gradient norm"), value (the float), step (the step that failed, from 1)."""

    def __init__(self, what: str, value: float, step: int):
        super().__init__(f"{what} became {value} at step {step}; lower the learning rate, or pass "
                         "nonfinite='skip_step' to skip such steps")
        self.what, self.value, self.step = what, value, step


class Engine(Protocol):
    """What `train_step` needs from a distributed / mixed-precision engine (vbshare.train.engine.Engine)."""

    num_processes: int
    scales_gradients: bool  # fp16's gradient scaler: infinite gradients are its normal skipped steps

    def no_sync(self) -> contextlib.AbstractContextManager: ...

    def backward(self, loss: Tensor) -> None: ...

    def clip_grad_norm_(self, parameters: list[Tensor], max_norm: float) -> Tensor: ...

    def sum_over_processes(self, value: Tensor) -> Tensor: ...

    def skip_update(self) -> None: ...


@dataclass
class StepStats:
    """What one step measured (detached scalars on the training device; `.item()` them when logging).

    loss: this process's share of the task loss — summed over the processes it is the global batch's mean
    loss; extra_loss: the adapters' extra term (None without one); grad_norm: the global gradient norm before
    clipping (measured with or without clipping; None when no parameter got a gradient); parameters_changed:
    `after_step` changed the set of optimised parameters (e.g. two tensors tied into one), so a data-parallel
    wrapper must be rebuilt; skipped: the loss or gradient norm was not finite and the update was dropped
    (`nonfinite="skip_step"`)."""

    loss: Tensor
    extra_loss: Tensor | None
    grad_norm: Tensor | None
    parameters_changed: bool
    skipped: bool = False


def optimised_parameters(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The optimiser's parameters as they are now (a method may remove tied-away tensors from its groups)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_losses: MicroLoss | Sequence[MicroLoss],
               step: int, engine: Engine | None = None, grad_clip: float | None = None,
               nonfinite: str = "stop") -> StepStats:
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
        grad_clip: the largest global gradient norm (None: no clipping; the norm is measured all the same).
        nonfinite: a NaN or infinite loss or gradient norm drops the step's update and then "stop"s (raises
            NonFiniteStep) or goes on ("skip_step": the returned stats say `skipped`).
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise VBShareError(f"nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {nonfinite!r}")
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

    extra = None if extra is None else extra.detach()
    grad_norm = None
    params = [p for p in optimised_parameters(optimizer) if p.grad is not None]
    if params:  # clipping to an infinite norm measures it and multiplies by exactly 1
        max_norm = math.inf if grad_clip is None else grad_clip
        grad_norm = (engine.clip_grad_norm_(params, max_norm) if engine is not None
                     else torch.nn.utils.clip_grad_norm_(params, max_norm)).detach()
    failure = nonfinite_part(task_loss if extra is None else task_loss + extra, grad_norm, engine)
    if failure is not None:
        optimizer.zero_grad(set_to_none=True)
        if engine is not None:
            engine.skip_update()
        if nonfinite == "stop":
            raise NonFiniteStep(*failure, step)
        return StepStats(task_loss, extra, grad_norm, False, skipped=True)
    before = [id(p) for p in optimised_parameters(optimizer)]
    optimizer.step()
    if has_adapters:
        vbshare.after_step(model, optimizer, step)
    optimizer.zero_grad(set_to_none=True)
    changed = [id(p) for p in optimised_parameters(optimizer)] != before
    return StepStats(task_loss, extra, grad_norm, changed)


def nonfinite_part(loss: Tensor, grad_norm: Tensor | None, engine: Engine | None) -> tuple[str, float] | None:
    """("loss" or "gradient norm", its value) when the step's loss over all processes, or its global gradient
    norm, is NaN or infinite; None when both are finite. Every process reaches the same answer (the gradient
    norm is of the averaged gradients). One device synchronisation."""
    if engine is not None and engine.num_processes > 1:
        loss = engine.sum_over_processes(loss)
    check_norm = grad_norm is not None and not (engine is not None and engine.scales_gradients)
    values = torch.stack([loss.float(), grad_norm.float() if check_norm else torch.zeros_like(loss, dtype=torch.float32)])
    if bool(torch.isfinite(values).all()):
        return None
    loss_value, norm_value = values.tolist()
    return ("loss", loss_value) if not math.isfinite(loss_value) else ("gradient norm", norm_value)
