"""`python -m vbshare.plan model=hf model.loader.name=<folder|hub name> [+adapter=<method>] [overrides ...]`

What each method trains and stores on a model, and an estimate of its training memory per device, from the
model's config.json alone: no weights are read or made (the model is built on the meta device), nothing is
downloaded. docs/planning.md says how the estimate is made and how far it was from measured peaks.

    python -m vbshare.plan model=hf model.loader.name=meta-llama/Llama-2-7b-hf +adapter=lora adapter.r=64
    python -m vbshare.plan model=hf model.loader.name=./llama-13b trainer.precision=bf16 \\
        trainer.strategy=fsdp trainer.processes=8 trainer.activation_checkpointing=true data=bbc_lm
    python -m vbshare.plan model=hf model.loader.name=./llama-13b model.quantization=nf4   # every method

The config is the training app's (configs/, the same overrides as `python -m vbshare.train`): the batch of one
device is trainer.batch_size / (processes · trainer.grad_accum_steps) sequences of data.max_length tokens;
model.dtype, model.quantization (when the config has it: nf4 | fp4 | int8), trainer.precision, trainer.strategy and
trainer.activation_checkpointing change the estimate. `trainer.processes=N` (the planner's own key, default 1) is
the number of processes training would start. Without `+adapter=` every registered method is planned with its
configs/adapter/ defaults. A hub name is read from the local Hugging Face cache only; a model whose config names
a *ForCausalLM architecture is planned as a causal LM, any other as a sequence classifier.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

import vbshare

from .adapters.base import LowRankAdapter, adapters, state_of
from .errors import VBShareError
from .models import CONFIG_FILE, torch_dtype
from .registry import METHODS
from .train.app import CONFIG_DIR, USER_ERRORS, exit_with
from .train.engine import transformer_blocks
from .train.modes import inject_arguments
from .train.settings import read_settings

PROCESSES_KEY = "trainer.processes="  # the planner's own override: processes training would start
GIB = 2**30
TRAINED_BYTES = 4 * 4  # per trained parameter: fp32 value, gradient and AdamW's two moments
# Bytes per quantized linear weight entry (bitsandbytes as transformers loads it): 4-bit values plus one fp32
# absmax per block of 64 (no double quantization, transformers' default); int8 values plus one fp32 scale per row.
QUANT_BYTES = {"nf4": 0.5 + 4 / 64, "fp4": 0.5 + 4 / 64, "int8": 1.0}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# -- the model, from config.json only -------------------------------------------------------------------------
def config_file(name: str) -> Path:
    """config.json of a local model folder, or of a hub name already in the Hugging Face cache (never a request)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / CONFIG_FILE).is_file():
            raise VBShareError(f"model folder {folder} has no {CONFIG_FILE}; give a folder written by save_pretrained")
        return folder / CONFIG_FILE
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(name, CONFIG_FILE)
    except HFValidationError:
        cached = None
    if not isinstance(cached, str):
        raise VBShareError(f"{name!r} is neither a local model folder nor a hub name in the Hugging Face cache; the "
                           f"planner reads only config.json: `hf download {name} config.json` once, or give a folder")
    return Path(cached)


def empty_model(path: Path, head_modules: list[str]) -> tuple[nn.Module, str]:
    """(model on the meta device, task kind "lm" | "classification") from a config.json."""
    import accelerate
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(str(path.parent))
    except (OSError, ValueError) as err:
        raise VBShareError(f"cannot read {path} ({str(err).strip().splitlines()[0]}); check model.loader.name") from None
    kind = "lm" if any(a.endswith("ForCausalLM") for a in config.architectures or []) else "classification"
    if kind == "classification" and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = getattr(config, "eos_token_id", None) or 0  # decoders classify at the last non-pad
    with accelerate.init_empty_weights(include_buffers=True):
        auto = AutoModelForCausalLM if kind == "lm" else AutoModelForSequenceClassification
        model = auto.from_config(config)
    for name in head_modules if kind == "classification" else []:
        if name in dict(model.named_modules()):
            model.get_submodule(name).requires_grad_(True)
    return model, kind


