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
from ..data.batching import collate
from ..data.tasks import Encoded, Task, tokenize_task
from ..errors import VBShareError
from ..records import flatten, read_jsonl
from . import metrics as M
from .loggers import NullLogger

log = logging.getLogger("vbshare.train")

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # repo-root configs/ (editable install)
CHECKPOINT = "checkpoint"  # resumable state inside a run directory
TRAINER_STATE = "trainer_state.pt"
WEIGHTS = "weights.pt"  # full fine-tuning: the whole model
ADAPTER = "adapter"  # adapter runs: vbshare.save_adapter folder in training form
RANK_SEED_STRIDE = 7_919  # torchrun rank k > 0 draws dropout from seed * DATA_ORDER_SEED_STRIDE + k * this + step
DATA_ORDER_SEED_STRIDE = 1_000_003  # epoch e of seed s shuffles with generator seed s * stride + e
BYTES_PER_MIB = 2**20
KIB_PER_MIB = 1024  # ru_maxrss is in KiB on Linux
LOAD_SLACK = 0.5  # load-average share not counted as a busy core by num_threads=auto
# Keys of the adapter config that are not hyperparameters; every other key goes to vbshare.inject.
NON_HPARAM_KEYS = ("method", "targets", "exclude", "layers", "lr")
FULL_FINETUNE = "full_finetune"  # `+adapter=full` (or no adapter): every weight trains
HEAD_ONLY = "head_only"  # `+adapter=head_only`: only the task head (model.head_modules) trains
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
    method: str | None  # the vbshare adapter method; None: full fine-tuning or head-only (see mode)
    head_modules: list[str]
    logger: Any
    step: int = 0  # optimiser steps completed
    best: dict[str, Any] | None = None  # {"step", "split", metric: value}
    train_seconds: float = 0.0  # summed over resumptions
    logger_id: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    mode: str = "adapter"  # adapter | full_finetune | head_only
    rank_diff: float | None = None  # distributed: largest trainable-value difference between ranks at the end
    dist: "Dist" = None  # filled by setup

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0


# ================================================================================================ distributed
@dataclass
class Dist:
    """Data-parallel layout under torchrun (WORLD_SIZE > 1); rank 0 / world 1 otherwise."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device_name: str) -> Dist:
    """Join the torchrun process group: nccl when this rank trains on a GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return Dist(rank, world, local_rank, backend)


def optimised_parameters(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The optimiser's parameters as they are now (ASLoRA's merges remove tied-away B's from the groups)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def sync_gradients(run: "Run") -> None:
    """Average the gradients of every optimised parameter over the ranks (one flat all-reduce).

    A parameter without a gradient on every rank keeps grad None, as in a single-process run; one with a
    gradient on some rank only gets the average with zeros elsewhere."""
    import torch.distributed as dist

    params = optimised_parameters(run.optimizer)
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=run.device)  # (P,)
    dist.all_reduce(has)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    dist.all_reduce(flat)
    flat /= run.dist.world
    offset = 0
    for p, seen in zip(params, has.tolist()):
        n = p.numel()
        if seen:
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


def trainable_state(run: "Run") -> Tensor:
    """Every optimised parameter, flattened in float64 (distributed agreement checks)."""
    params = optimised_parameters(run.optimizer)
    return torch.cat([p.detach().reshape(-1).double() for p in params])


