"""NOLA — LoRA factors as trained combinations of frozen random bases. docs/methods.md §7.

Per adapted module:
    A = Σ_{i=1..k} α_i A_i   (r, in),     B = Σ_{j=1..l} β_j B_j   (out, r),     ΔW = s · B A,   s = α_s / r,
with frozen random bases A_i (r, in), B_j (out, r) and trained coefficients α (k) and β (l). Nothing is shared
between modules; the only stored tensors are the coefficients, k + l per module, whatever the layer's shape
and r.

The bases are drawn from the module's own seed, derived from `seed` and the module name by SHA-256 (the same
in every process, unlike Python's hash()), one stream for the A bases and one for the B bases:
    A_i entries ~ U(−1/√k, 1/√k),   B_j entries ~ U(−1/√l, 1/√l)
(the official code's scaling), always drawn in float32 on the CPU with a seeded `torch.Generator` and then
moved, so every device and every load rebuilds the same bits. They are never saved. Initialisation:
α ~ U(−√(3/in), √(3/in)) from the global RNG, which gives A entries of variance 1/(3·in), that of LoRA's
kaiming A; β = 0, so ΔW = 0 at init.

`cache_bases` (default True) keeps the bases as non-persistent buffers of the module (they follow `.to()`,
are cast with the model, and never enter a state_dict); False draws them again in every forward pass and
again in backward (a custom autograd function keeps nothing but the seed), trading time for memory.
Measured on the MiniLM module set (a random BERT of MiniLM's shape: 6 layers × query, key, value,
attention.output.dense, intermediate.dense, output.dense = 36 modules; k = l = 1024, r = 8), CPU, one thread,
batch 8 × 128 tokens, AdamW (peak RSS with MALLOC_MMAP_THRESHOLD_=1048576, so glibc returns freed blocks):
    cached       0.90 s per training step, 0.35 s per no-grad forward, 1.27 GiB of bases held, peak RSS 1.99 GiB
    regenerated  3.32 s per training step, 1.35 s per no-grad forward, no bases held,       peak RSS 0.76 GiB
    (LoRA r = 8  0.81 s,                   0.27 s,                                          peak RSS 0.72 GiB)
Caching is the default because it is about 3.7× faster; the bases cost 4·r·(k·in + l·out) bytes per module in
float32. Drawing the bases again is the choice when they do not fit; merge before serving, as every no-grad
forward draws them too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import VBShareError
from ..checks import integer
from .base import AdapterConfig, AdapterState, LowRankAdapter, check_alpha, derived_seed


@dataclass
class NOLAConfig(AdapterConfig):
    r: int = 8
    num_basis_a: int = 1024  # k: bases (and trained coefficients α) for A
    num_basis_b: int | None = None  # l: bases (and trained coefficients β) for B; None -> l = k
    alpha: float | None = None  # s = alpha / r; None -> alpha = r, so s = 1
    dropout: float = 0.0
    seed: int = 0  # with the module name, draws every basis
    cache_bases: bool = True  # False: draw the bases again in every forward and backward (saves memory, slower)

    def validate(self) -> None:
        super().validate()
        for key, value in (("num_basis_a", self.num_basis_a), ("num_basis_b", self.num_basis_l)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise VBShareError(f"{key} must be a positive integer, got {value!r}")
        check_alpha(self.alpha)
        integer("seed", self.seed)
        if not isinstance(self.cache_bases, bool):
            raise VBShareError(f"cache_bases must be true or false, got {self.cache_bases!r}")

    @property
    def num_basis_l(self) -> int:
        """l, the number of B bases: `num_basis_b`, or k when it is None (so one knob sizes both)."""
        return self.num_basis_a if self.num_basis_b is None else self.num_basis_b

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.r) / self.r


@dataclass(frozen=True)
class BasisSpec:
    """What draws one factor's bases: (count, rows, cols) entries U(−1/√count, 1/√count) from `seed`."""

    seed: int
    shape: tuple[int, int, int]  # (k, r, in) for A, (l, out, r) for B

    def draw(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """The bases (count, rows, cols), drawn in float32 on the CPU, then moved / cast."""
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        bound = 1.0 / math.sqrt(self.shape[0])
        bases = torch.empty(self.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        return bases.to(device=device, dtype=dtype)


def combine(coefficients: Tensor, bases: Tensor) -> Tensor:
    """Σ_i c_i M_i: coefficients (count,), bases (count, rows, cols) -> (rows, cols)."""
    count, rows, cols = bases.shape
    return (coefficients @ bases.view(count, rows * cols)).view(rows, cols)  # (count,) @ (count, rows·cols)


class _CombineRegenerated(torch.autograd.Function):
    """`combine` whose bases are drawn in forward and drawn again in backward, so autograd holds none of them."""

    @staticmethod
    def forward(ctx, coefficients: Tensor, spec: BasisSpec) -> Tensor:
        ctx.spec = spec
        return combine(coefficients, spec.draw(coefficients.device, coefficients.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        bases = ctx.spec.draw(grad.device, grad.dtype)  # (count, rows, cols)
        return bases.flatten(1) @ grad.flatten(), None  # (count, rows·cols) @ (rows·cols,) -> (count,)


class NOLA(LowRankAdapter):
    """One adapted layer: its coefficients α (k) and β (l), and (with `cache_bases`) its bases as buffers."""

    config_class = NOLAConfig
    state_class = AdapterState  # nothing is shared
    roles = {"coef_A": "coefficients", "coef_B": "coefficients"}

    def __init__(self, base_layer: nn.Module, name: str, config: NOLAConfig, state: AdapterState):
        super().__init__(base_layer, name, config, state)
        r, k, l = config.r, config.num_basis_a, config.num_basis_l
        device = base_layer.weight.device
        self.scale = config.scale
        self.spec_A = BasisSpec(derived_seed(config.seed, name, "A"), (k, r, self.in_features))
        self.spec_B = BasisSpec(derived_seed(config.seed, name, "B"), (l, self.out_features, r))
        self.coef_A = nn.Parameter(torch.empty(k, device=device))  # α (k,)
        self.coef_B = nn.Parameter(torch.zeros(l, device=device))  # β (l,)
        bound = math.sqrt(3.0 / self.in_features)  # Var(A entry) = k · (1/in) · 1/(3k) = 1/(3·in), as LoRA's A
        nn.init.uniform_(self.coef_A, -bound, bound)
        self.cache_bases = config.cache_bases
        if self.cache_bases:
            self.register_buffer("bases_A", self.spec_A.draw(device), persistent=False)  # (k, r, in)
            self.register_buffer("bases_B", self.spec_B.draw(device), persistent=False)  # (l, out, r)

    def bases(self) -> tuple[Tensor, Tensor]:
        """(A bases (k, r, in), B bases (l, out, r)) as this module uses them (its buffers or a fresh draw)."""
        if self.cache_bases:
            return self.bases_A, self.bases_B
        return (self.spec_A.draw(self.coef_A.device, self.coef_A.dtype),
                self.spec_B.draw(self.coef_B.device, self.coef_B.dtype))

    def factors(self) -> tuple[Tensor, Tensor, float]:
        if self.cache_bases:
            A = combine(self.coef_A, self.bases_A.to(self.coef_A.dtype))  # (r, in)
            B = combine(self.coef_B, self.bases_B.to(self.coef_B.dtype))  # (out, r)
        else:
            A = _CombineRegenerated.apply(self.coef_A, self.spec_A)  # (r, in)
            B = _CombineRegenerated.apply(self.coef_B, self.spec_B)  # (out, r)
        return A, B, self.scale

    def extra_repr(self) -> str:
        k, l = self.coef_A.numel(), self.coef_B.numel()
        return f"{super().extra_repr()}, k={k}, l={l}, cache_bases={self.cache_bases}"
