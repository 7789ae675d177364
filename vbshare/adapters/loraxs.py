"""LoRA-XS (Bałazy, Banaei, Aberer, Tabor, 2024) — frozen truncated-SVD factors of the base weight, one trained
r × r matrix per module. docs/methods.md §13.

The frozen weight W (out, in) (`LowRankAdapter.base_weight()`, so a GPT-2 `Conv1D` reads the same orientation)
has the truncated SVD W ≈ U_r Σ_r V_rᵀ: U_r (out, r), Σ_r (r) the r largest singular values, V_r (in, r). The
module keeps two frozen factors and trains R (r, r) between them:
    svd_A = Σ_r V_rᵀ  (r, in)      svd_B = U_r  (out, r)
    Δh = s · svd_B (R (svd_A x)),   ΔW = s · U_r R Σ_r V_rᵀ  (out, in),   s = α / r.
Σ_r sits on the input side, as in the official code (its A is `TruncatedSVD.transform(Wᵀ)` = V_r Σ_r). The
paper writes the same update in the x·W orientation (W of shape (in, out)) as ΔW = U Σ R Vᵀ; transposed into
the (out, in) orientation used here its R becomes Rᵀ, which is again just a trained r × r matrix.
`factors()` returns (svd_A, svd_B R, s), so forward, ΔW, merge and disabling come from the contract.

The SVD is exact (`torch.linalg.svd`, not the official randomised `TruncatedSVD`), computed in float64 on the
weight's device (on the CPU for a device without float64) and stored in the default dtype. Its sign ambiguity is
removed canonically: each singular pair (u_i, v_i) is flipped so that the entry of u_i with the largest |value|
(the first such entry on a tie) is positive. The SVD is then a function of W alone, so by default the factors are
non-persistent buffers recomputed from the base on load (nothing but R is saved); `save_factors` saves them too.
A recompute on another device or library build can differ from the original in the last float32 bits, and where
σ_r is (nearly) equal to σ_{r+1} the truncated subspace itself is not unique: save the factors in that case.

R ~ N(0, init_std²) with init_std = 1e-5, the official initialisation: the adapted model starts within ~1e-5 of
the base; init_std = 0 starts it exactly at the base (R still trains, since the factors around it are not zero).

Stored parameters: Σ r² over modules; with `save_factors` also Σ r·(in + out).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import VBShareError
from .base import AdapterConfig, LowRankAdapter


@dataclass
class LoRAXSConfig(AdapterConfig):
    r: int = 8  # rank of the truncated SVD; R is r × r
    alpha: float = 16.0  # s = alpha / r; the official GLUE runs use 16 at every rank
    init_std: float = 1e-5  # R ~ N(0, init_std²); 0: R = 0, the adapted model starts exactly at the base
    save_factors: bool = False  # save the frozen SVD factors too (else they are recomputed from the base on load)
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
                math.isfinite(self.alpha) and self.alpha > 0):
            raise VBShareError(f"alpha must be a positive number, got {self.alpha!r}")
        std = self.init_std
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not (math.isfinite(std) and std >= 0):
            raise VBShareError(f"init_std must be a non-negative number, got {std!r}")
        if not isinstance(self.save_factors, bool):
            raise VBShareError(f"save_factors must be true or false, got {self.save_factors!r}")


def truncated_svd(weight: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """(U_r (out, r), Σ_r (r,), V_rᵀ (r, in)) of weight (out, in) in float64, signs canonical: every column of
    U_r has its largest-magnitude entry (the first one on a tie) positive; the matching row of V_rᵀ flips with it."""
    device = weight.device if weight.device.type in ("cpu", "cuda") else torch.device("cpu")  # float64 there
    U, S, Vh = torch.linalg.svd(weight.detach().to(device=device, dtype=torch.float64), full_matrices=False)
    U, S, Vh = U[:, :r], S[:r], Vh[:r]  # (out, r), (r,), (r, in)
    largest = U.abs().argmax(dim=0)  # (r,) row of each column's largest |entry| (argmax picks the first)
    signs = torch.sign(U.gather(0, largest[None, :])).squeeze(0)  # (r,), never 0: that entry is the largest
    return U * signs, S, Vh * signs[:, None]


def check_svd_rank(method: str, r: int, name: str, out_features: int, in_features: int) -> None:
    """A truncated SVD of an (out, in) weight has at most min(in, out) directions: refuse a larger r in one line."""
    most = min(in_features, out_features)
    if r > most:
        raise VBShareError(f"{method} r={r} exceeds min(in, out) = {most} of module {name} (out={out_features}, "
                           f"in={in_features}); choose r <= {most}")


class LoRAXS(LowRankAdapter):
    """One adapted layer: frozen svd_A (r, in) and svd_B (out, r) from its own base weight, a trained R (r, r)."""

    config_class = LoRAXSConfig
    roles = {"R": "R"}

    def __init__(self, base_layer: nn.Module, name: str, config: LoRAXSConfig, state):
        super().__init__(base_layer, name, config, state)
        r = config.r
        check_svd_rank("loraxs", r, name, self.out_features, self.in_features)
        self.r = r
        self.scale = config.alpha / r
        self.save_factors = config.save_factors
        weight = self.base_weight()  # (out, in)
        dtype = torch.get_default_dtype()
        if weight.is_meta:  # planning without weights: shapes only
            A = torch.empty(r, self.in_features, device="meta", dtype=dtype)
            B = torch.empty(self.out_features, r, device="meta", dtype=dtype)
        else:
            U, S, Vh = truncated_svd(weight, r)
            A = (S[:, None] * Vh).to(device=weight.device, dtype=dtype)  # Σ_r V_rᵀ: (r, 1) * (r, in) -> (r, in)
            B = U.to(device=weight.device, dtype=dtype)  # U_r (out, r)
        self.register_buffer("svd_A", A.contiguous(), persistent=config.save_factors)  # (r, in)
        self.register_buffer("svd_B", B.contiguous(), persistent=config.save_factors)  # (out, r)
        self.R = nn.Parameter(torch.zeros(r, r, device=weight.device, dtype=dtype))  # (r, r)
        if config.init_std > 0:
            nn.init.normal_(self.R, 0.0, config.init_std)

    def factors(self) -> tuple[Tensor, Tensor, float]:
        return self.svd_A, self.svd_B @ self.R, self.scale  # (r, in), (out, r) @ (r, r) -> (out, r)

    @property
    def rank(self) -> int:
        return self.r

    def stored_parameters(self, topk_only: bool = True) -> float:
        """r² (R); with save_factors also r·(in + out) (the frozen factors)."""
        frozen = self.r * (self.in_features + self.out_features) if self.save_factors else 0
        return self.r * self.r + frozen
