"""`python -m vbshare.train [+adapter=lora|vblora|aslora|sora] [model=...] [data=...] [trainer=...] [logger=...]`

A plain PyTorch training loop, read top to bottom: setup -> train -> save.

setup: compose the Hydra config (configs/ at the repo root), build the task and the model, inject the adapter
       (none = full fine-tuning baseline), tokenise once, build AdamW over `vbshare.param_groups`.
train: warmup + linear decay, grad clipping, `loss + vbshare.extra_loss(model)`, `vbshare.after_step(...)`
       after every optimiser step, evaluation every `eval_every` steps, atomic checkpoints every
       `checkpoint_every` steps; `trainer.resume=<run dir>` continues exactly where a checkpoint left off.
save:  the adapter (weights only, with the head), VB-LoRA also in top-k form, SoRA pruned; metrics.jsonl,
       summary.json and the resolved config.yaml in the run directory.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn

import vbshare

from ..checkpoint import atomic_torch_save, atomic_write
from ..data.tasks import Encoded, Task, tokenize_task
from ..errors import VBShareError
from . import metrics as M

log = logging.getLogger("vbshare.train")

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # repo-root configs/ (editable install)
CHECKPOINT = "checkpoint"  # resumable state inside a run directory
TRAINER_STATE = "trainer_state.pt"
WEIGHTS = "weights.pt"  # full fine-tuning: the whole model
ADAPTER = "adapter"  # adapter runs: vbshare.save_adapter folder in training form
DATA_ORDER_SEED_STRIDE = 1_000_003  # epoch e of seed s shuffles with generator seed s * stride + e
BYTES_PER_MIB = 2**20
KIB_PER_MIB = 1024  # ru_maxrss is in KiB on Linux
LOAD_SLACK = 0.5  # load-average share not counted as a busy core by num_threads=auto
# Config keys that may change between an interrupted run and its resumption.
RESUME_FREE_KEYS = ("trainer.resume", "trainer.stop_at_step", "trainer.progress_bar", "trainer.device", "logger")


# ====================================================================================================== setup
@dataclass
class Run:
    """Everything the loop carries between setup, train and save."""

    cfg: DictConfig
    run_dir: Path
    task: Task
    data: dict[str, Encoded]
    model: nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    device: torch.device
    method: str | None  # None: full fine-tuning
    head_modules: list[str]
    logger: Any
    step: int = 0  # optimiser steps completed
    best: dict[str, Any] | None = None  # {"step", "split", metric: value}
    train_seconds: float = 0.0  # summed over resumptions
    logger_id: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VBShareError(f"trainer.device={name} but no CUDA device is available; use trainer.device=cpu")
    return torch.device(name)


def set_threads(setting: int | str | None) -> int:
    """CPU threads for torch. "auto": the cores not already busy (cpu count minus the 1-minute load
    average, at least 1) — oversubscribing a shared machine makes every step several times slower."""
    if setting is None:
        return torch.get_num_threads()
    if setting == "auto":
        busy = math.ceil(os.getloadavg()[0] - LOAD_SLACK)
        setting = max(1, (os.cpu_count() or 1) - max(0, busy))
    if not isinstance(setting, int) or setting < 1:
        raise VBShareError(f"trainer.num_threads must be a positive integer, auto or null, got {setting!r}")
    torch.set_num_threads(setting)
    return setting


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_python(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def setup(cfg: DictConfig, run_dir: Path) -> Run:
    """Build task, model (+ adapter), tokenised data and optimiser; restore a checkpoint when resuming."""
    from hydra.utils import instantiate

    resume_dir = Path(cfg.trainer.resume) if cfg.trainer.resume else None
    if resume_dir is not None:
        check_resumable(resume_dir, cfg)
        if resume_dir.resolve() != Path(run_dir).resolve():
            log.info("resuming the run in %s (its files are continued there)", resume_dir)
        run_dir = resume_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.trainer.device)
    threads = set_threads(cfg.trainer.num_threads) if device.type == "cpu" else None
    log.info("device %s%s", device, f" ({threads} threads)" if threads else "")
    seed_everything(cfg.seed)

    task: Task = instantiate(cfg.data)
    model, tokenizer = instantiate(cfg.model.loader, task=task.kind, num_labels=task.num_labels, seed=cfg.seed)
    data = tokenize_task(task, tokenizer, cfg.trainer.max_examples)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in data.items())
    log.info("task %s (%s, metric %s): %s %s", task.name, task.kind, task.metric, sizes,
             "blocks" if task.kind == "lm" else "examples")

    adapter = cfg.get("adapter")
    head_modules = list(cfg.model.head_modules) if task.kind == "classification" else []
    if adapter is None:
        method = None
        log.info("no adapter given: FULL FINE-TUNING baseline (every weight trains); "
                 "add +adapter=lora|vblora|aslora|sora to train an adapter instead")
        for param in model.parameters():
            param.requires_grad_(True)
    else:
        method = adapter.method
        vbshare.inject(model, method, targets=to_python(adapter.targets), **to_python(adapter.hparams))
        for name in head_modules:  # inject froze everything: the task head trains alongside the adapter
            try:
                model.get_submodule(name).requires_grad_(True)
            except AttributeError:
                raise VBShareError(f"the model has no module {name!r} to train as head; set model.head_modules") from None
        log.info("%s", str(vbshare.summary(model)).splitlines()[-1])
    model.to(device)

    logger = instantiate(cfg.logger)
    run = Run(cfg, run_dir, task, data, model, tokenizer, build_optimizer(cfg, model, method), device, method,
              head_modules, logger)
    if resume_dir is not None:
        load_checkpoint(run)
    return run


def build_optimizer(cfg: DictConfig, model: nn.Module, method: str | None) -> torch.optim.Optimizer:
    """AdamW over one group per parameter role (adapter) or one group of every weight (full fine-tuning).

    Each group remembers its peak lr as "base_lr"; the schedule scales it every step.
    """
    from hydra.utils import instantiate

    if method is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "role": "full",
                   "lr": cfg.optim.full_finetune_lr, "weight_decay": cfg.optim.weight_decay}]
    else:
        groups = vbshare.param_groups(model, lr=to_python(cfg.adapter.lr), weight_decay=cfg.optim.weight_decay)
    for group in groups:
        group["base_lr"] = group["lr"]
    return instantiate(cfg.optim.optimizer)(groups)


# ====================================================================================================== train
def lr_factor(step: int, max_steps: int, warmup_ratio: float) -> float:
    """Linear warmup over the first warmup_ratio · max_steps steps, then linear decay to 0 (step from 0)."""
    warmup = int(round(warmup_ratio * max_steps))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (max_steps - step) / max(1, max_steps - warmup))


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> Tensor:
    """Example indices of optimiser step `step` (from 0): epoch-wise shuffles, last partial batch dropped.

    A pure function of (step, seed), so a resumed run sees exactly the batches the uninterrupted one would.
    """
    per_epoch = max(1, n // batch_size)
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * DATA_ORDER_SEED_STRIDE + epoch)
    order = torch.randperm(n, generator=generator)  # (n,)
    return order[position * batch_size:(position + 1) * batch_size]  # (batch_size,) or (n,) when n < batch_size


def collate(split: Encoded, indices: list[int] | Tensor, pad_id: int, device: torch.device) -> dict[str, Tensor]:
    """Right-pad the chosen examples to the longest one: input_ids / attention_mask (B, T), labels (B,)."""
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
    if split.labels is not None:
        labels = [split.labels[int(i)] for i in indices]
        batch["labels"] = torch.tensor(labels, dtype=torch.float if isinstance(labels[0], float) else torch.long)
    return {k: v.to(device) for k, v in batch.items()}


def forward_loss(model: nn.Module, batch: dict[str, Tensor], task: Task, reduction: str = "mean") -> tuple[Tensor, Tensor]:
    """(task loss, outputs). Classification: cross-entropy (MSE for regression) on logits (B, C).
    LM: next-token cross-entropy over the non-padded positions of logits (B, T, V)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    if task.kind == "lm":
        targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)  # (B, T-1)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction=reduction)  # (B·(T-1), V)
        return loss, logits
    if task.num_labels == 1:
        return F.mse_loss(logits[:, 0], batch["labels"], reduction=reduction), logits
    return F.cross_entropy(logits, batch["labels"], reduction=reduction), logits


