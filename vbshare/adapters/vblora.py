"""VB-LoRA (Li, Han, Ji, NeurIPS 2024) — every factor is mixed from ONE shared vector bank. METHODS.md §1.

Each rank-one component i is a row of A (in/b sub-vectors of length b) and a column of B (out/b
sub-vectors). Every sub-vector u has logits σ ∈ ℝ^h over the bank 𝔅 (h, b):
    u = Σ_{s ∈ TopK(σ, k)} softmax(σ_TopK)_s · 𝔅_s
Logits layout is PEFT's, so checkpoints interoperate:
    logits_A (r, in/b, h) -> A (r, in);   logits_B (out/b, r, h) -> B (out, r).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import torch
from einops import einsum, rearrange
from torch import Tensor, nn

from ..errors import VBShareError
from .base import AdapterConfig, AdapterState, LowRankAdapter


@dataclass
class VBLoRAConfig(AdapterConfig):
    r: int = 4
    num_vectors: int = 256  # h: vectors in the bank
    vector_length: int = 256  # b: length of every vector; divides in and out of every target
    topk: int = 2  # k: vectors mixed per sub-vector
    init_logits_std: float = 0.1
    init_bank_bound: float = 0.02
    scale: float = 1.0  # s; the paper and PEFT use none (1.0)
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        for key in ("num_vectors", "vector_length", "topk"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise VBShareError(f"{key} must be a positive integer, got {value!r}")
        if self.topk > self.num_vectors:
            raise VBShareError(
                f"topk={self.topk} exceeds num_vectors={self.num_vectors}; choose topk <= num_vectors"
            )


def index_dtype(num_vectors: int) -> torch.dtype:
    """Smallest integer dtype that holds a bank index (METHODS.md §1)."""
    if num_vectors < 2**8:
        return torch.uint8
    if num_vectors < 2**15:
        return torch.int16
    return torch.int32


def index_width(num_vectors: int) -> float:
    """Bytes of one stored index relative to one fp32 parameter: 0.25, 0.5 or 1."""
    return {torch.uint8: 0.25, torch.int16: 0.5, torch.int32: 1.0}[index_dtype(num_vectors)]


def mix(logits: Tensor, bank: Tensor, topk: int) -> Tensor:
    """Top-k admixture of bank vectors: logits (..., h), bank (h, b) -> (..., b).

    The softmax runs over the k selected logits only, so gradients reach exactly those k logits and the
    k selected bank rows.
    """
    top_logits, top_index = logits.topk(topk, dim=-1)  # (..., k)
    weights = top_logits.softmax(dim=-1)  # (..., k)
    vectors = bank[top_index]  # (..., k, b)
    return einsum(weights, vectors, "... k, ... k b -> ... b")


class VBLoRAState(AdapterState):
    """Owns the one bank (h, b) shared by every adapted module of the model."""

    roles = {"bank": "bank"}
    decay_free_roles = frozenset({"bank"})

    def __init__(self, method: str, config: VBLoRAConfig, targets: dict[str, tuple[int, int]]):
        super().__init__(method, config, targets)
        b = config.vector_length
        for name, (out_features, in_features) in targets.items():
            if in_features % b or out_features % b:
                common = reduce(math.gcd, [d for shape in targets.values() for d in shape])
                fits = max(d for d in range(1, min(b, common) + 1) if common % d == 0)
                raise VBShareError(
                    f"vector_length={b} does not divide module {name} of shape (out={out_features}, in={in_features}); "
                    f"use a vector_length that divides every target, e.g. vector_length={fits}"
                )
        self.bank = nn.Parameter(torch.empty(config.num_vectors, b))  # (h, b)
        nn.init.uniform_(self.bank, -config.init_bank_bound, config.init_bank_bound)

    def stored_parameters(self, topk_only: bool = True) -> float:
        return self.bank.numel()

    def pack(self, tensors: dict[str, Tensor], topk_only: bool = False) -> dict[str, Tensor]:
        """topk_only: each logits tensor becomes `<key>_topk_indices` (k) and `<key>_topk_weights` (k-1)."""
        if not topk_only:
            return tensors
        packed = {}
        for key, value in tensors.items():
            if key.endswith(("logits_A", "logits_B")):
                top_logits, top_index = value.float().topk(self.config.topk, dim=-1)  # (..., k)
                packed[key + "_topk_indices"] = top_index.to(index_dtype(self.config.num_vectors)).contiguous()
                packed[key + "_topk_weights"] = top_logits.softmax(-1)[..., :-1].to(value.dtype).contiguous()
            else:
                packed[key] = value
        return packed

    def unpack(self, tensors: dict[str, Tensor], topk_only: bool = False) -> dict[str, Tensor]:
        """Rebuild logits from a top-k checkpoint: log-weights at the k indices, -inf elsewhere."""
        if not topk_only:
            return tensors
        logits = {}
        for key, value in tensors.items():
            if key.endswith("_topk_indices"):
                base_key = key[: -len("_topk_indices")]
                head = tensors[base_key + "_topk_weights"].float()  # (..., k-1)
                weights = torch.cat([head, 1.0 - head.sum(-1, keepdim=True)], dim=-1)  # (..., k)
                full = torch.full((*weights.shape[:-1], self.config.num_vectors), float("-inf"))  # (..., h)
                logits[base_key] = full.scatter(-1, value.long(), weights.log())
            elif not key.endswith("_topk_weights"):
                logits[key] = value
        self.inference_only = True
        return logits


class VBLoRA(LowRankAdapter):
    config_class = VBLoRAConfig
    state_class = VBLoRAState
    roles = {"logits_A": "logits", "logits_B": "logits"}
    decay_free_roles = frozenset({"logits"})

    def __init__(self, base_layer: nn.Module, name: str, config: VBLoRAConfig, state: VBLoRAState):
        super().__init__(base_layer, name, config, state)
        r, b, h = config.r, config.vector_length, config.num_vectors
        device = base_layer.weight.device
        self.topk = config.topk
        self.scale = config.scale
        self.logits_A = nn.Parameter(torch.empty(r, self.in_features // b, h, device=device))  # (r, in/b, h)
        self.logits_B = nn.Parameter(torch.empty(self.out_features // b, r, h, device=device))  # (out/b, r, h)
        nn.init.normal_(self.logits_A, 0.0, config.init_logits_std)
        nn.init.normal_(self.logits_B, 0.0, config.init_logits_std)

    def factors(self) -> tuple[Tensor, Tensor, float]:
        if self.training and self.state.inference_only and torch.is_grad_enabled():
            raise VBShareError(
                f"{self.name} was loaded from a top-k-only checkpoint, which cannot be trained; "
                "load the full checkpoint (saved with topk_only=False) to continue training"
            )
        bank = self.state.bank
        A = rearrange(mix(self.logits_A, bank, self.topk), "r n b -> r (n b)")  # (r, in/b, b) -> (r, in)
        B = rearrange(mix(self.logits_B, bank, self.topk), "n r b -> (n b) r")  # (out/b, r, b) -> (out, r)
        return A, B, self.scale

    def sub_vectors(self) -> int:
        """n_sub of this module: r·(in + out)/b."""
        return self.logits_A.shape[:2].numel() + self.logits_B.shape[:2].numel()

    def stored_parameters(self, topk_only: bool = True) -> float:
        """Top-k form: n_sub·(k−1) weights + n_sub·k indices at their width; else the logits themselves."""
        if not topk_only:
            return self.logits_A.numel() + self.logits_B.numel()
        n_sub, k = self.sub_vectors(), self.topk
        return n_sub * (k - 1) + n_sub * k * index_width(self.state.config.num_vectors)
