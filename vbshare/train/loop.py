"""The training loop: optimiser steps from `run.step` to `trainer.max_steps`, read top to bottom.

Every step: set the learning rates (linear warmup, then linear decay to 0), take the step's global batch,
keep this process's share cut into `grad_accum_steps` micro-batches, and run `train_step` (task loss,
`extra_loss`, backward, clipping, `optimizer.step()`, `after_step`). Each micro-batch's summed loss is divided
by the global batch's count of examples (target tokens for a language model), so any split into processes and
micro-batches trains the same model as one full batch. Then bookkeeping: metrics every `log_every` steps,
validation every `eval_every` steps, a training-form adapter snapshot every `snapshot_every` steps, an atomic
checkpoint every `checkpoint_every` steps, and one at the step where the run stops early (`stop_at_step`, or
SIGINT / SIGTERM: see interrupt.py), so that `trainer.resume` redoes no step.

A NaN or infinite loss or gradient norm (`take_step`, under `trainer.nonfinite`): `stop` ends the run with one
error line before anything of that step is written (the last checkpoint stays the last good one); `skip_step`
drops that step's update, warns and counts it (`run.skipped_steps`, in the summary).
"""
from __future__ import annotations

import logging
import math
import re
import time
from typing import TYPE_CHECKING, Any

from torch import Tensor
from tqdm.auto import tqdm

from ..checks import refuse_nonfinite
from ..errors import VBShareError
from .batches import batch_indices, collate, count_targets, forward_loss, shard_micro_batches
from . import interrupt
from .checkpoints import save_checkpoint, save_snapshot
from .evaluation import evaluate, format_scores, update_best
from .outputs import write_metrics
from .step import MicroLoss, NonFiniteStep, StepStats, train_step

if TYPE_CHECKING:
    from .run import Run

log = logging.getLogger("vbshare.train")


class Diverged(VBShareError):
    """The run stopped at a non-finite loss or gradient norm (trainer.nonfinite=stop). Its message is the line
    the command prints: "loss became nan at step 2; lower the learning rate (adapter.lr) or ..."."""

    LINE = re.compile(r"(loss|gradient norm) became \S+ at step \d+; lower the learning rate")

    @classmethod
    def said_in(cls, line: str) -> bool:
        """Whether an error line of a training process is this error's (vbshare.compare reads its runs' lines)."""
        return cls.LINE.search(line) is not None


def lr_factor(step: int, max_steps: int, warmup_ratio: float, schedule: str | None = "linear") -> float:
    """Linear warmup over the first warmup_ratio · max_steps steps, then decay to 0 (step from 0): linear, or
    along a half cosine (`schedule="cosine"`, as transformers' get_cosine_schedule_with_warmup)."""
    warmup = int(round(warmup_ratio * max_steps))
    if step < warmup:
        return (step + 1) / warmup
    remaining = max(0.0, (max_steps - step) / max(1, max_steps - warmup))  # 1 -> 0 after the warmup
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (1.0 - remaining)))
    return remaining


def micro_losses(run: "Run", step: int) -> list[MicroLoss]:
    """One callable per micro-batch of this process for optimiser step `step` (from 0): its forward pass in the
    run's precision, returning its summed loss over the global batch's count (see `train_step`)."""
    t, engine, data = run.settings.trainer, run.engine, run.data["train"]
    indices = batch_indices(len(data), t.batch_size, step, run.settings.seed)  # the global batch, same on every process
    global_count = count_targets(data, indices, run.task.kind)
    parts = shard_micro_batches(indices, engine.process_index, engine.num_processes, t.grad_accum_steps)

    def loss_of(part: Tensor) -> MicroLoss:
        def run_forward() -> Tensor:
            batch = collate(data, part, run.pad_id, engine.device)
            with engine.autocast():
                loss_sum, _ = forward_loss(engine.wrapped, batch, run.task, reduction="sum")
            return loss_sum / global_count
        return run_forward

    return [loss_of(part) for part in parts]


def take_step(run: "Run") -> StepStats:
    """Optimiser step run.step + 1 (`train_step` with the run's engine, clipping and trainer.nonfinite); counts
    it in run.step and rebuilds the data-parallel wrapper when the step changed the trained tensors.

    A non-finite loss or gradient norm: with `stop`, one VBShareError line saying what to change (nothing of
    the step was applied or written); with `skip_step`, a warning, and the step counts in run.skipped_steps."""
    policy = run.settings.trainer.nonfinite
    try:
        stats = train_step(run.model, run.optimizer, micro_losses(run, run.step), run.step + 1, engine=run.engine,
                           grad_clip=run.settings.optim.grad_clip, nonfinite=policy)
    except NonFiniteStep as bad:
        raise Diverged(f"{bad.what} became {bad.value} at step {bad.step}; lower the learning rate "
                           f"({run.mode.lr_key}) or set trainer.nonfinite=skip_step") from None
    run.step += 1
    if stats.skipped:
        run.skipped_steps += 1
        log.warning("step %d: non-finite loss or gradient norm, update skipped (trainer.nonfinite=skip_step; "
                    "%d skipped so far)", run.step, run.skipped_steps)
    if stats.parameters_changed:  # e.g. two tensors tied into one: every process wraps the new set
        run.optimizer = run.engine.rewrap(run.optimizer)
        run.engine.wrapped.train()
    return stats


