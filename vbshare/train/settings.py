"""The run's settings, read once from the composed config and checked before anything starts: `read_settings`.

    settings = read_settings(cfg)        # Settings: seed, trainer, optim, data, adapter_lr, compare
    settings.trainer.batch_size          # an int >= 1, whatever the command line said

Each block is a frozen dataclass whose fields are the keys of its config group (configs/trainer/default.yaml,
configs/optim/adamw.yaml, configs/compare.yaml; for `data`, the keys the data builders share). The YAML stays
the one place that gives defaults: a field here says only what a key may hold, so a key missing from the config is
an error, not a silent default. Every failure is one `VBShareError` line naming the key, the value given and
what is allowed ("trainer.batch_size must be a positive integer, got 0").

Checked here, before the engine, the model or any file: positive integers (steps, batches, intervals), seeds
(integers numpy accepts), fractions, choices (precision, strategy, device, trainer.nonfinite), booleans,
nullable keys, learning rates (adapter.lr as one number or a role -> number mapping, optim.full_finetune_lr:
finite and >= 0), the app's keys of `trainer.sparsify`, and vbshare.compare's `compare` block
(`compare.seeds=3` means seeds 0, 1, 2). What depends on the machine or the model (processes dividing the
batch, a CUDA device being there, the method's own hyperparameters) is checked where it is known.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Mapping

from omegaconf import DictConfig

from ..checks import boolean, choice, fail, integer, is_integer, is_number, number
from ..errors import VBShareError
from .modes import to_python
from .step import NONFINITE_POLICIES

PRECISIONS = ("fp32", "bf16", "fp16")  # trainer.precision (autocast; fp16 with a gradient scaler)
STRATEGIES = ("ddp", "fsdp")
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
SPLITS = ("train", "validation", "test")
SEED_LIMIT = 2**32 - 1  # numpy's seeds (accelerate's set_seed seeds numpy too)
FRACTION_TOLERANCE = 1e-6


# -- what one key may hold -------------------------------------------------------------------------------------
def setting(check: Callable[[str, Any], Any], optional: bool = False) -> Any:
    """A settings field: the config key of the field's name, checked by `check(key, value)` (which returns the
    typed value). `optional`: the key may be absent from the block (the field is None then)."""
    return field(metadata={"check": check, "optional": optional})


positive = partial(integer, low=1)
positive_or_null = partial(integer, low=1, null=True)


def seed_value(key: str, value: Any) -> int:
    if not is_integer(value) or not 0 <= value <= SEED_LIMIT:
        fail(key, value, f"an integer from 0 to {SEED_LIMIT}")
    return value


def rates(key: str, value: Any) -> float | dict[str, float]:
    """A learning rate (or weight decay): one finite number >= 0, or a mapping role -> such a number."""
    if isinstance(value, Mapping):
        if not value:
            fail(key, value, "a finite number >= 0 or a mapping role -> number")
        return {str(role): number(f"{key}.{role}", rate, low=0) for role, rate in value.items()}
    return number(key, value, low=0, allowed="a finite number >= 0 or a mapping role -> number")


def device(key: str, value: Any) -> str:
    if not isinstance(value, str) or not DEVICE.fullmatch(value):
        fail(key, value, "auto, cpu, cuda or cuda:N")
    return value


def threads(key: str, value: Any) -> int | str | None:
    if value is None or value == "auto":
        return value
    return integer(key, value, low=1, allowed="a positive integer, auto or null")


def folder_or_null(key: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        fail(key, value, "a folder or null")
    return value


def folder(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        fail(key, value, "a folder")
    return value


def method_name(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        fail(key, value, "an adapter config's name")
    return value


def fractions(key: str, value: Any) -> dict[str, float] | None:
    """Split name -> fraction of one file's rows: train (and validation, test), each in [0, 1], summing to 1."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or "train" not in value or set(value) - set(SPLITS):
        fail(key, value, "a mapping of train (and validation, test) to fractions, e.g. {train: 0.8, validation: 0.1, "
                         "test: 0.1}")
    parts = {split: number(f"{key}.{split}", part, 0, 1) for split, part in value.items()}
    if abs(sum(parts.values()) - 1.0) > FRACTION_TOLERANCE:
        fail(key, value, "fractions that sum to 1")
    return parts


