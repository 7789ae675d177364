"""PVeRA (Fillioux et al., WACV 2026) — VeRA's frozen shared projections with a probabilistic latent: the input
side yields a mean and a log-variance, and training samples the latent between them. docs/methods.md §11.

ONE pair of frozen random matrices serves the whole model, as in VeRA (vera.py), but A has twice the rows:
A (2r, max_in) and B (max_out, r), max_in / max_out the largest in / out features over the targets. A module of
shape (out, in) reads the slices A[:, :in] and B[:out, :] and owns λ_d (2r) and λ_b (out):
    h = λ_d ⊙ (A_sl x)  (2r)      μ = h[:r],  log σ² = h[r:]      Δh = λ_b ⊙ (B_sl z)
with the latent z (r) chosen by mode:
    deterministic (eval, the default at inference; merge, ΔW, export):  z = μ
        ΔW = diag(λ_b) B_sl diag(λ_d[:r]) A_sl[:r]   (out, in)
    sampling (train mode, or `sample_at_inference` in eval mode):        z = μ + ε ⊙ exp(½ log σ²),  ε ~ N(0, I)
ε has the shape of μ: one draw per token and latent unit. `factors()` is the deterministic path (A' = diag(λ_d[:r])
A_sl[:r], B' = diag(λ_b) B_sl, s = 1), so merge, ΔW, disabling and the eval forward come from the contract; the
sampling path is this module's own `forward`. Merging always folds the mean: a merged layer does not sample.

Noise. `sample_seed` = None (default) draws ε from torch's generator of the input's device, which the training
app seeds with `seed`; an integer gives every module its own CPU generator seeded with
derived_seed(sample_seed, module name) (SHA-256, `base.derived_seed`), whose draws are moved to the device: the
same noise in every process and on every device, at the cost of one host-to-device copy per layer and pass.
Activation checkpointing replays torch's generators for the recomputation (so the default draws the same ε twice)
but not these per-module ones: with `sample_seed` set, a checkpointed layer's recomputation draws other noise.

Optional KL term (the paper's objective; off by default, as in PEFT): with kl_weight = w > 0, each sampling
forward records −½ · mean(1 + log σ² − μ² − σ²) over its (tokens × r) entries, and `extra_loss` returns
w · Σ_modules of the last recorded terms (the official code divides the per-block sum by a per-dataset β: w = 1/β).

The projections are drawn on the CPU from a generator seeded with `projection_seed`, A first, then B, each with
kaiming_uniform(a=0) over the full matrix: U(−√(6/fan_in), √(6/fan_in)), fan_in = max_in for A, r for B. This is
PEFT's draw from `projection_prng_key`, so both rebuild the same bits; they are non-persistent buffers unless
`save_projection`. λ_d starts at `d_initial` (0.1), λ_b at 0, so ΔW = 0 at init.

Stored parameters: Σ (out + 2r) over modules, plus r·(2·max_in + max_out) when the projections are saved.

Paper / official code / PEFT. PEFT 0.21 (matched here): one pair for all targets, no scale, λ_d = d_initial, no KL
term, `save_projection` on by default (off here, as for VeRA). The official code: a separate pair per role
(q, v), output scale α = 16, λ_d initialised to one random constant U(1e-5, 1), and the KL term above with β
chosen per dataset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import VBShareError
from . import vera
from .base import AdapterConfig, AdapterState, LowRankAdapter, derived_seed


@dataclass
class PVeRAConfig(AdapterConfig):
    r: int = 256  # latent size: A holds 2r rows (mean and log-variance), B r columns
    d_initial: float = 0.1  # starting value of every λ_d entry
    projection_seed: int = 0  # seeds the draw of the shared projections
    save_projection: bool = False  # save A and B (else the seed rebuilds them bit for bit on load)
    sample_at_inference: bool = False  # eval mode samples the latent too (else it uses the mean)
    sample_seed: int | None = None  # None: ε from torch's device generator; int: a seeded CPU generator per module
    kl_weight: float = 0.0  # weight w of the KL term added through extra_loss (0: none, as in PEFT)
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        vera.check_d_initial(self.d_initial)
        for key in ("projection_seed", "sample_seed"):
            value = getattr(self, key)
            if value is None and key == "sample_seed":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise VBShareError(f"{key} must be a non-negative integer, got {value!r}")
        for key in ("save_projection", "sample_at_inference"):
            if not isinstance(getattr(self, key), bool):
                raise VBShareError(f"{key} must be true or false, got {getattr(self, key)!r}")
        w = self.kl_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w >= 0):
            raise VBShareError(f"kl_weight must be a non-negative number, got {w!r}")


def draw_projections(r: int, max_in: int, max_out: int, seed: int) -> tuple[Tensor, Tensor]:
    """The shared (A (2r, max_in), B (max_out, r)): VeRA's draw (§5) with twice the rows in A."""
    return vera.draw_projections(r, max_in, max_out, seed, rows_A=2 * r)


