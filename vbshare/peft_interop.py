"""Read and write Hugging Face PEFT adapter folders (LoRA and VB-LoRA) without importing PEFT.

A PEFT folder holds `adapter_config.json` and `adapter_model.safetensors` whose keys are the model's
module names prefixed by `base_model.model.`:
    LoRA:    <name>.lora_A.weight (r, in), <name>.lora_B.weight (out, r)
    VB-LoRA: <name>.vblora_logits_A (r, in/b, h), <name>.vblora_logits_B (out/b, r, h),
             base_model.vblora_vector_bank (h, b); the top-k form replaces each logits tensor by
             `<key>_topk_indices` and `<key>_topk_weights`, exactly like vbshare's own top-k form.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import Tensor, nn

from .checkpoint import adapter_state_dict, atomic_write, freeze_adapter, load_adapter_tensors
from .core import STATE_ATTR, adapters, inject, state_of
from .errors import VBShareError

PEFT_PREFIX = "base_model.model."
PEFT_BANK = "base_model.vblora_vector_bank"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# our tensor name suffix -> PEFT's, per method
_LORA_KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
_VBLORA_KEYS = {"logits_A": "vblora_logits_A", "logits_B": "vblora_logits_B"}


def _rename(key: str, table: dict[str, str]) -> str:
    """`<module>.<ours><tail>` -> `base_model.model.<module>.<theirs><tail>` (tail: e.g. `_topk_indices`)."""
    module, _, local = key.rpartition(".")
    for ours, theirs in table.items():
        if local.startswith(ours):
            return f"{PEFT_PREFIX}{module}.{theirs}{local[len(ours):]}"
    raise VBShareError(f"tensor {key} has no PEFT counterpart")


def export_peft(model: nn.Module, directory: str | os.PathLike, topk_only: bool = False,
                base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapter as a PEFT folder that `peft.PeftModel.from_pretrained(base, dir)` loads.

    LoRA (including per-module ranks from `rank_pattern`) and VB-LoRA (full or `topk_only`) are supported,
    and SoRA through its stored form (the pruned LoRA).
    """
    model = state_of(model).saved_form(model)
    state = state_of(model)
    layers = adapters(model)
    fan_in_fan_out = any(a.fan_in_fan_out for a in layers.values())
    tensors = state.pack(adapter_state_dict(model), topk_only=topk_only)
    common = {
        "base_model_name_or_path": base_model_name_or_path,
        "target_modules": sorted(layers),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "inference_mode": True,
        "task_type": None,
        "modules_to_save": None,
    }
    if state.method == "lora":
        cfg = state.config
        ranks = {name: a.lora_A.shape[0] for name, a in layers.items()}
        top_rank = max(ranks.values())
        config = {
            "peft_type": "LORA", **common, "r": top_rank,
            "lora_alpha": cfg.alpha if cfg.alpha is not None else cfg.r,
            "use_rslora": cfg.rslora, "lora_dropout": cfg.dropout,
            "rank_pattern": {name: r for name, r in ranks.items() if r != top_rank},
            # PEFT derives s from alpha and the module's rank: pin alpha per module so s is preserved exactly
            "alpha_pattern": {name: _alpha_for_scale(a.scale, ranks[name], cfg.rslora) for name, a in layers.items()},
        }
        renamed = {_rename(k, _LORA_KEYS): v for k, v in tensors.items()}
    elif state.method == "vblora":
        cfg = state.config
        if cfg.scale != 1.0:
            raise VBShareError(f"PEFT's VB-LoRA has no scale; only adapters with scale=1.0 export (this one has {cfg.scale})")
        config = {
            "peft_type": "VBLORA", **common, "r": cfg.r, "num_vectors": cfg.num_vectors,
            "vector_length": cfg.vector_length, "topk": cfg.topk, "vblora_dropout": cfg.dropout,
            "save_only_topk_weights": topk_only, "init_logits_std": cfg.init_logits_std,
            "init_vector_bank_bound": cfg.init_bank_bound,
        }
        renamed = {PEFT_BANK if k == f"{STATE_ATTR}.bank" else _rename(k, _VBLORA_KEYS): v for k, v in tensors.items()}
    else:
        raise VBShareError(
            f"PEFT has no {state.method} adapter with the same maths; export covers lora, vblora and sora (as LoRA)"
        )
    directory = Path(directory)
    atomic_write(directory / WEIGHTS_FILE,
                 safetensors.torch.save({k: v.detach().contiguous().cpu() for k, v in renamed.items()}))
    atomic_write(directory / CONFIG_FILE, json.dumps(config, indent=2).encode())
    return directory


