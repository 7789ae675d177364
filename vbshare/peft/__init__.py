"""Read and write Hugging Face PEFT adapter folders without importing PEFT.

One module per PEFT type (`lora`, `vblora`, `vera`, `unilora`, `randlora`, `pvera`, `tinylora`), each with one
`KeyTable` that renames tensors both ways and an `export` / `load` pair; `PEFT_TYPES` below is the one table
that maps vbshare methods onto PEFT's. A method PEFT lacks is written as a plain LoRA (and any method on request, `as_lora=True`); SoRA as its
pruned LoRA. Modules trained beside the adapter (PEFT's `modules_to_save`, a task head) are written and read
under their own names.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import safetensors.torch
from torch import nn

from ..adapters.base import adapters, state_of
from ..checkpoint import CONFIG_FILE, WEIGHTS_FILE, serialise
from ..core import check_module_tensors, head_modules, injected_or_undone, module_tensors
from ..errors import VBShareError
from ..files import atomic_write
from . import lora, pvera, randlora, tinylora, unilora, vblora, vera
from .common import PEFT_PREFIX, PeftType, strip_prefix

__all__ = ["PEFT_TYPES", "export_peft", "import_peft"]

# vbshare method -> PEFT's own type for it. SoRA needs no entry: its stored form is a (pruned) LoRA.
PEFT_TYPES: dict[str, PeftType] = {
    "lora": lora.TYPE,
    "vblora": vblora.TYPE,
    "vera": vera.TYPE,
    "unilora": unilora.TYPE,
    "randlora": randlora.TYPE,
    "pvera": pvera.TYPE,
    "tinylora": tinylora.TYPE,
}
PLAIN_LORA = lora.TYPE


def export_peft(model: nn.Module, directory: str | os.PathLike, topk_only: bool = False, as_lora: bool = False,
                modules: Sequence[str] | None = None, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapter as a folder that `peft.PeftModel.from_pretrained(base, dir)` loads.

    Args:
        topk_only: VB-LoRA in PEFT's top-k form (`save_only_topk_weights`).
        as_lora: write every module's (A, B, s) as a plain PEFT LoRA, whatever the method. Methods PEFT does not
            have (ASLoRA, ...) are always written that way; SoRA is written as its pruned LoRA.
        modules: modules saved beside the adapter as PEFT's `modules_to_save`, weights included (a classifier
            head); None (default) takes every module that trains outside the adapter, [] none.
    """
    heads = head_modules(model) if modules is None else list(modules)
    head_tensors = {PEFT_PREFIX + k: v for k, v in module_tensors(model, heads).items()}
    model = state_of(model).saved_form(model)
    state = state_of(model)
    layers = adapters(model)
    if not layers:
        raise VBShareError("the adapter's stored form has no adapted module left (e.g. every SoRA gate is zero); "
                           "there is nothing to export")
    kind = PLAIN_LORA if as_lora else PEFT_TYPES.get(state.method, PLAIN_LORA)
    specific, tensors = kind.export(model, topk_only)
    config = {
        "peft_type": kind.peft_type,
        "base_model_name_or_path": base_model_name_or_path,
        "target_modules": sorted(layers),
        "fan_in_fan_out": any(a.fan_in_fan_out for a in layers.values()),
        "bias": "none",
        "inference_mode": True,
        "task_type": None,
        "modules_to_save": heads or None,
        **specific,
    }
    directory = Path(directory)
    atomic_write(directory / WEIGHTS_FILE, serialise({**tensors, **head_tensors}))
    atomic_write(directory / CONFIG_FILE, json.dumps(config, indent=2).encode())
    return directory


def import_peft(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Inject and load a PEFT adapter folder (a type in `PEFT_TYPES`) into a plain base model (in place),
    with its `modules_to_save` weights. A folder that does not fit is refused in one line (tensors checked like
    `vbshare.load_adapter`'s), and the model is then left plain."""
    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        tensors = safetensors.torch.load_file(str(directory / WEIGHTS_FILE))
    except FileNotFoundError as err:
        raise VBShareError(f"{err.filename} does not exist; point at a PEFT adapter folder") from None
    except Exception as err:
        line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VBShareError(f"{directory} is not a readable PEFT adapter folder ({line})") from None
    path = directory / CONFIG_FILE
    if not isinstance(config, dict):
        raise VBShareError(f"{path} holds a JSON {type(config).__name__}, not an object; point at a PEFT adapter folder")
    by_type = {kind.peft_type: kind for kind in PEFT_TYPES.values()}
    kind = by_type.get(config.get("peft_type"))
    if kind is None:
        raise VBShareError(
            f"PEFT adapter type {config.get('peft_type')!r} is not supported; vbshare imports {', '.join(sorted(by_type))}"
        )
    missing = [key for key in kind.required if key not in config]
    if missing:
        raise VBShareError(f"{path} has no {missing[0]!r}, which a PEFT {kind.peft_type} config needs; is it a "
                           "complete save?")
    heads = config.get("modules_to_save") or []
    if not (isinstance(heads, list) and all(isinstance(h, str) and h for h in heads)):
        raise VBShareError(f"{path}: 'modules_to_save' must be a list of module names, got {heads!r}")
    head_keys = {k for k in tensors if any(strip_prefix(k).startswith(h + ".") for h in heads)}
    with injected_or_undone(model):
        kind.load(model, config, {k: v for k, v in tensors.items() if k not in head_keys})
        if heads:
            head = {strip_prefix(k): tensors[k] for k in head_keys}
            check_module_tensors(model, heads, head, str(directory / WEIGHTS_FILE))
            model.load_state_dict(head, strict=False)
            state_of(model).head_modules = heads
    return model