def check_in_sync(run: "Run") -> float:
    """Largest |difference| of any trainable value between ranks (0 when they agree bit for bit).

    With all-reduced gradients every rank applies the same update, and ASLoRA's merge decisions and SoRA's
    gates follow deterministically from identical parameters (random pairing uses a seeded generator of its
    own); a non-zero difference means a decision diverged, so the run stops rather than save a mixture."""
    import torch.distributed as dist

    state = trainable_state(run)
    low, high = state.clone(), state.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    diff = float((high - low).abs().max()) if state.numel() else 0.0
    if diff != 0.0:
        raise VBShareError(f"ranks disagree after step {run.step}: trainable parameters differ by up to {diff:.3e} "
                           "(a merge or gate decision diverged); report this with the config")
    return diff


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
    dist_info = init_distributed(cfg.trainer.device)
    device = pick_device(cfg.trainer.device)
    if dist_info.active:
        if device.type == "cuda":
            device = torch.device("cuda", dist_info.local_rank)
        if cfg.trainer.batch_size % dist_info.world:
            raise VBShareError(f"trainer.batch_size={cfg.trainer.batch_size} (the global batch) must be divisible "
                               f"by the number of processes ({dist_info.world})")
        if dist_info.rank != 0:
            logging.getLogger("vbshare").setLevel(logging.WARNING)  # rank 0 alone logs
        log.info("data-parallel: %d processes (%s); global batch %d, %d per rank", dist_info.world,
                 dist_info.backend, cfg.trainer.batch_size, cfg.trainer.batch_size // dist_info.world)
    threads = set_threads(cfg.trainer.num_threads) if device.type == "cpu" else None
    log.info("device %s%s", device, f" ({threads} threads)" if threads else "")
    seed_everything(cfg.seed)

    task: Task = instantiate(cfg.data)
    model, tokenizer = instantiate(cfg.model.loader, task=task.kind, num_labels=task.num_labels, seed=cfg.seed)
    set_dropout(model, cfg.trainer.get("dropout"))
    data = tokenize_task(task, tokenizer, cfg.trainer.max_examples)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in data.items())
    log.info("task %s (%s, metric %s): %s %s", task.name, task.kind, task.metric, sizes,
             "blocks" if task.kind == "lm" else "examples")

    adapter = cfg.get("adapter")
    head_modules = list(cfg.model.head_modules) if task.kind == "classification" else []
    mode = adapter_mode(cfg)
    method = None
    if mode == FULL_FINETUNE:
        if adapter is None:
            log.info("no adapter given: FULL FINE-TUNING baseline (every weight trains); "
                     "add +adapter=lora|vblora|aslora|sora to train an adapter instead")
        for param in model.parameters():
            param.requires_grad_(True)
    else:
        if mode == HEAD_ONLY:
            if not head_modules:
                raise VBShareError("adapter=head_only needs a task head: set model.head_modules (classification only)")
            model.requires_grad_(False)
        else:
            method = adapter.method
            vbshare.inject(model, method, **inject_arguments(adapter))
        for name in head_modules:  # inject froze everything: the task head trains alongside the adapter
            try:
                model.get_submodule(name).requires_grad_(True)
            except AttributeError:
                raise VBShareError(f"the model has no module {name!r} to train as head; set model.head_modules") from None
        if method:
            log.info("%s", str(vbshare.summary(model)).splitlines()[-1])
        else:
            log.info("HEAD-ONLY baseline: only %s train (%d parameters)", ", ".join(head_modules),
                     sum(p.numel() for p in model.parameters() if p.requires_grad))
    model.to(device)

    logger = instantiate(cfg.logger)
    if dist_info.rank != 0:
        logger = NullLogger()
    run = Run(cfg, run_dir, task, data, model, tokenizer, build_optimizer(cfg, model, mode), device, method,
              head_modules, logger, mode=mode, dist=dist_info)
    if resume_dir is not None:
        load_checkpoint(run)
    if dist_info.rank > 0:  # its own dropout stream (rank 0 keeps the single-process one); init is done
        torch.manual_seed(cfg.seed * DATA_ORDER_SEED_STRIDE + RANK_SEED_STRIDE * dist_info.rank + run.step)
    return run


def set_dropout(model: nn.Module, p: float | None) -> None:
    """trainer.dropout: None keeps the model's own rates; a number sets every nn.Dropout's p (0 turns it off)."""
    if p is None:
        return
    if not 0.0 <= float(p) < 1.0:
        raise VBShareError(f"trainer.dropout must be null or in [0, 1), got {p!r}")
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = float(p)


def adapter_mode(cfg: DictConfig) -> str:
    """adapter (a vbshare method), full_finetune (no adapter or `+adapter=full`) or head_only."""
    adapter = cfg.get("adapter")
    method = None if adapter is None else adapter.get("method")
    if method in (None, FULL_FINETUNE):
        return FULL_FINETUNE
    return HEAD_ONLY if method == HEAD_ONLY else "adapter"


def inject_arguments(adapter: DictConfig) -> dict[str, Any]:
    """vbshare.inject's keyword arguments: targets / exclude / layers and every hyperparameter (the adapter
    config's keys except method and lr)."""
    options = to_python(adapter)
    return {k: v for k, v in options.items() if k not in ("method", "lr")}


def hyperparameters(adapter: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in to_python(adapter).items() if k not in NON_HPARAM_KEYS}