@torch.no_grad()
def evaluate(run: Run, split: str) -> dict[str, float]:
    """The task's metrics on one split, in eval mode (no dropout; the RNG is not touched)."""
    model, task, data = run.model, run.task, run.data[split]
    was_training = model.training
    model.eval()
    pad_id = run.tokenizer.pad_token_id or 0
    size = run.cfg.trainer.eval_batch_size
    outputs, total_nll, tokens = [], 0.0, 0
    for start in range(0, len(data), size):
        batch = collate(data, range(start, min(start + size, len(data))), pad_id, run.device)
        if task.kind == "lm":
            nll, _ = forward_loss(model, batch, task, reduction="sum")
            total_nll += nll.item()
            tokens += int(batch["attention_mask"][:, 1:].sum())
        else:
            _, logits = forward_loss(model, batch, task)
            outputs.append(logits.float().cpu())
    model.train(was_training)
    if task.kind == "lm":
        return {"loss": total_nll / max(tokens, 1), "perplexity": M.perplexity(total_nll, tokens)}
    gold = np.asarray(data.labels)
    return M.classification_metrics(torch.cat(outputs).numpy(), gold, task.num_labels)


def train(run: Run) -> bool:
    """Run optimiser steps from run.step to max_steps; False when stopped early by trainer.stop_at_step."""
    from tqdm.auto import tqdm

    cfg, model, task = run.cfg, run.model, run.task
    t, optim_cfg = cfg.trainer, cfg.optim
    train_data = run.data["train"]
    pad_id = run.tokenizer.pad_token_id or 0
    has_validation = "validation" in run.data
    model.train()
    bar = tqdm(total=t.max_steps, initial=run.step, disable=not t.progress_bar, dynamic_ncols=True, unit="step")
    started, steps_here = time.perf_counter(), 0
    while run.step < t.max_steps:
        # -- one optimiser step; param lists are re-read from the optimizer (ASLoRA may swap parameters)
        factor = lr_factor(run.step, t.max_steps, optim_cfg.warmup_ratio)
        for group in run.optimizer.param_groups:
            group["lr"] = group.setdefault("base_lr", group["lr"]) * factor
        batch = collate(train_data, batch_indices(len(train_data), t.batch_size, run.step, cfg.seed), pad_id, run.device)
        loss, _ = forward_loss(model, batch, task)
        extra = vbshare.extra_loss(model) if run.method else None
        total = loss if extra is None else loss + extra
        run.optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = None
        if optim_cfg.grad_clip is not None:
            params = [p for g in run.optimizer.param_groups for p in g["params"] if p.grad is not None]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, optim_cfg.grad_clip))
        run.optimizer.step()
        run.step += 1
        steps_here += 1
        if run.method:
            vbshare.after_step(model, run.optimizer, run.step)

        # -- bookkeeping: log, evaluate, checkpoint
        lr = run.optimizer.param_groups[0]["lr"]
        rate = steps_here / (time.perf_counter() - started)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
        if run.step % t.log_every == 0 or run.step == t.max_steps:
            record = {"step": run.step, "loss": loss.item(), "lr": lr, "steps_per_s": rate}
            if extra is not None:
                record["extra_loss"] = extra.item()
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            write_metrics(run, record)
        if has_validation and (run.step % t.eval_every == 0 or run.step == t.max_steps):
            scores = evaluate(run, "validation")
            write_metrics(run, {"step": run.step, "split": "validation", **scores})
            log.info("step %d validation %s", run.step, format_scores(scores))
            update_best(run, scores)
        if t.checkpoint_every and run.step % t.checkpoint_every == 0:
            run.train_seconds += time.perf_counter() - started
            started, steps_here = time.perf_counter(), 0
            save_checkpoint(run)
        if t.stop_at_step is not None and run.step >= t.stop_at_step and run.step < t.max_steps:
            bar.close()
            log.info("stopped at step %d (trainer.stop_at_step); continue with trainer.resume=%s", run.step, run.run_dir)
            return False
    bar.close()
    run.train_seconds += time.perf_counter() - started
    return True