def _alpha_for_scale(scale: float, rank: int, rslora: bool) -> float:
    return scale * (math.sqrt(rank) if rslora else rank)


def _peft_pattern(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule: a pattern key matches a module name that ends with it at a dot boundary (regex allowed)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def import_peft(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Inject and load a PEFT LoRA or VB-LoRA adapter folder into a plain base model (in place)."""
    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        tensors = safetensors.torch.load_file(str(directory / WEIGHTS_FILE))
    except FileNotFoundError as err:
        raise VBShareError(f"{err.filename} does not exist; point at a PEFT adapter folder") from None
    except Exception as err:
        raise VBShareError(f"{directory} is not a readable PEFT adapter folder ({err})") from None
    peft_type = config.get("peft_type")
    if peft_type == "LORA":
        return _import_lora(model, config, tensors)
    if peft_type == "VBLORA":
        return _import_vblora(model, config, tensors)
    raise VBShareError(f"PEFT adapter type {peft_type!r} is not supported; vbshare imports LORA and VBLORA")


def _strip(key: str) -> str:
    if not key.startswith(PEFT_PREFIX):
        raise VBShareError(f"unexpected tensor {key} in the PEFT adapter (expected the {PEFT_PREFIX} prefix)")
    return key[len(PEFT_PREFIX):]


def _import_lora(model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]) -> nn.Module:
    if config.get("use_dora"):
        raise VBShareError("DoRA adapters are not LoRA; vbshare does not import use_dora=True")
    state: dict[str, Tensor] = {}
    for key, value in tensors.items():
        module, _, local = _strip(key).rpartition(".")  # "<name>.lora_A", "weight"
        name, _, which = module.rpartition(".")
        if local != "weight" or which not in _LORA_KEYS:
            raise VBShareError(f"unexpected tensor {key} in the PEFT LoRA adapter (a bias or an embedding adapter?)")
        state[f"{name}.{which}"] = value
    names = sorted({k.rpartition(".")[0] for k in state})
    r, alpha = config["r"], config.get("lora_alpha", config["r"])
    rank_pattern = {n: state[f"{n}.lora_A"].shape[0] for n in names if state[f"{n}.lora_A"].shape[0] != r}
    alpha_pattern = {n: _peft_pattern(config.get("alpha_pattern") or {}, n, alpha) for n in names}
    inject(model, "lora", targets=names, r=r, alpha=alpha, rslora=bool(config.get("use_rslora")),
           dropout=float(config.get("lora_dropout") or 0.0), rank_pattern=rank_pattern,
           alpha_pattern={n: a for n, a in alpha_pattern.items() if a != alpha})
    load_adapter_tensors(model, state, "the PEFT LoRA adapter")
    return model


def _import_vblora(model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]) -> nn.Module:
    topk_only = bool(config.get("save_only_topk_weights"))
    ours: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if key == PEFT_BANK:
            ours[f"{STATE_ATTR}.bank"] = value
            continue
        module, _, local = _strip(key).rpartition(".")
        renamed = local.replace("vblora_logits_A", "logits_A").replace("vblora_logits_B", "logits_B")
        ours[f"{module}.{renamed}"] = value
    names = sorted({k.rpartition(".")[0] for k in ours if k.rpartition(".")[2].startswith("logits_A")})
    inject(model, "vblora", targets=names, r=config["r"], num_vectors=config["num_vectors"],
           vector_length=config["vector_length"], topk=config["topk"],
           dropout=float(config.get("vblora_dropout") or 0.0),
           init_logits_std=config.get("init_logits_std", 0.1),
           init_bank_bound=config.get("init_vector_bank_bound", 0.02))
    state = state_of(model)
    load_adapter_tensors(model, state.unpack(ours, topk_only=topk_only), "the PEFT VB-LoRA adapter")
    if topk_only:
        freeze_adapter(model)
    return model
