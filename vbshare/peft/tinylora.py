"""PEFT's TinyLoRA (docs/methods.md §12).

Keys: `<module>.tinylora_A` (r, in), `<module>.tinylora_B` (out, r), `<module>.tinylora_P` (u, r, r), and one key
per tying group `base_model.tinylora_v.<g>` (u,), which vbshare holds as the rows of `vectors` (G, u). PEFT does
not write which module reads which group: both libraries derive it from `weight_tying` and the targets' order,
by the same rule (`adapters.tinylora.tying_groups`).

PEFT always writes the SVD factors (its float32 SVD's signs are not a function of W alone), so an import keeps
them (save_factors on) and loads P when the folder has it (else rebuilds it from the seed, bit for bit as PEFT).
An export always writes the factors and every P, so PEFT loads vbshare's exact tensors.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters.base import STATE_ATTR, adapters, state_of
from ..core import inject, load_adapter_tensors
from ..errors import VBShareError
from .common import PEFT_PREFIX, KeyTable, PeftType

KEYS = KeyTable({"svd_A": "tinylora_A", "svd_B": "tinylora_B", "projection": "tinylora_P"}, what="TinyLoRA")
VECTOR_KEY = re.compile(r"base_model\.tinylora_v\.(\d+)")


def export(model: nn.Module, topk_only: bool) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The factors and P of every module (buffers written here whatever save_*), and one vector per group."""
    if topk_only:
        raise VBShareError("TinyLoRA has no top-k form; drop topk_only=True")
    state = state_of(model)
    cfg = state.config
    config = {"r": cfg.r, "u": cfg.u, "weight_tying": cfg.weight_tying, "projection_seed": cfg.projection_seed,
              "save_projection": True, "init_v_bound": cfg.init_v_bound, "init_weights": True,
              "tinylora_dropout": cfg.dropout}
    tensors = {}
    for name, adapter in adapters(model).items():
        for local in KEYS.module:
            tensors[KEYS.to_peft(f"{name}.{local}")] = getattr(adapter, local).detach().contiguous()
    for group, vector in enumerate(state.vectors.detach()):  # (G, u) -> G keys of (u,)
        tensors[f"base_model.tinylora_v.{group}"] = vector.contiguous()
    return config, tensors


def load(model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]) -> nn.Module:
    vectors = {}
    for key in [k for k in tensors if not k.startswith(PEFT_PREFIX)]:
        match = VECTOR_KEY.fullmatch(key)
        if match is None:
            raise VBShareError(f"unexpected tensor {key} in the PEFT TinyLoRA adapter")
        vectors[int(match.group(1))] = tensors.pop(key)
    ours = {KEYS.to_ours(key): value for key, value in tensors.items()}
    names = KEYS.modules_with(ours, "svd_A")
    if not names or not vectors:
        raise VBShareError("the PEFT TinyLoRA adapter lacks tinylora_A or tinylora_v tensors; is it a complete save?")
    has_projection = bool(KEYS.modules_with(ours, "projection"))
    inject(model, "tinylora", targets=names, r=config["r"], u=config["u"],
           weight_tying=float(config.get("weight_tying", 0.0)), projection_seed=config.get("projection_seed", 42),
           save_projection=has_projection, save_factors=True, dropout=float(config.get("tinylora_dropout") or 0.0))
    groups = state_of(model).vectors.shape[0]
    if sorted(vectors) != list(range(groups)):
        raise VBShareError(
            f"the PEFT TinyLoRA adapter has vectors {sorted(vectors)}, but weight_tying={config.get('weight_tying')} "
            f"on its {len(names)} targets gives {groups} groups; is it a complete save for this base model?")
    ours[f"{STATE_ATTR}.vectors"] = torch.stack([vectors[g] for g in range(groups)])  # G x (u,) -> (G, u)
    load_adapter_tensors(model, ours, "the PEFT TinyLoRA adapter")
    return model


TYPE = PeftType("TINYLORA", export, load, required=("r", "u"))