def update_best(run: Run, scores: dict[str, float]) -> None:
    metric = run.task.metric
    if metric not in scores:
        return
    better = M.higher_is_better(metric)
    best = run.best
    if best is None or (scores[metric] > best[metric] if better else scores[metric] < best[metric]):
        run.best = {"step": run.step, "split": "validation", **scores}


def format_scores(scores: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in scores.items())


def write_metrics(run: Run, record: dict[str, Any]) -> None:
    """Append one JSON line to metrics.jsonl and mirror it to the logger."""
    run.history.append(record)
    with (run.run_dir / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    prefix = record.get("split", "train")
    run.logger.log({f"{prefix}/{k}": v for k, v in record.items() if k not in ("step", "split")}, step=record["step"])


# ================================================================================================= checkpoints
def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(run: Run) -> None:
    """Write <run dir>/checkpoint atomically: build it in a temporary folder, then swap it in by rename.

    Holds the trainable weights in their *training* form (`save_adapter(stored_form=False)`: adapter tensors,
    the method's metadata such as ASLoRA tie-sets or SoRA's unpruned gates, and the head; or the whole model
    for full fine-tuning), the optimiser state, the RNG states, the step (which fixes the data-order
    position) and the best score so far.
    """
    final = run.run_dir / CHECKPOINT
    tmp, old = run.run_dir / f".{CHECKPOINT}.tmp", run.run_dir / f".{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    if run.method:
        vbshare.save_adapter(run.model, tmp / ADAPTER, modules=run.head_modules, stored_form=False)
    else:
        atomic_torch_save(run.model.state_dict(), tmp / WEIGHTS)
    atomic_torch_save({
        "step": run.step,
        "optimizer": run.optimizer.state_dict(),
        "rng": rng_states(),
        "best": run.best,
        "train_seconds": run.train_seconds,
        "logger_id": run.logger_id,
        "config": comparable_config(run.cfg),
    }, tmp / TRAINER_STATE)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir: Path) -> Path:
    for candidate in (run_dir / CHECKPOINT, run_dir / f".{CHECKPOINT}.old"):  # .old: a crash mid-swap
        if (candidate / TRAINER_STATE).is_file():
            return candidate
    raise VBShareError(f"no checkpoint in {run_dir}; trainer.resume needs a run directory with a {CHECKPOINT}/ folder")


