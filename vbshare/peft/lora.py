"""PEFT's LoRA: vbshare's LoRA, and every method's plain form (`as_lora=True`).

Keys: `<module>.lora_A.weight` (r, in) and `<module>.lora_B.weight` (out, r). A plain-LoRA export writes each
module's A, B and scale s from the contract's `composed_factors()`, with per-module ranks in `rank_pattern` and
each module's s pinned by `alpha_pattern` (PEFT's scale is alpha / r), so any method serves from LoRA-only
stacks (PEFT, vLLM, TGI multi-LoRA) with the same outputs.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..adapters.base import adapters, state_of
from ..core import inject, load_adapter_tensors
from ..errors import VBShareError
from .common import KeyTable, PeftType, peft_pattern

KEYS = KeyTable({"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}, what="LoRA")


@torch.no_grad()
def export(model: nn.Module, topk_only: bool) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Every module's (A, B, s) from `composed_factors()` as a PEFT LoRA (s = alpha / r, pinned per module)."""
    if topk_only:
        raise VBShareError("a plain-LoRA export has no top-k form; drop topk_only=True")
    ranks, alphas, tensors = {}, {}, {}
    for name, adapter in adapters(model).items():
        A, B, scale = adapter.composed_factors()  # (r, in), (out, r)
        ranks[name] = A.shape[0]
        alphas[name] = float(scale) * A.shape[0]
        # own copies: modules that share a factor (ASLoRA's A) must not share storage in the file
        tensors[KEYS.to_peft(f"{name}.lora_A")] = A.detach().clone(memory_format=torch.contiguous_format)
        tensors[KEYS.to_peft(f"{name}.lora_B")] = B.detach().clone(memory_format=torch.contiguous_format)
    top = max(ranks.values())
    config = {
        "r": top, "lora_alpha": top, "use_rslora": False, "lora_dropout": state_of(model).config.dropout,
        "rank_pattern": {name: r for name, r in ranks.items() if r != top},
        "alpha_pattern": alphas,
    }
    return config, tensors


def load(model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]) -> nn.Module:
    if config.get("use_dora"):
        raise VBShareError("DoRA adapters are not LoRA; vbshare does not import use_dora=True")
    state = {KEYS.to_ours(key): value for key, value in tensors.items()}
    names = sorted({k.rpartition(".")[0] for k in state})
    for name in names:
        for which in KEYS.module:
            if f"{name}.{which}" not in state:
                raise VBShareError(f"the PEFT LoRA adapter has no {which} for {name}; is it a complete save?")
    r, alpha = config["r"], config.get("lora_alpha", config["r"])
    rank_pattern = {n: state[f"{n}.lora_A"].shape[0] for n in names if state[f"{n}.lora_A"].shape[0] != r}
    alpha_pattern = {n: peft_pattern(config.get("alpha_pattern") or {}, n, alpha) for n in names}
    inject(model, "lora", targets=names, r=r, alpha=alpha, rslora=bool(config.get("use_rslora")),
           dropout=float(config.get("lora_dropout") or 0.0), rank_pattern=rank_pattern,
           alpha_pattern={n: a for n, a in alpha_pattern.items() if a != alpha})
    load_adapter_tensors(model, state, "the PEFT LoRA adapter")
    return model


TYPE = PeftType("LORA", export, load)
