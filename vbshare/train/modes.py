"""The three kinds of run in one place: an adapter, full fine-tuning, or the task head alone.

A `RunMode` says which weights train (`prepare`), how the optimiser groups them (`param_groups`), how they are
checkpointed and restored (`save_weights` / `load_weights`) and what a finished run leaves behind
(`save_outputs`). The rest of the app never asks which mode it runs, and never which adapter method: per-method
outputs come from hooks on the adapter contract (`AdapterState.extra_saves`, `run_records()`,
`sharing_pattern()`, `saved_form()`).

    +adapter=lora|vblora|aslora|sora|...   AdapterMode   vbshare.inject; the head trains alongside
    (no adapter) or +adapter=full          FullFinetune  every weight trains at optim.full_finetune_lr
    +adapter=head_only                     HeadOnly      only model.head_modules train
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn

import vbshare

from ..files import atomic_torch_save, atomic_write, read_tensors, writing
from ..errors import VBShareError
from ..registry import METHODS
from ..rundir import ADAPTER, FULL_FINETUNE, HEAD_ONLY, RunDir  # ADAPTER: the adapter folder, in a checkpoint too

log = logging.getLogger("vbshare.train")

# Keys of an adapter config that are not the method's hyperparameters (the summary's "hyperparameters"
# lists the others): which method, where it goes, and its learning rates.
NON_HPARAM_KEYS = ("method", "targets", "exclude", "layers", "lr")
NOT_INJECTED_KEYS = ("method", "lr")  # every other key is an argument of vbshare.inject
WEIGHTS = "weights.pt"  # full fine-tuning / head-only checkpoints: the trained weights by name
HEAD_FILE = "head.safetensors"  # head-only: the trained head of a finished run, in adapter/


@dataclass(frozen=True)
class Outputs:
    """What a run mode's trained weights amount to: the summary's fields that depend on the mode (in its order)."""

    method: str  # the method the summary reports (an adapter's name, FULL_FINETUNE or HEAD_ONLY)
    hyperparameters: dict[str, Any]
    trainable_parameters: int
    head_parameters: int  # trained outside the adapter (the task head), counted apart from stored parameters
    stored_parameters: int  # what the method stores (docs/methods.md §4); 0 for head-only
    sharing: dict[str, Any] | None  # the adapter's sharing_pattern() (None without an adapter)
    adapter_bytes: int | None  # the saved weights' file size (None for a full fine-tune's model/)


def to_python(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def inject_arguments(adapter: DictConfig) -> dict[str, Any]:
    """vbshare.inject's keyword arguments: targets / exclude / layers and every hyperparameter."""
    return {k: v for k, v in to_python(adapter).items() if k not in NOT_INJECTED_KEYS}


def hyperparameters(adapter: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in to_python(adapter).items() if k not in NON_HPARAM_KEYS}


class RunMode:
    """What trains in a run and what it leaves behind (the base class trains nothing by itself)."""

    name = ""
    lr_key = "adapter.lr"  # the setting that gives this mode's learning rates

    def __init__(self, cfg: DictConfig, head_modules: list[str]):
        self.cfg, self.head_modules = cfg, head_modules

    def prepare(self, model: nn.Module) -> None:
        """Set which weights train (and inject the adapter)."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        raise NotImplementedError

    def save_weights(self, model: nn.Module, folder: Path) -> None:
        """The trained weights, in the form training resumes from exactly, into a checkpoint folder."""
        atomic_torch_save(self.trained_state(model), folder / WEIGHTS)

    def load_weights(self, model: nn.Module, folder: Path) -> None:
        weights = read_tensors(folder / WEIGHTS)  # tensors only: nothing in a checkpoint is unpickled
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or set(self.trained_state(model)) - set(weights):
            raise VBShareError(f"the checkpoint in {folder} holds other weights than this run trains; "
                               "resume with the same model and adapter settings")

    snapshots = False  # trainer.snapshot_every works for this mode

    def load_outputs(self, model: nn.Module, run_dir: Path, check_base: bool = True) -> nn.Module:
        """A finished run's trained weights (what `save_outputs` wrote) on a fresh base model; returns the
        model to evaluate (vbshare.evaluate). check_base=False loads an adapter into a base whose weights differ
        from those it was trained on (`vbshare.load_adapter`)."""
        raise NotImplementedError

    def save_snapshot(self, model: nn.Module, folder: Path) -> None:
        """The trained weights of one step, in training form, as a folder of its own (trainer.snapshot_every)."""
        raise NotImplementedError

    def trained_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The trained weights under their full names."""
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        return {k: v for k, v in model.state_dict().items() if k in trained}

    def save_outputs(self, model: nn.Module, run_dir: Path) -> Outputs:
        """Write the run's trained weights; returns what they amount to (the summary's mode fields)."""
        raise NotImplementedError

    def train_heads(self, model: nn.Module) -> None:
        for name in self.head_modules:
            try:
                model.get_submodule(name).requires_grad_(True)
            except AttributeError:
                raise VBShareError(f"the model has no module {name!r} to train as head; set model.head_modules") from None


