"""Distributed and mixed-precision plumbing of the training app, on Hugging Face Accelerate.

`Engine` owns everything that depends on how many processes train and in what precision, so the loop and the
step recipe read as single-process PyTorch:

* processes, devices and the process group: `Accelerator` (under `accelerate launch` or `torchrun`; gloo on
  CPU, nccl on GPUs); rank 0 alone writes files.
* data parallelism, `trainer.strategy`:
  - `ddp`: `Accelerator.prepare_model` wraps the model in DistributedDataParallel; gradients are averaged
    over the processes on the last micro-batch of a step (`no_sync` before it).
  - `fsdp`: PyTorch's FSDP2 (`fully_shard`) shards the FROZEN weights — per transformer block one unit of
    the block's largest sub-modules without a trainable tensor, and the rest at the root — while every
    trainable tensor (adapters' own, tensors shared across layers such as VB-LoRA's bank or ASLoRA's A's
    and B's, the task head) stays whole on every process, with gradients averaged by DDP. Hooks that read
    or edit adapter tensors between steps (composition, merging, thresholding, saving) therefore see plain
    tensors, exactly as under `ddp`; the frozen base, where the memory is, is what gets sharded.
* a changed parameter set (a method tying two tensors into one in `after_step`): the data-parallel
  wrapper is rebuilt around the model, so every process reduces exactly the new parameters.
* mixed precision, `trainer.precision`: autocast (`Accelerator.autocast`), a gradient scaler for fp16,
  unscaling before clipping (`Accelerator.clip_grad_norm_`).
* agreement between processes: `check_in_sync` stops a run whose processes hold different trainable values.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import gather_object, is_torch_version
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import vbshare

from ..adapters import AdapterState
from ..errors import VBShareError
from .settings import TrainerSettings
from .step import optimised_parameters

log = logging.getLogger("vbshare.train")

# trainer.precision (one of settings.PRECISIONS) -> Accelerate's name
ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
FSDP2_TORCH = "2.7.0"  # fully_shard over a list of modules, with ignored_params


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide state, so the next in-process run may choose another precision.

    Accelerate keeps one state per process and refuses a second `Accelerator` with other settings; the app runs
    many trainings in one process (tests, the comparison app, notebooks). Its own test utilities reset it the
    same way."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class Engine:
    """The `Accelerator` of one run, and the model as each part of the loop needs it.

    Attributes:
        model: the model itself (holds `model.vbshare`; evaluation, hooks and saving use it).
        wrapped: what training forward passes run through (DDP wrapper and/or compiled; `model` alone in a
            single fp32 process).
    """

    def __init__(self, trainer: TrainerSettings):
        """`trainer`: the checked trainer settings (`read_settings(cfg).trainer`): device, precision, strategy,
        compile."""
        precision = trainer.precision
        self.strategy = trainer.strategy
        cpu = use_cpu(trainer.device)
        if precision == "fp16" and cpu:  # Accelerate would silently train in fp32
            raise VBShareError("trainer.precision=fp16 needs a CUDA device (its gradient scaler runs on GPUs); "
                               "use trainer.precision=bf16 on CPU")
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if launched not in ("no", ACCELERATE_PRECISION[precision]):  # `accelerate launch --mixed_precision ...`
            raise VBShareError(f"accelerate launch --mixed_precision={launched} disagrees with trainer.precision={precision}; "
                               "set the precision with trainer.precision and launch without --mixed_precision")
        reset_accelerate_state()
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=ACCELERATE_PRECISION[precision])
        self.precision = precision
        self.compile = trainer.compile
        self.model: nn.Module | None = None
        self.wrapped: nn.Module | None = None
        self._ddp: nn.Module | None = None  # the DistributedDataParallel wrapper, when there is one

    # -- where this process stands ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def distributed(self) -> bool:
        return self.num_processes > 1

    @property
    def backend(self) -> str | None:
        return dist.get_backend() if self.distributed else None

    @property
    def sharded(self) -> bool:
        """The frozen weights are split over the processes (every process must run every forward pass)."""
        return self.strategy == "fsdp" and self.distributed

    # -- wrapping ---------------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """Place the model on this process's device and wrap it for data parallelism (and compile it).

        Returns what training forward passes run through (also kept as `self.wrapped`)."""
        self.model = model
        if self.sharded:
            check_shardable(model)
            shard_frozen_weights(model.to(self.device))
            self._ddp = self._ddp_around_shards(model)
        else:
            if self.strategy == "fsdp":
                log.info("trainer.strategy=fsdp with one process: nothing to shard, training as usual")
            prepared = self.accelerator.prepare_model(model)
            self._ddp = prepared if prepared is not model else None
        self.wrapped = self._compiled(self._ddp or model)
        return self.wrapped

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimiser as Accelerate steps it (through the gradient scaler under fp16)."""
        return self.accelerator.prepare_optimizer(optimizer)

    def rewrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """After the set of trained parameters changed: a fresh data-parallel wrapper over the model as it is now.

        The old wrapper still expects gradients for parameters that no longer exist (it would fail, or wait
        forever, on the next step). Returns the optimiser registered anew with Accelerate."""
        if self._ddp is None:  # one process: nothing reduces gradients, nothing to rebuild
            return optimizer
        inner = getattr(optimizer, "optimizer", optimizer)
        if self.sharded:
            self._ddp = self._ddp_around_shards(self.model)
        else:
            model = self.accelerator.unwrap_model(self._ddp, keep_fp32_wrapper=False, keep_torch_compile=False)
            self.accelerator.free_memory()  # drop Accelerate's references to the old wrapper and optimiser
            self._ddp = self.accelerator.prepare_model(model)
        self.wrapped = self._compiled(self._ddp)
        log.info("parameter set changed: data-parallel wrapper rebuilt over %d parameters",
                 len(optimised_parameters(inner)))
        return self.prepare_optimizer(inner)

    def _ddp_around_shards(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel over the trainable (whole) tensors of a model whose frozen weights FSDP shards.

        The sharded weights are excluded by name (DDP's own static method for that): DDP must neither broadcast
        them (each process holds a different shard) nor expect gradients for them. Accelerate refuses models
        holding sharded tensors, so this wrapper is built here, with the arguments Accelerate would give it."""
        from torch.distributed.tensor import DTensor  # here: only with strategy=fsdp (public from torch 2.5)

        sharded = [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sharded)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def _compiled(self, module: nn.Module) -> nn.Module:
        return torch.compile(module) if self.compile else module

    # -- what train_step calls --------------------------------------------------------------------------------
    def no_sync(self) -> contextlib.AbstractContextManager:
        """Accumulate gradients locally (micro-batches before the last one of a step)."""
        return self.accelerator.no_sync(self._ddp) if self._ddp is not None else contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm_(self, parameters: list[Tensor], max_norm: float) -> Tensor:
        """The global gradient norm (of the unscaled gradients under fp16), after clipping to `max_norm`."""
        return self.accelerator.clip_grad_norm_(parameters, max_norm)

    @property
    def scales_gradients(self) -> bool:
        """fp16's gradient scaler is on: a step with infinite gradients is normal, the scaler skips it itself."""
        return self.accelerator.scaler is not None

    def skip_update(self) -> None:
        """Close a step whose update was dropped (its gradients cleared, no `optimizer.step()`): under fp16 the
        gradient scaler still ends the step (the unscaling `clip_grad_norm_` did is recorded until then)."""
        if self.accelerator.scaler is not None:
            self.accelerator.scaler.update()

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward-pass precision (`trainer.precision`); fp32 does nothing."""
        return self.accelerator.autocast()

    # -- collectives ------------------------------------------------------------------------------------------
    def sum_over_processes(self, value: Tensor) -> Tensor:
        return self.accelerator.reduce(value.detach().clone(), reduction="sum") if self.distributed else value

    def max_over_processes(self, value: int) -> int:
        """The largest of every process's integer (e.g. a stop request: one process's stops them all)."""
        if not self.distributed:
            return value
        tensor = torch.tensor(value, dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)  # Accelerate's reduce knows sum and mean only
        return int(tensor)

    def gather_objects(self, items: list[Any]) -> list[Any]:
        """Every process's items, concatenated in process order (the items themselves on one process)."""
        return gather_object(items) if self.distributed else items

    def check_in_sync(self, optimizer: torch.optim.Optimizer, step: int) -> float | None:
        """Largest |difference| of any trained value between processes (0.0 when they agree bit for bit).

        With averaged gradients every process applies the same update, and merge or gate decisions follow
        deterministically from identical tensors; a difference means a decision diverged, so the run stops
        rather than save a mixture. None with one process."""
        if not self.distributed:
            return None
        diff = torch.zeros((), dtype=torch.float64, device=self.device)
        for param in optimised_parameters(optimizer):
            low, high = param.detach().clone(), param.detach().clone()
            dist.all_reduce(low, op=dist.ReduceOp.MIN)  # Accelerate's reduce knows sum and mean only
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
            if param.numel():
                diff = torch.maximum(diff, (high.double() - low.double()).abs().max())
        diff = float(diff)
        if diff != 0.0:
            raise VBShareError(f"processes disagree after step {step}: trained parameters differ by up to "
                               f"{diff:.3e} (a merge or gate decision diverged); report this with the config")
        return diff

    def reshard(self) -> None:
        """Before rank 0 alone reads the model's weights (a checkpoint): FSDP keeps the root unit gathered
        between forward passes, and reading a state dict reshards it — on one process only, the processes'
        next forward passes would no longer match. So every process reshards here, together."""
        if self.sharded:
            self.model.reshard()

    def end(self) -> None:
        """Leave the process group and forget Accelerate's state (the next in-process run starts afresh)."""
        self.accelerator.end_training()
        reset_accelerate_state()


def use_cpu(device: str) -> bool:
    """trainer.device (checked by the settings): auto (a GPU when there is one) | cpu | cuda | cuda:N."""
    if device == "auto":
        return not torch.cuda.is_available()
    if device == "cpu":
        return True
    if not torch.cuda.is_available():  # cuda or cuda:N
        raise VBShareError(f"trainer.device={device} but no CUDA device is available; use trainer.device=cpu")
    if ":" in device:  # one process on a chosen GPU; launched processes take theirs from LOCAL_RANK
        torch.cuda.set_device(torch.device(device))
    return False


# -- FSDP -----------------------------------------------------------------------------------------------------
def check_shardable(model: nn.Module) -> None:
    """trainer.strategy=fsdp shards frozen weights and needs every adapter's stored form to be computed
    without copying the model (PyTorch cannot deep-copy sharded modules)."""
    if not is_torch_version(">=", FSDP2_TORCH):
        raise VBShareError(f"trainer.strategy=fsdp needs torch >= {FSDP2_TORCH} (FSDP2 with ignored parameters); "
                           f"this is {torch.__version__}: upgrade torch or use trainer.strategy=ddp")
    if not any(not p.requires_grad for p in model.parameters()):
        raise VBShareError("trainer.strategy=fsdp shards the frozen weights, and full fine-tuning freezes none; "
                           "use trainer.strategy=ddp")
    state = vbshare.state_of(model, required=False)
    if state is not None and type(state).saved_form is not AdapterState.saved_form:
        raise VBShareError(f"{state.method} saves a converted copy of the model, which PyTorch cannot make of "
                           "FSDP-sharded modules; train it with trainer.strategy=ddp")
    if not transformer_blocks(model):
        raise VBShareError(f"trainer.strategy=fsdp shards per transformer block, but {type(model).__name__} names "
                           "no block classes (_no_split_modules); use trainer.strategy=ddp")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost modules whose class the model lists as a block (`_no_split_modules`, as transformers
    declares them: BertLayer, LlamaDecoderLayer, ...)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if type(module).__name__ in names:
            blocks.append(module)
            inside.update(id(m) for m in module.modules())
    return blocks


def frozen_subtrees(module: nn.Module) -> list[nn.Module]:
    """The largest sub-modules of `module` (itself included) that hold parameters, none of them trainable."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        return [module]
    return [found for child in module.children() for found in frozen_subtrees(child)]


def shard_frozen_weights(model: nn.Module) -> None:
    """FSDP2 over the frozen weights: one unit per transformer block (its frozen sub-modules, gathered together
    before the block runs and freed after it), then the root unit for the remaining frozen weights; every
    trainable tensor is left out (`ignored_params`) and stays a whole, ordinary tensor."""
    from torch.distributed.fsdp import fully_shard  # here: only with strategy=fsdp (absent before torch 2.6)

    trainable = {p for p in model.parameters() if p.requires_grad}
    blocks = transformer_blocks(model)
    for block in blocks:
        units = frozen_subtrees(block)
        if units:
            fully_shard(units, reshard_after_forward=True)
    fully_shard(model, ignored_params=trainable)
    log.info("FSDP: frozen weights sharded in %d block units and the root; %d trained tensors kept whole",
             len(blocks), len(trainable))
