"""MoS, Mixture of Shards (Wang et al., ICLR 2025) — every module's LoRA factors are concatenations of shards
picked from trained pools that the layers share. docs/methods.md §14.

Pools. The L modules of one role (`targets.module_role`: the path with layer indices replaced by `*`) share two
trained pools of shards; with l = `shards_per_vector` and e = `equivalent_rank`,
    pool_A (N, in/l),   pool_B (N, out/l),   N = e·L·l,
so a role holds exactly the parameters of L rank-e LoRAs. The first P = (e − p)·L·l shards are public
(p = `private_rank`); then the module at position i of the role (target order) owns the private block
P + [i·p·l, (i+1)·p·l).

Index tables. Each module reads r·l shards of each pool, in the order of its index table (r·l,):
    idx = [(r − p)·l distinct public shards, in a seeded random order] + [its own p·l private shards]
A and B draw their public shards independently (pair dissociation); the private block is the same for both, so
the private rank vectors pair up as in a LoRA (shard privatisation). A module uses a subset of the shared pool
(subset selection), and rank vector j is the concatenation of the l shards idx[j·l], …, idx[j·l + l − 1]
(vector sharding):
    A = rearrange(pool_A[idx_A], "(r l) d -> r (l d)")   (r, in)
    B = rearrange(pool_B[idx_B], "(r l) d -> (l d) r")   (out, r)
    ΔW = s · B A,   s = α / r.
The public draw ranks the P public shards j by derived_seed(seed, module name, "A" or "B", str(j)) (SHA-256,
`base.derived_seed`) and takes the (r − p)·l smallest, so it depends on nothing but the seed and the names:
every process, device, torch and Python version rebuilds the same tables, which are therefore non-persistent
buffers, never saved. One index_select per factor composes a module; the reshapes are views.

Initialisation: pool_A ~ U(−1/√in, 1/√in) (LoRA's A bound for a full vector of length in), pool_B = 0, so
ΔW = 0 at the start.

Stored parameters: the pools, Σ_roles N·(in + out)/l = e · Σ_modules (in + out), the same as a rank-e LoRA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from ..errors import VBShareError
from ..targets import module_role, role_key
from .base import AdapterConfig, AdapterState, LowRankAdapter, derived_seed


@dataclass
class MoSConfig(AdapterConfig):
    r: int = 8  # rank of every module's A and B (the official `lora_r`)
    equivalent_rank: int = 2  # e: the pools hold e rank vectors per module (the official `valid_param_lora_r`)
    private_rank: int = 1  # p: rank vectors per module built from its own shards (`valid_param_private_r`)
    shards_per_vector: int = 2  # l: shards concatenated into one rank vector; divides every in and out
    alpha: float = 16.0  # s = alpha / r (the official runs: 16)
    seed: int = 0  # seeds the public shard selection
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        for key in ("equivalent_rank", "shards_per_vector"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise VBShareError(f"{key} must be a positive integer, got {value!r}")
        p = self.private_rank
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise VBShareError(f"private_rank must be a non-negative integer, got {p!r}")
        if p > min(self.r, self.equivalent_rank):
            raise VBShareError(
                f"private_rank={p} exceeds r={self.r} or equivalent_rank={self.equivalent_rank}; "
                f"choose private_rank <= {min(self.r, self.equivalent_rank)}"
            )
        if p == self.equivalent_rank and self.r != p:
            raise VBShareError(
                f"private_rank = equivalent_rank = {p} leaves no public shards to share, so r={self.r} cannot be "
                f"filled; lower private_rank or set r={p}"
            )
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
                math.isfinite(self.alpha) and self.alpha > 0):
            raise VBShareError(f"alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise VBShareError(f"seed must be a non-negative integer, got {self.seed!r}")


def ranked_subset(count: int, size: int, seed: int, *parts: str) -> list[int]:
    """`size` distinct integers of range(count) in a seeded random order: those whose keys
    derived_seed(seed, *parts, str(j)) are smallest, smallest first (ties, never seen, by j)."""
    return sorted(range(count), key=lambda j: derived_seed(seed, *parts, str(j)))[:size]


class MoSState(AdapterState):
    """Owns every role's pools `pool_A_<key>` (N, in/l) and `pool_B_<key>` (N, out/l) and builds each module's
    index tables (`shard_tables`).

    Attributes:
        groups: role -> its module names, in target order (a module's position is its private block).
        shard_tables: module name -> (idx_A (r·l,), idx_B (r·l,)) int64, rebuilt from the seed.
    """

    def __init__(self, method: str, config: MoSConfig, targets: dict[str, tuple[int, int]]):
        super().__init__(method, config, targets)
        r, e, p, l = config.r, config.equivalent_rank, config.private_rank, config.shards_per_vector
        self.roles: dict[str, str] = {}  # per instance: pool parameter name -> optimiser role ("A" / "B")
        self.groups: dict[str, list[str]] = {}
        for name in targets:
            self.groups.setdefault(module_role(name), []).append(name)
        self._key_of: dict[str, str] = {}  # module name -> its role's key in the pool names
        self.shard_tables: dict[str, tuple[Tensor, Tensor]] = {}
        for role, names in self.groups.items():
            shapes = sorted({tuple(targets[n]) for n in names})
            if len(shapes) > 1:
                raise VBShareError(
                    f"mos shares pools across the modules of role {role}, but they have different shapes {shapes}; "
                    "target roles whose layers all have one shape"
                )
            (out_features, in_features), L = shapes[0], len(names)
            if in_features % l or out_features % l:
                common = reduce(math.gcd, [d for shape in targets.values() for d in shape])
                fits = max(d for d in range(1, min(l, common) + 1) if common % d == 0)
                raise VBShareError(
                    f"shards_per_vector={l} does not divide module {names[0]} of shape (out={out_features}, "
                    f"in={in_features}); use one that divides every target, e.g. shards_per_vector={fits}"
                )
            if r - p > (e - p) * L:
                raise VBShareError(
                    f"role {role} has {L} module(s), so its public pool holds (equivalent_rank - private_rank) * {L} "
                    f"= {(e - p) * L} rank vectors of shards, fewer than the r - private_rank = {r - p} distinct "
                    f"ones each module draws; use r <= {p + (e - p) * L} or a larger equivalent_rank"
                )
            key = role_key(role)
            if key in self._key_of.values():
                raise VBShareError(f"roles {role} and another map to the same tensor key {key}; rename or exclude one")
            shards, public = e * L * l, (e - p) * L * l
            pool_A = torch.empty(shards, in_features // l)  # (N, in/l)
            bound = 1.0 / math.sqrt(in_features)
            nn.init.uniform_(pool_A, -bound, bound)
            self.register_parameter(f"pool_A_{key}", nn.Parameter(pool_A))
            self.register_parameter(f"pool_B_{key}", nn.Parameter(torch.zeros(shards, out_features // l)))  # (N, out/l)
            self.roles[f"pool_A_{key}"], self.roles[f"pool_B_{key}"] = "A", "B"
            for i, name in enumerate(names):
                self._key_of[name] = key
                private = list(range(public + i * p * l, public + (i + 1) * p * l))  # (p·l,)
                tables = [ranked_subset(public, (r - p) * l, config.seed, name, factor) + private for factor in "AB"]
                self.shard_tables[name] = tuple(torch.tensor(t, dtype=torch.int64) for t in tables)  # (r·l,) each

    def pools_of(self, name: str) -> tuple[Tensor, Tensor]:
        """The (pool_A (N, in/l), pool_B (N, out/l)) that module `name` reads."""
        key = self._key_of[name]
        return getattr(self, f"pool_A_{key}"), getattr(self, f"pool_B_{key}")

    def sharing_pattern(self) -> dict[str, Any]:
        config: MoSConfig = self.config
        return {"roles": len(self.groups), "equivalent_rank": config.equivalent_rank,
                "private_rank": config.private_rank, "shards_per_vector": config.shards_per_vector,
                "pool_shards": {role: config.equivalent_rank * len(names) * config.shards_per_vector
                                for role, names in self.groups.items()}}


class MoS(LowRankAdapter):
    """One adapted layer: its role's pools (on `model.vbshare`) read through its own fixed index tables."""

    config_class = MoSConfig
    state_class = MoSState
    roles: dict[str, str] = {}  # a module trains nothing of its own: every trained tensor is a shared pool

    def __init__(self, base_layer: nn.Module, name: str, config: MoSConfig, state: MoSState):
        super().__init__(base_layer, name, config, state)
        self.r, self.shards_per_vector = config.r, config.shards_per_vector
        self.scale = config.alpha / config.r
        idx_A, idx_B = state.shard_tables[name]
        device = base_layer.weight.device
        self.register_buffer("shards_A", idx_A.to(device), persistent=False)  # (r·l,) rows of pool_A
        self.register_buffer("shards_B", idx_B.to(device), persistent=False)  # (r·l,) rows of pool_B

    def factors(self) -> tuple[Tensor, Tensor, float]:
        pool_A, pool_B = self.state.pools_of(self.name)
        l = self.shards_per_vector
        A = rearrange(pool_A.index_select(0, self.shards_A), "(r l) d -> r (l d)", l=l)  # (r·l, in/l) -> (r, in)
        B = rearrange(pool_B.index_select(0, self.shards_B), "(r l) d -> (l d) r", l=l)  # (r·l, out/l) -> (out, r)
        return A, B, self.scale

    @property
    def rank(self) -> int:
        return self.r