class AdapterMode(RunMode):
    """A vbshare adapter (`+adapter=<method>`); the task head trains alongside it."""

    def __init__(self, cfg: DictConfig, head_modules: list[str]):
        super().__init__(cfg, head_modules)
        self.name = cfg.adapter.method

    def prepare(self, model: nn.Module) -> None:
        vbshare.inject(model, self.name, **inject_arguments(self.cfg.adapter))
        self.train_heads(model)  # inject froze everything
        log.info("%s", str(vbshare.summary(model)).splitlines()[-1])

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return vbshare.param_groups(model, lr=to_python(self.cfg.adapter.lr), weight_decay=self.cfg.optim.weight_decay)

    def save_weights(self, model: nn.Module, folder: Path) -> None:
        """Training form (`stored_form=False`): the adapter tensors, the method's metadata (e.g. ASLoRA's
        tie-sets, SoRA's unpruned gates) and the head."""
        vbshare.save_adapter(model, folder / ADAPTER, modules=self.head_modules, stored_form=False)

    snapshots = True

    def save_snapshot(self, model: nn.Module, folder: Path) -> None:
        """A `save_adapter` folder in training form, with the head (vbshare.analysis reads it)."""
        vbshare.save_adapter(model, folder, modules=self.head_modules, stored_form=False)

    def load_weights(self, model: nn.Module, folder: Path) -> None:
        vbshare.load_adapter(model, folder / ADAPTER)  # metadata (e.g. tie-sets) first, then tensors and head
        self.train_heads(model)

    def load_outputs(self, model: nn.Module, run_dir: Path, check_base: bool = True) -> nn.Module:
        """The run's adapter/ (its stored form, with the head), injected into the fresh base."""
        return vbshare.load_adapter(model, RunDir(run_dir).adapter, check_base=check_base)

    def save_outputs(self, model: nn.Module, run_dir: Path) -> Outputs:
        counted = vbshare.summary(model)  # stored parameters / bytes in the method's stored form
        state = vbshare.state_of(model)
        for folder, options in state.extra_saves.items():  # e.g. VB-LoRA's top-k form in adapter_topk/
            vbshare.save_adapter(model, run_dir / folder, modules=self.head_modules, **options)
        for name, rows in state.run_records().items():  # e.g. ASLoRA's merge_history
            atomic_write(RunDir(run_dir).record(name), "".join(json.dumps(row) + "\n" for row in rows).encode())
        # the method's stored form (`saved_form`: SoRA writes its pruned LoRA)
        vbshare.save_adapter(model, RunDir(run_dir).adapter, modules=self.head_modules)
        adapter = self.cfg.adapter
        return Outputs(self.name, {"targets": to_python(adapter.targets), **hyperparameters(adapter),
                                   "lr": to_python(adapter.lr)},
                       trainable_parameters=counted.trainable, head_parameters=counted.other_trainable,
                       stored_parameters=counted.stored, sharing=state.sharing_pattern(),
                       adapter_bytes=counted.adapter_bytes)


