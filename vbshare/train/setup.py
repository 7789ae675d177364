"""Everything a run needs before its first step: `setup(cfg, run_dir) -> Run`.

In order: check the settings (every `_target_` the config names must be one of vbshare's own builders or a
torch.optim optimiser: `check_builders`), start the engine (processes, device, precision), seed, build the task and the
model, tokenise once, let the run mode choose what trains (inject the adapter), keep the trained tensors in
fp32, turn on activation checkpointing, restore a checkpoint when resuming, wrap the model for data
parallelism and build the optimiser (AdamW over the mode's parameter groups, each remembering its peak lr).
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate.utils import set_seed
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers.utils import logging as hf_logging

from ..data.encoding import Encoded, tokenize_task
from ..data.examples import Task
from ..errors import VBShareError
from ..quantization import check_quantization
from . import checkpoints
from .engine import Engine
from .loggers import NullLogger
from .modes import FULL_FINETUNE, RunMode, run_mode
from .run import Run
from .settings import TrainerSettings, read_settings

log = logging.getLogger("vbshare.train")

DATA_ORDER_SEED_STRIDE = 1_000_003  # as in batches.py: seeds of process k > 0 start past every epoch's seed
RANK_SEED_STRIDE = 7_919  # process k > 0 draws dropout from seed * DATA_ORDER_SEED_STRIDE + k * this + step
# The only modules whose functions and classes a config may name as `_target_` (besides torch.optim's
# optimisers): a config, and so a recorded override, can build vbshare's tasks, models and loggers, nothing else.
BUILDER_MODULES = ("vbshare.data.tasks", "vbshare.data.hub", "vbshare.models", "vbshare.train.loggers")
TARGET_KEY = "_target_"


def is_builder(target: Any) -> bool:
    """True for `<module>.<name>` with the module in BUILDER_MODULES and `name` a public function or class
    defined in that module (not one it imports), or `torch.optim.<Optimizer subclass>`."""
    if not isinstance(target, str) or "." not in target:
        return False
    module_name, name = target.rsplit(".", 1)
    if name.startswith("_"):
        return False
    if module_name == "torch.optim":
        found = getattr(torch.optim, name, None)
        return isinstance(found, type) and issubclass(found, torch.optim.Optimizer)
    if module_name not in BUILDER_MODULES:
        return False
    found = getattr(importlib.import_module(module_name), name, None)
    return callable(found) and getattr(found, "__module__", None) == module_name


def check_builders(cfg: DictConfig) -> None:
    """Refuse, in one line, a `_target_` anywhere in the config that `is_builder` does not allow: a config
    composed from a run's recorded overrides (`+data._target_=...`) must not run other code."""
    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if TARGET_KEY in node and not is_builder(node[TARGET_KEY]):
                raise VBShareError(
                    f"{where + '.' if where else ''}{TARGET_KEY}={node[TARGET_KEY]!r} is not one of vbshare's builders "
                    f"({', '.join(m + '.*' for m in BUILDER_MODULES)}) or a torch.optim optimizer; nothing else "
                    "is instantiated from a config")
            for key, value in node.items():
                walk(value, f"{where}.{key}" if where else str(key))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    walk(OmegaConf.to_container(cfg, resolve=True), "")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a job scheduler's or taskset's allotment)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def set_threads(setting: int | str | None) -> int:
    """CPU threads for torch (trainer.num_threads, checked by the settings). "auto": one per core this process
    may run on (`usable_cores`); a number as given; None leaves torch's default. The load average is not
    consulted: cores waiting on I/O count in it although they are free to compute. On a machine shared with
    other jobs, set a number."""
    if setting is None:
        return torch.get_num_threads()
    if setting == "auto":
        setting = usable_cores()
    torch.set_num_threads(setting)
    return setting


@contextlib.contextmanager
def no_loading_bars() -> Iterator[None]:
    """transformers' per-tensor "Loading weights" progress bars off while a model loads (they flood sweeps)."""
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def set_dropout(model: nn.Module, p: float | None) -> None:
    """trainer.dropout (in [0, 1), checked by the settings): None keeps the model's own rates; a number sets
    every nn.Dropout's p (0 turns it off)."""
    if p is None:
        return
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = float(p)


def keep_trained_in_fp32(model: nn.Module, precision: str) -> None:
    """Trained tensors (and so their gradients and optimiser state) stay fp32 whatever the base's dtype
    (`model.dtype`); autocast computes in the lower precision, which a lower-precision base therefore needs."""
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    frozen = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()
              and not p.requires_grad and p.dtype != torch.float32}
    if frozen and precision == "fp32":
        raise VBShareError(f"the frozen weights are {', '.join(sorted(frozen))} (model.dtype) but trainer.precision=fp32 "
                           "would feed their outputs to fp32 trained tensors; set trainer.precision=bf16 (or fp16 on GPU)")


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block's activations in backward (transformers' own checkpointing,
    non-reentrant, so frozen inputs and adapters inside the blocks need nothing special)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise VBShareError(f"trainer.activation_checkpointing=true needs a transformers model that supports gradient "
                           f"checkpointing; {type(model).__name__} does not")
    non_reentrant = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the older name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)


def check_batch(trainer: TrainerSettings, engine: Engine) -> None:
    """The global batch must split evenly into processes × micro-batches."""
    accum = trainer.grad_accum_steps
    if trainer.batch_size % (engine.num_processes * accum):
        raise VBShareError(
            f"trainer.batch_size={trainer.batch_size} (the global batch) must be divisible by the number of "
            f"processes ({engine.num_processes}) times trainer.grad_accum_steps ({accum})")


