"""Adapter-only checkpoints: `adapter_model.safetensors` + `adapter_config.json`.

The JSON names the method, its hyperparameters, the targets with their base shapes (the fingerprint a
loading model must match), the method's own metadata (e.g. ASLoRA tie-sets) and the SHA-256 of the
weights file. Every file is written to a temporary name and renamed into place, the JSON last, so a crash
leaves either the old checkpoint or the new one; a weights file that does not match its JSON is refused.
Modules trained beside the adapter (a task head) go into `modules.safetensors` in the same folder.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import safetensors.torch
from torch import Tensor, nn

from .adapters.base import adapters, state_of
from .checks import refuse_nonfinite
from .core import freeze_adapter, head_modules, inject, load_adapter_tensors, module_tensors, stored_tensors
from .errors import VBShareError
from .files import atomic_torch_save, atomic_write
from .registry import get_method
from .targets import linear_shape

__all__ = ["CONFIG_FILE", "MODULES_FILE", "WEIGHTS_FILE", "atomic_torch_save", "atomic_write", "fingerprint",
           "load_adapter", "read_adapter_config", "save_adapter", "serialise"]

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
MODULES_FILE = "modules.safetensors"
FORMAT = "vbshare-adapter"
FORMAT_VERSION = 1


def fingerprint(shapes: dict[str, Sequence[int]]) -> str:
    """SHA-256 of the targeted modules' names and (out, in) shapes."""
    canonical = json.dumps({k: list(v) for k, v in sorted(shapes.items())}, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def serialise(tensors: dict[str, Tensor]) -> bytes:
    """The safetensors bytes of `tensors` (detached, contiguous, on the CPU)."""
    return safetensors.torch.save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    topk_only: bool = False,
    modules: Sequence[str] | None = None,
    stored_form: bool = True,
) -> Path:
    """Save the adapter (weights only) and its JSON description into `directory`.

    Args:
        topk_only: VB-LoRA's compact inference form (indices + k−1 weights per sub-vector); it cannot be
            trained further.
        modules: names of modules to save beside the adapter in `modules.safetensors` (a classifier head);
            None (default) saves every module that trains outside the adapter (`vbshare.core.head_modules`),
            [] saves none.
        stored_form: write the method's stored form (`AdapterState.saved_form`: SoRA saves its pruned LoRA);
            False writes the training form, from which training resumes exactly (SoRA keeps its gates).
    A tensor holding NaN or infinity is refused (one VBShareError line) before anything is written.
    """
    modules = head_modules(model) if modules is None else list(modules)
    if stored_form:
        model = state_of(model).saved_form(model)
    state = state_of(model)
    directory = Path(directory)
    tensors = stored_tensors(model, topk_only=topk_only, stored_form=False)
    head = module_tensors(model, modules) if modules else {}
    refuse_nonfinite({**tensors, **head}, f"the adapter to {directory}")  # a diverged run saves nothing
    weights = serialise(tensors)
    described: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "method": state.method,
        "config": state.config.to_dict(),
        "target_spec": getattr(state, "target_spec", None),
        "targets": {k: list(v) for k, v in state.targets.items()},
        "fingerprint": fingerprint(state.targets),
        "topk_only": topk_only,
        "state": state.metadata(),
        "files": {WEIGHTS_FILE: hashlib.sha256(weights).hexdigest()},
    }
    atomic_write(directory / WEIGHTS_FILE, weights)
    if modules:
        blob = serialise(head)
        atomic_write(directory / MODULES_FILE, blob)
        described["files"][MODULES_FILE] = hashlib.sha256(blob).hexdigest()
        described["modules"] = list(modules)
    atomic_write(directory / CONFIG_FILE, json.dumps(described, indent=2).encode())
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's JSON description, validated; a clear error when missing or corrupt."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise VBShareError(f"{path} does not exist; point at a folder written by vbshare.save_adapter")
    try:
        described = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise VBShareError(f"{path} is corrupt ({err.msg if hasattr(err, 'msg') else err}); save the adapter again") from None
    if not isinstance(described, dict) or described.get("format") != FORMAT:
        raise VBShareError(
            f"{path} is not a vbshare adapter config (for a PEFT adapter folder use vbshare.import_peft)"
        )
    return described


def _read_checked(directory: Path, name: str, described: dict[str, Any]) -> dict[str, Tensor]:
    path = directory / name
    if not path.is_file():
        raise VBShareError(f"{path} is missing; the checkpoint is incomplete, save the adapter again")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != described["files"].get(name):
        raise VBShareError(
            f"{path} does not match the checksum in {CONFIG_FILE} (corrupt or half-written); save the adapter again"
        )
    try:
        return safetensors.torch.load(blob)
    except Exception as err:  # safetensors raises its own error types
        raise VBShareError(f"{path} is not a readable safetensors file ({err}); save the adapter again") from None


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a `save_adapter` folder into `model` (in place); injects the adapters first if needed.

    The targeted modules must exist with the saved shapes. Returns the model.
    """
    directory = Path(directory)
    described = read_adapter_config(directory)
    saved_shapes = {k: tuple(v) for k, v in described["targets"].items()}
    modules = dict(model.named_modules())
    state = state_of(model, required=False)
    if state is None:
        _check_base_shapes(modules, saved_shapes)
        get_method(described["method"])
        inject(model, described["method"], targets=list(saved_shapes), **described["config"])
        state = state_of(model)
        state.target_spec = described.get("target_spec")
    elif state.method != described["method"] or state.config.to_dict() != described["config"]:
        raise VBShareError(
            f"the model carries {state.method} adapters with other hyperparameters than {directory} "
            f"({described['method']}); load into a fresh base model instead"
        )
    elif fingerprint(state.targets) != described["fingerprint"]:
        _check_base_shapes({n: a.base_layer for n, a in adapters(model).items()}, saved_shapes)
        raise VBShareError(f"the model's adapted modules differ from those of {directory}; load into a fresh base model")

    state.load_metadata(described.get("state") or {})
    tensors = state.unpack(_read_checked(directory, WEIGHTS_FILE, described), topk_only=described["topk_only"])
    load_adapter_tensors(model, tensors, str(directory / WEIGHTS_FILE))
    if described.get("topk_only"):
        freeze_adapter(model)
    if described.get("modules"):
        model.load_state_dict(_read_checked(directory, MODULES_FILE, described), strict=False)
        state.head_modules = list(described["modules"])
    return model


def _check_base_shapes(modules: dict[str, nn.Module], saved_shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise a one-line error naming the first targeted module that is absent or shaped differently."""
    for name, shape in saved_shapes.items():
        module = modules.get(name)
        if module is None:
            raise VBShareError(
                f"the adapter targets {name}, which this model does not have; load it into the base model it was trained on"
            )
        if tuple(linear_shape(module)[:2]) != tuple(shape):
            raise VBShareError(
                f"module {name} has shape (out, in) = {tuple(linear_shape(module)[:2])} but the adapter was trained on "
                f"{tuple(shape)}; load it into the base model it was trained on"
            )
