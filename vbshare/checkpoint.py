"""Adapter-only checkpoints: `adapter_model.safetensors` + `adapter_config.json`.

The JSON names the method, its hyperparameters, the targets with their base shapes (the fingerprint a
loading model must match), the method's own metadata (e.g. ASLoRA tie-sets) and the SHA-256 of the
weights file. Every file is written to a temporary name and renamed into place, the JSON last, so a crash
leaves either the old checkpoint or the new one; a weights file that does not match its JSON is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import safetensors.torch
import torch
from torch import Tensor, nn

from .core import STATE_ATTR, adapters, get_method, inject, state_of
from .errors import VBShareError
from .targets import linear_shape

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
MODULES_FILE = "modules.safetensors"
FORMAT = "vbshare-adapter"
FORMAT_VERSION = 1


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` with the same temporary-file-and-rename guarantee."""
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's adapter tensors only (parameters and persistent buffers), base layers left out."""
    return {k: v for k, v in model.state_dict().items() if _is_adapter_key(k, model)}


def _is_adapter_key(key: str, model: nn.Module) -> bool:
    if ".base_layer." in key or key.startswith("base_layer."):
        return False
    if key.startswith(STATE_ATTR + "."):
        return True
    return any(key.startswith(name + ".") for name in adapters(model))


def fingerprint(shapes: dict[str, Sequence[int]]) -> str:
    """SHA-256 of the targeted modules' names and (out, in) shapes."""
    canonical = json.dumps({k: list(v) for k, v in sorted(shapes.items())}, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _serialise(tensors: dict[str, Tensor]) -> bytes:
    return safetensors.torch.save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def adapter_bytes(model: nn.Module, topk_only: bool = False) -> int:
    """Size in bytes of the adapter weights file `save_adapter` would write."""
    model = state_of(model).saved_form(model)
    state = state_of(model)
    return len(_serialise(state.pack(adapter_state_dict(model), topk_only=topk_only)))


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    topk_only: bool = False,
    modules: Sequence[str] = (),
    stored_form: bool = True,
) -> Path:
    """Save the adapter (weights only) and its JSON description into `directory`.

    Args:
        topk_only: VB-LoRA's compact inference form (indices + k−1 weights per sub-vector); it cannot be
            trained further.
        modules: names of extra trainable modules (e.g. a classifier head) to save in `modules.safetensors`.
        stored_form: write the method's stored form (`AdapterState.saved_form`: SoRA saves its pruned LoRA);
            False writes the training form, from which training resumes exactly (SoRA keeps its gates).
    """
    if stored_form:
        model = state_of(model).saved_form(model)
    state = state_of(model)
    directory = Path(directory)
    weights = _serialise(state.pack(adapter_state_dict(model), topk_only=topk_only))
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
        extra = {}
        for name in modules:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise VBShareError(f"cannot save module {name!r}: the model has no such submodule") from None
            extra.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        blob = _serialise(extra)
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
    return model


def load_adapter_tensors(model: nn.Module, tensors: dict[str, Tensor], source: str) -> None:
    """Load adapter tensors (model state_dict keys) after checking they are exactly the adapter's."""
    expected = set(adapter_state_dict(model))
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise VBShareError(
            f"{source} does not fit this model's adapters (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); check it was saved from the same method and targets"
        )
    model.load_state_dict(tensors, strict=False)


def freeze_adapter(model: nn.Module) -> None:
    """Stop gradients to every adapter tensor (a lossy top-k load serves inference only)."""
    for key, param in model.named_parameters():
        if _is_adapter_key(key, model):
            param.requires_grad_(False)


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
