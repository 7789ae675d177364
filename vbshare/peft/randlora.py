"""PEFT's RandLoRA (docs/methods.md §10).

Keys: `<module>.randlora_lambda` (r, n), `<module>.randlora_gamma` (n, d), and with `save_projection` the shared
bases `base_model.randlora_A` (r, 1, d_g) and `base_model.randlora_B` (D_g, n_g, r). PEFT's own saves also hold
a copy of both bases under every module (`<module>.randlora_A`, `<module>.randlora_B`); an import checks that
every copy equals the shared one and keeps a single tensor. vbshare holds basis_A without PEFT's middle axis
of 1, (r, d_g).

An export writes the bases once, as PEFT advises (save_projection): without them PEFT redraws them from
`projection_prng_key`, which gives vbshare's bits only where accelerate lets PEFT draw in bfloat16. An import of
a folder without bases rebuilds them from the seed the same way.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..adapters.base import STATE_ATTR, state_of
from ..core import inject, load_adapter_tensors, stored_tensors
from ..errors import VBShareError
from .common import PEFT_PREFIX, KeyTable, PeftType

KEYS = KeyTable({"lambdas": "randlora_lambda", "gammas": "randlora_gamma"},
                shared={"basis_A": "base_model.randlora_A", "basis_B": "base_model.randlora_B"}, what="RandLoRA")
BASES = {"basis_A": "randlora_A", "basis_B": "randlora_B"}  # vbshare's shared tensor -> PEFT's per-module copy


def export(model: nn.Module, topk_only: bool) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Every module's lambdas and gammas and the shared bases, once."""
    if topk_only:
        raise VBShareError("RandLoRA has no top-k form; drop topk_only=True")
    state = state_of(model)
    cfg = state.config
    config = {"r": cfg.r, "randlora_alpha": cfg.alpha, "projection_prng_key": cfg.projection_seed,
              "save_projection": True, "sparse": cfg.bases == "sparse", "very_sparse": cfg.bases == "very_sparse",
              "randlora_dropout": cfg.dropout, "init_weights": True}
    tensors = {KEYS.to_peft(k): v for k, v in stored_tensors(model, stored_form=False).items()}
    tensors[KEYS.shared["basis_A"]] = state.basis_A.detach()[:, None, :].contiguous()  # (r, 1, d_g), PEFT's layout
    tensors[KEYS.shared["basis_B"]] = state.basis_B.detach().contiguous()  # (D_g, n_g, r)
    return config, tensors


def shared_bases(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(the folder's tensors without any basis, {"basis_A" / "basis_B": the one copy of each basis it holds}).
    PEFT writes each basis once under `base_model.` and again under every module; all copies must be equal."""
    rest, copies = {}, {local: [] for local in BASES}
    for key, value in tensors.items():
        local = next((ours for ours, theirs in KEYS.shared.items() if key == theirs), None)
        if local is None and key.startswith(PEFT_PREFIX):
            local = next((ours for ours, theirs in BASES.items() if key.endswith("." + theirs)), None)
        if local is None:
            rest[key] = value
        else:
            copies[local].append((key, value))
    found = {}
    for local, held in copies.items():
        if not held:
            continue
        held.sort(key=lambda item: item[0] != KEYS.shared[local])  # the shared copy first: the one compared against
        first_key, first = held[0]
        for key, value in held[1:]:
            if value.shape != first.shape or not torch.equal(value, first):
                raise VBShareError(f"the PEFT RandLoRA adapter's {key} differs from {first_key}; the bases are shared "
                                   "by every module, so the folder is inconsistent: save it again")
        found[local] = first
    if len(found) == 1:
        raise VBShareError("the PEFT RandLoRA adapter holds only one of randlora_A and randlora_B; "
                           "is it a complete save?")
    return rest, found


def load(model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]) -> nn.Module:
    rest, bases = shared_bases(tensors)
    ours = {KEYS.to_ours(key): value for key, value in rest.items()}
    names = KEYS.modules_with(ours, "lambdas")
    if not names:
        raise VBShareError("the PEFT RandLoRA adapter holds no randlora_lambda tensors; is it a complete save?")
    # PEFT's precedence: very_sparse over sparse
    kind = "very_sparse" if config.get("very_sparse") else "sparse" if config.get("sparse") else "dense"
    inject(model, "randlora", targets=names, r=config["r"], alpha=config.get("randlora_alpha", 640),
           projection_seed=config.get("projection_prng_key", 0), save_projection=bool(bases), bases=kind,
           dropout=float(config.get("randlora_dropout") or 0.0))
    if "basis_A" in bases:
        A = bases["basis_A"]
        ours[f"{STATE_ATTR}.basis_A"] = A[:, 0, :] if A.dim() == 3 and A.shape[1] == 1 else A  # (r, 1, d_g) -> (r, d_g)
        ours[f"{STATE_ATTR}.basis_B"] = bases["basis_B"]
    load_adapter_tensors(model, ours, "the PEFT RandLoRA adapter")
    return model


TYPE = PeftType("RANDLORA", export, load)
