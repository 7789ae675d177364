"""Read and write Hugging Face PEFT adapter folders (LoRA and VB-LoRA) without importing PEFT.

A PEFT folder holds `adapter_config.json` and `adapter_model.safetensors` whose keys are the model's
module names prefixed by `base_model.model.`:
    LoRA:    <name>.lora_A.weight (r, in), <name>.lora_B.weight (out, r)
    VB-LoRA: <name>.vblora_logits_A (r, in/b, h), <name>.vblora_logits_B (out/b, r, h),
             base_model.vblora_vector_bank (h, b); the top-k form replaces each logits tensor by
             `<key>_topk_indices` and `<key>_topk_weights`, exactly like vbshare's own top-k form.
    VeRA:    <name>.vera_lambda_d (r), <name>.vera_lambda_b (out); the shared projections
             base_model.vera_A (r, max_in) and base_model.vera_B (max_out, r) only when they are saved.
    Uni-LoRA: base_model.unilora_theta_d (d); with save_indices also <name>.unilora_indices_A (r, in),
             <name>.unilora_indices_B (out, r) (int64) and <name>.unilora_scales_A / _B (the per-entry c_j).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from .adapters.unilora import theta_scales
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
    and SoRA through its stored form (the pruned LoRA); VeRA and Uni-LoRA (with its indices) are written by
    their own block at the end of this file.
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
    if state.method in EXPORTERS:  # VeRA, Uni-LoRA: their block at the end of this file
        config, renamed = EXPORTERS[state.method](state, layers, tensors, common)
        return _write_folder(Path(directory), config, renamed)
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
            f"PEFT has no {state.method} adapter with the same maths; export covers lora, vblora, vera, unilora "
            "and sora (as LoRA)"
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
    """Inject and load a PEFT LoRA, VB-LoRA, VeRA or Uni-LoRA adapter folder into a plain base model (in place)."""
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
    if peft_type in IMPORTERS:  # VeRA, Uni-LoRA: their block at the end of this file
        return IMPORTERS[peft_type](model, config, tensors)
    raise VBShareError(
        f"PEFT adapter type {peft_type!r} is not supported; vbshare imports LORA, VBLORA, VERA and UNILORA")


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


# ===================================================================== VeRA and Uni-LoRA (docs/methods.md §5, §8)
# Both keep a model-wide shared tensor on `model.vbshare`; PEFT keeps it on its tuner (`base_model.`).
PEFT_VERA_PROJECTIONS = {"base_model.vera_A": "projection_A", "base_model.vera_B": "projection_B"}
PEFT_THETA = "base_model.unilora_theta_d"
_VERA_KEYS = {"lambda_d": "vera_lambda_d", "lambda_b": "vera_lambda_b"}
_UNILORA_BUFFERS = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")


def _write_folder(directory: Path, config: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    """The weights, then the JSON (so a folder with a config is complete), each written atomically."""
    atomic_write(directory / WEIGHTS_FILE,
                 safetensors.torch.save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))
    atomic_write(directory / CONFIG_FILE, json.dumps(config, indent=2).encode())
    return directory


def _export_vera(state: Any, layers: dict[str, nn.Module], tensors: dict[str, Tensor],
                 common: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """λ_d, λ_b per module; the projections when saved (else PEFT draws the same ones from the seed)."""
    cfg = state.config
    config = {"peft_type": "VERA", **common, "r": cfg.r, "projection_prng_key": cfg.projection_seed,
              "save_projection": cfg.save_projection, "vera_dropout": cfg.dropout, "d_initial": cfg.d_initial}
    ours_to_peft = {f"{STATE_ATTR}.{local}": key for key, local in PEFT_VERA_PROJECTIONS.items()}
    renamed = {ours_to_peft[k] if k in ours_to_peft else _rename(k, _VERA_KEYS): v for k, v in tensors.items()}
    return config, renamed


def _export_unilora(state: Any, layers: dict[str, nn.Module], tensors: dict[str, Tensor],
                    common: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """θ plus every module's indices and per-entry scales (save_indices), so PEFT does not regenerate them."""
    cfg = state.config
    config = {"peft_type": "UNILORA", **common, "r": cfg.r, "theta_d_length": cfg.theta_d_length,
              "proj_seed": cfg.proj_seed, "unilora_dropout": cfg.dropout,
              "init_theta_d_bound": cfg.init_theta_d_bound, "save_indices": True}
    renamed = {PEFT_THETA: state.theta}
    scale = state.theta_scale.float()  # (d,)
    for name, adapter in layers.items():
        for factor in ("A", "B"):
            indices = getattr(adapter, f"indices_{factor}").long()  # (r, in) or (out, r)
            renamed[f"{PEFT_PREFIX}{name}.unilora_indices_{factor}"] = indices
            renamed[f"{PEFT_PREFIX}{name}.unilora_scales_{factor}"] = scale[indices]  # c_j of every entry
    return config, renamed


