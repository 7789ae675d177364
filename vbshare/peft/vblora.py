"""PEFT's VB-LoRA (docs/methods.md, VB-LoRA).

Keys: `<module>.vblora_logits_A` (r, in/b, h), `<module>.vblora_logits_B` (out/b, r, h) and the bank
`base_model.vblora_vector_bank` (h, b). The top-k form replaces each logits tensor by `<key>_topk_indices` and
`<key>_topk_weights`, exactly as vbshare's own top-k form does, so the same table renames both.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..adapters.base import state_of
from ..core import freeze_adapter, inject, load_adapter_tensors, stored_tensors
from ..errors import VBShareError
from .common import KeyTable, PeftType

KEYS = KeyTable({"logits_A": "vblora_logits_A", "logits_B": "vblora_logits_B"},
                shared={"bank": "base_model.vblora_vector_bank"}, what="VB-LoRA")


def export(model: nn.Module, topk_only: bool) -> tuple[dict[str, Any], dict[str, Tensor]]:
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
    tensors = {KEYS.to_peft(k): v for k, v in stored_tensors(model, topk_only=topk_only, stored_form=False).items()}
    return config, tensors


def load(model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]) -> nn.Module:
    topk_only = bool(config.get("save_only_topk_weights"))
    ours = {KEYS.to_ours(key): value for key, value in tensors.items()}
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


TYPE = PeftType("VBLORA", export, load, ("r", "num_vectors", "vector_length", "topk"))
