"""One entry per adapter method for the shared test matrix (tests/test_matrix.py).

A case gives the hyperparameters for the tiny test models and an INDEPENDENT float64 reference for a
module's ΔW (out, in), written from docs/methods.md without calling the method's own `factors()`.
Adding a method to the matrix = adding one `Case` to `CASES`.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


class TwoLinear(nn.Module):
    """The smallest model with two adaptable layers: (out=64, in=32) then (out=16, in=64)."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(32, 64)
        self.lin1 = nn.Linear(64, 16)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


@dataclass
class Case:
    method: str
    hyperparameters: dict = field(default_factory=dict)
    reference_delta: Callable[[torch.nn.Module], torch.Tensor] | None = None  # adapter -> ΔW (out, in), float64


def lora_reference(adapter) -> torch.Tensor:
    A, B = adapter.lora_A.detach().double(), adapter.lora_B.detach().double()  # (r, in), (out, r)
    return adapter.scale * B @ A


def vblora_reference(adapter) -> torch.Tensor:
    """Compose every sub-vector by an explicit loop: top-k by sorting, softmax over those k, weighted bank rows."""
    bank = adapter.state.bank.detach().double()  # (h, b)
    h, b = bank.shape
    k = adapter.topk

    def compose(logits: torch.Tensor) -> torch.Tensor:
        flat = logits.detach().double().reshape(-1, h)
        rows = []
        for row in flat:
            chosen = torch.argsort(row, descending=True)[:k]
            weights = torch.exp(row[chosen] - row[chosen].max())
            weights = weights / weights.sum()
            rows.append((weights[:, None] * bank[chosen]).sum(0))
        return torch.stack(rows).reshape(*logits.shape[:-1], b)

    r = adapter.logits_A.shape[0]
    A = compose(adapter.logits_A).reshape(r, -1)  # (r, in/b, b) -> (r, in)
    B = compose(adapter.logits_B).permute(0, 2, 1).reshape(-1, r)  # (out/b, r, b) -> (out/b, b, r) -> (out, r)
    return adapter.scale * B @ A


def sora_reference(adapter) -> torch.Tensor:
    """ΔW = (α / r_max) · Σ_i g_i · b_i a_iᵀ, summed rank-one component by component (docs/methods.md §2)."""
    A, B = adapter.lora_A.detach().double(), adapter.lora_B.detach().double()  # (r, in), (out, r)
    g = adapter.gate.detach().double()  # (r,)
    config = adapter.state.config
    scale = (config.alpha if config.alpha is not None else config.r) / config.r
    delta = torch.zeros(B.shape[0], A.shape[1], dtype=torch.float64)
    for i in range(g.numel()):
        delta += g[i] * torch.outer(B[:, i], A[i])
    return scale * delta


def aslora_reference(adapter) -> torch.Tensor:
    """A of the module's role and B of its tie-set, found from the saved metadata and the state_dict keys."""
    import re

    state = adapter.state
    meta = state.metadata()
    tensors = state.state_dict()
    role = re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", adapter.name)
    group_key = re.sub(r"[^0-9A-Za-z_]", "_", role.replace("*", "N"))
    (tie_key,) = [k for k, names in meta["ties"][role].items() if adapter.name in names]
    A = tensors[f"A_{group_key}"].double()  # (r, in)
    B = tensors[f"B_{tie_key}"].double()  # (out, r)
    config = state.config
    return (config.alpha / config.r) * B @ A


def tied_lora_reference(adapter) -> torch.Tensor:
    """ΔW = s · Σ_i u_i · (v ⊙ B[:, i]) a_iᵀ, one rank-one component at a time; A and B are the role's
    tensors, found by their state_dict key `A_<role with * -> N, other non-word characters -> _>`."""
    role = re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", adapter.name)
    key = re.sub(r"[^0-9A-Za-z_]", "_", role.replace("*", "N"))
    shared = adapter.state.state_dict()
    A, B = shared[f"A_{key}"].double(), shared[f"B_{key}"].double()  # (r, in), (out, r)
    own = adapter.state_dict()
    u, v = own["u"].double(), own["v"].double()  # (r,), (out,)
    config = adapter.state.config
    delta = torch.zeros(B.shape[0], A.shape[1], dtype=torch.float64)
    for i in range(u.numel()):
        delta += u[i] * torch.outer(v * B[:, i], A[i])
    return (config.alpha / config.r) * delta


def nola_reference(adapter) -> torch.Tensor:
    """ΔW = s · (Σ_j β_j B_j)(Σ_i α_i A_i) with the bases redrawn here by the documented rule: seed = first 8
    bytes (little-endian, top bit cleared) of SHA-256("<seed>/<module name>/<A|B>"), float32 CPU draws
    U(−1/√count, 1/√count) of shape (k, r, in) / (l, out, r); summed in float64, one basis at a time."""
    config = adapter.state.config

    def bases(factor: str, shape: tuple[int, int, int]) -> torch.Tensor:
        digest = hashlib.sha256(f"{config.seed}/{adapter.name}/{factor}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        bound = 1.0 / math.sqrt(shape[0])
        return torch.empty(shape).uniform_(-bound, bound, generator=generator).double()

    coef_A, coef_B = adapter.coef_A.detach().double(), adapter.coef_B.detach().double()  # α (k,), β (l,)
    r, out_features, in_features = config.r, adapter.out_features, adapter.in_features
    bases_A = bases("A", (coef_A.numel(), r, in_features))
    bases_B = bases("B", (coef_B.numel(), out_features, r))
    A = sum(coef_A[i] * bases_A[i] for i in range(coef_A.numel()))  # (r, in)
    B = sum(coef_B[j] * bases_B[j] for j in range(coef_B.numel()))  # (out, r)
    return (config.alpha / config.r) * B @ A


CASES: dict[str, Case] = {
    "lora": Case("lora", {"r": 4, "alpha": 8}, lora_reference),
    "vblora": Case("vblora", {"r": 2, "num_vectors": 16, "vector_length": 8, "topk": 2}, vblora_reference),
    # merge_start=1, merge_every=1: every group of 2 layers ties its pair at step 1, so each check sees ties
    "aslora": Case("aslora", {"r": 4, "alpha": 8, "merge_start": 1, "merge_every": 1}, aslora_reference),
    # lam small: τ = lr·λ = 1e-4 per step, so 3 steps at lr 1e-2 train the adapter without pruning it away
    "sora": Case("sora", {"r": 4, "alpha": 8, "lam": 0.01}, sora_reference),
    # every factor trained (the default): B starts at 0, so training steps are what make ΔW non-zero
    "tied_lora": Case("tied_lora", {"r": 4, "alpha": 8}, tied_lora_reference),
    # k != l so a swap of the two coefficient vectors or basis sets cannot go unnoticed
    "nola": Case("nola", {"r": 4, "alpha": 8, "num_basis_a": 16, "num_basis_b": 12}, nola_reference),
}
