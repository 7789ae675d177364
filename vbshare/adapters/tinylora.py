"""TinyLoRA (Morris, Mireshghallah, Ibrahim, Mahloujifar, 2026: "Learning to Reason in 13 Parameters") — LoRA-XS's
frozen SVD factors around an r × r matrix that is itself a trained u-vector times fixed random tensors, the vector
optionally tied across modules down to one for the whole model. docs/methods.md §12.

Per module, with W (out, in) the frozen base weight (`LowRankAdapter.base_weight()`) and its truncated SVD
W ≈ U_r Σ_r V_rᵀ (loraxs.truncated_svd: exact, float64, canonical signs), the frozen factors split Σ evenly:
    svd_A = Σ_r^½ V_rᵀ  (r, in)        svd_B = U_r Σ_r^½  (out, r)
and a frozen projection tensor P (u, r, r) turns the trained vector v (u) of the module's group into
    R = Σ_i v_i P_i  (r, r)        Δh = svd_B (R (svd_A x)),   ΔW = U_r Σ_r^½ R Σ_r^½ V_rᵀ  (out, in),   s = 1.
`factors()` returns (svd_A, svd_B R, 1), so forward, ΔW, merge and disabling come from the contract.

Weight tying. The L targets (in target order, index i) fall into G = max(1, round(L · (1 − weight_tying))) groups
of size g = max(1, ⌊L / G⌋); module i uses group min(⌊i / g⌋, G − 1). weight_tying = 0 gives every module its own v,
1 gives ONE v for the whole model. The vectors live on the state as one parameter `vectors` (G, u), counted once.

P of module i is drawn from a CPU generator seeded with projection_seed + i, torch.normal(0, 1/√r) of shape
(u, r, r) in float32 — PEFT's draw, so both rebuild the same bits. P is a non-persistent buffer unless
`save_projection`; the SVD factors are recomputed from the base on load unless `save_factors` (see loraxs.py for
when a recompute may not reproduce them: then save them). v starts at 0 (ΔW = 0; gradients still reach v through
the non-zero factors), or U(−init_v_bound, init_v_bound) when init_v_bound > 0.

Stored parameters: G·u (the vectors); with save_projection also L·u·r²; with save_factors also Σ r·(in + out).

Paper / PEFT. The paper writes the update as U Σ (Σ_i v_i P_i) Vᵀ, Σ on one side as in LoRA-XS, and leaves P's
distribution open; PEFT 0.21 (matched here) splits Σ^½ to both sides, draws P ~ N(0, 1/r) per module, computes an
fp32 SVD with whatever signs LAPACK returns (so its saves always carry the factors, which the import keeps), clips
r to min(in, out) per module (refused here instead) and saves P by default (not here).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import VBShareError
from .base import AdapterConfig, AdapterState, LowRankAdapter
from .loraxs import check_svd_rank, truncated_svd


@dataclass
class TinyLoRAConfig(AdapterConfig):
    r: int = 2  # rank of the truncated SVD; R is r × r (the paper recommends 2)
    u: int = 64  # length of each trained vector v: R = Σ_i v_i P_i
    weight_tying: float = 0.0  # 0: one v per module … 1: one v for the whole model
    projection_seed: int = 42  # module i's P is drawn with seed projection_seed + i (PEFT's default 42)
    init_v_bound: float = 0.0  # v ~ U(−bound, bound); 0: v = 0, the model starts exactly at the base
    save_projection: bool = False  # save every module's P (else rebuilt from the seed on load)
    save_factors: bool = False  # save the frozen SVD factors (else recomputed from the base on load)
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        if isinstance(self.u, bool) or not isinstance(self.u, int) or self.u < 1:
            raise VBShareError(f"u must be a positive integer, got {self.u!r}")
        tie = self.weight_tying
        if isinstance(tie, bool) or not isinstance(tie, (int, float)) or not 0 <= tie <= 1:
            raise VBShareError(f"weight_tying must be a number in [0, 1] (0: a vector per module, 1: one for the "
                               f"model), got {tie!r}")
        if isinstance(self.projection_seed, bool) or not isinstance(self.projection_seed, int) or self.projection_seed < 0:
            raise VBShareError(f"projection_seed must be a non-negative integer, got {self.projection_seed!r}")
        bound = self.init_v_bound
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not (math.isfinite(bound) and bound >= 0):
            raise VBShareError(f"init_v_bound must be a non-negative number, got {bound!r}")
        for key in ("save_projection", "save_factors"):
            if not isinstance(getattr(self, key), bool):
                raise VBShareError(f"{key} must be true or false, got {getattr(self, key)!r}")


def tying_groups(count: int, weight_tying: float) -> list[int]:
    """The group of each of `count` modules (in target order): G = max(1, round(count·(1 − weight_tying))) groups
    of max(1, count // G) consecutive modules, the remainder joining the last group."""
    groups = max(1, round(count * (1.0 - weight_tying)))
    size = max(1, count // groups)
    return [min(i // size, groups - 1) for i in range(count)]


def draw_projection(u: int, r: int, seed: int) -> Tensor:
    """One module's P (u, r, r) in float32: N(0, 1/r) entries from a CPU generator seeded with `seed`."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.normal(0.0, 1.0 / math.sqrt(r), size=(u, r, r), generator=generator)  # (u, r, r)


class TinyLoRAState(AdapterState):
    """Owns the trained vectors `vectors` (G, u), one row per tying group.

    Attributes:
        position: module name -> its index i in target order (seeds its P).
        group: module name -> the row of `vectors` it reads.
    """

    roles = {"vectors": "vectors"}
    decay_free_roles = frozenset({"vectors"})  # the vectors ARE the adapter: decay would pull every ΔW to 0

    def __init__(self, method: str, config: TinyLoRAConfig, targets: dict[str, tuple[int, int]]):
        super().__init__(method, config, targets)
        names = list(targets)
        self.position = {name: i for i, name in enumerate(names)}
        self.group = dict(zip(names, tying_groups(len(names), config.weight_tying)))
        vectors = torch.zeros(max(self.group.values()) + 1, config.u)  # (G, u)
        if config.init_v_bound > 0:
            nn.init.uniform_(vectors, -config.init_v_bound, config.init_v_bound)
        self.vectors = nn.Parameter(vectors)

    def sharing_pattern(self) -> dict[str, Any]:
        groups: dict[int, list[str]] = {}
        for name, g in self.group.items():
            groups.setdefault(g, []).append(name)
        return {"vectors": list(self.vectors.shape), "weight_tying": self.config.weight_tying,
                "group_sizes": [len(groups[g]) for g in sorted(groups)]}


class TinyLoRA(LowRankAdapter):
    """One adapted layer: frozen svd_A (r, in), svd_B (out, r) and P (u, r, r); its group's trained v (u) on the state."""

    config_class = TinyLoRAConfig
    state_class = TinyLoRAState
    roles: dict[str, str] = {}  # a module trains nothing of its own: v lives on the state

    def __init__(self, base_layer: nn.Module, name: str, config: TinyLoRAConfig, state: TinyLoRAState):
        super().__init__(base_layer, name, config, state)
        r = config.r
        check_svd_rank("tinylora", r, name, self.out_features, self.in_features)
        self.r, self.u = r, config.u
        self.save_projection, self.save_factors = config.save_projection, config.save_factors
        weight = self.base_weight()  # (out, in)
        dtype = torch.get_default_dtype()
        if weight.is_meta:  # planning without weights: shapes only
            A = torch.empty(r, self.in_features, device="meta", dtype=dtype)
            B = torch.empty(self.out_features, r, device="meta", dtype=dtype)
        else:
            U, S, Vh = truncated_svd(weight, r)
            root = S.sqrt()  # (r,)
            A = (root[:, None] * Vh).to(device=weight.device, dtype=dtype)  # Σ^½ V_rᵀ: (r, 1) * (r, in) -> (r, in)
            B = (U * root[None, :]).to(device=weight.device, dtype=dtype)  # U_r Σ^½: (out, r) * (1, r) -> (out, r)
        if weight.is_meta:
            P = torch.empty(config.u, r, r, device="meta")  # (u, r, r): no draw when planning
        else:
            P = draw_projection(config.u, r, config.projection_seed + state.position[name])
        self.register_buffer("svd_A", A.contiguous(), persistent=config.save_factors)  # (r, in)
        self.register_buffer("svd_B", B.contiguous(), persistent=config.save_factors)  # (out, r)
        self.register_buffer("projection", P.to(device=weight.device, dtype=dtype), persistent=config.save_projection)

    @property
    def vector(self) -> Tensor:
        """This module's trained v (u,): its group's row of the shared `vectors`."""
        return self.state.vectors[self.state.group[self.name]]

    def factors(self) -> tuple[Tensor, Tensor, float]:
        R = torch.einsum("u,urs->rs", self.vector, self.projection)  # Σ_i v_i P_i: (u,), (u, r, r) -> (r, r)
        return self.svd_A, self.svd_B @ R, 1.0  # (r, in), (out, r) @ (r, r) -> (out, r)

    @property
    def rank(self) -> int:
        return self.r

    def stored_parameters(self, topk_only: bool = True) -> float:
        """0 of its own (v is counted by the state); u·r² with save_projection, r·(in + out) with save_factors."""
        projection = self.u * self.r * self.r if self.save_projection else 0
        factors = self.r * (self.in_features + self.out_features) if self.save_factors else 0
        return projection + factors
