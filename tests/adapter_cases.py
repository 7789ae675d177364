"""One entry per adapter method for the shared test matrix (tests/test_matrix.py).

A case gives the hyperparameters for the tiny test models and an INDEPENDENT float64 reference for a
module's ΔW (out, in), written from docs/methods.md without calling the method's own `factors()`.
Adding a method to the matrix = adding one `Case` to `CASES`.
"""
from __future__ import annotations

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



def vera_reference(adapter) -> torch.Tensor:
    """Draw the shared projections again from the seed (U(−√(6/fan_in), √(6/fan_in)), A (r, max_in) first, then
    B (max_out, r), one CPU generator), slice them to the module and sum the rank-one terms
    λ_d[i] · (λ_b ⊙ B[:out, i]) A[i, :in] one by one (docs/methods.md §5)."""
    config = adapter.state.config
    max_out = max(shape[0] for shape in adapter.state.targets.values())
    max_in = max(shape[1] for shape in adapter.state.targets.values())
    generator = torch.Generator().manual_seed(config.projection_seed)
    A = torch.empty(config.r, max_in).uniform_(-(6 / max_in) ** 0.5, (6 / max_in) ** 0.5, generator=generator)
    B = torch.empty(max_out, config.r).uniform_(-(6 / config.r) ** 0.5, (6 / config.r) ** 0.5, generator=generator)
    A, B = A.double()[:, : adapter.in_features], B.double()[: adapter.out_features]  # (r, in), (out, r)
    lambda_d, lambda_b = adapter.lambda_d.detach().double(), adapter.lambda_b.detach().double()  # (r,), (out,)
    delta = torch.zeros(adapter.out_features, adapter.in_features, dtype=torch.float64)
    for i in range(config.r):
        delta += lambda_d[i] * torch.outer(lambda_b * B[:, i], A[i])
    return delta


def unilora_reference(adapter) -> torch.Tensor:
    """Count, over every module's index maps, how many factor entries read each θ entry (checking the balance
    ⌊D/d⌋ / ⌈D/d⌉), then fill A and B entry by entry with θ[idx] / √count (docs/methods.md §8)."""
    from collections import Counter

    state = adapter.state
    d = state.config.theta_d_length
    every_index = [int(i) for a in state.adapters().values() for m in (a.indices_A, a.indices_B) for i in m.reshape(-1)]
    uses = Counter(every_index)
    total = len(every_index)
    assert set(uses.values()) <= {total // d, -(-total // d)}, "the index assignment is not balanced"
    theta = state.theta.detach().double()

    def fill(indices: torch.Tensor) -> torch.Tensor:
        rows = [[theta[int(k)] / uses[int(k)] ** 0.5 for k in row] for row in indices]
        return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)

    A, B = fill(adapter.indices_A), fill(adapter.indices_B)  # (r, in), (out, r)
    return B @ A

CASES: dict[str, Case] = {
    "lora": Case("lora", {"r": 4, "alpha": 8}, lora_reference),
    "vblora": Case("vblora", {"r": 2, "num_vectors": 16, "vector_length": 8, "topk": 2}, vblora_reference),
    # merge_start=1, merge_every=1: every group of 2 layers ties its pair at step 1, so each check sees ties
    "aslora": Case("aslora", {"r": 4, "alpha": 8, "merge_start": 1, "merge_every": 1}, aslora_reference),
    # lam small: τ = lr·λ = 1e-4 per step, so 3 steps at lr 1e-2 train the adapter without pruning it away
    "sora": Case("sora", {"r": 4, "alpha": 8, "lam": 0.01}, sora_reference),
    # unequal target shapes in both models, so every module reads its own slice of the shared projections;
    # d_initial 1: the matrix loss (mean square of a LayerNorm output) gives λ_b gradients near Adam's eps at 0.1
    "vera": Case("vera", {"r": 8, "projection_seed": 3, "d_initial": 1.0}, vera_reference),
    # D = Σ r(in + out) is not a multiple of d (each θ entry read once or twice), so the balanced assignment's
    # extra reads are exercised; the wider init moves BERT's LayerNorm'd output measurably in 3 steps
    "unilora": Case("unilora", {"r": 2, "theta_d_length": 1000, "proj_seed": 5, "init_theta_d_bound": 0.1},
                    unilora_reference),
}
