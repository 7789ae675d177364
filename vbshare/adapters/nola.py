"""NOLA — LoRA factors as trained combinations of frozen random bases. docs/methods.md §7.

Per adapted module:
    A = Σ_{i=1..k} α_i A_i   (r, in),     B = Σ_{j=1..l} β_j B_j   (out, r),     ΔW = s · B A,   s = α_s / r,
with frozen random bases A_i (r, in), B_j (out, r) and trained coefficients α (k) and β (l). Nothing is shared
between modules; the only stored tensors are the coefficients, k + l per module, whatever the layer's shape
and r.

The bases come from the module's own seed, derived from `seed` and the module name by SHA-256 (the same in every
process, unlike Python's hash()), one stream for the A bases and one for the B bases:
    A_i entries ~ U(−1/√k, 1/√k),   B_j entries ~ U(−1/√l, 1/√l)
(the official code's scaling). Entry n of a stream is a function of (seed, n) alone — splitmix64 written in int64
tensor ops (`BasisSpec`) — so the bases are made on the module's own device, any chunk of them alone, with the
same bits on every device and every load. They are never saved. Initialisation: α ~ U(−√(3/in), √(3/in)) from
the global RNG, which gives A entries of variance 1/(3·in), that of LoRA's kaiming A; β = 0, so ΔW = 0 at init.

`cache_bases` True keeps the bases as non-persistent buffers of the module (they follow `.to()`, are cast with the
model, and never enter a state_dict); False makes them again in every forward pass and again in backward,
`chunk_size` bases at a time (a custom autograd function keeps nothing but the seed), so a module's memory is one
chunk's; None (the default) caches while all modules' bases fit in CACHE_LIMIT_BYTES. Caching was measured much
faster per step on a CPU (docs/methods.md §7 has the table); the bases cost 4·r·(k·in + l·out) bytes per module,
about 60 GiB for a 7B at k = l = 1024, r = 8, where only the chunked path fits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import VBShareError
from ..checks import integer
from .base import AdapterConfig, AdapterState, LowRankAdapter, check_alpha, derived_seed


# The default keeps the bases while all of them take at most this many bytes: cached steps are several times
# faster on a CPU, made-again ones hold one chunk (measured in docs/methods.md §7); a 7B's would take ~60 GiB.
CACHE_LIMIT_BYTES = 2 * 2**30


@dataclass
class NOLAConfig(AdapterConfig):
    r: int = 8
    num_basis_a: int = 1024  # k: bases (and trained coefficients α) for A
    num_basis_b: int | None = None  # l: bases (and trained coefficients β) for B; None -> l = k
    alpha: float | None = None  # s = alpha / r; None -> alpha = r, so s = 1
    dropout: float = 0.0
    seed: int = 0  # with the module name, draws every basis
    cache_bases: bool | None = None  # True: keep; False: make again, chunk by chunk, every pass; None: keep when
    # every module's bases together fit in CACHE_LIMIT_BYTES (float32)
    chunk_size: int | None = None  # bases made at a time; None: CHUNK_ENTRIES entries' worth for the device

    def validate(self) -> None:
        super().validate()
        for key, value in (("num_basis_a", self.num_basis_a), ("num_basis_b", self.num_basis_l)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise VBShareError(f"{key} must be a positive integer, got {value!r}")
        check_alpha(self.alpha)
        integer("seed", self.seed)
        if self.cache_bases is not None and not isinstance(self.cache_bases, bool):
            raise VBShareError(f"cache_bases must be true or false (or null: cache when they fit in "
                               f"{CACHE_LIMIT_BYTES / 2**30:g} GiB), got {self.cache_bases!r}")
        integer("chunk_size", self.chunk_size, low=1, null=True)

    @property
    def num_basis_l(self) -> int:
        """l, the number of B bases: `num_basis_b`, or k when it is None (so one knob sizes both)."""
        return self.num_basis_a if self.num_basis_b is None else self.num_basis_b

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.r) / self.r

    def caches(self, targets: dict[str, tuple[int, int]]) -> bool:
        """Whether the bases are kept: `cache_bases`, or when None whether all of them, 4·r·(k·in + l·out) bytes
        per module of (out, in) in `targets`, fit in CACHE_LIMIT_BYTES."""
        if self.cache_bases is not None:
            return self.cache_bases
        k, l = self.num_basis_a, self.num_basis_l
        return sum(4 * self.r * (k * inp + l * out) for out, inp in targets.values()) <= CACHE_LIMIT_BYTES


# -- the bases: a counter-based generator in int64 tensor ops ------------------------------------------------------
GOLDEN_GAMMA = 0x9E3779B97F4A7C15 - 2**64  # splitmix64's constants as signed int64 (torch has no uint64 arithmetic)
MIX_1 = 0xBF58476D1CE4E5B9 - 2**64
MIX_2 = 0x94D049BB133111EB - 2**64
TOP_BITS = 24  # a float32 holds every integer below 2^24 exactly
# Entries made at a time by default: on a CPU a chunk whose int64 working set stays in cache (measured 4x faster
# than 16 MiB chunks); on a GPU large chunks, so few kernel launches (2^22 entries: 32 MiB per int64 tensor).
CHUNK_ENTRIES = {"cpu": 2**16, "cuda": 2**22}


def shift_right(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 `z` seen as uint64 (torch's >> is arithmetic on int64), as a new tensor."""
    return (z >> bits).bitwise_and_((1 << (64 - bits)) - 1)