# -- the pieces of the estimate -------------------------------------------------------------------------------
def frozen_bytes(model: nn.Module, dtype: torch.dtype, quantization: str | None) -> tuple[float, list[float]]:
    """(bytes of the frozen base weights outside the transformer blocks, bytes of each block's) in `dtype`; with
    `quantization` the blocks' linear weights count QUANT_BYTES per entry (heads and embeddings stay unquantized)."""
    blocks = transformer_blocks(model)
    quantized = {id(w) for w in block_linear_weights(blocks)} if quantization is not None else set()
    per_entry = QUANT_BYTES.get(quantization or "", 0.0)
    adapter_tensors = {id(t) for t in adapter_tensors_of(model)}

    def size(params: Sequence[Tensor]) -> float:
        return sum(p.numel() * (per_entry if id(p) in quantized else dtype.itemsize) for p in params
                   if not p.requires_grad and id(p) not in adapter_tensors)

    inside = {id(p) for block in blocks for p in block.parameters()}
    outside = [p for p in model.parameters() if id(p) not in inside]
    return size(outside), [size(list(block.parameters())) for block in blocks]


def block_linear_weights(blocks: list[nn.Module]) -> list[Tensor]:
    """The base weights of the linear layers inside the transformer blocks: what a quantized base quantizes."""
    found = []
    for module in (m for block in blocks for m in block.modules()):
        if isinstance(module, nn.Linear) and not isinstance(module, LowRankAdapter):
            found.append(module.weight)
    return found


def adapter_tensors_of(model: nn.Module) -> list[Tensor]:
    """The adapters' own tensors (parameters and buffers, base layers left out) and the shared state's."""
    found = list(state_of(model).parameters()) + list(state_of(model).buffers())
    for adapter in adapters(model).values():
        found += [t for n, t in [*adapter.named_parameters(), *adapter.named_buffers()] if not n.startswith("base_layer.")]
    return found


@dataclass
class Activations:
    """Bytes autograd keeps for backward in one forward pass (with the loss), split by transformer block."""

    outside: float  # saved outside every block (embeddings, head, loss)
    blocks: list[float]  # saved inside each block
    block_inputs: list[float]  # each block's input hidden states (what checkpointing keeps instead)
    largest: float  # the largest single saved tensor (the logits' size for a language model)


