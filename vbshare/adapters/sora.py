"""SoRA (Ding et al., EMNLP 2023) — a LoRA whose rank is gated and pruned by a proximal step. docs/methods.md §2.

    Δh = s · B (g ⊙ (A x)),   A (r_max, in) ~ kaiming_uniform(a=√5),  B (out, r_max) = 0,  g (r_max),
    s = α / r_max.

The gate g is folded into the factors (`factors()` returns A, B·diag(g), s), so forward, ΔW, merge and
disabling come from the `LowRankAdapter` contract. After every optimiser step the gate is soft-thresholded
(`soft_threshold`): τ = η_t · λ (`threshold="lr_lambda"`, the paper; η_t is the lr of the gate's param group)
or τ = λ read as a constant ξ (`threshold="constant"`, the official code's mode). Gates that reach zero drop
their rank-one component; `vbshare.prune` then turns the model into a plain LoRA with per-module ranks.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..errors import VBShareError
from .base import AdapterConfig, AdapterState, LowRankAdapter

THRESHOLDS = ("lr_lambda", "constant")
GATE_INITS = ("ones", "normal")


# -- the proximal operator: standalone, usable with any torch optimiser -----------------------------------------
def soft_threshold(g: Tensor, tau: float | Tensor) -> Tensor:
    """prox of τ‖·‖₁: sign(g) · max(|g| − τ, 0), computed out of place (no 2τ bug: |g| ∈ (τ, 2τ) is shrunk, kept)."""
    return torch.sign(g) * torch.clamp(g.abs() - tau, min=0.0)


def param_lr(optimizer: torch.optim.Optimizer, param: Tensor) -> float | None:
    """The learning rate of the optimiser param group holding `param` (None when it is in none)."""
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            lr = group["lr"]
            return float(lr.item() if isinstance(lr, Tensor) else lr)
    return None


@torch.no_grad()
def proximal_step_(
    params: Iterable[Tensor],
    optimizer: torch.optim.Optimizer | None,
    lam: float,
    threshold: str = "lr_lambda",
) -> None:
    """Soft-threshold each tensor in place, right after `optimizer.step()` (and before any lr scheduler step).

    threshold="lr_lambda": τ = lr · lam, the lr of the param group that holds the tensor;
    threshold="constant": τ = lam (the optimiser is not consulted).
    """
    if threshold not in THRESHOLDS:
        raise VBShareError(f"threshold must be one of {', '.join(THRESHOLDS)}, got {threshold!r}")
    if lam == 0:
        return
    for param in params:
        if threshold == "constant":
            tau = lam
        else:
            if optimizer is None:
                raise VBShareError("threshold='lr_lambda' needs the optimiser to read the gate's learning rate")
            lr = param_lr(optimizer, param)
            if lr is None:
                if not param.requires_grad:
                    continue  # a frozen gate is not being trained: leave it
                raise VBShareError(
                    "a SoRA gate is not in any param group of this optimiser; build the optimiser from "
                    "vbshare.param_groups(model, ...) so the gates get their own 'gate' group"
                )
            tau = lr * lam
        param.copy_(soft_threshold(param, tau))


# -- config, state, module --------------------------------------------------------------------------------------
@dataclass
class SoRAConfig(AdapterConfig):
    r: int = 8  # r_max
    alpha: float | None = None  # None -> alpha = r, so s = 1
    gate_init: str = "normal"  # "normal" (N(0, 1), the official code) | "ones" (every gate equal: prunes all-or-nothing)
    threshold: str = "lr_lambda"  # τ = lr·lam ("lr_lambda", the paper) | τ = lam ("constant", official code's ξ)
    lam: float = 0.1  # λ (lr_lambda) or ξ (constant); the sparsifying scheduler raises it stage by stage
    l1: float = 0.0  # optional extra loss l1 · mean|g| per module
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.gate_init not in GATE_INITS:
            raise VBShareError(f"gate_init must be one of {', '.join(GATE_INITS)}, got {self.gate_init!r}")
        if self.threshold not in THRESHOLDS:
            raise VBShareError(f"threshold must be one of {', '.join(THRESHOLDS)}, got {self.threshold!r}")
        for key in ("lam", "l1"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
                raise VBShareError(f"{key} must be a finite number >= 0, got {value!r}")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.r) / self.r


class SoRAState(AdapterState):
    """Applies the proximal step to every gate after each optimiser step; saves the pruned (LoRA) form."""

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        gates = [a.gate for a in self._adapters.values()]
        proximal_step_(gates, optimizer, self.config.lam, self.config.threshold)

    def sharing_pattern(self) -> dict[str, Any]:
        ranks = {name: 0 for name in self.targets}
        ranks.update({name: adapter.retained_rank for name, adapter in self._adapters.items()})
        return {"retained_ranks": ranks}

    def saved_form(self, model: nn.Module) -> nn.Module:
        """A pruned copy (plain LoRA with per-module ranks); the model itself is left as it is.

        Frozen tensors (the base weights) are shared with the copy rather than duplicated: pruning only
        replaces modules and never writes into a base weight.
        """
        from ..sora import prune  # local: vbshare.sora imports the adapters

        frozen = [t for t in (*model.parameters(), *model.buffers()) if not t.requires_grad]
        return prune(copy.deepcopy(model, memo={id(t): t for t in frozen}))


class SoRA(LowRankAdapter):
    config_class = SoRAConfig
    state_class = SoRAState
    roles = {"lora_A": "A", "lora_B": "B", "gate": "gate"}
    decay_free_roles = frozenset({"gate"})

    def __init__(self, base_layer: nn.Module, name: str, config: SoRAConfig, state: SoRAState):
        super().__init__(base_layer, name, config, state)
        r = config.r
        device = base_layer.weight.device
        self.scale = config.scale
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))  # (out, r)
        self.gate = nn.Parameter(torch.ones(r, device=device))  # (r,)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if config.gate_init == "normal":
            nn.init.normal_(self.gate, 0.0, 1.0)

    def factors(self) -> tuple[Tensor, Tensor, float]:
        return self.lora_A, self.lora_B * self.gate, self.scale  # B·diag(g): (out, r) * (r,)

    def extra_loss(self) -> Tensor | None:
        l1 = self.state.config.l1
        return l1 * self.gate.abs().mean() if l1 else None

    def kept(self) -> Tensor:
        """Indices of the non-zero gates (the retained rank-one components)."""
        return torch.nonzero(self.gate.detach() != 0).flatten()

    @property
    def retained_rank(self) -> int:
        return int((self.gate.detach() != 0).sum())

    @property
    def rank(self) -> int:
        """The retained rank (what pruning keeps); r_max is `self.gate.numel()`."""
        return self.retained_rank

    def stored_parameters(self, topk_only: bool = True) -> float:
        """What saving stores: the pruned LoRA, r_kept · (in + out)."""
        return self.retained_rank * (self.in_features + self.out_features)
