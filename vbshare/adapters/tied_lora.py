"""Tied-LoRA — one A and one B per module role, scaled per layer, selectively trained. docs/methods.md §6.

Modules with the same role (`targets.module_role`: the path with layer indices replaced by `*`) form a
*sharing group*. A group has ONE A (r, in) and ONE B (out, r); every layer i has its own vectors u_i (r) and
v_i (out):
    Δh_i = s · v_i ⊙ (B (u_i ⊙ (A x))),   ΔW_i = s · diag(v_i) B diag(u_i) A,   s = α / r.
`factors()` folds the vectors into the factors (A' = diag(u) A, B' = diag(v) B), so forward, ΔW, merge and
disabling come from the `LowRankAdapter` contract.

`train` picks which of A, B, u, v are trained (default all four, the paper's best "vBuA"). A frozen tensor is
not a parameter and is never saved: frozen A and B are non-persistent buffers drawn from `seed` (one stream per
group and factor, derived from the seed and the role name by SHA-256, so every process rebuilds the same bits),
frozen u and v are ones. Initialisation keeps ΔW = 0 for every choice of `train` by zeroing ONE trained factor,
the first of this list that trains:
    B trains       -> B = 0, v = 1        (LoRA's choice)
    else v trains  -> v = 0, B random     (docs/methods.md §6)
    else u trains  -> u = 0, A, B random, v = 1
    else (A only)  -> A = 0, B random, u = v = 1
Every other trained tensor starts as LoRA's would: A ~ kaiming_uniform(a=√5) from the global RNG, u = v = 1.
Frozen A / B ~ kaiming_uniform(a=√5) from their seeded stream: U(−1/√fan_in, 1/√fan_in), fan_in = in for A,
r for B. A zeroed factor still receives gradient, since every other factor is non-zero.

Stored parameters (the trained tensors only; shared ones once): per group r·in for a trained A and out·r for a
trained B, per layer r for a trained u and out for a trained v.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import VBShareError
from ..targets import module_role, role_key
from ..checks import integer
from .base import AdapterConfig, AdapterState, LowRankAdapter, check_alpha, derived_seed

FACTORS = ("A", "B", "u", "v")  # what `train` may name, in this canonical order
KAIMING_A = math.sqrt(5)  # nn.Linear's (and LoRA's) kaiming_uniform slope: bound = 1/√fan_in


@dataclass
class TiedLoRAConfig(AdapterConfig):
    r: int = 8
    alpha: float | None = None  # None -> alpha = r, so s = 1
    dropout: float = 0.0
    train: list[str] = field(default_factory=lambda: list(FACTORS))  # subset of A, B, u, v
    seed: int = 0  # draws the frozen A / B

    def validate(self) -> None:
        super().validate()
        if isinstance(self.train, str) or not isinstance(self.train, (list, tuple)):
            raise VBShareError(f"train must be a list drawn from {list(FACTORS)}, got {self.train!r}")
        unknown = [t for t in self.train if t not in FACTORS]
        if unknown or not self.train or len(set(self.train)) != len(self.train):
            raise VBShareError(
                f"train must name each of A, B, u, v at most once and at least one of them, got {list(self.train)!r}"
            )
        self.train = [t for t in FACTORS if t in self.train]  # canonical order, so equal choices compare equal
        check_alpha(self.alpha)
        integer("seed", self.seed)

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.r) / self.r

    @property
    def zero_factor(self) -> str:
        """The one trained factor that starts at zero so that ΔW = 0 at init (see the module docstring)."""
        return next(t for t in ("B", "v", "u", "A") if t in self.train)


def seeded_kaiming(shape: tuple[int, int], seed: int) -> Tensor:
    """kaiming_uniform(a=√5) of a (rows, fan_in) matrix, drawn in float32 on the CPU from its own seeded
    generator (so every process and device gets the same bits), returned in the default dtype."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    drawn = nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.float32), a=KAIMING_A, generator=generator)
    return drawn.to(torch.get_default_dtype())


