"""What a run writes into its folder besides checkpoints (vbshare.rundir names the files): the metrics log
(appended as training goes), the final evaluation, the test split's predictions, the run mode's trained weights
and the summary. Rank 0 alone writes."""
from __future__ import annotations

import dataclasses
import json
import logging
import resource
from typing import TYPE_CHECKING, Any

import torch

from ..checks import refuse_nonfinite
from ..files import append_text, atomic_write
from ..rundir import RunDir
from .evaluation import evaluate, evaluate_with_predictions, format_scores, write_predictions
from .forgetting import forgetting

if TYPE_CHECKING:
    from .run import Run

log = logging.getLogger("vbshare.train")

BYTES_PER_MIB = 2**20
KIB_PER_MIB = 1024  # ru_maxrss is in KiB on Linux


def write_metrics(run: "Run", record: dict[str, Any]) -> None:
    """Append one JSON line to the metrics log and mirror it to the logger (rank 0 only)."""
    if not run.is_main:
        return
    run.history.append(record)
    append_text(RunDir(run.run_dir).metrics, json.dumps(record) + "\n")
    prefix = record.get("split", "train")
    run.logger.log({f"{prefix}/{k}": v for k, v in record.items() if k not in ("step", "split")}, step=record["step"])


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / BYTES_PER_MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_MIB


def final_scores(run: "Run") -> tuple[dict[str, dict[str, float]], list[dict[str, Any]] | None]:
    """{split: scores} over the run's evaluation splits (every process takes part), and the test split's
    per-example rows. The validation scores of the last step are reused when it was just evaluated."""
    final, predictions = {}, None
    for split in run.eval_splits:
        if split == "validation" and run.last_validation is not None and run.last_validation[0] == run.step:
            final[split] = run.last_validation[1]
        elif split == "test":
            final[split], predictions = evaluate_with_predictions(run, split)
        else:
            final[split] = evaluate(run, split)
    return final, predictions


def save_outputs(run: "Run") -> dict[str, Any] | None:
    """Final evaluation (every process takes part), then on rank 0 the trained weights, the test split's
    predictions (when scored) and the summary; returns the summary (None on the other processes).
    Trained tensors holding NaN or infinity are refused before anything is evaluated or written."""
    trained = {name: p for name, p in run.model.named_parameters() if p.requires_grad}
    refuse_nonfinite(trained, f"the results of {run.run_dir}")  # every process: their tensors are identical
    final, predictions = final_scores(run)
    forgot = forgetting(run, run.forgetting_before)  # trainer.forgetting_eval (every process takes part)
    if not run.is_main:
        return None
    if predictions is not None:
        write_predictions(RunDir(run.run_dir).predictions, predictions)
    for split, scores in final.items():
        write_metrics(run, {"step": run.step, "split": f"final_{split}", **scores})
        log.info("final %s %s", split, format_scores(scores))
    cfg, engine = run.cfg, run.engine
    written = dataclasses.asdict(run.mode.save_outputs(run.model, run.run_dir))  # the mode's fields, in order
    wall_seconds = run.wall_seconds()
    summary = {
        "method": written.pop("method"),
        "task": run.task.name,
        "model": cfg.model.loader._target_.rsplit(".", 1)[-1],
        "base_quantization": cfg.model.get("quantization"),  # null, or the frozen base's nf4 | fp4 | int8
        "hyperparameters": written.pop("hyperparameters"),
        "metric": run.task.metric,
        "label_names": list(run.task.label_names),  # class id -> name as trained (evaluate checks new data against it)
        "final": final,
        "best": run.best,
        "steps": run.step,
        **written,  # trainable / head / stored parameters, sharing, adapter_bytes (modes.Outputs)
        "wall_time_s": round(wall_seconds, 3),  # summed over resumed segments
        "train_time_s": round(run.train_seconds, 3),
        "steps_per_s": round(run.step / max(run.train_seconds, 1e-9), 4),  # over every resumption's time
        "peak_memory_mb": round(peak_memory_mb(engine.device), 1),
        "device": str(engine.device),
        "world_size": engine.num_processes,
        "precision": engine.precision,
        "grad_accum_steps": run.settings.trainer.grad_accum_steps,
        "skipped_steps": run.skipped_steps,  # updates dropped for a non-finite loss or gradient (trainer.nonfinite)
    }
    if forgot is not None:  # general-text LM loss before / after training (vbshare.train.forgetting)
        summary["forgetting"] = forgot
    if run.sparsify is not None:  # trainer.sparsify: one line of numbers per stage (the method's stage file has more)
        summary["sparsify"] = run.sparsify
    if engine.distributed:
        summary["distributed"] = {"world_size": engine.num_processes, "backend": engine.backend,
                                  "strategy": engine.strategy, "max_param_diff_across_ranks": run.rank_diff}
    atomic_write(RunDir(run.run_dir).summary, json.dumps(summary, indent=2).encode())
    headline = final.get("test", final.get("validation", {})).get(run.task.metric)
    log.info("done in %.1fs: %s %s=%s; files in %s", wall_seconds, summary["method"], run.task.metric,
             None if headline is None else round(headline, 4), run.run_dir)
    return summary