def _import_vera(model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]) -> nn.Module:
    ours: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if key in PEFT_VERA_PROJECTIONS:
            ours[f"{STATE_ATTR}.{PEFT_VERA_PROJECTIONS[key]}"] = value
            continue
        module, _, local = _strip(key).rpartition(".")
        if local not in _VERA_KEYS.values():
            raise VBShareError(f"unexpected tensor {key} in the PEFT VeRA adapter (a bias? vbshare imports bias='none')")
        ours[f"{module}.{local.removeprefix('vera_')}"] = value
    names = sorted({k.rpartition(".")[0] for k in ours if k.endswith(".lambda_d")})
    if not names:
        raise VBShareError("the PEFT VeRA adapter holds no vera_lambda_d tensors; is it a complete save?")
    saved = f"{STATE_ATTR}.projection_A" in ours
    inject(model, "vera", targets=names, r=config["r"], projection_seed=config.get("projection_prng_key", 0),
           save_projection=saved, d_initial=config.get("d_initial", 0.1),
           dropout=float(config.get("vera_dropout") or 0.0))
    state = state_of(model)
    for local in PEFT_VERA_PROJECTIONS.values():
        key = f"{STATE_ATTR}.{local}"
        if saved and ours[key].shape != getattr(state, local).shape:
            raise VBShareError(
                f"the PEFT VeRA {local} has shape {tuple(ours[key].shape)}, but r={config['r']} on these targets needs "
                f"{tuple(getattr(state, local).shape)}; import into the base model the adapter was trained on")
    load_adapter_tensors(model, ours, "the PEFT VeRA adapter")
    return model


def _import_unilora(model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]) -> nn.Module:
    if PEFT_THETA not in tensors:
        raise VBShareError(f"the PEFT Uni-LoRA adapter has no {PEFT_THETA}; is it a complete save?")
    saved: dict[str, dict[str, Tensor]] = {}  # module -> {unilora_indices_A: ..., unilora_scales_A: ..., ...}
    for key, value in tensors.items():
        if key == PEFT_THETA:
            continue
        module, _, local = _strip(key).rpartition(".")
        if local not in _UNILORA_BUFFERS:
            raise VBShareError(f"unexpected tensor {key} in the PEFT Uni-LoRA adapter (a bias? vbshare imports bias='none')")
        saved.setdefault(module, {})[local] = value
    if saved:
        targets: Any = sorted(saved)
    else:
        targets = config.get("target_modules")
        if targets in (None, "all-linear") or config.get("layers_to_transform") is not None:
            raise VBShareError(
                "this PEFT Uni-LoRA adapter was saved without indices and with targets vbshare cannot match exactly "
                f"(target_modules={targets!r}, layers_to_transform={config.get('layers_to_transform')!r}); "
                "save it with save_indices=True")
    hyper = dict(r=config["r"], theta_d_length=config["theta_d_length"], proj_seed=config.get("proj_seed", 42),
                 init_theta_d_bound=config.get("init_theta_d_bound", 0.02),
                 dropout=float(config.get("unilora_dropout") or 0.0))
    inject(model, "unilora", targets=targets, save_indices=bool(saved), **hyper)
    state = state_of(model)
    theta = tensors[PEFT_THETA]
    if theta.shape != state.theta.shape:
        raise VBShareError(f"the PEFT theta_d has shape {tuple(theta.shape)} but theta_d_length is "
                           f"{config['theta_d_length']}; the adapter folder is inconsistent")
    ours = {f"{STATE_ATTR}.theta": theta}
    if saved:
        ours.update(_unilora_indices(state, adapters(model), saved))
    load_adapter_tensors(model, ours, "the PEFT Uni-LoRA adapter")
    return model


def _unilora_indices(state: Any, layers: dict[str, nn.Module], saved: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    """Our tensors from PEFT's saved indices: every module's indices and the per-θ-entry scale recounted from
    them, after checking shapes, the index range and that PEFT's per-entry scales are that scale."""
    d = state.config.theta_d_length
    found: dict[str, Tensor] = {}
    for name, adapter in layers.items():
        for factor in ("A", "B"):
            key = f"unilora_indices_{factor}"
            indices = saved.get(name, {}).get(key)
            expected = tuple(getattr(adapter, f"indices_{factor}").shape)
            if indices is None or tuple(indices.shape) != expected:
                raise VBShareError(f"the PEFT Uni-LoRA {key} of {name} is missing or not of shape {expected}; "
                                   "import into the base model the adapter was trained on")
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= d):
                raise VBShareError(f"the PEFT Uni-LoRA {key} of {name} points outside theta_d (length {d})")
            found[f"{name}.indices_{factor}"] = indices
    scale = theta_scales(torch.cat([i.reshape(-1) for i in found.values()]), d)  # (d,)
    for name in layers:
        for factor in ("A", "B"):
            theirs = saved[name].get(f"unilora_scales_{factor}")
            ours = scale[found[f"{name}.indices_{factor}"].long()]
            if theirs is None or not torch.allclose(theirs.float(), ours.to(theirs.dtype).float(), rtol=1e-6, atol=0):
                raise VBShareError(f"the PEFT Uni-LoRA unilora_scales_{factor} of {name} are missing or not "
                                   "1/sqrt(uses) of their theta entries; vbshare imports only that normalisation")
    found[f"{STATE_ATTR}.theta_scale"] = scale
    return found


# method -> its export function; PEFT type -> its import function
EXPORTERS = {"vera": _export_vera, "unilora": _export_unilora}
IMPORTERS = {"VERA": _import_vera, "UNILORA": _import_unilora}