def set_lr(run: "Run", factor: float) -> None:
    """Every parameter group's lr: its peak (`base_lr`, set once when the optimiser is built: setup.build_optimizer)
    times `factor` (the schedule's lr_factor in the dense training, trainer.sparsify.lr_factor in the stages)."""
    for group in run.optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def step_record(run: "Run", stats: StepStats) -> dict[str, Any]:
    """The metrics line of the step just taken, as both training phases log it: step, the global batch's mean loss
    (null when non-finite) and lr. It sums the loss over processes: every process calls it at the same steps."""
    loss = finite_or_none(run.engine.sum_over_processes(stats.loss).item())
    return {"step": run.step, "loss": loss, "lr": run.optimizer.param_groups[0]["lr"]}


def loss_text(loss: float | None) -> str:
    """The progress bar's loss: 4 decimals, or `skipped` for a step whose update was dropped."""
    return f"{loss:.4f}" if loss is not None else "skipped"


def refuse_nonfinite_state(run: "Run", what: str) -> None:
    """One error line, instead of a checkpoint or snapshot, when a trained tensor or the optimiser's state holds
    NaN or infinity. Every process checks (their values agree), so all of them stop together."""
    trained = {name: p for name, p in run.model.named_parameters() if p.requires_grad}
    optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # Accelerate's wrapper holds the optimiser
    refuse_nonfinite({"parameters": trained, "optimizer state": list(optimizer.state.values())}, what)


def finite_or_none(value: float) -> float | None:
    """The metrics log holds plain JSON: a NaN or infinite value (a skipped step's loss) is written as null."""
    return value if math.isfinite(value) else None


def train(run: "Run") -> bool:
    """Run optimiser steps from run.step to max_steps; False when stopped early by trainer.stop_at_step.

    Raises TrainingInterrupted after checkpointing the current step when SIGINT / SIGTERM arrived
    (interrupt.catch_stop_signals must be active; every process stops at the same step)."""
    t, engine = run.settings.trainer, run.engine
    has_validation = "validation" in run.data
    engine.wrapped.train()
    bar = tqdm(total=t.max_steps, initial=run.step, disable=not (t.progress_bar and run.is_main),
               dynamic_ncols=True, unit="step")
    started, steps_here = time.perf_counter(), 0
    while run.step < t.max_steps:
        set_lr(run, lr_factor(run.step, t.max_steps, run.settings.optim.warmup_ratio, run.settings.optim.schedule))
        stats = take_step(run)
        steps_here += 1

        # -- bookkeeping: log, evaluate, snapshot, checkpoint (rank 0 alone writes anything)
        bar.update(1)
        last = run.step == t.max_steps
        if run.step % t.log_every == 0 or last:
            record = {**step_record(run, stats), "steps_per_s": steps_here / (time.perf_counter() - started)}
            if stats.extra_loss is not None:
                record["extra_loss"] = finite_or_none(stats.extra_loss.item())
            if stats.grad_norm is not None:
                record["grad_norm"] = finite_or_none(stats.grad_norm.item())
            if run.skipped_steps:
                record["skipped_steps"] = run.skipped_steps
            write_metrics(run, record)
            bar.set_postfix(loss=loss_text(record["loss"]), lr=f"{record['lr']:.2e}")
        if run.step % t.eval_every == 0 or last:
            engine.check_in_sync(run.optimizer, run.step)
            if has_validation:
                scores = evaluate(run, "validation")
                write_metrics(run, {"step": run.step, "split": "validation", **scores})
                log.info("step %d validation %s", run.step, format_scores(scores))
                update_best(run, scores)
                run.last_validation = (run.step, scores)  # the final evaluation reuses it
        if t.snapshot_every and (run.step % t.snapshot_every == 0 or last):
            refuse_nonfinite_state(run, f"the snapshot of step {run.step}")
            engine.reshard()
            if run.is_main:
                save_snapshot(run)
        signum = engine.max_over_processes(interrupt.requested())  # all processes stop at the same step
        stopping = bool(signum) or (t.stop_at_step is not None and t.stop_at_step <= run.step < t.max_steps)
        if (t.checkpoint_every and run.step % t.checkpoint_every == 0) or stopping:
            run.train_seconds += time.perf_counter() - started
            started, steps_here = time.perf_counter(), 0
            refuse_nonfinite_state(run, f"the checkpoint of step {run.step}")
            engine.reshard()
            if run.is_main:
                save_checkpoint(run)
        if signum:
            bar.close()
            raise interrupt.TrainingInterrupted(signum, run.step, run.run_dir, run.is_main)
        if stopping:
            bar.close()
            log.info("stopped at step %d (trainer.stop_at_step); continue with trainer.resume=%s", run.step, run.run_dir)
            return False
    bar.close()
    run.train_seconds += time.perf_counter() - started
    return True