def optimizer_block(key: str, value: Any) -> dict[str, Any]:
    """optim.optimizer: the optimiser's builder (`_target_`, `_partial_`) and its arguments; AdamW's betas and eps
    are checked when given (torch would refuse them with a traceback)."""
    if not isinstance(value, Mapping) or "_target_" not in value:
        fail(key, value, "a block with a _target_ (the optimiser class) and its arguments")
    if "betas" in value:
        betas = value["betas"]
        if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(
                is_number(beta) and 0 <= beta < 1 for beta in betas):
            fail(f"{key}.betas", betas, "two numbers in [0, 1)")
    if "eps" in value:
        number(f"{key}.eps", value["eps"], 0, low_open=True)
    return dict(value)


def method_list(key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        fail(key, value, "a list of adapter configs, e.g. [lora,vblora]")
    if not value:
        raise VBShareError(f"{key} is empty; list adapter configs, e.g. {key}=[lora,vblora]")
    if len(set(value)) != len(value):
        raise VBShareError(f"{key} lists a method twice: {value}")
    return list(value)


def seed_list(key: str, value: Any) -> list[int]:
    """compare.seeds: a count N (seeds 0, 1, ..., N-1) or a list of distinct seeds."""
    if is_integer(value) and value >= 1:
        return list(range(value))
    allowed = "a number of seeds N >= 1 (seeds 0 to N-1) or a list of distinct integer seeds, e.g. [0,1,2]"
    if not isinstance(value, list) or not value or len(set(map(repr, value))) != len(value):
        fail(key, value, allowed)
    return [seed_value(key, s) for s in value]


def size_lists(key: str, value: Any) -> dict[str, list[Any]] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(v, list) and v for v in value.values()):
        fail(key, value, "null or a mapping method -> list of sizes, e.g. {lora: [2, 8]}")
    return {str(k): list(v) for k, v in value.items()}


# -- reading a block ----------------------------------------------------------------------------------------
def read_block(kind: type, block: Any, prefix: str, closed: bool = True) -> Any:
    """A `kind` dataclass from the config block `prefix` (a mapping): every field's key checked. `closed`: a key
    the dataclass does not know is refused (an added `+trainer.typo=...` would otherwise do nothing)."""
    if not isinstance(block, Mapping):
        fail(prefix, block, "a block of keys")
    names = [f.name for f in dataclasses.fields(kind) if "check" in f.metadata]
    unknown = sorted(set(block) - set(names))
    if closed and unknown:
        raise VBShareError(f"{prefix}.{unknown[0]} is not a setting; the {prefix} keys are: {', '.join(names)}")
    values = {}
    for f in dataclasses.fields(kind):
        if "check" not in f.metadata:
            continue
        key = f"{prefix}.{f.name}"
        if f.name not in block:
            if f.metadata["optional"]:
                values[f.name] = None
                continue
            raise VBShareError(f"{key} is missing from the config; put it back (configs/ gives every default)")
        values[f.name] = f.metadata["check"](key, block[f.name])
    return kind(**values)


# -- the blocks -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SparsifySettings:
    """The app's keys of trainer.sparsify (configs/trainer/sparsify/default.yaml); `schedule` holds the others,
    which the method's sparsifier checks."""

    lr_factor: float = setting(partial(number, low=0, low_open=True, allowed="a number > 0"))
    memorise_examples: int = setting(positive)
    snapshots: bool = setting(boolean)
    schedule: dict[str, Any] = field(default_factory=dict)


