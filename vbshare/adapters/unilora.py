"""Uni-LoRA (Li et al. 2025) — every entry of every LoRA factor reads ONE shared trainable vector θ.
docs/methods.md §8.

Flatten the factors of all targets, module by module in model order and A (r, in) before B (out, r) within a
module, each row-major, into one list of D = Σ r·(in + out) entries. Entry j reads
    W_j = θ[idx_j] · c_j,   c_j = 1/√(number of entries that read θ[idx_j]),
which makes the map θ -> (all factors) an isometry. The assignment idx is balanced: every θ entry is read
⌊D/d⌋ times, the D mod d entries of a seeded choice (without replacement) once more, and the whole list is
shuffled by the same seeded generator (numpy's PCG64 from `proj_seed`). This is the assignment Hugging Face
PEFT generates from its `proj_seed`, so both rebuild the same idx.

Because c_j depends only on idx_j, the scale is kept per θ entry: `theta_scale` (d,) = 1/√uses (0 for an entry
no factor reads), and a module's factors are gathers of θ ⊙ theta_scale by its `indices_A` (r, in) and
`indices_B` (out, r). idx and the scales are non-persistent buffers rebuilt from the seed unless
`save_indices` (then they are saved and counted). θ ~ U(−bound, bound), bound = `init_theta_d_bound`;
both factors are non-zero at init, so the adapted model is not the base model at step 0 (s = 1).

Stored parameters: d; with `save_indices` also D int32 indices (counted at the width of one float32) and the
d per-entry scales.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import VBShareError
from .base import AdapterConfig, AdapterState, LowRankAdapter

INDEX_DTYPE = torch.int32  # a gather index; int32 holds any θ length and is half of int64's memory


@dataclass
class UniLoRAConfig(AdapterConfig):
    r: int = 4
    theta_d_length: int = 256  # d: length of the one shared vector θ
    init_theta_d_bound: float = 0.02  # θ ~ U(−bound, bound)
    proj_seed: int = 42  # seeds the balanced index assignment
    save_indices: bool = False  # save idx and the scales (else the seed rebuilds them on load)
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        if isinstance(self.theta_d_length, bool) or not isinstance(self.theta_d_length, int) or self.theta_d_length < 1:
            raise VBShareError(f"theta_d_length must be a positive integer, got {self.theta_d_length!r}")
        bound = self.init_theta_d_bound
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not (math.isfinite(bound) and bound > 0):
            raise VBShareError(f"init_theta_d_bound must be a positive number, got {bound!r}")
        if isinstance(self.proj_seed, bool) or not isinstance(self.proj_seed, int) or self.proj_seed < 0:
            raise VBShareError(f"proj_seed must be a non-negative integer, got {self.proj_seed!r}")
        if not isinstance(self.save_indices, bool):
            raise VBShareError(f"save_indices must be true or false, got {self.save_indices!r}")


def balanced_assignment(entries: int, theta_length: int, seed: int) -> Tensor:
    """idx (entries,) int64: which θ entry each of the D flattened factor entries reads.

    Every θ entry appears ⌊D/d⌋ times; D mod d distinct entries, chosen by the seeded generator, appear once
    more; the generator then shuffles the list. Under `torch.device("meta")` (planning without weights) only
    the shape is made.
    """
    if torch.get_default_device().type == "meta":
        return torch.empty(entries, dtype=torch.long)  # (D,) shape only
    rng = np.random.default_rng(seed)
    assignment = np.repeat(np.arange(theta_length), entries // theta_length)  # (d·⌊D/d⌋,)
    leftover = entries % theta_length
    if leftover:
        extra = rng.choice(theta_length, size=leftover, replace=False)  # (D mod d,) distinct θ entries
        assignment = np.concatenate([assignment, extra])  # (D,)
    rng.shuffle(assignment)
    return torch.from_numpy(assignment).long()


def theta_scales(assignment: Tensor, theta_length: int) -> Tensor:
    """c per θ entry (d,) float32: 1/√(entries reading it), 0 for an entry that no factor reads."""
    if assignment.is_meta:  # planning without weights: shape only
        return torch.empty(theta_length, device="meta")
    uses = torch.bincount(assignment.long().reshape(-1), minlength=theta_length).float()  # (d,)
    return torch.where(uses > 0, uses.clamp(min=1).rsqrt(), torch.zeros_like(uses))


def build_index_map(targets: dict[str, tuple[int, int]], r: int, theta_length: int,
                    seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """module -> (idx_A (r, in), idx_B (out, r)) int64: the balanced assignment over all D = Σ r·(in + out)
    entries of `targets` (module -> (out, in)), cut in flattening order (modules in order, A before B)."""
    sizes = [(name, r * in_features, out_features * r) for name, (out_features, in_features) in targets.items()]
    assignment = balanced_assignment(sum(a + b for _, a, b in sizes), theta_length, seed)  # (D,)
    found, offset = {}, 0
    for name, size_A, size_B in sizes:
        out_features, in_features = targets[name]
        idx_A = assignment[offset: offset + size_A].view(r, in_features)  # (r, in)
        idx_B = assignment[offset + size_A: offset + size_A + size_B].view(out_features, r)  # (out, r)
        found[name] = (idx_A, idx_B)
        offset += size_A + size_B
    return found


class UniLoRAState(AdapterState):
    """Owns θ (d,) and its per-entry scale `theta_scale` (d,); hands every module its slice of idx at injection."""

    roles = {"theta": "theta"}
    decay_free_roles = frozenset({"theta"})

    def __init__(self, method: str, config: UniLoRAConfig, targets: dict[str, tuple[int, int]]):
        super().__init__(method, config, targets)
        d = config.theta_d_length
        indices = build_index_map(targets, config.r, d, config.proj_seed)
        self.entries = sum(a.numel() + b.numel() for a, b in indices.values())  # D
        if d > self.entries:
            warnings.warn(f"theta_d_length={d} exceeds the {self.entries} factor entries of these targets: "
                          f"{d - self.entries} theta entries are never read but still trained and stored; "
                          f"use theta_d_length <= {self.entries}", stacklevel=2)
        self.theta = nn.Parameter(torch.empty(d))  # (d,)
        nn.init.uniform_(self.theta, -config.init_theta_d_bound, config.init_theta_d_bound)
        every = torch.cat([i.reshape(-1) for pair in indices.values() for i in pair])  # (D,)
        self.register_buffer("theta_scale", theta_scales(every, d).to(torch.get_default_dtype()),
                             persistent=config.save_indices)  # (d,)
        # module -> (idx_A, idx_B) until the module takes them
        self._pending = {name: (a.to(INDEX_DTYPE), b.to(INDEX_DTYPE)) for name, (a, b) in indices.items()}

    def take_indices(self, name: str) -> tuple[Tensor, Tensor]:
        """The (idx_A (r, in), idx_B (out, r)) of module `name`, handed out once."""
        return self._pending.pop(name)

    def scaled_theta(self) -> Tensor:
        """θ ⊙ c (d,): entry k is what every factor entry with idx = k reads."""
        return self.theta * self.theta_scale

    def stored_parameters(self, topk_only: bool = True) -> float:
        """d; with save_indices also the d per-entry scales (the modules count their indices)."""
        return self.theta.numel() + (self.theta_scale.numel() if self.config.save_indices else 0)

    def unpack(self, tensors: dict[str, Tensor], topk_only: bool = False) -> dict[str, Tensor]:
        """Saved indices (save_indices) are checked before they load: integers in [0, theta_d_length), and the
        saved per-entry scale equal to 1/√uses recounted from them (one line naming the tensor otherwise)."""
        d = self.config.theta_d_length
        indices = {k: v for k, v in tensors.items() if k.endswith((".indices_A", ".indices_B"))}
        for key, value in indices.items():
            if value.is_floating_point() or value.dtype == torch.bool:
                raise VBShareError(f"Uni-LoRA indices {key} are {value.dtype}, not integers; save the adapter again")
            if value.numel() and (int(value.min()) < 0 or int(value.max()) >= d):
                raise VBShareError(f"Uni-LoRA indices {key} range over [{int(value.min())}, {int(value.max())}], "
                                   f"outside theta [0, {d - 1}] (theta_d_length={d}); the file was altered or saved "
                                   "with another theta_d_length")
        scale_key = next((k for k in tensors if k.rpartition(".")[2] == "theta_scale"), None)
        if len(indices) == 2 * len(self._adapters) and scale_key is not None:  # (a missing one is refused later)
            recounted = theta_scales(torch.cat([v.reshape(-1) for v in indices.values()]), d)  # (d,)
            saved = tensors[scale_key]
            rtol = max(1e-5, 4 * torch.finfo(saved.dtype).eps) if saved.is_floating_point() else 0.0
            if tuple(saved.shape) != (d,) or not torch.allclose(saved.float(), recounted, rtol=rtol, atol=0):
                raise VBShareError(f"Uni-LoRA {scale_key} is not 1/sqrt(uses) of the saved indices; the file was "
                                   "altered, save the adapter again")
        return tensors

    def sharing_pattern(self) -> dict[str, Any]:
        d = self.config.theta_d_length
        return {"theta_d_length": d, "factor_entries": self.entries,
                "uses_per_theta_entry": [self.entries // d, -(-self.entries // d)]}


class UniLoRA(LowRankAdapter):
    """One adapted layer: its factors are gathers of the shared θ ⊙ c (on `model.vbshare`) by its own indices."""

    config_class = UniLoRAConfig
    state_class = UniLoRAState

    def __init__(self, base_layer: nn.Module, name: str, config: UniLoRAConfig, state: UniLoRAState):
        super().__init__(base_layer, name, config, state)
        device = base_layer.weight.device
        idx_A, idx_B = state.take_indices(name)
        self.register_buffer("indices_A", idx_A.to(device), persistent=config.save_indices)  # (r, in)
        self.register_buffer("indices_B", idx_B.to(device), persistent=config.save_indices)  # (out, r)
        self.save_indices = config.save_indices

    def factors(self) -> tuple[Tensor, Tensor, float]:
        scaled = self.state.scaled_theta()  # (d,)
        return scaled[self.indices_A], scaled[self.indices_B], 1.0  # (r, in), (out, r)

    def stored_parameters(self, topk_only: bool = True) -> float:
        """0 (θ is the state's); with save_indices the module's r·(in + out) int32 indices."""
        return self.indices_A.numel() + self.indices_B.numel() if self.save_indices else 0