def comparable_config(cfg: DictConfig) -> dict[str, Any]:
    """The config flattened to {dotted key: value}, minus the keys a resumption may change."""
    flat: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif not any(prefix == k or prefix.startswith(k + ".") for k in RESUME_FREE_KEYS):
            flat[prefix] = value

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def check_resumable(resume_dir: Path, cfg: DictConfig) -> None:
    saved = torch.load(find_checkpoint(resume_dir) / TRAINER_STATE, map_location="cpu", weights_only=False)["config"]
    now = comparable_config(cfg)
    for key in sorted(set(saved) | set(now)):
        if saved.get(key, "<absent>") != now.get(key, "<absent>"):
            raise VBShareError(
                f"cannot resume {resume_dir}: {key} was {saved.get(key, '<absent>')!r} there but is "
                f"{now.get(key, '<absent>')!r} now; resume with the same settings"
            )


def load_checkpoint(run: Run) -> None:
    """Restore weights (adapter metadata such as ASLoRA tie-sets first), rebuild the optimiser from the
    restored parameters, load its state, then the RNG states, step and best score; trim metrics.jsonl."""
    folder = find_checkpoint(run.run_dir)
    state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=False)
    if run.method:  # metadata (ASLoRA tie-sets) first, then the tensors and the head
        vbshare.load_adapter(run.model, folder / ADAPTER)
        for name in run.head_modules:
            run.model.get_submodule(name).requires_grad_(True)
    else:
        run.model.load_state_dict(torch.load(folder / WEIGHTS, map_location=run.device, weights_only=True))
    run.model.to(run.device)
    run.optimizer = build_optimizer(run.cfg, run.model, run.method)
    run.optimizer.load_state_dict(state["optimizer"])
    set_rng_states(state["rng"])
    run.step, run.best = state["step"], state["best"]
    run.train_seconds, run.logger_id = state["train_seconds"], state["logger_id"]
    metrics = run.run_dir / "metrics.jsonl"
    if metrics.is_file():  # drop what the interrupted run logged after its last checkpoint
        kept = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        run.history = [r for r in kept if r["step"] <= run.step]
        atomic_write(metrics, "".join(json.dumps(r) + "\n" for r in run.history).encode())
    log.info("resumed from %s at step %d", folder, run.step)


