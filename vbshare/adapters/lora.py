"""LoRA (Hu et al. 2021) — the control every comparison needs. docs/methods.md §0.

ΔW = s · B A with A (r, in) ~ kaiming_uniform(a=√5), B (out, r) = 0, s = α / r (or α / √r with rslora).
`rank_pattern` / `alpha_pattern` give individual modules their own rank / α (keys: module-name suffixes),
which is also how a pruned SoRA adapter is stored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..checks import boolean, is_integer, number
from ..errors import VBShareError
from .base import AdapterConfig, AdapterState, LowRankAdapter, check_alpha


def pattern_value(patterns: dict[str, float], name: str, default: float) -> float:
    """The value of the longest key of `patterns` that equals `name` or is a dotted suffix of it."""
    hits = [k for k in patterns if name == k or name.endswith("." + k)]
    return patterns[max(hits, key=len)] if hits else default


@dataclass
class LoRAConfig(AdapterConfig):
    r: int = 8
    alpha: float | None = None  # None -> alpha = r, so s = 1
    rslora: bool = False
    dropout: float = 0.0
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        check_alpha(self.alpha)
        boolean("rslora", self.rslora)
        for key in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, key), dict):
                raise VBShareError(f"{key} must be a mapping module name -> value, got {getattr(self, key)!r}")
        bad = {k: v for k, v in self.rank_pattern.items() if not is_integer(v) or v < 1}
        if bad:
            raise VBShareError(f"rank_pattern ranks must be positive integers, got {bad}")
        for name, alpha in self.alpha_pattern.items():
            number(f"alpha_pattern[{name!r}]", alpha, 0, low_open=True)

    def rank_for(self, name: str) -> int:
        return int(pattern_value(self.rank_pattern, name, self.r))

    def scale_for(self, name: str) -> float:
        r = self.rank_for(name)
        alpha = pattern_value(self.alpha_pattern, name, self.alpha if self.alpha is not None else self.r)
        return alpha / math.sqrt(r) if self.rslora else alpha / r


class LoRA(LowRankAdapter):
    config_class = LoRAConfig
    state_class = AdapterState
    roles = {"lora_A": "A", "lora_B": "B"}

    def __init__(self, base_layer: nn.Module, name: str, config: LoRAConfig, state: AdapterState):
        super().__init__(base_layer, name, config, state)
        r = config.rank_for(name)
        weight = base_layer.weight
        self.scale = config.scale_for(name)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=weight.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=weight.device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def factors(self) -> tuple[Tensor, Tensor, float]:
        return self.lora_A, self.lora_B, self.scale