def build_optimizer(cfg: DictConfig, model: nn.Module, mode: str) -> torch.optim.Optimizer:
    """AdamW over one group per parameter role (adapter), one group of every weight (full fine-tuning) or one
    group of the head (head-only).

    Each group remembers its peak lr as "base_lr"; the schedule scales it every step.
    """
    from hydra.utils import instantiate

    if mode == FULL_FINETUNE:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "role": "full",
                   "lr": cfg.optim.full_finetune_lr, "weight_decay": cfg.optim.weight_decay}]
    elif mode == HEAD_ONLY:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "role": "head",
                   "lr": float(to_python(cfg.adapter.lr)["head"]), "weight_decay": cfg.optim.weight_decay}]
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


def forward_loss(model: nn.Module, batch: dict[str, Tensor], task: Task, reduction: str = "mean") -> tuple[Tensor, Tensor]:
    """(task loss, outputs). Classification: cross-entropy (MSE for regression) on logits (B, C).
    LM: next-token cross-entropy of logits (B, T, V) against lm_labels[:, 1:] when the batch has them
    (instruction data: response tokens only), else against the non-padded input ids shifted by one."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "lm_labels")}
    logits = model(**inputs).logits
    if task.kind == "lm":
        if "lm_labels" in batch:
            targets = batch["lm_labels"][:, 1:]  # (B, T-1), -100 on prompt and padding
        else:
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
    bar = tqdm(total=t.max_steps, initial=run.step, disable=not (t.progress_bar and run.is_main),
               dynamic_ncols=True, unit="step")
    shard = t.batch_size // run.dist.world  # examples per rank per step (the global batch split evenly)
    started, steps_here = time.perf_counter(), 0
    while run.step < t.max_steps:
        # -- one optimiser step; param lists are re-read from the optimizer (ASLoRA may swap parameters)
        factor = lr_factor(run.step, t.max_steps, optim_cfg.warmup_ratio)
        for group in run.optimizer.param_groups:
            group["lr"] = group.setdefault("base_lr", group["lr"]) * factor
        indices = batch_indices(len(train_data), t.batch_size, run.step, cfg.seed)  # the global batch
        if run.dist.active:  # this rank's contiguous shard of it
            indices = indices[run.dist.rank * shard:(run.dist.rank + 1) * shard]
        batch = collate(train_data, indices, pad_id, run.device)
        loss, _ = forward_loss(model, batch, task)
        extra = vbshare.extra_loss(model) if run.method else None
        total = loss if extra is None else loss + extra
        run.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if run.dist.active:
            sync_gradients(run)
        grad_norm = None
        if optim_cfg.grad_clip is not None:
            params = [p for p in optimised_parameters(run.optimizer) if p.grad is not None]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, optim_cfg.grad_clip))
        run.optimizer.step()
        run.step += 1
        steps_here += 1
        if run.method:
            vbshare.after_step(model, run.optimizer, run.step)

        # -- bookkeeping: log, evaluate, checkpoint (rank 0 alone writes anything)
        if run.dist.active and (run.step % t.log_every == 0 or run.step == t.max_steps):
            import torch.distributed as dist

            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= run.dist.world  # the global batch's mean loss, as a single process logs it
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
        if run.dist.active and (run.step % t.eval_every == 0 or run.step == t.max_steps):
            check_in_sync(run)
        if has_validation and run.is_main and (run.step % t.eval_every == 0 or run.step == t.max_steps):
            scores = evaluate(run, "validation")
            write_metrics(run, {"step": run.step, "split": "validation", **scores})
            log.info("step %d validation %s", run.step, format_scores(scores))
            update_best(run, scores)
        if t.checkpoint_every and run.step % t.checkpoint_every == 0:
            run.train_seconds += time.perf_counter() - started
            started, steps_here = time.perf_counter(), 0
            if run.is_main:
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
    """Append one JSON line to metrics.jsonl and mirror it to the logger (rank 0 only)."""
    if not run.is_main:
        return
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
    elif run.mode == HEAD_ONLY:
        atomic_torch_save(head_state(run), tmp / WEIGHTS)
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


def head_state(run: Run) -> dict[str, Tensor]:
    """The task head's weights under their full names (head-only checkpoints and outputs)."""
    prefixes = tuple(name + "." for name in run.head_modules)
    return {k: v for k, v in run.model.state_dict().items() if k.startswith(prefixes)}


def find_checkpoint(run_dir: Path) -> Path:
    for candidate in (run_dir / CHECKPOINT, run_dir / f".{CHECKPOINT}.old"):  # .old: a crash mid-swap
        if (candidate / TRAINER_STATE).is_file():
            return candidate
    raise VBShareError(f"no checkpoint in {run_dir}; trainer.resume needs a run directory with a {CHECKPOINT}/ folder")


