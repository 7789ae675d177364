"""PEFT's Uni-LoRA (docs/methods.md, Uni-LoRA).

Keys: the trained vector `base_model.unilora_theta_d` (d); with `save_indices` also every module's
`<module>.unilora_indices_A` (r, in), `<module>.unilora_indices_B` (out, r) (int64) and PEFT's per-entry scales
`<module>.unilora_scales_A` / `_B` (each entry's c_j). vbshare keeps one scale per θ entry instead
(`theta_scale`, 1/√uses); an export spreads it onto the entries, an import recounts it and checks PEFT's.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..adapters.base import STATE_ATTR, adapters, state_of
from ..adapters.unilora import theta_scales
from ..core import inject, load_adapter_tensors
from ..errors import VBShareError
from .common import KeyTable, PeftType

# The per-entry scales exist in PEFT's folder only: they are written and checked here, never loaded as ours.
KEYS = KeyTable({"indices_A": "unilora_indices_A", "indices_B": "unilora_indices_B",
                 "entry_scales_A": "unilora_scales_A", "entry_scales_B": "unilora_scales_B"},
                shared={"theta": "base_model.unilora_theta_d"}, what="Uni-LoRA")
FACTORS = ("A", "B")


def export(model: nn.Module, topk_only: bool) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """θ plus every module's indices and per-entry scales (save_indices), so PEFT does not regenerate them."""
    if topk_only:
        raise VBShareError("Uni-LoRA has no top-k form; drop topk_only=True")
    state = state_of(model)
    cfg = state.config
    config = {"r": cfg.r, "theta_d_length": cfg.theta_d_length, "proj_seed": cfg.proj_seed,
              "unilora_dropout": cfg.dropout, "init_theta_d_bound": cfg.init_theta_d_bound, "save_indices": True}
    tensors = {KEYS.to_peft(f"{STATE_ATTR}.theta"): state.theta.detach()}
    scale = state.theta_scale.float()  # (d,)
    for name, adapter in adapters(model).items():
        for factor in FACTORS:
            indices = getattr(adapter, f"indices_{factor}").long()  # (r, in) or (out, r)
            tensors[KEYS.to_peft(f"{name}.indices_{factor}")] = indices
            tensors[KEYS.to_peft(f"{name}.entry_scales_{factor}")] = scale[indices]  # c_j of every entry
    return config, tensors


def load(model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]) -> nn.Module:
    theta_key = KEYS.to_peft(f"{STATE_ATTR}.theta")
    if theta_key not in tensors:
        raise VBShareError(f"the PEFT Uni-LoRA adapter has no {theta_key}; is it a complete save?")
    saved: dict[str, dict[str, Tensor]] = {}  # module -> {indices_A: ..., entry_scales_A: ..., ...}
    for key, value in tensors.items():
        if key != theta_key:
            module, _, local = KEYS.to_ours(key).rpartition(".")
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
    theta = tensors[theta_key]
    if theta.shape != state.theta.shape:
        raise VBShareError(f"the PEFT theta_d has shape {tuple(theta.shape)} but theta_d_length is "
                           f"{config['theta_d_length']}; the adapter folder is inconsistent")
    ours = {f"{STATE_ATTR}.theta": theta}
    if saved:
        ours.update(_indices(state, adapters(model), saved))
    load_adapter_tensors(model, ours, "the PEFT Uni-LoRA adapter")
    return model


def _indices(state: Any, layers: dict[str, nn.Module], saved: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    """Our tensors from PEFT's saved indices: every module's indices and the per-θ-entry scale recounted from
    them, after checking shapes, the index range and that PEFT's per-entry scales are that scale."""
    d = state.config.theta_d_length
    found: dict[str, Tensor] = {}
    for name, adapter in layers.items():
        for factor in FACTORS:
            indices = saved.get(name, {}).get(f"indices_{factor}")
            expected = tuple(getattr(adapter, f"indices_{factor}").shape)
            peft_name = KEYS.module[f"indices_{factor}"]
            if indices is None or tuple(indices.shape) != expected:
                raise VBShareError(f"the PEFT Uni-LoRA {peft_name} of {name} is missing or not of shape {expected}; "
                                   "import into the base model the adapter was trained on")
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= d):
                raise VBShareError(f"the PEFT Uni-LoRA {peft_name} of {name} points outside theta_d (length {d})")
            found[f"{name}.indices_{factor}"] = indices
    scale = theta_scales(torch.cat([i.reshape(-1) for i in found.values()]), d)  # (d,)
    for name in layers:
        for factor in FACTORS:
            theirs = saved[name].get(f"entry_scales_{factor}")
            ours = scale[found[f"{name}.indices_{factor}"].long()]
            if theirs is None or not torch.allclose(theirs.float(), ours.to(theirs.dtype).float(), rtol=1e-6, atol=0):
                raise VBShareError(f"the PEFT Uni-LoRA {KEYS.module[f'entry_scales_{factor}']} of {name} are missing "
                                   "or not 1/sqrt(uses) of their theta entries; vbshare imports only that normalisation")
    found[f"{STATE_ATTR}.theta_scale"] = scale
    return found


TYPE = PeftType("UNILORA", export, load, ("r", "theta_d_length"))
