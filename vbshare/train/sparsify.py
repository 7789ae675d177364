"""`trainer.sparsify`: the sparsifying stages that follow the normal training (docs/methods.md §2).

The normal training (`trainer.max_steps`, warmup and decay) is the dense stage. Then the adapter's sparsity
knob (SoRA: λ, or ξ with `adapter.threshold=constant`) rises through a schedule; each stage trains
`stage_steps` more optimiser steps through the app's own step (`train_step`, the engine, micro-batches,
clipping) at a constant learning rate (each group's peak lr × `lr_factor`: the dense stage's decay ended at 0).
After every stage the method writes its record (SoRA: `<run>/sora_stages.jsonl`: retained rank per module,
non-zero adapter parameters, memorisation = the task's scores on a fixed training subset, generalisation = on
validation, each also relative to the dense stage), the record's numbers go to metrics.jsonl
(`"split": "sparsify_stage"`), and with `snapshots` the training-form adapter goes to `snapshots/stage_<i>/`.
The run then saves and summarises the final stage as usual (SoRA's saved form is the pruned LoRA);
summary.json gains `sparsify.stages`, one line of numbers per stage.

The app names no method: the adapter state's `sparsifier` hook (the adapter contract) validates the schedule
before the first step and runs the stages; a method without a sparsity knob refuses with one line.

Checkpoints: none are written during the stages. A run interrupted there resumes (`trainer.resume`) from its
last dense-stage checkpoint and runs every stage again from the start; the stage file, snapshots and
metrics.jsonl are replaced or trimmed as they go (each write is atomic), so nothing is left half-written.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from tqdm.auto import tqdm

import vbshare

from ..data.tasks import Encoded
from ..errors import VBShareError
from .evaluation import evaluate, format_scores
from .loop import micro_losses
from .modes import to_python
from .outputs import write_metrics
from .step import train_step

if TYPE_CHECKING:
    from .run import Run

log = logging.getLogger("vbshare.train")

# Keys of trainer.sparsify that the app reads; every other key is the method's schedule (its sparsifier checks them).
APP_KEYS = ("lr_factor", "memorise_examples", "snapshots")
MEMORISE_SPLIT = "sparsify_memorise"  # the fixed training subset, added to run.data during the stages only
SNAPSHOTS = "snapshots"
STAGE_SPLIT = "sparsify_stage"  # metrics.jsonl rows of the stage records


def sparsify_stages(run: "Run") -> Callable[[], None] | None:
    """Check `trainer.sparsify` before any training step; returns the stages to run after the dense training
    (None when the block is not set). Refuses a run without an adapter, or whose method has no sparsity knob."""
    spec = to_python(run.cfg.trainer.get("sparsify"))
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise VBShareError(f"trainer.sparsify must be a block of keys (+trainer/sparsify=default) or null, got {spec!r}")
    if "dense_steps" in spec:
        raise VBShareError("trainer.sparsify.dense_steps is not a key here: the dense stage is the normal training, "
                           "trainer.max_steps")
    state = vbshare.state_of(run.model, required=False)
    if state is None:
        raise VBShareError("trainer.sparsify needs an adapter with a sparsity knob; this run trains no adapter "
                           "(add +adapter=<method>) or drop trainer.sparsify")
    lr_factor, memorise = spec.get("lr_factor", 1.0), spec.get("memorise_examples")
    if not isinstance(lr_factor, (int, float)) or not lr_factor > 0:
        raise VBShareError(f"trainer.sparsify.lr_factor must be a number > 0, got {lr_factor!r}")
    if not isinstance(memorise, int) or memorise < 1:
        raise VBShareError(f"trainer.sparsify.memorise_examples must be a positive integer, got {memorise!r}")
    schedule = {k: v for k, v in spec.items() if k not in APP_KEYS}
    runner = state.sparsifier(run.model, {**schedule, "dense_steps": 0})  # the dense stage is already trained
    return lambda: _run_stages(run, runner, spec)


def first_examples(data: Encoded, count: int) -> Encoded:
    """The first `count` examples of a split (all of them when it has fewer): a fixed subset."""
    keep = slice(0, min(count, len(data)))
    return dataclasses.replace(data, **{f.name: getattr(data, f.name)[keep] for f in dataclasses.fields(data)
                                        if getattr(data, f.name) is not None})


def flat_record(record: dict[str, Any], metric: str) -> dict[str, Any]:
    """A stage record's plain numbers, plus the task metric of its score dicts (`memorisation_accuracy`,
    `memorisation_accuracy_rel`, ...)."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = value
        elif isinstance(value, dict) and isinstance(value.get(metric), (int, float)):
            base, rel, _ = key.partition("_rel")
            flat[f"{base}_{metric}{rel}"] = value[metric]
    return flat


