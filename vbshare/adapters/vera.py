"""VeRA (Kopiczko et al., ICLR 2024) — frozen random projections shared by every module, trained scaling
vectors per module. docs/methods.md §5.

ONE pair of frozen random matrices serves the whole model: A (r, max_in) and B (max_out, r), where max_in and
max_out are the largest in / out features over the targets. A module of shape (out, in) reads the slices
A[:, :in] and B[:out, :] and owns two vectors, λ_d (r) and λ_b (out):
    Δh = λ_b ⊙ (B_sl (λ_d ⊙ (A_sl x))),   ΔW = diag(λ_b) B_sl diag(λ_d) A_sl.
`factors()` folds the vectors into the slices (A' = diag(λ_d) A_sl, B' = diag(λ_b) B_sl, s = 1), so ΔW, merge,
disabling and export come from the `LowRankAdapter` contract. The forward pass (`low_rank_forward`) scales
activations instead, x -> (x A_slᵀ) ⊙ λ_d -> (· B_slᵀ) ⊙ λ_b, as PEFT does: the scaled factors are never formed,
and backward needs no weight-gradient products (r × in and out × r) to reach the vectors, only products of
activations with the output gradient (tokens × r and tokens × out), which is cheaper at every batch size.

The projections are drawn on the CPU from a generator seeded with `projection_seed`, A first, then B, each with
kaiming_uniform(a=0) over the full matrix: U(−√(6/fan_in), √(6/fan_in)) with fan_in = max_in for A and r for B.
This is the draw Hugging Face PEFT makes from `projection_prng_key`, so both rebuild the same bits. They are
non-persistent buffers unless `save_projection` (then they are saved and counted).
λ_d starts at `d_initial` (default 0.1) and λ_b at 0, so ΔW = 0 at init.

Stored parameters: Σ (out + r) over modules, plus r·(max_in + max_out) when the projections are saved.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import VBShareError
from .base import AdapterConfig, AdapterState, LowRankAdapter

PROJECTION_SLOPE = 0.0  # kaiming_uniform negative slope of the projections (ReLU gain √2), as in PEFT's VeRA


def check_d_initial(d_initial: object) -> None:
    """λ_d's starting value: a finite, non-zero number (λ_b starts at 0, so with λ_d = 0 neither would train)."""
    if isinstance(d_initial, bool) or not isinstance(d_initial, (int, float)) or not math.isfinite(d_initial):
        raise VBShareError(f"d_initial must be a finite number, got {d_initial!r}")
    if d_initial == 0:
        raise VBShareError("d_initial must be non-zero: with lambda_b starting at 0 too, no gradient would reach "
                           "either vector; use e.g. d_initial=0.1")


@dataclass
class VeRAConfig(AdapterConfig):
    r: int = 256  # rows of the shared A / columns of B; VeRA runs use far higher ranks than LoRA
    d_initial: float = 0.1  # starting value of every λ_d entry
    projection_seed: int = 0  # seeds the draw of the shared projections
    save_projection: bool = False  # save A and B (else the seed rebuilds them bit for bit on load)
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_d_initial(self.d_initial)
        if isinstance(self.projection_seed, bool) or not isinstance(self.projection_seed, int) or self.projection_seed < 0:
            raise VBShareError(f"projection_seed must be a non-negative integer, got {self.projection_seed!r}")
        if not isinstance(self.save_projection, bool):
            raise VBShareError(f"save_projection must be true or false, got {self.save_projection!r}")


def draw_projections(r: int, max_in: int, max_out: int, seed: int, rows_A: int | None = None) -> tuple[Tensor, Tensor]:
    """The shared (A (rows_A, max_in), B (max_out, r)) in float32, rows_A = r unless given (PVeRA's A has 2r):
    one CPU generator seeded with `seed`, A drawn first, each with kaiming_uniform(a=0) over its own full shape."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    A = torch.empty(rows_A or r, max_in)  # (rows_A, max_in)
    nn.init.kaiming_uniform_(A, a=PROJECTION_SLOPE, generator=generator)
    B = nn.init.kaiming_uniform_(torch.empty(max_out, r), a=PROJECTION_SLOPE, generator=generator)  # (max_out, r)
    return A, B


class VeRAState(AdapterState):
    """Owns the shared frozen projections `projection_A` (r, max_in) and `projection_B` (max_out, r)."""

    def __init__(self, method: str, config: VeRAConfig, targets: dict[str, tuple[int, int]]):
        super().__init__(method, config, targets)
        self.max_out = max(out_features for out_features, _ in targets.values())
        self.max_in = max(in_features for _, in_features in targets.values())
        A, B = draw_projections(config.r, self.max_in, self.max_out, config.projection_seed)
        dtype = torch.get_default_dtype()
        self.register_buffer("projection_A", A.to(dtype), persistent=config.save_projection)  # (r, max_in)
        self.register_buffer("projection_B", B.to(dtype), persistent=config.save_projection)  # (max_out, r)

    def stored_parameters(self, topk_only: bool = True) -> float:
        """r·(max_in + max_out) when the projections are saved; 0 when the seed rebuilds them."""
        if not self.config.save_projection:
            return 0
        return self.projection_A.numel() + self.projection_B.numel()

    def sharing_pattern(self) -> dict[str, Any]:
        return {"projection_A": [self.config.r, self.max_in], "projection_B": [self.max_out, self.config.r],
                "projections_saved": self.config.save_projection}


class VeRA(LowRankAdapter):
    """One adapted layer: slices of the shared projections (on `model.vbshare`), scaled by its own λ_d, λ_b."""

    config_class = VeRAConfig
    state_class = VeRAState
    roles = {"lambda_d": "vectors", "lambda_b": "vectors"}
    decay_free_roles = frozenset({"vectors"})  # the vectors ARE the adapter: decay would shrink every ΔW to 0

    def __init__(self, base_layer: nn.Module, name: str, config: VeRAConfig, state: VeRAState):
        super().__init__(base_layer, name, config, state)
        device = base_layer.weight.device
        self.r = config.r
        self.lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial), device=device))  # (r,)
        self.lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device))  # (out,)

    def factors(self) -> tuple[Tensor, Tensor, float]:
        A = self.lambda_d[:, None] * self.state.projection_A[:, : self.in_features]  # (r, 1) * (r, in) -> (r, in)
        B = self.lambda_b[:, None] * self.state.projection_B[: self.out_features, :]  # (out, 1) * (out, r) -> (out, r)
        return A, B, 1.0

    def low_rank_forward(self, x: Tensor) -> Tensor:
        """λ_b ⊙ (B_sl (λ_d ⊙ (A_sl x))) for x (..., in) -> (..., out), in x's (autocast) dtype."""
        A = self.state.projection_A[:, : self.in_features]  # (r, in)
        B = self.state.projection_B[: self.out_features, :]  # (out, r)
        h = F.linear(x.to(A.dtype), A) * self.lambda_d  # (..., r)
        return F.linear(h, B) * self.lambda_b  # (..., out)

    def stored_parameters(self, topk_only: bool = True) -> float:
        """out + r: the module's λ_b and λ_d."""
        return self.out_features + self.r
