"""Read and write Hugging Face PEFT adapter folders without importing PEFT.

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
    Modules trained beside the adapter (`modules_to_save`, a task head): <name>.<tensor> as in the model.

Export writes a method in PEFT's own type where PEFT has one (`PEFT_TYPES`, the one table here that maps vbshare
methods onto PEFT's), and any method as a plain LoRA (`as_lora=True`, and always for a method PEFT lacks): every
module's A (r, in), B (out, r) and scale s straight from the contract's `factors()`, with per-module ranks in
`rank_pattern` and each module's s pinned by `alpha_pattern` (PEFT's scale is alpha / r). Such a folder serves
any adapter from LoRA-only stacks (PEFT, vLLM, TGI multi-LoRA) with the same outputs.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import safetensors.torch
import torch
from torch import Tensor, nn

from .adapters.base import STATE_ATTR, adapters, state_of
from .adapters.unilora import theta_scales
from .checkpoint import CONFIG_FILE, WEIGHTS_FILE, serialise  # one adapter-folder layout, PEFT's
from .core import (check_module_tensors, freeze_adapter, head_modules, inject, injected_or_undone, load_adapter_tensors,
                   module_tensors, stored_tensors)
from .errors import VBShareError
from .files import atomic_write

PEFT_PREFIX = "base_model.model."
PEFT_BANK = "base_model.vblora_vector_bank"

ExportFn = Callable[[nn.Module, bool], tuple[dict[str, Any], dict[str, Tensor]]]
ImportFn = Callable[[nn.Module, dict[str, Any], dict[str, Tensor]], nn.Module]


@dataclass(frozen=True)
class PeftType:
    """One PEFT adapter type: `export(model, topk_only)` -> (its config keys, tensors under PEFT's keys);
    `load(base, config, tensors)` injects and loads it into a plain base model (tensors: PEFT keys, head left out)."""

    peft_type: str
    export: ExportFn
    load: ImportFn
    required: tuple[str, ...] = ("r",)  # config keys an import cannot do without


def _rename(key: str, table: dict[str, str]) -> str:
    """`<module>.<ours><tail>` -> `base_model.model.<module>.<theirs><tail>` (tail: e.g. `_topk_indices`)."""
    module, _, local = key.rpartition(".")
    for ours, theirs in table.items():
        if local.startswith(ours):
            return f"{PEFT_PREFIX}{module}.{theirs}{local[len(ours):]}"
    raise VBShareError(f"tensor {key} has no PEFT counterpart")


def _strip(key: str) -> str:
    if not key.startswith(PEFT_PREFIX):
        raise VBShareError(f"unexpected tensor {key} in the PEFT adapter (expected the {PEFT_PREFIX} prefix)")
    return key[len(PEFT_PREFIX):]


def _peft_pattern(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule: a pattern key matches a module name that ends with it at a dot boundary (regex allowed)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


# -- LoRA: every method's plain form ---------------------------------------------------------------------------
_LORA_KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}


@torch.no_grad()
def _export_plain_lora(model: nn.Module, topk_only: bool) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Every module's (A, B, s) from `composed_factors()` as a PEFT LoRA (s = alpha / r, pinned per module)."""
    if topk_only:
        raise VBShareError("a plain-LoRA export has no top-k form; drop topk_only=True")
    ranks, alphas, tensors = {}, {}, {}
    for name, adapter in adapters(model).items():
        A, B, scale = adapter.composed_factors()  # (r, in), (out, r)
        ranks[name] = A.shape[0]
        alphas[name] = float(scale) * A.shape[0]
        # own copies: modules that share a factor (ASLoRA's A) must not share storage in the file
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.detach().clone(memory_format=torch.contiguous_format)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.detach().clone(memory_format=torch.contiguous_format)
    top = max(ranks.values())
    config = {
        "r": top, "lora_alpha": top, "use_rslora": False, "lora_dropout": state_of(model).config.dropout,
        "rank_pattern": {name: r for name, r in ranks.items() if r != top},
        "alpha_pattern": alphas,
    }
    return config, tensors


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
    for name in names:
        for which in _LORA_KEYS:
            if f"{name}.{which}" not in state:
                raise VBShareError(f"the PEFT LoRA adapter has no {which} for {name}; is it a complete save?")
    r, alpha = config["r"], config.get("lora_alpha", config["r"])
    rank_pattern = {n: state[f"{n}.lora_A"].shape[0] for n in names if state[f"{n}.lora_A"].shape[0] != r}
    alpha_pattern = {n: _peft_pattern(config.get("alpha_pattern") or {}, n, alpha) for n in names}
    inject(model, "lora", targets=names, r=r, alpha=alpha, rslora=bool(config.get("use_rslora")),
           dropout=float(config.get("lora_dropout") or 0.0), rank_pattern=rank_pattern,
           alpha_pattern={n: a for n, a in alpha_pattern.items() if a != alpha})
    load_adapter_tensors(model, state, "the PEFT LoRA adapter")
    return model


# -- VB-LoRA ------------------------------------------------------------------------------------------------
_VBLORA_KEYS = {"logits_A": "vblora_logits_A", "logits_B": "vblora_logits_B"}


def _export_vblora(model: nn.Module, topk_only: bool) -> tuple[dict[str, Any], dict[str, Tensor]]:
    cfg = state_of(model).config
    if cfg.scale != 1.0:
        raise VBShareError(
            f"PEFT's VB-LoRA has no scale and this adapter has scale={cfg.scale}; export it with as_lora=True"
        )
    config = {
        "r": cfg.r, "num_vectors": cfg.num_vectors, "vector_length": cfg.vector_length, "topk": cfg.topk,
        "vblora_dropout": cfg.dropout, "save_only_topk_weights": topk_only, "init_logits_std": cfg.init_logits_std,
        "init_vector_bank_bound": cfg.init_bank_bound,
    }
    tensors = {PEFT_BANK if k == f"{STATE_ATTR}.bank" else _rename(k, _VBLORA_KEYS): v
               for k, v in stored_tensors(model, topk_only=topk_only, stored_form=False).items()}
    return config, tensors


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


# -- VeRA and Uni-LoRA (docs/methods.md §5, §8) ----------------------------------------------------------
# Both keep a model-wide shared tensor on `model.vbshare`; PEFT keeps it on its tuner (`base_model.`).
PEFT_VERA_PROJECTIONS = {"base_model.vera_A": "projection_A", "base_model.vera_B": "projection_B"}
PEFT_THETA = "base_model.unilora_theta_d"
_VERA_KEYS = {"lambda_d": "vera_lambda_d", "lambda_b": "vera_lambda_b"}
_UNILORA_BUFFERS = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")


def _export_vera(model: nn.Module, topk_only: bool) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """λ_d, λ_b per module; the projections when saved (else PEFT draws the same ones from the seed)."""
    if topk_only:
        raise VBShareError("VeRA has no top-k form; drop topk_only=True")
    cfg = state_of(model).config
    config = {"r": cfg.r, "projection_prng_key": cfg.projection_seed, "save_projection": cfg.save_projection,
              "vera_dropout": cfg.dropout, "d_initial": cfg.d_initial}
    ours_to_peft = {f"{STATE_ATTR}.{local}": key for key, local in PEFT_VERA_PROJECTIONS.items()}
    tensors = stored_tensors(model, stored_form=False)
    renamed = {ours_to_peft[k] if k in ours_to_peft else _rename(k, _VERA_KEYS): v for k, v in tensors.items()}
    return config, renamed


def _export_unilora(model: nn.Module, topk_only: bool) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """θ plus every module's indices and per-entry scales (save_indices), so PEFT does not regenerate them."""
    if topk_only:
        raise VBShareError("Uni-LoRA has no top-k form; drop topk_only=True")
    state = state_of(model)
    cfg = state.config
    config = {"r": cfg.r, "theta_d_length": cfg.theta_d_length, "proj_seed": cfg.proj_seed,
              "unilora_dropout": cfg.dropout, "init_theta_d_bound": cfg.init_theta_d_bound, "save_indices": True}
    renamed = {PEFT_THETA: state.theta.detach()}
    scale = state.theta_scale.float()  # (d,)
    for name, adapter in adapters(model).items():
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


# vbshare method -> PEFT's own type for it. SoRA needs no entry: its stored form is a (pruned) LoRA.
PEFT_TYPES: dict[str, PeftType] = {
    "lora": PeftType("LORA", _export_plain_lora, _import_lora),
    "vblora": PeftType("VBLORA", _export_vblora, _import_vblora, ("r", "num_vectors", "vector_length", "topk")),
    "vera": PeftType("VERA", _export_vera, _import_vera),
    "unilora": PeftType("UNILORA", _export_unilora, _import_unilora, ("r", "theta_d_length")),
}
PLAIN_LORA = PEFT_TYPES["lora"]


# -- the two public calls -----------------------------------------------------------------------------------
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
    head_keys = {k for k in tensors if any(_strip(k).startswith(h + ".") for h in heads)}
    with injected_or_undone(model):
        kind.load(model, config, {k: v for k, v in tensors.items() if k not in head_keys})
        if heads:
            head = {_strip(k): tensors[k] for k in head_keys}
            check_module_tensors(model, heads, head, str(directory / WEIGHTS_FILE))
            model.load_state_dict(head, strict=False)
            state_of(model).head_modules = heads
    return model