# ======================================================================================================= save
def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / BYTES_PER_MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_MIB


def sharing_pattern(model: nn.Module, method: str) -> dict[str, Any] | None:
    """A compact record of what the method shares / keeps (METHODS.md §4), for summary.json."""
    state = vbshare.state_of(model)
    if method == "sora":
        from ..sora import retained_ranks

        return {"retained_ranks": retained_ranks(model)}
    if method == "aslora":
        return {"merges": len(getattr(state, "history", []))}
    return None


def save_outputs(run: Run, wall_seconds: float) -> dict[str, Any]:
    """Final evaluation, adapter folders and summary.json; returns the summary."""
    cfg, model, task = run.cfg, run.model, run.task
    final = {split: evaluate(run, split) for split in task.eval_splits}
    for split, scores in final.items():
        write_metrics(run, {"step": run.step, "split": f"final_{split}", **scores})
        log.info("final %s %s", split, format_scores(scores))

    if run.method:
        counted = vbshare.summary(model)  # stored parameters / bytes in the method's stored form
        trainable, head = counted.trainable, counted.other_trainable
        stored_params, adapter_bytes = counted.stored, counted.adapter_bytes
        if run.method == "vblora":  # the compact inference form, besides the trainable one in adapter/
            vbshare.save_adapter(model, run.run_dir / "adapter_topk", topk_only=True, modules=run.head_modules)
        sharing = sharing_pattern(model, run.method)
        write_history = getattr(vbshare.adapters, "write_merge_history", None)
        if run.method == "aslora" and write_history is not None:  # the sharing pattern (METHODS.md §3)
            write_history(model, run.run_dir / "merge_history.jsonl")
        # save_adapter writes each method's stored form: SoRA pruned to plain LoRA (vbshare.prune).
        vbshare.save_adapter(model, run.run_dir / "adapter", modules=run.head_modules)
        hyper = {"targets": to_python(cfg.adapter.targets), **to_python(cfg.adapter.hparams), "lr": to_python(cfg.adapter.lr)}
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        head, stored_params, adapter_bytes = 0, trainable, None
        model.save_pretrained(str(run.run_dir / "model"))
        hyper = {"lr": cfg.optim.full_finetune_lr}
        sharing = None

    train_steps_here = run.step  # steps/s over the (summed) training time of every resumption
    summary = {
        "method": run.method or "full_finetune",
        "task": task.name,
        "model": cfg.model.loader._target_.rsplit(".", 1)[-1],
        "hyperparameters": hyper,
        "metric": task.metric,
        "final": final,
        "best": run.best,
        "steps": run.step,
        "trainable_parameters": trainable,
        "head_parameters": head,
        "stored_parameters": stored_params,
        "sharing": sharing,
        "adapter_bytes": adapter_bytes,
        "wall_time_s": round(wall_seconds, 3),
        "train_time_s": round(run.train_seconds, 3),
        "steps_per_s": round(train_steps_here / max(run.train_seconds, 1e-9), 4),
        "peak_memory_mb": round(peak_memory_mb(run.device), 1),
        "device": str(run.device),
    }
    atomic_write(run.run_dir / "summary.json", json.dumps(summary, indent=2).encode())
    headline = final.get("test", final.get("validation", {})).get(task.metric)
    log.info("done in %.1fs: %s %s=%s; files in %s", wall_seconds, summary["method"], task.metric,
             None if headline is None else round(headline, 4), run.run_dir)
    return summary


