"""PEFT's VeRA (docs/methods.md, VeRA).

Keys: `<module>.vera_lambda_d` (r), `<module>.vera_lambda_b` (out), and the shared projections
`base_model.vera_A` (r, max_in), `base_model.vera_B` (max_out, r). An export always writes the projections, as
PEFT advises: a folder without them makes PEFT redraw them from `projection_prng_key`, which reproduces them
only with the same PyTorch random-number stream (PEFT warns when it loads such a folder).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..adapters.base import state_of
from ..core import inject, load_adapter_tensors, stored_tensors
from ..errors import VBShareError
from .common import KeyTable, PeftType

KEYS = KeyTable({"lambda_d": "vera_lambda_d", "lambda_b": "vera_lambda_b"},
                shared={"projection_A": "base_model.vera_A", "projection_B": "base_model.vera_B"}, what="VeRA")


def export(model: nn.Module, topk_only: bool) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """λ_d, λ_b per module and the shared projections."""
    if topk_only:
        raise VBShareError("VeRA has no top-k form; drop topk_only=True")
    state = state_of(model)
    cfg = state.config
    config = {"r": cfg.r, "projection_prng_key": cfg.projection_seed, "save_projection": True,
              "vera_dropout": cfg.dropout, "d_initial": cfg.d_initial}
    tensors = {KEYS.to_peft(k): v for k, v in stored_tensors(model, stored_form=False).items()}
    for local, key in KEYS.shared.items():  # non-persistent buffers unless save_projection: written here either way
        tensors[key] = getattr(state, local).detach().contiguous()
    return config, tensors


def load(model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]) -> nn.Module:
    ours = {KEYS.to_ours(key): value for key, value in tensors.items()}
    names = KEYS.modules_with(ours, "lambda_d")
    if not names:
        raise VBShareError("the PEFT VeRA adapter holds no vera_lambda_d tensors; is it a complete save?")
    saved = KEYS.shared_in(ours)
    inject(model, "vera", targets=names, r=config["r"], projection_seed=config.get("projection_prng_key", 0),
           save_projection=bool(saved), d_initial=config.get("d_initial", 0.1),
           dropout=float(config.get("vera_dropout") or 0.0))
    KEYS.check_shared_shapes(ours, state_of(model), saved, config["r"])
    load_adapter_tensors(model, ours, "the PEFT VeRA adapter")
    return model


TYPE = PeftType("VERA", export, load)