def check_snapshots(every: int | None, mode: RunMode) -> None:
    """trainer.snapshot_every keeps adapter snapshots: only a run that trains an adapter has them."""
    if every is None:
        return
    if not mode.snapshots:
        raise VBShareError("trainer.snapshot_every keeps adapter snapshots and this run trains no adapter; "
                           "set trainer.snapshot_every=null")


def check_quantized_base(cfg: DictConfig, engine: Engine) -> None:
    """model.quantization (a bitsandbytes-quantized frozen base) before anything loads: a known kind with
    bitsandbytes installed, an adapter to train around it (its packed weights take no gradient), and not sharded
    by FSDP (it shards plain tensors, not packed codes with their scales)."""
    quantization = check_quantization(cfg.model.get("quantization"))
    if quantization is None:
        return
    adapter = cfg.get("adapter")
    if adapter is None or adapter.get("method") == FULL_FINETUNE:
        raise VBShareError(f"model.quantization={quantization} freezes the base in packed form, so full fine-tuning "
                           "cannot train it; add +adapter=<method> or set model.quantization=null")
    if engine.sharded:
        raise VBShareError(f"model.quantization={quantization} with trainer.strategy=fsdp: FSDP cannot shard "
                           "bitsandbytes' packed weights; use trainer.strategy=ddp (a 4-bit base is small already)")


def build_task_and_model(cfg: DictConfig, device: torch.device | None = None) -> tuple[Task, nn.Module, Any, dict[str, Encoded]]:
    """The task (`cfg.data`), a fresh model and its tokenizer (`cfg.model`; seeded by `cfg.seed`) and the
    tokenised splits, capped at trainer.max_examples: what training and `vbshare.evaluate` start from.
    `device`: where a quantized base (model.quantization) is quantized and kept; other bases load on the CPU."""
    task: Task = instantiate(cfg.data)
    placement = {"device": str(device)} if device is not None and cfg.model.get("quantization") else {}
    with no_loading_bars():
        model, tokenizer = instantiate(cfg.model.loader, task=task.kind, num_labels=task.num_labels, seed=cfg.seed,
                                       **placement)
    return task, model, tokenizer, tokenize_task(task, tokenizer, cfg.trainer.max_examples)


def setup(cfg: DictConfig, run_dir: Path) -> Run:
    """Check the settings (`read_settings`: every range, before anything starts), then build engine, task,
    model (+ adapter), tokenised data and optimiser; restore a checkpoint when resuming."""
    settings = read_settings(cfg)
    check_builders(cfg)
    t = settings.trainer
    resume_dir = Path(t.resume) if t.resume else None
    if resume_dir is not None:
        checkpoints.check_resumable(resume_dir, cfg)
        if resume_dir.resolve() != Path(run_dir).resolve():
            log.info("resuming the run in %s (its files are continued there)", resume_dir)
        run_dir = resume_dir
    run_dir.mkdir(parents=True, exist_ok=True)

    engine = Engine(t)
    check_batch(t, engine)
    if not engine.is_main:
        logging.getLogger("vbshare").setLevel(logging.WARNING)  # rank 0 alone logs
    if engine.distributed:
        log.info("data-parallel (%s): %d processes (%s); global batch %d, %d per process per step",
                 t.strategy, engine.num_processes, engine.backend, t.batch_size,
                 t.batch_size // engine.num_processes)
    threads = set_threads(t.num_threads) if engine.device.type == "cpu" else None
    log.info("device %s%s, precision %s", engine.device, f" ({threads} threads)" if threads else "", engine.precision)
    set_seed(settings.seed)

    check_quantized_base(cfg, engine)
    task, model, tokenizer, data = build_task_and_model(cfg, engine.device)
    set_dropout(model, t.dropout)
    if len(data["train"]) < t.batch_size:
        log.warning("the training split has %d examples, fewer than trainer.batch_size=%d: every batch repeats "
                    "examples (set a smaller trainer.batch_size for batches of distinct examples)",
                    len(data["train"]), t.batch_size)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in data.items())
    log.info("task %s (%s, metric %s): %s %s", task.name, task.kind, task.metric, sizes,
             "blocks" if task.kind == "lm" else "examples")

    mode = run_mode(cfg, task.kind)
    check_snapshots(t.snapshot_every, mode)
    mode.prepare(model)
    keep_trained_in_fp32(model, engine.precision)
    if t.activation_checkpointing:
        enable_activation_checkpointing(model)
    saved_state = checkpoints.load_weights(run_dir, mode, model) if resume_dir is not None else None

    engine.wrap(model)
    optimizer = build_optimizer(cfg, mode, model)
    logger = instantiate(cfg.logger) if engine.is_main else NullLogger()
    run = Run(cfg, run_dir, task, data, model, tokenizer, engine.prepare_optimizer(optimizer), engine, mode, logger,
              settings=settings)
    if saved_state is not None:
        checkpoints.restore_trainer_state(run, saved_state)
    if engine.process_index > 0:  # its own dropout stream (process 0 keeps the single-process one); init is done
        torch.manual_seed(settings.seed * DATA_ORDER_SEED_STRIDE + RANK_SEED_STRIDE * engine.process_index + run.step)
    return run


def build_optimizer(cfg: DictConfig, mode: RunMode, model: nn.Module) -> torch.optim.Optimizer:
    """`optim.optimizer` (AdamW) over the mode's parameter groups; each group remembers its peak lr as
    "base_lr", which the schedule scales every step."""
    groups = mode.param_groups(model)
    for group in groups:
        group["base_lr"] = group["lr"]
    return instantiate(cfg.optim.optimizer)(groups)