class PVeRAState(AdapterState):
    """Owns the shared frozen projections `projection_A` (2r, max_in) and `projection_B` (max_out, r)."""

    def __init__(self, method: str, config: PVeRAConfig, targets: dict[str, tuple[int, int]]):
        super().__init__(method, config, targets)
        self.max_out = max(out_features for out_features, _ in targets.values())
        self.max_in = max(in_features for _, in_features in targets.values())
        A, B = draw_projections(config.r, self.max_in, self.max_out, config.projection_seed)
        dtype = torch.get_default_dtype()
        self.register_buffer("projection_A", A.to(dtype), persistent=config.save_projection)  # (2r, max_in)
        self.register_buffer("projection_B", B.to(dtype), persistent=config.save_projection)  # (max_out, r)

    def stored_parameters(self, topk_only: bool = True) -> float:
        """r·(2·max_in + max_out) when the projections are saved; 0 when the seed rebuilds them."""
        if not self.config.save_projection:
            return 0
        return self.projection_A.numel() + self.projection_B.numel()

    def sharing_pattern(self) -> dict[str, Any]:
        return {"projection_A": [2 * self.config.r, self.max_in], "projection_B": [self.max_out, self.config.r],
                "projections_saved": self.config.save_projection}


class PVeRA(LowRankAdapter):
    """One adapted layer: slices of the shared projections (on `model.vbshare`), scaled by its own λ_d, λ_b;
    the latent is sampled in train mode (or with `sample_at_inference`), its mean used otherwise."""

    config_class = PVeRAConfig
    state_class = PVeRAState
    roles = {"lambda_d": "vectors", "lambda_b": "vectors"}
    decay_free_roles = frozenset({"vectors"})  # the vectors ARE the adapter: decay would shrink every ΔW to 0

    def __init__(self, base_layer: nn.Module, name: str, config: PVeRAConfig, state: PVeRAState):
        super().__init__(base_layer, name, config, state)
        device = base_layer.weight.device
        self.r = config.r
        self.sample_at_inference = config.sample_at_inference
        self.kl_weight = config.kl_weight
        self.lambda_d = nn.Parameter(torch.full((2 * config.r,), float(config.d_initial), device=device))  # (2r,)
        self.lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device))  # (out,)
        self.generator = None if config.sample_seed is None else torch.Generator(device="cpu").manual_seed(
            derived_seed(config.sample_seed, name))
        self._kl: Tensor | None = None  # the last sampling forward's KL term, read once by extra_loss

    def factors(self) -> tuple[Tensor, Tensor, float]:
        """The deterministic path (z = μ): the mean half of λ_d and of A."""
        r = self.r
        A = self.lambda_d[:r, None] * self.state.projection_A[:r, : self.in_features]  # (r, 1) * (r, in) -> (r, in)
        B = self.lambda_b[:, None] * self.state.projection_B[: self.out_features, :]  # (out, 1) * (out, r) -> (out, r)
        return A, B, 1.0

    def samples(self) -> bool:
        """True when the forward pass samples the latent: train mode, or eval mode with sample_at_inference."""
        return self.training or self.sample_at_inference

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.disabled or self.merged or not self.samples():
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)  # (..., out)
        # the vectors scale the activations, not the projections (as PEFT): no (2r, in) product is built or saved
        A = self.state.projection_A[:, : self.in_features]  # (2r, in)
        B = self.state.projection_B[: self.out_features, :]  # (out, r)
        h = F.linear(self.dropout(x).to(self.lambda_d.dtype), A) * self.lambda_d  # (..., 2r)
        mu, logvar = h.chunk(2, dim=-1)  # (..., r) each
        std = torch.exp(0.5 * logvar)
        if self.generator is None:
            noise = torch.randn_like(std)
        else:
            noise = torch.randn(std.shape, dtype=std.dtype, generator=self.generator).to(std.device)
        z = mu + noise * std  # (..., r)
        if self.training and self.kl_weight > 0:
            mu32, logvar32 = mu.float(), logvar.float()
            self._kl = -0.5 * torch.mean(1 + logvar32 - mu32.pow(2) - logvar32.exp())
        return result + (F.linear(z.to(B.dtype), B) * self.lambda_b).to(result.dtype)  # (..., out)

    def extra_loss(self) -> Tensor | None:
        """kl_weight · the KL term of the last training forward (each term is returned once); None when off."""
        kl, self._kl = self._kl, None
        return None if kl is None else self.kl_weight * kl

    @property
    def rank(self) -> int:
        return self.r

    def stored_parameters(self, topk_only: bool = True) -> float:
        """out + 2r: the module's λ_b and λ_d."""
        return self.out_features + 2 * self.r