def _run_stages(run: "Run", runner: Callable[..., list[dict[str, Any]]], spec: dict[str, Any]) -> None:
    t, engine, metric = run.cfg.trainer, run.engine, run.task.metric
    lr_factor, take_snapshots = float(spec.get("lr_factor", 1.0)), bool(spec.get("snapshots", False))
    held_out = "validation" if "validation" in run.data else run.task.eval_splits[0]
    run.data[MEMORISE_SPLIT] = first_examples(run.data["train"], spec["memorise_examples"])
    planned = spec.get("num_stages", 0) * spec.get("stage_steps", 0)
    bar = tqdm(total=planned or None, disable=not (t.progress_bar and run.is_main), dynamic_ncols=True,
               unit="step", desc="sparsify")
    started = time.perf_counter()

    def train_steps(n_steps: int, knob: float) -> None:
        """n more optimiser steps at the constant stage learning rate, logged like the loop's."""
        for group in run.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor
        engine.wrapped.train()
        for _ in range(n_steps):
            stats = train_step(run.model, run.optimizer, micro_losses(run, run.step), run.step + 1,
                               engine=engine, grad_clip=run.cfg.optim.grad_clip)
            run.step += 1
            if stats.parameters_changed:
                run.optimizer = engine.rewrap(run.optimizer)
                engine.wrapped.train()
            bar.update(1)
            if run.step % t.log_every == 0:
                loss = engine.sum_over_processes(stats.loss).item()
                write_metrics(run, {"step": run.step, "loss": loss, "lr": run.optimizer.param_groups[0]["lr"],
                                    "sparsity": knob})
                bar.set_postfix(loss=f"{loss:.4f}", knob=f"{knob:.3g}")

    def score(split: str) -> dict[str, float]:
        """"train": the fixed training subset; otherwise the held-out split. The task metric comes first."""
        scores = evaluate(run, MEMORISE_SPLIT if split == "train" else held_out)
        return {metric: scores[metric], **{k: v for k, v in scores.items() if k != metric}}

    def on_stage(record: dict[str, Any]) -> None:
        flat = flat_record(record, metric)
        write_metrics(run, {"step": run.step, "split": STAGE_SPLIT, **{k: v for k, v in flat.items() if k != "step"}})
        log.info("sparsify stage %s: %s", record.get("stage"), format_scores(
            {k: v for k, v in flat.items() if k not in ("stage", "steps", "total_steps")}))
        if not take_snapshots:
            return
        engine.reshard()  # every process, before rank 0 alone reads the weights (as before a checkpoint)
        if run.is_main:
            vbshare.save_adapter(run.model, run.run_dir / SNAPSHOTS / f"stage_{record.get('stage', 0):02d}",
                                 modules=run.mode.head_modules, stored_form=False)

    try:
        records = runner(train_steps, score, run.run_dir if run.is_main else None, on_stage)
    finally:
        bar.close()
        del run.data[MEMORISE_SPLIT]
        run.train_seconds += time.perf_counter() - started
    run.sparsify = {"stages": [flat_record(r, metric) for r in records]}
