"""`trainer.sparsify`: the sparsifying stages that follow the normal training (docs/methods.md §2).

The normal training (`trainer.max_steps`, warmup and decay) is the dense stage. Then the adapter's sparsity
knob (SoRA: λ, or ξ with `adapter.threshold=constant`) rises through a schedule; each stage trains
`stage_steps` more optimiser steps through the app's own step (`train_step`, the engine, micro-batches,
clipping) at a constant learning rate (each group's peak lr × `lr_factor`: the dense stage's decay ended at 0).
After every stage the method's record goes to `<run>/<method>_stages.jsonl` (SoRA: retained rank per module,
non-zero adapter parameters, memorisation = the task's scores on a fixed training subset, generalisation = on
validation, each also relative to the dense stage), the record's numbers go to the metrics log
(`"split": "sparsify_stage"`), and with `snapshots` the training-form adapter goes to `snapshots/stage_<i>/`.
The run then saves and summarises the final stage as usual (SoRA's saved form is the pruned LoRA);
the summary gains `sparsify.stages`, one line of numbers per stage.

The app names no method: the adapter state's `sparsifier` hook (the adapter contract) validates the schedule
before the first step and runs the stages; a method without a sparsity knob refuses with one line.

Checkpoints: none are written during the stages. A run interrupted there resumes (`trainer.resume`) from its
last dense-stage checkpoint and runs every stage again from the start; the stage file, snapshots and
the metrics log are replaced or trimmed as they go (each write is atomic), so nothing is left half-written.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from tqdm.auto import tqdm

import vbshare

from ..checks import is_integer
from ..data.encoding import Encoded
from ..errors import VBShareError
from ..rundir import RunDir
from .evaluation import evaluate, format_scores
from .loop import loss_text, set_lr, step_record, take_step
from .outputs import write_metrics
from .settings import SparsifySettings

if TYPE_CHECKING:
    from .run import Run

log = logging.getLogger("vbshare.train")

MEMORISE_SPLIT = "sparsify_memorise"  # the fixed training subset, added to run.data during the stages only
STAGE_SPLIT = "sparsify_stage"  # the metrics log's rows of the stage records


def sparsify_stages(run: "Run") -> Callable[[], None] | None:
    """Check `trainer.sparsify` against the model before any training step (its keys' ranges are checked with
    the other settings); returns the stages to run after the dense training (None when the block is not set).
    Refuses a run without an adapter, or whose method has no sparsity knob."""
    spec = run.settings.trainer.sparsify
    if spec is None:
        return None
    state = vbshare.state_of(run.model, required=False)
    if state is None:
        raise VBShareError("trainer.sparsify needs an adapter with a sparsity knob; this run trains no adapter "
                           "(add +adapter=<method>) or drop trainer.sparsify")
    runner = state.sparsifier(run.model, {**spec.schedule, "dense_steps": 0})  # the dense stage is already trained
    return lambda: _run_stages(run, runner, spec, f"{state.method}_stages")


def first_examples(data: Encoded, count: int) -> Encoded:
    """The first `count` examples of a split (all of them when it has fewer): a fixed subset."""
    keep = slice(0, min(count, len(data)))
    return dataclasses.replace(data, **{f.name: getattr(data, f.name)[keep] for f in dataclasses.fields(data)
                                        if getattr(data, f.name) is not None})


def flat_record(record: dict[str, Any], metric: str) -> dict[str, Any]:
    """A stage record's plain numbers and the name of its knob (`knob`), plus the task metric of its score dicts
    (`memorisation_accuracy`, `memorisation_accuracy_rel`, ...)."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) or key == "knob" and isinstance(value, str):
            flat[key] = value
        elif isinstance(value, dict) and isinstance(value.get(metric), (int, float)):
            base, rel, _ = key.partition("_rel")
            flat[f"{base}_{metric}{rel}"] = value[metric]
    return flat


def _run_stages(run: "Run", runner: Callable[..., list[dict[str, Any]]], spec: SparsifySettings,
                record_name: str) -> None:
    t, engine, metric = run.settings.trainer, run.engine, run.task.metric
    held_out = "validation" if "validation" in run.data else run.task.eval_splits[0]
    run.data[MEMORISE_SPLIT] = first_examples(run.data["train"], spec.memorise_examples)
    stages, stage_steps = spec.schedule.get("num_stages"), spec.schedule.get("stage_steps")
    planned = stages * stage_steps if is_integer(stages) and is_integer(stage_steps) else None  # the bar's length
    bar = tqdm(total=planned, disable=not (t.progress_bar and run.is_main), dynamic_ncols=True,
               unit="step", desc="sparsify")
    started = time.perf_counter()

    def train_steps(n_steps: int, knob: float) -> None:
        """n more optimiser steps at the constant stage learning rate, logged like the loop's."""
        set_lr(run, spec.lr_factor)
        engine.wrapped.train()
        for _ in range(n_steps):
            stats = take_step(run)
            bar.update(1)
            if run.step % t.log_every == 0:
                record = {**step_record(run, stats), "sparsity": knob}
                write_metrics(run, record)
                bar.set_postfix(loss=loss_text(record["loss"]), knob=f"{knob:.3g}")

    def score(split: str) -> dict[str, float]:
        """"train": the fixed training subset; otherwise the held-out split. The task metric comes first."""
        scores = evaluate(run, MEMORISE_SPLIT if split == "train" else held_out)
        return {metric: scores[metric], **{k: v for k, v in scores.items() if k != metric}}

    def on_stage(record: dict[str, Any]) -> None:
        flat = flat_record(record, metric)
        write_metrics(run, {"step": run.step, "split": STAGE_SPLIT, **{k: v for k, v in flat.items() if k != "step"}})
        log.info("sparsify stage %s: %s", record.get("stage"), format_scores(
            {k: v for k, v in flat.items() if k not in ("stage", "steps", "total_steps", "knob")}))
        if not spec.snapshots:
            return
        engine.reshard()  # every process, before rank 0 alone reads the weights (as before a checkpoint)
        if run.is_main:
            run.mode.save_snapshot(run.model, RunDir(run.run_dir).stage_snapshot(record.get("stage", 0)))

    try:
        out = RunDir(run.run_dir).record(record_name) if run.is_main else None  # rank 0 writes: sora_stages.jsonl
        records = runner(train_steps, score, out, on_stage)
    finally:
        bar.close()
        del run.data[MEMORISE_SPLIT]
        run.train_seconds += time.perf_counter() - started
    run.sparsify = {"stages": [flat_record(r, metric) for r in records]}