def sparsify_block(key: str, value: Any) -> SparsifySettings | None:
    """trainer.sparsify: null, or the stage schedule (`+trainer/sparsify=default`)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        fail(key, value, "a block of keys (+trainer/sparsify=default) or null")
    if "dense_steps" in value:
        raise VBShareError(f"{key}.dense_steps is not a key here: the dense stage is the normal training, "
                           "trainer.max_steps")
    app_keys = [f.name for f in dataclasses.fields(SparsifySettings) if "check" in f.metadata]
    app = read_block(SparsifySettings, {k: v for k, v in value.items() if k in app_keys}, key)
    return dataclasses.replace(app, schedule={k: v for k, v in value.items() if k not in app_keys})


@dataclass(frozen=True)
class TrainerSettings:
    """configs/trainer/default.yaml, checked (its comments say what every key does)."""

    max_steps: int = setting(positive)
    batch_size: int = setting(positive)
    grad_accum_steps: int = setting(positive)
    eval_batch_size: int = setting(positive)
    eval_every: int = setting(positive)
    eval_test: bool = setting(boolean)
    forgetting_eval: bool | None = setting(boolean, optional=True)  # absent: false
    log_every: int = setting(positive)
    checkpoint_every: int | None = setting(positive_or_null)
    snapshot_every: int | None = setting(positive_or_null)
    resume: str | None = setting(folder_or_null)
    stop_at_step: int | None = setting(positive_or_null)
    max_examples: int | None = setting(positive_or_null)
    device: str = setting(device)
    precision: str = setting(partial(choice, options=PRECISIONS))
    activation_checkpointing: bool = setting(boolean)
    compile: bool = setting(boolean)
    strategy: str = setting(partial(choice, options=STRATEGIES))
    num_threads: int | str | None = setting(threads)
    dropout: float | None = setting(partial(number, low=0, high=1, high_open=True, null=True,
                                            allowed="null or in [0, 1)"))
    progress_bar: bool = setting(boolean)
    nonfinite: str = setting(partial(choice, options=NONFINITE_POLICIES))
    sparsify: SparsifySettings | None = setting(sparsify_block)


@dataclass(frozen=True)
class OptimSettings:
    """configs/optim/adamw.yaml, checked."""

    optimizer: dict[str, Any] = setting(optimizer_block)
    weight_decay: float | dict[str, float] = setting(rates)
    full_finetune_lr: float = setting(partial(number, low=0))
    warmup_ratio: float = setting(partial(number, low=0, high=1))
    schedule: str | None = setting(partial(choice, options=("linear", "cosine")), optional=True)  # absent: linear
    grad_clip: float | None = setting(partial(number, low=0, low_open=True, null=True))


@dataclass(frozen=True)
class DataSettings:
    """The keys the data builders (configs/data/) share, checked where the data config has them (None where it
    has not: `data=glue` has no seed); every other key is its builder's to check."""

    max_length: int | None = setting(positive, optional=True)
    seed: int | None = setting(seed_value, optional=True)
    train_per_class: int | None = setting(positive_or_null, optional=True)
    train_subset_seed: int | None = setting(seed_value, optional=True)
    fractions: dict[str, float] | None = setting(fractions, optional=True)
    packing: bool | None = setting(boolean, optional=True)
    chat_template: bool | None = setting(boolean, optional=True)


@dataclass(frozen=True)
class CompareSettings:
    """configs/compare.yaml's `compare` block, checked (vbshare.compare)."""

    methods: list[str] = setting(method_list)
    trials: int = setting(positive)
    seeds: list[int] = setting(seed_list)
    sizes: dict[str, list[Any]] | None = setting(size_lists)
    control: str = setting(method_name)  # one of methods (checked below)
    sampler_seed: int = setting(seed_value)
    isolate: bool = setting(boolean)
    workers: int = setting(partial(integer, low=1, allowed="a whole number >= 1 (runs trained at a time)"))
    out: str = setting(folder)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.sizes or {}) - set(self.methods))
        if unknown:
            raise VBShareError(f"compare.sizes names {', '.join(unknown)}, which compare.methods does not list")
        if self.control not in self.methods:
            raise VBShareError(f"compare.control={self.control} is not in compare.methods {self.methods}; "
                               "add it or choose another control")
        if self.workers > 1 and not self.isolate:
            raise VBShareError("compare.workers > 1 trains runs side by side in separate processes; set "
                               "compare.isolate=true (or compare.workers=1)")


@dataclass(frozen=True)
class Settings:
    """Everything a run (or a comparison) is configured with, checked: see `read_settings`."""

    seed: int  # the run seed: model init (head), data order, dropout
    trainer: TrainerSettings
    optim: OptimSettings
    data: DataSettings
    adapter_lr: float | dict[str, float] | None  # adapter.lr; None when the run has no adapter block with one
    compare: CompareSettings | None  # vbshare.compare's block; None in a training config


# -- the whole config ------------------------------------------------------------------------------------------
def read_settings(cfg: DictConfig) -> Settings:
    """Check the composed config of vbshare.train (or vbshare.compare, which adds `compare`) and return its
    settings. Interpolations are resolved first; any failure is one VBShareError line."""
    values = to_python(cfg)
    for group in ("trainer", "optim", "data"):
        if group not in values:
            raise VBShareError(f"the config has no {group} block; compose it from configs/ (e.g. {group}=...)")
    if "seed" not in values:
        raise VBShareError("seed is missing from the config; put it back (configs/ gives every default)")
    adapter = values.get("adapter")
    adapter_lr = rates("adapter.lr", adapter["lr"]) if isinstance(adapter, Mapping) and "lr" in adapter else None
    compare = values.get("compare")
    return Settings(
        seed=seed_value("seed", values["seed"]),
        trainer=read_block(TrainerSettings, values["trainer"], "trainer"),
        optim=read_block(OptimSettings, values["optim"], "optim"),
        data=read_block(DataSettings, values["data"], "data", closed=False),
        adapter_lr=adapter_lr,
        compare=None if compare is None else read_block(CompareSettings, compare, "compare"),
    )
