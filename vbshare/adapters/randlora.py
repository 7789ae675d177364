"""RandLoRA (Albert et al., ICLR 2025) — full-rank updates from frozen random low-rank bases that every module
shares, combined through trained diagonal scalings. docs/methods.md §10.

A module of shape (out, in) has d = min(in, out), the side its scalings act on, D = max(in, out), and
n = ⌈d / r⌉ bases, the fewest with n·r >= d, so that the update can reach full rank. The paper writes, in the
(D, d) orientation,
    M = Σ_{i<n} B_i Λ_i A Γ_i,   ΔW = s·M (out, in) when in <= out, s·Mᵀ when in > out,   s = α / r,
with B_i (D, r) frozen random per term, one frozen random A (r, d) for all n terms, and trained diagonals
Λ_i = diag(λ_i) (r × r) and Γ_i = diag(γ_i) (d × d).

Shared, frozen (on `model.vbshare`: one copy for the whole model, never one per module). With (max_out, max_in)
the element-wise largest target shape, d_g = min(max_out, max_in), D_g = max(max_out, max_in), n_g = ⌈d_g / r⌉:
    basis_A (r, d_g),   basis_B (D_g, n_g, r);
a module reads the leading slices basis_A[:, :d] and basis_B[:D, :n, :], which are views.

Trained, per module: lambdas (r, n) (column i is λ_i) and gammas (n, d) (row i is γ_i). Composition:
    P = lambdas[:, :, None] · gammas[None] · A[:, None, :]      (r, n, d) -> "(r n) d"   (r·n, d)
    Q = basis_B[:D, :n, :] as "D (n r)"                         (D, n·r), a view
    M = Q P                                                     (D, d)
Row p = j·n + i of P (rank j of term i) meets column p of Q, which is basis_B[:, p // r, p % r]: M is the paper's
sum with each B_i made of the columns {j·n + i} of Q, a fixed relabelling of i.i.d. random columns, and exactly
what the official code and PEFT compute. `factors()` returns (P, Q, s) when in <= out and (Qᵀ, Pᵀ, s) when
in > out, so forward, ΔW, merge and disabling come from the `LowRankAdapter` contract; the factor rank is r·n.
P is multiplied by the frozen A last, so autograd keeps A (a view) and the two scaling tensors for backward,
never a second (r, n, d) tensor; in a bfloat16 model everything stays bfloat16 (nothing is upcast).

Bases, drawn as PEFT draws them from `projection_seed` (so PEFT and vbshare rebuild the same bits): one CPU
generator, basis_A first, then basis_B as n_g slabs (D_g, r) one after another. `bases="dense"`: every draw is
kaiming_uniform(a=√5) of a bfloat16 tensor (A ~ U(±1/√d_g), each slab ~ U(±1/√r)), then basis_A and basis_B
are each divided by their own standard deviation, in bfloat16. `"sparse"` / `"very_sparse"`: U(0, 1) float32
draws of the two full shapes, A first, mapped to −1 below 1/(2k), +1 above 1 − 1/(2k) and 0 between, k = 3 /
k = √d_g, then divided by their standard deviation (the ternary bases of Achlioptas / Li et al.). The values are
held in the default dtype (exact: bf16 values fit in float32) as non-persistent buffers, rebuilt on load, unless
`save_projection` (then saved and counted).

Initialisation (PEFT's): lambdas = 0, gammas = 1/d, so ΔW = 0 at the start.

Stored parameters: Σ n·(r + d) over modules; with save_projection also r·d_g + D_g·n_g·r.
Llama-3.2-3B, q_proj (3072 → 3072) and v_proj (3072 → 1024), r = 32: 28 · (96·3104 + 32·1056) = 9,289,728.

Where the three sources differ. The official code (github.com/PaulAlbert31/RandLoRA) draws its bases in float32,
the B slabs before A, starts Λ at 1/max(n, r) and Γ at 0 (PEFT the other way round: λ = 0, γ = 1/d), scales by
s = 10·α/r and uses n = d // r + 1 bases (one more than needed when r divides d). PEFT draws in bfloat16
(float16 where accelerate reports no bfloat16), defaults to r = 32, α = 640 (s = 20) and save_projection=True,
and its saved file holds the bases once per module besides the shared copy (its Llama-3.2-3B comparison run
wrote 2.2 GB for 9.3 M trained parameters). vbshare follows PEFT's draw, n, init and s, holds the bases once,
and by default saves only the scalings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from ..checks import boolean, choice, integer, number
from ..errors import VBShareError
from .base import AdapterConfig, AdapterState, LowRankAdapter

BASES = ("dense", "sparse", "very_sparse")
DENSE_SLOPE = math.sqrt(5)  # kaiming_uniform negative slope of the dense draws (gain √(1/3): U(±1/√fan_in))


@dataclass
class RandLoRAConfig(AdapterConfig):
    r: int = 32  # rank of every random basis; a module gets n = ⌈min(in, out) / r⌉ of them (fewer r, more trained)
    alpha: float = 640.0  # s = alpha / r; PEFT's default (s = 20 at r = 32)
    projection_seed: int = 0  # seeds the draw of the shared bases
    save_projection: bool = False  # save the bases too (else the seed rebuilds them bit for bit on load)
    bases: str = "dense"  # dense | sparse | very_sparse (ternary bases)
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        number("alpha", self.alpha, 0, low_open=True, allowed="a positive number")
        integer("projection_seed", self.projection_seed, low=0)
        boolean("save_projection", self.save_projection)
        choice("bases", self.bases, BASES)


def num_bases(d: int, r: int) -> int:
    """n = ⌈d / r⌉: the fewest rank-r bases whose sum can reach rank d."""
    return -(-d // r)


def draw_bases(r: int, max_out: int, max_in: int, seed: int, bases: str = "dense") -> tuple[Tensor, Tensor]:
    """The shared (basis_A (r, d_g), basis_B (D_g, n_g, r)) for targets whose element-wise largest shape is
    (max_out, max_in), by the draw described in the module docstring; float32 tensors (bf16 values when dense)."""
    d_g, D_g = min(max_out, max_in), max(max_out, max_in)
    n_g = num_bases(d_g, r)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if bases == "dense":
        A = nn.init.kaiming_uniform_(torch.empty(r, 1, d_g, dtype=torch.bfloat16), a=DENSE_SLOPE, generator=generator)
        slabs = [nn.init.kaiming_uniform_(torch.empty(D_g, 1, r, dtype=torch.bfloat16), a=DENSE_SLOPE,
                                          generator=generator) for _ in range(n_g)]  # n_g × (D_g, 1, r)
        B = torch.cat(slabs, dim=1)  # (D_g, n_g, r)
    else:
        k = 3.0 if bases == "sparse" else math.sqrt(d_g)
        uniform_A = torch.rand(r, 1, d_g, generator=generator)  # (r, 1, d_g)
        uniform_B = torch.rand(D_g, n_g, r, generator=generator)  # (D_g, n_g, r)
        A, B = (torch.where(u < 1 / (2 * k), -1.0, torch.where(u > 1 - 1 / (2 * k), 1.0, 0.0))
                for u in (uniform_A, uniform_B))
        if A.count_nonzero() == 0 or B.count_nonzero() == 0:
            raise VBShareError(f"the {bases} bases drawn from projection_seed={seed} are all zero (r={r}, "
                               f"d_g={d_g}); use bases=sparse, a larger r or another projection_seed")
    A, B = A / A.std(), B / B.std()
    return A.squeeze(1).float(), B.float()  # (r, d_g), (D_g, n_g, r)


class RandLoRAState(AdapterState):
    """Owns the shared frozen bases `basis_A` (r, d_g) and `basis_B` (D_g, n_g, r)."""

    def __init__(self, method: str, config: RandLoRAConfig, targets: dict[str, tuple[int, int]]):
        super().__init__(method, config, targets)
        self.max_out = max(out_features for out_features, _ in targets.values())
        self.max_in = max(in_features for _, in_features in targets.values())
        A, B = draw_bases(config.r, self.max_out, self.max_in, config.projection_seed, config.bases)
        dtype = torch.get_default_dtype()
        self.register_buffer("basis_A", A.to(dtype), persistent=config.save_projection)  # (r, d_g)
        self.register_buffer("basis_B", B.to(dtype), persistent=config.save_projection)  # (D_g, n_g, r)

    def stored_parameters(self, topk_only: bool = True) -> float:
        """r·d_g + D_g·n_g·r when the bases are saved; 0 when the seed rebuilds them."""
        if not self.config.save_projection:
            return 0
        return self.basis_A.numel() + self.basis_B.numel()

    def sharing_pattern(self) -> dict[str, Any]:
        return {"basis_A": list(self.basis_A.shape), "basis_B": list(self.basis_B.shape),
                "bases": self.config.bases, "bases_saved": self.config.save_projection}


class RandLoRA(LowRankAdapter):
    """One adapted layer: slices of the shared bases (on `model.vbshare`) under its own lambdas and gammas."""

    config_class = RandLoRAConfig
    state_class = RandLoRAState
    roles = {"lambdas": "scalings", "gammas": "scalings"}
    decay_free_roles = frozenset({"scalings"})  # the scalings ARE the adapter: decay would pull ΔW back to 0

    def __init__(self, base_layer: nn.Module, name: str, config: RandLoRAConfig, state: RandLoRAState):
        super().__init__(base_layer, name, config, state)
        self.r, self.scale = config.r, config.alpha / config.r
        self.d = min(self.in_features, self.out_features)
        self.D = max(self.in_features, self.out_features)
        self.n = num_bases(self.d, config.r)
        device = base_layer.weight.device
        self.lambdas = nn.Parameter(torch.zeros(self.r, self.n, device=device))  # (r, n)
        self.gammas = nn.Parameter(torch.full((self.n, self.d), 1.0 / self.d, device=device))  # (n, d)

    def factors(self) -> tuple[Tensor, Tensor, float]:
        A = self.state.basis_A[:, : self.d]  # (r, d), a view
        # the trained product first, the frozen A last: backward then needs A, not the (r, n, d) intermediate
        P = (self.lambdas[:, :, None] * self.gammas[None]) * A[:, None, :]  # (r, n, 1) * (1, n, d) * (r, 1, d)
        P = rearrange(P, "r n d -> (r n) d")  # (r·n, d)
        Q = rearrange(self.state.basis_B[: self.D, : self.n, :], "D n r -> D (n r)")  # (D, n·r), a view
        if self.in_features <= self.out_features:
            return P, Q, self.scale  # A (r·n, in), B (out, r·n)
        return Q.T, P.T, self.scale  # A (n·r, in), B (out, r·n)

    @property
    def rank(self) -> int:
        return self.r * self.n

    def stored_parameters(self, topk_only: bool = True) -> float:
        """n·(r + d): the module's lambdas and gammas."""
        return self.n * (self.r + self.d)