def splitmix64(seed: int, index: Tensor) -> Tensor:
    """splitmix64's output number `index` (int64 tensor, counted from 0; overwritten) of the stream seeded with
    `seed`, as int64 bits: z = seed + (index + 1)·γ, then two xor-shift-multiply rounds and a final xor-shift
    (mod 2^64). In place: at most two int64 tensors of index's size are alive."""
    z = index.add_(1).mul_(GOLDEN_GAMMA).add_(seed)
    z.bitwise_xor_(shift_right(z, 30)).mul_(MIX_1)
    z.bitwise_xor_(shift_right(z, 27)).mul_(MIX_2)
    return z.bitwise_xor_(shift_right(z, 31))


@dataclass(frozen=True)
class BasisSpec:
    """One factor's bases, (count, rows, cols) entries U(−1/√count, 1/√count) from `seed`, entry by entry.

    Entry n (flat index in (count, rows, cols) order) is u = the top 24 bits of splitmix64(seed, n), mapped to
    (2u + 1 − 2^24) · (bound / 2^24): odd multiples of bound/2^24 in (−bound, bound), uniform and symmetric. Every
    step is integer arithmetic, an exact int -> float32 conversion and one float32 product, so any device gives
    the same bits, and any chunk of bases can be made alone.
    """

    seed: int
    shape: tuple[int, int, int]  # (k, r, in) for A, (l, out, r) for B

    def draw(self, start: int = 0, stop: int | None = None, device: torch.device | None = None,
             dtype: torch.dtype | None = None) -> Tensor:
        """Bases start..stop−1 (stop−start, rows, cols), made in float32 on `device`, then cast to `dtype`."""
        count, rows, cols = self.shape
        stop = count if stop is None else min(stop, count)
        index = torch.arange(start * rows * cols, stop * rows * cols, dtype=torch.int64, device=device)
        top = shift_right(splitmix64(self.seed, index), 64 - TOP_BITS)  # (n,) in [0, 2^24)
        del index
        step = torch.tensor(1.0 / math.sqrt(count) / 2**TOP_BITS, dtype=torch.float32, device=device)
        odd = top.mul_(2).add_(1 - 2**TOP_BITS).to(torch.float32)  # exact integers in (−2^24, 2^24)
        del top
        bases = odd.mul_(step)  # one float32 product
        return bases.view(stop - start, rows, cols).to(dtype=dtype)  # (stop−start, rows, cols)

    def chunks(self, size: int) -> range:
        return range(0, self.shape[0], size)

    def chunk_for(self, device: torch.device, size: int | None) -> int:
        """`size` bases, or when None as many as hold CHUNK_ENTRIES[device type] entries (at least one)."""
        if size is not None:
            return size
        entries = CHUNK_ENTRIES.get(torch.device(device).type, CHUNK_ENTRIES["cuda"])
        return max(1, entries // (self.shape[1] * self.shape[2]))


def combine(coefficients: Tensor, bases: Tensor) -> Tensor:
    """Σ_i c_i M_i: coefficients (count,), bases (count, rows, cols) -> (rows, cols)."""
    count, rows, cols = bases.shape
    return (coefficients @ bases.view(count, rows * cols)).view(rows, cols)  # (count,) @ (count, rows·cols)


class _CombineChunked(torch.autograd.Function):
    """`combine` over bases made `size` at a time on the coefficients' device, in forward and again in backward:
    memory O(size · rows · cols), and autograd keeps none of them."""

    @staticmethod
    def forward(ctx, coefficients: Tensor, spec: BasisSpec, size: int | None) -> Tensor:
        size = spec.chunk_for(coefficients.device, size)
        ctx.spec, ctx.size = spec, size
        _, rows, cols = spec.shape
        total = coefficients.new_zeros(rows * cols)  # (rows·cols,)
        for start in spec.chunks(size):
            chunk = spec.draw(start, start + size, coefficients.device, coefficients.dtype)  # (n, rows, cols)
            n = chunk.shape[0]
            total.addmv_(chunk.view(n, rows * cols).t(), coefficients[start:start + n])  # (rows·cols, n) @ (n,)
        return total.view(rows, cols)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        spec, parts = ctx.spec, []
        for start in spec.chunks(ctx.size):
            chunk = spec.draw(start, start + ctx.size, grad.device, grad.dtype)  # (n, rows, cols)
            parts.append(chunk.flatten(1) @ grad.flatten())  # (n, rows·cols) @ (rows·cols,) -> (n,)
        return torch.cat(parts), None, None


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
        self.cache_bases, self.chunk_size = config.caches(state.targets), config.chunk_size
        self._eval_factors: tuple[tuple, Tensor, Tensor] | None = None  # (coefficient key, A, B), see factors()
        if self.cache_bases:
            self.register_buffer("bases_A", self.draw_all(self.spec_A, device), persistent=False)  # (k, r, in)
            self.register_buffer("bases_B", self.draw_all(self.spec_B, device), persistent=False)  # (l, out, r)

    def draw_all(self, spec: BasisSpec, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
        """Every basis of `spec` (count, rows, cols), made `chunk_size` at a time into one tensor."""
        bases = torch.empty(spec.shape, device=device, dtype=dtype)
        size = spec.chunk_for(bases.device, self.chunk_size)
        for start in spec.chunks(size):
            bases[start:start + size] = spec.draw(start, start + size, device, dtype)
        return bases

    def bases(self) -> tuple[Tensor, Tensor]:
        """(A bases (k, r, in), B bases (l, out, r)) as this module uses them (its buffers or made now, whole)."""
        if self.cache_bases:
            return self.bases_A, self.bases_B
        return (self.draw_all(self.spec_A, self.coef_A.device, self.coef_A.dtype),
                self.draw_all(self.spec_B, self.coef_B.device, self.coef_B.dtype))

    def factors(self) -> tuple[Tensor, Tensor, float]:
        """A (r, in), B (out, r) and the scale. Without autograd (evaluation, decoding) the combined factors are
        kept until a coefficient changes (in place, or replaced by a move or a load), so the k + l bases are
        combined, or made again, once per evaluation instead of once per forward pass: each decoded token is one
        pass."""
        reuse = not torch.is_grad_enabled() and not torch.compiler.is_compiling()  # (a compiled graph has no state)
        key = (self.coef_A._version, self.coef_B._version, self.coef_A.data_ptr(), self.coef_B.data_ptr(),
               self.coef_A.dtype, self.coef_A.device) if reuse else None
        if reuse and self._eval_factors is not None and self._eval_factors[0] == key:
            return self._eval_factors[1], self._eval_factors[2], self.scale
        if self.cache_bases:
            A = combine(self.coef_A, self.bases_A.to(self.coef_A.dtype))  # (r, in)
            B = combine(self.coef_B, self.bases_B.to(self.coef_B.dtype))  # (out, r)
        else:
            A = _CombineChunked.apply(self.coef_A, self.spec_A, self.chunk_size)  # (r, in)
            B = _CombineChunked.apply(self.coef_B, self.spec_B, self.chunk_size)  # (out, r)
        self._eval_factors = (key, A, B) if reuse else None
        return A, B, self.scale

    def extra_repr(self) -> str:
        k, l = self.coef_A.numel(), self.coef_B.numel()
        return f"{super().extra_repr()}, k={k}, l={l}, cache_bases={self.cache_bases}"