# ====================================================================================================== entry
from hydra.errors import HydraException  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

USER_ERRORS = (VBShareError, HydraException, OmegaConfBaseException)  # reported as one line, no traceback

def run_training(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any] | None:
    """setup -> train -> save for a composed config; returns summary.json's content (None if stopped early).

    Usable in-process with Hydra's compose API: `run_training(compose("train", overrides), tmp_dir)`.
    """
    started = time.perf_counter()
    run = setup(cfg, Path(run_dir))
    atomic_write(run.run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
    run.logger_id = run.logger.start(run.run_dir, OmegaConf.to_container(cfg, resolve=True), run.logger_id)
    try:
        if not train(run):
            return None
        return save_outputs(run, time.perf_counter() - started)
    finally:
        run.logger.finish({"best_" + k: v for k, v in (run.best or {}).items() if k != "split"})


def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        run_training(cfg, HydraConfig.get().runtime.output_dir)
    except USER_ERRORS as err:  # report here: past this point Hydra adds its own "Error executing job" line
        exit_with(err)


def exit_with(err: BaseException) -> None:
    if os.environ.get("VBSHARE_DEBUG") == "1":
        raise err
    print(f"error: {one_line(err)}", file=sys.stderr)
    sys.exit(2)


def one_line(err: BaseException) -> str:
    """A user-facing one-line message: a VBShareError in the cause chain wins; otherwise Hydra's / OmegaConf's
    message with its lists folded ("options: a, b") and the config-search-path dump dropped."""
    chain, seen = [], err
    while seen is not None:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for candidate in chain:
        if isinstance(candidate, VBShareError):
            return str(candidate)
    texts = [str(chain[-1])] if type(err).__name__ == "InstantiationException" else [str(e) for e in chain[:2]]
    parts: list[str] = []
    for text in texts:
        lines = [line.strip().rstrip(".") for line in text.split("Config search path")[0].splitlines()]
        lines = [line for line in lines if line and not line.startswith(("full_key:", "object_type="))
                 and "$FULL_KEY" not in line]
        for i, line in enumerate(lines):
            if line.endswith(":"):  # Hydra ends with a header and one item per line: fold them
                parts.append(f"{line} {', '.join(lines[i + 1:])}")
                break
            parts.append(line)
    return "; ".join(parts) or type(err).__name__


def main() -> None:
    """Console entry: Hydra app; bad input (composition errors, VBShareError) -> one 'error: ...' line, exit 2.

    HYDRA_FULL_ERROR=1 (or VBSHARE_DEBUG=1) shows full tracebacks instead.
    """
    import hydra

    debug = os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("VBSHARE_DEBUG") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach this function rather than Hydra's report
    if not CONFIG_DIR.is_dir():
        print(f"error: config folder {CONFIG_DIR} not found; vbshare.train needs the repository checkout "
              "(pip install -e .)", file=sys.stderr)
        sys.exit(2)
    app = hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")(_hydra_main)
    try:
        app()
    except USER_ERRORS as err:  # composition errors: unknown group option, typo'd key, missing value
        if debug:
            raise
        exit_with(err)
