"""VB-LoRA (Li, Han, Ji, NeurIPS 2024) — every factor is mixed from ONE shared vector bank. docs/methods.md §1.

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
from ..checks import integer, number
from .base import AdapterConfig, AdapterState, LowRankAdapter, autocast_off


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
            integer(key, getattr(self, key), low=1)
        for key in ("init_logits_std", "init_bank_bound"):
            number(key, getattr(self, key), low=0)
        number("scale", self.scale)
        if self.topk > self.num_vectors:
            raise VBShareError(
                f"topk={self.topk} exceeds num_vectors={self.num_vectors}; choose topk <= num_vectors"
            )


def index_dtype(num_vectors: int) -> torch.dtype:
    """Smallest integer dtype that holds a bank index (docs/methods.md §1)."""
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


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _kept_as_is(tensor: Tensor) -> Tensor:
    """Pack and unpack hook that keeps a saved tensor as autograd would without hooks."""
    return tensor


class VBLoRAState(AdapterState):
    """Owns the one bank (h, b) shared by every adapted module of the model.

    Composition: each forward pass of the root model composes every module's factors once, in ONE batched top-k /
    softmax / gather / weighted sum (`compose_all`), into a plain dict that the modules read during that pass
    (`begin_forward` / `end_forward` are hooks that `vbshare.inject` registers on the root model). Anywhere else
    (a module called on its own, under `torch.compile`, an activation-checkpoint recompute during backward) a
    module composes its own factors (`VBLoRA.compose`). Nothing is kept from one pass to the next, so the result
    never depends on what ran before.
    """

    extra_saves = {"adapter_topk": {"topk_only": True}}  # the compact inference form, beside the trainable one
    topk_form = True
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
        self._depth = 0  # root-model forward passes currently running
        self._composed: dict[str, tuple[Tensor, Tensor]] | None = None  # this pass's factors, by module name
        self._composed_with_grad = False

    # -- one batched composition per forward pass of the root model ----------------------------------------------
    def begin_forward(self) -> None:
        if _compiling():
            return
        self._depth += 1
        self._composed = None
        if any(not (a.disabled or a.merged) for a in self._adapters.values()):
            # composed here, outside every layer: an activation-checkpointed layer's forward then reads the
            # factors without recording the composition, and its recompute composes its own (`VBLoRA.factors`)
            with autocast_off(self.bank.device.type):
                self._composed = self.compose_all()
            self._composed_with_grad = torch.is_grad_enabled()

    def end_forward(self) -> None:
        if _compiling():
            return
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            self._composed = None

    def factors_of(self, name: str) -> tuple[Tensor, Tensor] | None:
        """The module's (A, B) from this forward pass's batched composition, or None when it composes its own."""
        composed = self._composed
        if composed is None or _compiling() or (torch.is_grad_enabled() and not self._composed_with_grad):
            return None  # no pass running, or composed without autograd while gradients are wanted now
        return composed.get(name)

    def compose_all(self) -> dict[str, tuple[Tensor, Tensor]]:
        """name -> (A (r, in), B (out, r)) of every module, from one concatenated (N_sub, h) logits tensor."""
        h, b, k = self.config.num_vectors, self.config.vector_length, self.config.topk
        adapters = list(self._adapters.values())
        pieces = [t.reshape(-1, h) for a in adapters for t in (a.logits_A, a.logits_B)]  # each (n_sub_i, h)
        parts = mix(torch.cat(pieces), self.bank, k).split([piece.shape[0] for piece in pieces])  # (n_sub_i, b)
        factors = {}
        for i, adapter in enumerate(adapters):
            A = parts[2 * i].view(adapter.logits_A.shape[:2] + (b,))  # (r, in/b, b)
            B = parts[2 * i + 1].view(adapter.logits_B.shape[:2] + (b,))  # (out/b, r, b)
            factors[adapter.name] = (rearrange(A, "r n b -> r (n b)"), rearrange(B, "n r b -> (n b) r"))
        return factors

    # -- storage -------------------------------------------------------------------------------------------------
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
        """Rebuild logits from a top-k checkpoint: log-weights at the k indices, -inf elsewhere.

        Every pair is checked first (one line naming the tensor): k distinct integer indices in [0, num_vectors)
        per sub-vector, and k-1 weights in [0, 1] summing to at most 1."""
        if not topk_only:
            return tensors
        for key, value in tensors.items():
            if key.endswith("_topk_indices"):
                self._check_topk(key, value, tensors.get(key[: -len("_topk_indices")] + "_topk_weights"))
            elif key.endswith("_topk_weights") and key[: -len("_topk_weights")] + "_topk_indices" not in tensors:
                raise VBShareError(f"top-k tensor {key} has no matching _topk_indices tensor; save the adapter again")
        logits = {}
        for key, value in tensors.items():
            if key.endswith("_topk_indices"):
                base_key = key[: -len("_topk_indices")]
                head = tensors[base_key + "_topk_weights"].float()  # (..., k-1)
                last = (1.0 - head.sum(-1, keepdim=True)).clamp(min=0.0)  # rounding may leave a tiny negative
                weights = torch.cat([head, last], dim=-1)  # (..., k)
                full = torch.full((*weights.shape[:-1], self.config.num_vectors), float("-inf"))  # (..., h)
                logits[base_key] = full.scatter(-1, value.long(), weights.log())
            elif not key.endswith("_topk_weights"):
                logits[key] = value
        self.inference_only = True
        return logits

    def _check_topk(self, key: str, indices: Tensor, weights: Tensor | None) -> None:
        """indices (..., k) and weights (..., k-1) of one top-k logits tensor, refused in one line when malformed."""
        h, k = self.config.num_vectors, self.config.topk
        name = key[: -len("_topk_indices")]
        if weights is None:
            raise VBShareError(f"top-k tensor {key} has no matching _topk_weights tensor; save the adapter again")
        if indices.is_floating_point() or indices.dtype == torch.bool or not weights.is_floating_point():
            raise VBShareError(f"top-k tensors of {name} have dtypes {indices.dtype} / {weights.dtype}; expected "
                               "integer indices and floating-point weights, save the adapter again")
        if indices.dim() < 1 or indices.shape[-1] != k or tuple(weights.shape) != (*indices.shape[:-1], k - 1):
            raise VBShareError(f"top-k tensors of {name} have shapes {tuple(indices.shape)} / {tuple(weights.shape)}, "
                               f"not (..., topk={k}) / (..., {k - 1}); load with the topk the adapter was saved with")
        if indices.numel():
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= h:
                raise VBShareError(f"top-k indices of {name} range over [{low}, {high}], outside the bank's "
                                   f"num_vectors={h} vectors [0, {h - 1}]; the file was altered or saved with "
                                   "another num_vectors")
            if k > 1 and bool((indices.long().sort(dim=-1).values.diff(dim=-1) == 0).any()):
                raise VBShareError(f"top-k indices of {name} select one bank vector twice for a sub-vector; "
                                   "the file was altered, save the adapter again")
        if weights.numel():
            w = weights.float()
            if not bool(torch.isfinite(w).all()) or float(w.min()) < 0 or float(w.sum(-1).max()) > 1 + 1e-3:
                raise VBShareError(f"top-k weights of {name} are not softmax weights (each in [0, 1], at most 1 "
                                   "together, finite); the file was altered, save the adapter again")


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
        shared = self.state.factors_of(self.name)
        if shared is not None:
            return (*shared, self.scale)
        if _compiling():
            return (*self.compose(), self.scale)
        # Saved for backward by this module itself, not by an enclosing activation checkpoint: a checkpointed
        # layer read the pass's shared factors in its forward, so its recompute must record what that forward
        # recorded (the two products with x), not this composition. The composition saves only tensors it
        # creates (indices, softmax weights, gathered vectors), never a parameter, so nothing else can change them.
        with torch.autograd.graph.saved_tensors_hooks(_kept_as_is, _kept_as_is):
            return (*self.compose(), self.scale)

    def compose(self) -> tuple[Tensor, Tensor]:
        """This module's (A, B) on its own, from its logits and the shared bank."""
        bank = self.state.bank
        A = rearrange(mix(self.logits_A, bank, self.topk), "r n b -> r (n b)")  # (r, in/b, b) -> (r, in)
        B = rearrange(mix(self.logits_B, bank, self.topk), "n r b -> (n b) r")  # (out/b, r, b) -> (out, r)
        return A, B

    @property
    def rank(self) -> int:
        return self.logits_A.shape[0]

    def sub_vectors(self) -> int:
        """n_sub of this module: r·(in + out)/b."""
        return self.logits_A.shape[:2].numel() + self.logits_B.shape[:2].numel()

    def stored_parameters(self, topk_only: bool = True) -> float:
        """Top-k form: n_sub·(k−1) weights + n_sub·k indices at their width; else the logits themselves."""
        if not topk_only:
            return self.logits_A.numel() + self.logits_B.numel()
        n_sub, k = self.sub_vectors(), self.topk
        return n_sub * (k - 1) + n_sub * k * index_width(self.state.config.num_vectors)
