"""One entry per adapter method for the shared test matrix (tests/test_matrix.py).

A case gives the hyperparameters for the tiny test models, an INDEPENDENT float64 reference for a module's
ΔW (out, in), written from docs/methods.md without calling the method's own `factors()`, and the method's
stored-parameter formula (docs/methods.md §4/§9) computed from the targets' shapes and the config.
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
    stored_reference: Callable[[torch.nn.Module], float] | None = None  # adapted model -> stored parameters


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


def lora_stored(model) -> float:
    """Σ r·(in + out) over the targets."""
    state = model.vbshare
    return sum(state.config.r * (out + inp) for out, inp in state.targets.values())


def vblora_stored(model) -> float:
    """h·b + n_sub·(k−1) + n_sub·k·f, n_sub = Σ r·(in + out)/b, f = 1/4 for uint8 indices (h < 256)."""
    config = model.vbshare.config
    h, b, k, r = config.num_vectors, config.vector_length, config.topk, config.r
    assert h < 256, "this formula's index width assumes uint8 indices"
    n_sub = sum(r * (out + inp) // b for out, inp in model.vbshare.targets.values())
    return h * b + n_sub * (k - 1) + n_sub * k * 0.25


def aslora_stored(model) -> float:
    """One A (r, in) per role plus one B (out, r) per distinct tie-set, read from the saved metadata."""
    state = model.vbshare
    r, meta = state.config.r, state.metadata()
    total = 0
    for role, names in meta["groups"].items():
        out, inp = state.targets[names[0]]
        total += r * inp + len(meta["ties"][role]) * out * r
    return total


def sora_stored(model) -> float:
    """Σ r_kept·(in + out), r_kept = the module's non-zero gates (what pruning keeps)."""
    state = model.vbshare
    total = 0
    for name, module in model.named_modules():
        if name in state.targets and hasattr(module, "gate"):
            out, inp = state.targets[name]
            total += int(torch.count_nonzero(module.gate.detach())) * (out + inp)
    return total


CASES: dict[str, Case] = {
    "lora": Case("lora", {"r": 4, "alpha": 8}, lora_reference, lora_stored),
    "vblora": Case("vblora", {"r": 2, "num_vectors": 16, "vector_length": 8, "topk": 2}, vblora_reference,
                   vblora_stored),
    # merge_start=1, merge_every=1: every group of 2 layers ties its pair at step 1, so each check sees ties
    "aslora": Case("aslora", {"r": 4, "alpha": 8, "merge_start": 1, "merge_every": 1}, aslora_reference,
                   aslora_stored),
    # lam small: τ = lr·λ = 1e-4 per step, so 3 steps at lr 1e-2 train the adapter without pruning it away
    "sora": Case("sora", {"r": 4, "alpha": 8, "lam": 0.01}, sora_reference, sora_stored),
}
