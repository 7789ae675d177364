"""PEFT's PVeRA (docs/methods.md §11).

Keys: `<module>.pvera_lambda_d` (2r: mean half, then log-variance half), `<module>.pvera_lambda_b` (out), and the
shared projections `base_model.pvera_A` (2r, max_in), `base_model.pvera_B` (max_out, r). An export always writes
the projections (as for VeRA: PEFT's redraw from `projection_prng_key` needs the same PyTorch random stream).
Both libraries use the latent's mean outside training, so their eval-mode outputs agree; the sampling noise is not
carried over (PEFT seeds every layer's generator with one `generator_seed`, vbshare derives one per module), so
`sample_seed` and `generator_seed` map onto each other by value only.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..adapters.base import state_of
from ..core import inject, load_adapter_tensors, stored_tensors
from ..errors import VBShareError
from .common import KeyTable, PeftType

KEYS = KeyTable({"lambda_d": "pvera_lambda_d", "lambda_b": "pvera_lambda_b"},
                shared={"projection_A": "base_model.pvera_A", "projection_B": "base_model.pvera_B"}, what="PVeRA")


def export(model: nn.Module, topk_only: bool) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """λ_d, λ_b per module and the shared projections."""
    if topk_only:
        raise VBShareError("PVeRA has no top-k form; drop topk_only=True")
    state = state_of(model)
    cfg = state.config
    # kl_weight is a training-time loss term that PEFT has no field for; nothing of it is in the adapter
    config = {"r": cfg.r, "projection_prng_key": cfg.projection_seed, "save_projection": True,
              "pvera_dropout": cfg.dropout, "d_initial": cfg.d_initial,
              "sample_at_inference": cfg.sample_at_inference, "generator_seed": cfg.sample_seed}
    tensors = {KEYS.to_peft(k): v for k, v in stored_tensors(model, stored_form=False).items()}
    for local, key in KEYS.shared.items():  # non-persistent buffers unless save_projection: written here either way
        tensors[key] = getattr(state, local).detach().contiguous()
    return config, tensors


def load(model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]) -> nn.Module:
    ours = {KEYS.to_ours(key): value for key, value in tensors.items()}
    names = KEYS.modules_with(ours, "lambda_d")
    if not names:
        raise VBShareError("the PEFT PVeRA adapter holds no pvera_lambda_d tensors; is it a complete save?")
    saved = KEYS.shared_in(ours)
    inject(model, "pvera", targets=names, r=config["r"], projection_seed=config.get("projection_prng_key", 0),
           save_projection=bool(saved), d_initial=config.get("d_initial", 0.1),
           sample_at_inference=bool(config.get("sample_at_inference", False)),
           sample_seed=config.get("generator_seed"), dropout=float(config.get("pvera_dropout") or 0.0))
    KEYS.check_shared_shapes(ours, state_of(model), saved, config["r"])
    load_adapter_tensors(model, ours, "the PEFT PVeRA adapter")
    return model


TYPE = PeftType("PVERA", export, load)