class FullFinetune(RunMode):
    """Every weight trains (no adapter, or `+adapter=full`): the upper baseline."""

    name = FULL_FINETUNE
    lr_key = "optim.full_finetune_lr"

    def prepare(self, model: nn.Module) -> None:
        if self.cfg.get("adapter") is None:
            log.info("no adapter given: FULL FINE-TUNING baseline (every weight trains); "
                     "add +adapter=<%s> to train an adapter instead", "|".join(METHODS))
        model.requires_grad_(True)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "role": "full",
                 "lr": self.cfg.optim.full_finetune_lr, "weight_decay": self.cfg.optim.weight_decay}]

    def load_outputs(self, model: nn.Module, run_dir: Path, check_base: bool = True) -> nn.Module:
        """The fine-tuned model/ folder (save_pretrained: model.safetensors), in the base's dtype. Only the
        safetensors weights are read: a pickled pytorch_model.bin in the folder is never loaded (and the
        base's own class loads it, so no code the folder's config.json names runs)."""
        folder = RunDir(run_dir).full_model
        if not (folder / "config.json").is_file():
            raise VBShareError(f"{folder} holds no fine-tuned model (config.json); is {run_dir} a finished run?")
        if not any(folder.glob("model*.safetensors")):
            raise VBShareError(f"{folder} holds no model.safetensors (only safetensors weights are read, never a "
                               f"pickled .bin); is {run_dir} a finished run?")
        return type(model).from_pretrained(str(folder), dtype=next(model.parameters()).dtype, use_safetensors=True)

    def save_outputs(self, model: nn.Module, run_dir: Path) -> Outputs:
        folder = RunDir(run_dir).full_model
        with writing(folder):  # a full disk: one line naming the file
            model.save_pretrained(str(folder))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return Outputs(self.name, {"lr": self.cfg.optim.full_finetune_lr}, trainable_parameters=trainable,
                       head_parameters=0, stored_parameters=trainable, sharing=None, adapter_bytes=None)


class HeadOnly(RunMode):
    """Only the task head trains (`+adapter=head_only`): the lower baseline."""

    name = HEAD_ONLY

    def prepare(self, model: nn.Module) -> None:
        if not self.head_modules:
            raise VBShareError("adapter=head_only needs a task head: set model.head_modules (classification only)")
        model.requires_grad_(False)
        self.train_heads(model)
        log.info("HEAD-ONLY baseline: only %s train (%d parameters)", ", ".join(self.head_modules),
                 sum(p.numel() for p in model.parameters() if p.requires_grad))

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "role": "head",
                 "lr": float(to_python(self.cfg.adapter.lr)["head"]), "weight_decay": self.cfg.optim.weight_decay}]

    def load_outputs(self, model: nn.Module, run_dir: Path, check_base: bool = True) -> nn.Module:
        """The trained head (adapter/head.safetensors) into the fresh base."""
        path = RunDir(run_dir).adapter / HEAD_FILE
        if not path.is_file():
            raise VBShareError(f"{path} is missing; is {run_dir} a finished head-only run?")
        head = safetensors.torch.load_file(str(path))
        _, unexpected = model.load_state_dict(head, strict=False)
        if unexpected:
            raise VBShareError(f"{path} holds weights the model lacks ({unexpected[0]}, ...); evaluate with the run's model")
        return model

    def save_outputs(self, model: nn.Module, run_dir: Path) -> Outputs:
        head = {k: v.detach().cpu().contiguous() for k, v in self.trained_state(model).items()}
        path = RunDir(run_dir).adapter / HEAD_FILE
        atomic_write(path, safetensors.torch.save(head))
        count = sum(v.numel() for v in head.values())
        return Outputs(self.name, {"lr": to_python(self.cfg.adapter.lr)}, trainable_parameters=count,
                       head_parameters=count,
                       stored_parameters=0,  # no adapter: the head is reported separately (docs/methods.md §4)
                       sharing=None, adapter_bytes=path.stat().st_size)


def run_mode(cfg: DictConfig, task_kind: str) -> RunMode:
    """The mode `cfg.adapter` asks for; the task head (model.head_modules) trains only for classification."""
    head_modules = list(cfg.model.head_modules) if task_kind == "classification" else []
    adapter = cfg.get("adapter")
    method = None if adapter is None else adapter.get("method")
    if method in (None, FULL_FINETUNE):
        return FullFinetune(cfg, head_modules)
    if method == HEAD_ONLY:
        return HeadOnly(cfg, head_modules)
    return AdapterMode(cfg, head_modules)
