"""A toy stack of residual MLP blocks for adapter tests that need the same module role in several layers
(Tied-LoRA's sharing groups, NOLA's per-module bases): `layers.<i>.fc` (out=12, in=8) and `layers.<i>.proj`
(out=8, in=12) in every block; inputs are (batch, 8)."""
from __future__ import annotations

import torch
from torch import nn

import vbshare


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 12)  # (out=12, in=8)
        self.proj = nn.Linear(12, 8)  # (out=8, in=12)


class Toy(nn.Module):
    """`blocks` residual blocks: x (batch, 8) -> x + tanh(proj(tanh(fc(x)))) per block -> (batch, 8)."""

    def __init__(self, blocks: int):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(blocks))

    def forward(self, x):
        for block in self.layers:
            x = x + torch.tanh(block.proj(torch.tanh(block.fc(x))))
        return x


def build_toy(blocks: int, seed: int = 0) -> Toy:
    """A `Toy` whose base weights are drawn after `torch.manual_seed(seed)` (the global RNG is reseeded)."""
    torch.manual_seed(seed)
    return Toy(blocks)


def batch(seed: int) -> torch.Tensor:
    """A fixed (5, 8) input batch for `seed`, drawn from its own generator (the global RNG is untouched)."""
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(seed))


def train(model: nn.Module, steps: int = 3, lr: float = 5e-2) -> None:
    """`steps` AdamW steps on mean(output²) over batches 1..steps, with the adapters' after-step hooks."""
    optimizer = torch.optim.AdamW(vbshare.param_groups(model, lr=lr))
    for step in range(1, steps + 1):
        model(batch(step)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        vbshare.after_step(model, optimizer, step)