class TiedLoRAState(AdapterState):
    """Owns each sharing group's A (r, in) and B (out, r): parameters when trained, else seeded buffers.

    Attributes:
        groups: role -> its module names, in target order.
        group_keys: role -> the key in the tensor names `A_<key>` / `B_<key>`.
    """

    def __init__(self, method: str, config: TiedLoRAConfig, targets: dict[str, tuple[int, int]]):
        super().__init__(method, config, targets)
        self.roles: dict[str, str] = {}  # per instance: one entry per trained shared tensor
        self.groups: dict[str, list[str]] = {}
        for name in targets:
            self.groups.setdefault(module_role(name), []).append(name)
        self.group_keys: dict[str, str] = {}
        for role, names in self.groups.items():
            shapes = sorted({tuple(targets[n]) for n in names})
            if len(shapes) > 1:
                raise VBShareError(
                    f"tied_lora shares A and B across the modules of role {role}, but they have different shapes "
                    f"{shapes}; target roles whose layers all have one shape"
                )
            key = role_key(role)
            if key in self.group_keys.values():
                raise VBShareError(f"roles {role} and another map to the same tensor key {key}; rename or exclude one")
            self.group_keys[role] = key
            out_features, in_features = shapes[0]
            self._add("A", key, (config.r, in_features), role)  # (r, in)
            self._add("B", key, (out_features, config.r), role)  # (out, r)

    def _add(self, factor: str, key: str, shape: tuple[int, int], role: str) -> None:
        config: TiedLoRAConfig = self.config
        name = f"{factor}_{key}"
        if factor not in config.train:
            self.register_buffer(name, seeded_kaiming(shape, derived_seed(config.seed, role, factor)), persistent=False)
            return
        value = torch.zeros(shape)
        if config.zero_factor != factor and factor == "A":
            nn.init.kaiming_uniform_(value, a=KAIMING_A)  # a trained, non-zero A starts as LoRA's A
        # a trained B is always the zero factor (B comes first in the zeroing order)
        self.register_parameter(name, nn.Parameter(value))
        self.roles[name] = factor

    def A_of(self, name: str) -> Tensor:
        """The group's A (r, in) that module `name` uses."""
        return getattr(self, f"A_{self.group_keys[module_role(name)]}")

    def B_of(self, name: str) -> Tensor:
        """The group's B (out, r) that module `name` uses."""
        return getattr(self, f"B_{self.group_keys[module_role(name)]}")

    def sharing_pattern(self) -> dict[str, Any]:
        return {"sharing_groups": len(self.groups), "trained": list(self.config.train)}


class TiedLoRA(LowRankAdapter):
    """One adapted layer: its group's A and B (on `model.vbshare`) and its own u (r) and v (out)."""

    config_class = TiedLoRAConfig
    state_class = TiedLoRAState
    roles = {"u": "u", "v": "v"}

    def __init__(self, base_layer: nn.Module, name: str, config: TiedLoRAConfig, state: TiedLoRAState):
        super().__init__(base_layer, name, config, state)
        self.scale = config.scale
        device = base_layer.weight.device
        for factor, size in (("u", config.r), ("v", self.out_features)):
            start = 0.0 if config.zero_factor == factor else 1.0
            value = torch.full((size,), start, device=device)
            if factor in config.train:
                self.register_parameter(factor, nn.Parameter(value))
            else:
                self.register_buffer(factor, value, persistent=False)  # frozen: ones, rebuilt, never saved

    def factors(self) -> tuple[Tensor, Tensor, float]:
        A = self.u[:, None] * self.state.A_of(self.name)  # (r, 1) * (r, in) -> (r, in)
        B = self.v[:, None] * self.state.B_of(self.name)  # (out, 1) * (out, r) -> (out, r)
        return A, B, self.scale