def comparable_config(cfg: DictConfig) -> dict[str, Any]:
    """The config flattened to {dotted key: value}, minus the keys a resumption may change."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    return {key: value for key, value in flat.items()
            if not any(key == free or key.startswith(free + ".") for free in RESUME_FREE_KEYS)}


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
        weights = torch.load(folder / WEIGHTS, map_location=run.device, weights_only=True)
        run.model.load_state_dict(weights, strict=run.mode != HEAD_ONLY)
    run.model.to(run.device)
    run.optimizer = build_optimizer(run.cfg, run.model, run.mode)
    run.optimizer.load_state_dict(state["optimizer"])
    set_rng_states(state["rng"])
    run.step, run.best = state["step"], state["best"]
    run.train_seconds, run.logger_id = state["train_seconds"], state["logger_id"]
    metrics = run.run_dir / "metrics.jsonl"
    if metrics.is_file() and run.is_main:  # drop what the interrupted run logged after its last checkpoint
        kept = read_jsonl(metrics)
        run.history = [r for r in kept if r["step"] <= run.step]
        atomic_write(metrics, "".join(json.dumps(r) + "\n" for r in run.history).encode())
    log.info("resumed from %s at step %d", folder, run.step)


# ======================================================================================================= save
def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / BYTES_PER_MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_MIB


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
        state = vbshare.state_of(model)
        for folder, options in state.extra_saves.items():  # e.g. VB-LoRA's top-k form in adapter_topk/
            vbshare.save_adapter(model, run.run_dir / folder, modules=run.head_modules, **options)
        for file_name, rows in state.run_records().items():  # e.g. ASLoRA's merge_history.jsonl
            atomic_write(run.run_dir / file_name, "".join(json.dumps(row) + "\n" for row in rows).encode())
        sharing = state.sharing_pattern()
        # save_adapter writes each method's stored form: SoRA pruned to plain LoRA (vbshare.prune).
        vbshare.save_adapter(model, run.run_dir / "adapter", modules=run.head_modules)
        hyper = {"targets": to_python(cfg.adapter.targets), **hyperparameters(cfg.adapter), "lr": to_python(cfg.adapter.lr)}
    elif run.mode == HEAD_ONLY:
        import safetensors.torch

        head_weights = {k: v.detach().cpu().contiguous() for k, v in head_state(run).items()}
        atomic_write(run.run_dir / ADAPTER / "head.safetensors", safetensors.torch.save(head_weights))
        trainable = head = sum(v.numel() for v in head_weights.values())
        stored_params = 0  # no adapter: the head is reported separately (docs/methods.md §4)
        adapter_bytes = (run.run_dir / ADAPTER / "head.safetensors").stat().st_size
        hyper = {"lr": to_python(cfg.adapter.lr)}
        sharing = None
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        head, stored_params, adapter_bytes = 0, trainable, None
        model.save_pretrained(str(run.run_dir / "model"))
        hyper = {"lr": cfg.optim.full_finetune_lr}
        sharing = None

    train_steps_here = run.step  # steps/s over the (summed) training time of every resumption
    summary = {
        "method": run.method or run.mode,
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
        "world_size": run.dist.world,
    }
    if run.dist.active:
        summary["distributed"] = {"world_size": run.dist.world, "backend": run.dist.backend,
                                  "max_param_diff_across_ranks": run.rank_diff}
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
    try:
        if run.is_main:
            atomic_write(run.run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
        run.logger_id = run.logger.start(run.run_dir, OmegaConf.to_container(cfg, resolve=True), run.logger_id)
        try:
            if not train(run):
                return None
            if run.dist.active:
                run.rank_diff = check_in_sync(run)  # identical adapters on every rank before rank 0 saves them
            return save_outputs(run, time.perf_counter() - started) if run.is_main else None
        finally:
            run.logger.finish({"best_" + k: v for k, v in (run.best or {}).items() if k != "split"})
    finally:
        if run.dist.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def objective(summary: dict[str, Any] | None) -> float | None:
    """The value a tuning sweeper (sweep=optuna_lr) optimises: the final validation metric (the test split is
    never used for tuning), else the final test metric for tasks without a validation split."""
    if not summary:
        return None
    final = summary["final"]
    scores = final.get("validation") or final.get("test") or {}
    value = scores.get(summary["metric"])
    return None if value is None else float(value)


def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    try:
        return objective(run_training(cfg, HydraConfig.get().runtime.output_dir))
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