def trace_activations(model: nn.Module, kind: str, batch: int, length: int, dtype: torch.dtype) -> Activations:
    """Run forward and loss on the meta device with autograd's saved-tensor hooks: every tensor kept for backward is
    counted once (by storage), the model's own weights excluded. `dtype` stands in for autocast (the model is cast)."""
    model.to(dtype).train()
    own = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    blocks = transformer_blocks(model)
    saved: dict[int, tuple[int, int]] = {}  # storage -> (bytes, block index or -1)
    inputs = [0.0] * len(blocks)
    current = [-1]

    def pack(t: Tensor) -> Tensor:
        key = t.untyped_storage()._cdata
        if key not in own and key not in saved:
            saved[key] = (t.untyped_storage().nbytes(), current[0])
        return t

    def enter(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            current[0] = index
            hidden = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
            inputs[index] = hidden.numel() * hidden.element_size()
        return hook

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        current[0] = -1

    handles = [b.register_forward_pre_hook(enter(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(leave) for b in blocks]
    ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
    labels = ids if kind == "lm" else torch.zeros(batch, dtype=torch.long, device="meta")
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=labels)
    finally:
        for handle in handles:
            handle.remove()
    per_block = [0.0] * len(blocks)
    for size, index in saved.values():
        if index >= 0:
            per_block[index] += size
    return Activations(outside=sum(s for s, i in saved.values() if i < 0), blocks=per_block, block_inputs=inputs,
                       largest=max((s for s, _ in saved.values()), default=0))


# -- one method's plan --------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Parameters and the estimated training memory of one device, in bytes (docs/planning.md)."""

    method: str
    trainable: int
    stored: float
    head: int
    weights: float  # frozen base weights held by this device
    adapter: float  # trained tensors with their gradients and AdamW moments, plus the adapter's frozen tensors
    activations: float  # kept for backward, plus backward's largest working tensor
    error: str | None = None

    @property
    def total(self) -> float:
        return self.weights + self.adapter + self.activations

    def row(self) -> str:
        if self.error:
            return f"{self.method:<10} error: {self.error}"
        gib = lambda b: f"{b / GIB:9.2f}"
        return (f"{self.method:<10} {self.trainable:>14,} {_count(self.stored):>16} {gib(self.weights)} "
                f"{gib(self.adapter)} {gib(self.activations)} {gib(self.total)}")


HEADER = (f"{'method':<10} {'trainable':>14} {'stored':>16} {'weights':>9} {'adapter':>9} {'activ.':>9} "
          f"{'total':>9}   (GiB per device)")


def _count(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.2f}"


def plan_method(cfg: DictConfig, processes: int) -> Plan:
    """Inject `cfg.adapter` into the config's model built on the meta device and estimate one device's memory."""
    settings = read_settings(cfg)
    t = settings.trainer
    name = cfg.model.loader.get("name") if "loader" in cfg.model else None
    if not name:
        raise VBShareError("the planner reads a model's config.json: use model=hf model.loader.name=<folder or hub name>")
    method = cfg.adapter.method
    dtype = torch_dtype(cfg.model.get("dtype", "fp32"))
    quantization = cfg.model.get("quantization")
    if quantization is not None and quantization not in QUANT_BYTES:
        raise VBShareError(f"model.quantization={quantization!r} is not one of {', '.join(QUANT_BYTES)} or null")
    share = t.batch_size // (processes * t.grad_accum_steps)
    if share < 1 or t.batch_size % (processes * t.grad_accum_steps):
        raise VBShareError(f"trainer.batch_size={t.batch_size} must be divisible by the processes ({processes}) times "
                           f"trainer.grad_accum_steps ({t.grad_accum_steps})")
    length = settings.data.max_length or 512
    model, kind = empty_model(config_file(str(name)), list(cfg.model.get("head_modules") or []))
    vbshare.inject(model, method, **inject_arguments(cfg.adapter))
    counted = vbshare.summary(model)

    outside, blocks = frozen_bytes(model, dtype, quantization)
    weights = outside + sum(blocks)
    if t.strategy == "fsdp" and processes > 1:  # blocks sharded, one gathered at a time; the root unit stays whole
        weights = outside + sum(blocks) / processes + max(blocks, default=0)
    if quantization is not None:  # a 4/8-bit weight is dequantized for its product: the largest linear, once
        largest = max((w.numel() for w in block_linear_weights(transformer_blocks(model))), default=0)
        weights += largest * dtype.itemsize
    frozen_own = sum(t.numel() * t.element_size() for t in adapter_tensors_of(model) if not t.requires_grad)
    trained = counted.trainable + counted.other_trainable
    ddp_buckets = trained * 4 if t.strategy == "ddp" and processes > 1 else 0  # DDP's gradient buckets
    adapter = trained * TRAINED_BYTES + frozen_own + ddp_buckets

    act_dtype = AUTOCAST_DTYPES.get(t.precision, dtype)
    traced = trace_activations(model, kind, share, length, act_dtype)
    if t.activation_checkpointing:  # block inputs kept, one block recomputed at a time in backward
        kept = traced.outside + sum(traced.block_inputs) + max(traced.blocks, default=0)
    else:
        kept = traced.outside + sum(traced.blocks)
    return Plan(method, counted.trainable, counted.stored, counted.other_trainable, weights, adapter,
                kept + traced.largest)


# -- the command line ---------------------------------------------------------------------------------------------
def compose(overrides: Sequence[str]) -> DictConfig:
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


def plan(overrides: Sequence[str]) -> tuple[list[Plan], dict[str, Any]]:
    """The plans for `overrides` (the training app's, plus `trainer.processes=N`), and what they assumed."""
    overrides = list(overrides)
    given = [o.split("=", 1)[1] for o in overrides if o.startswith(PROCESSES_KEY)]
    overrides = [o for o in overrides if not o.startswith(PROCESSES_KEY)]
    if given and not (given[-1].isdigit() and int(given[-1]) >= 1):
        raise VBShareError(f"trainer.processes must be a positive integer, got {given[-1]!r}")
    processes = int(given[-1]) if given else 1
    single = any(o.lstrip("+").startswith("adapter=") for o in overrides)
    methods = [None] if single else [m for m in METHODS if (CONFIG_DIR / "adapter" / f"{m}.yaml").is_file()]
    plans = []
    for method in methods:
        cfg = compose(overrides if method is None else [*overrides, f"+adapter={method}"])
        try:
            plans.append(plan_method(cfg, processes))
        except VBShareError as err:
            if single:
                raise
            plans.append(Plan(method, 0, 0, 0, 0, 0, 0, error=str(err)))
    t = cfg.trainer
    assumed = {"model": str(cfg.model.loader.get("name")), "dtype": cfg.model.get("dtype"),
               "quantization": cfg.model.get("quantization"), "precision": t.precision, "processes": processes,
               "strategy": t.strategy, "activation_checkpointing": t.activation_checkpointing,
               "sequences_per_device": t.batch_size // (processes * t.grad_accum_steps),
               "tokens_per_sequence": cfg.data.get("max_length")}
    return plans, assumed


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry: the table on stdout; bad input -> one `error: ...` line and exit status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in args):
        print(__doc__)
        return
    try:
        plans, assumed = plan(args)
    except USER_ERRORS as err:
        exit_with(err)
    print(" ".join(f"{k}={v}" for k, v in assumed.items()))
    print(HEADER)
    for one in plans:
        print(one.row())


if __name__ == "__main__":
    main()
