"""One entry per adapter method for the shared test matrix (tests/test_matrix.py).

A case gives the hyperparameters for the tiny test models, an INDEPENDENT float64 reference for a module's
ΔW (out, in), written from docs/methods.md without calling the method's own `factors()`, and the method's
stored-parameter formula (docs/methods.md §4/§9) computed from the targets' shapes and the config.
Adding a method to the matrix = adding one `Case` to `CASES`.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn


class TwoLinear(nn.Module):
    """The smallest model with two adaptable layers: (out=64, in=32) then (out=16, in=64)."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(32, 64)
        self.lin1 = nn.Linear(64, 16)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


@dataclass
class Case:
    method: str
    hyperparameters: dict = field(default_factory=dict)
    reference_delta: Callable[[torch.nn.Module], torch.Tensor] | None = None  # adapter -> ΔW (out, in), float64
    stored_reference: Callable[[torch.nn.Module], float] | None = None  # adapted model -> stored parameters
    # (hyperparameters put over the case's, a regex of the one-line VBShareError they must raise); test_matrix runs each
    bad_configs: list[tuple[dict, str]] = field(default_factory=list)


def lora_reference(adapter) -> torch.Tensor:
    A, B = adapter.lora_A.detach().double(), adapter.lora_B.detach().double()  # (r, in), (out, r)
    return adapter.scale * B @ A


def vblora_reference(adapter) -> torch.Tensor:
    """Compose every sub-vector by an explicit loop: top-k by sorting, softmax over those k, weighted bank rows."""
    bank = adapter.state.bank.detach().double()  # (h, b)
    h, b = bank.shape
    k = adapter.topk

    def compose(logits: torch.Tensor) -> torch.Tensor:
        flat = logits.detach().double().reshape(-1, h)
        rows = []
        for row in flat:
            chosen = torch.argsort(row, descending=True)[:k]
            weights = torch.exp(row[chosen] - row[chosen].max())
            weights = weights / weights.sum()
            rows.append((weights[:, None] * bank[chosen]).sum(0))
        return torch.stack(rows).reshape(*logits.shape[:-1], b)

    r = adapter.logits_A.shape[0]
    A = compose(adapter.logits_A).reshape(r, -1)  # (r, in/b, b) -> (r, in)
    B = compose(adapter.logits_B).permute(0, 2, 1).reshape(-1, r)  # (out/b, r, b) -> (out/b, b, r) -> (out, r)
    return adapter.scale * B @ A


def sora_reference(adapter) -> torch.Tensor:
    """ΔW = (α / r_max) · Σ_i g_i · b_i a_iᵀ, summed rank-one component by component (docs/methods.md §2)."""
    A, B = adapter.lora_A.detach().double(), adapter.lora_B.detach().double()  # (r, in), (out, r)
    g = adapter.gate.detach().double()  # (r,)
    config = adapter.state.config
    scale = (config.alpha if config.alpha is not None else config.r) / config.r
    delta = torch.zeros(B.shape[0], A.shape[1], dtype=torch.float64)
    for i in range(g.numel()):
        delta += g[i] * torch.outer(B[:, i], A[i])
    return scale * delta


def aslora_reference(adapter) -> torch.Tensor:
    """A of the module's role and B of its tie-set, found from the saved metadata and the state_dict keys."""
    import re

    state = adapter.state
    meta = state.metadata()
    tensors = state.state_dict()
    role = re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", adapter.name)
    group_key = re.sub(r"[^0-9A-Za-z_]", "_", role.replace("*", "N"))
    (tie_key,) = [k for k, names in meta["ties"][role].items() if adapter.name in names]
    A = tensors[f"A_{group_key}"].double()  # (r, in)
    B = tensors[f"B_{tie_key}"].double()  # (out, r)
    config = state.config
    return (config.alpha / config.r) * B @ A


def tied_lora_reference(adapter) -> torch.Tensor:
    """ΔW = s · Σ_i u_i · (v ⊙ B[:, i]) a_iᵀ, one rank-one component at a time; A and B are the role's
    tensors, found by their state_dict key `A_<role with * -> N, other non-word characters -> _>`."""
    role = re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", adapter.name)
    key = re.sub(r"[^0-9A-Za-z_]", "_", role.replace("*", "N"))
    shared = adapter.state.state_dict()
    A, B = shared[f"A_{key}"].double(), shared[f"B_{key}"].double()  # (r, in), (out, r)
    own = adapter.state_dict()
    u, v = own["u"].double(), own["v"].double()  # (r,), (out,)
    config = adapter.state.config
    delta = torch.zeros(B.shape[0], A.shape[1], dtype=torch.float64)
    for i in range(u.numel()):
        delta += u[i] * torch.outer(v * B[:, i], A[i])
    return (config.alpha / config.r) * delta


def splitmix64_bases(seed: int, shape: tuple[int, int, int]) -> np.ndarray:
    """NOLA's bases by the documented rule, in numpy uint64 (wrapping) arithmetic: entry n (C order of `shape`)
    takes the top 24 bits u of splitmix64(seed, n) and becomes (2u + 1 − 2^24) · (1/√count) / 2^24, rounded once
    to float32, as float64."""
    n = np.arange(int(np.prod(shape)), dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (n + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    top = (z >> np.uint64(40)).astype(np.int64)
    step = np.float32(1.0 / math.sqrt(shape[0]) / 2**24)
    return ((2 * top + 1 - 2**24).astype(np.float32) * step).astype(np.float64).reshape(shape)


def nola_reference(adapter) -> torch.Tensor:
    """ΔW = s · (Σ_j β_j B_j)(Σ_i α_i A_i) with the bases made here by the documented rule: seed = first 8 bytes
    (little-endian, top bit cleared) of SHA-256("<seed>/<module name>/<A|B>"), entries from splitmix64
    (`splitmix64_bases`) of shape (k, r, in) / (l, out, r); summed in float64, one basis at a time."""
    config = adapter.state.config

    def bases(factor: str, shape: tuple[int, int, int]) -> torch.Tensor:
        digest = hashlib.sha256(f"{config.seed}/{adapter.name}/{factor}".encode()).digest()
        return torch.from_numpy(splitmix64_bases(int.from_bytes(digest[:8], "little") & (2**63 - 1), shape))

    coef_A, coef_B = adapter.coef_A.detach().double(), adapter.coef_B.detach().double()  # α (k,), β (l,)
    r, out_features, in_features = config.r, adapter.out_features, adapter.in_features
    bases_A = bases("A", (coef_A.numel(), r, in_features))
    bases_B = bases("B", (coef_B.numel(), out_features, r))
    A = sum(coef_A[i] * bases_A[i] for i in range(coef_A.numel()))  # (r, in)
    B = sum(coef_B[j] * bases_B[j] for j in range(coef_B.numel()))  # (out, r)
    return (config.alpha / config.r) * B @ A


def lora_stored(model) -> float:
    """Σ r·(in + out) over the targets."""
    state = model.vbshare
    return sum(state.config.r * (out + inp) for out, inp in state.targets.values())


def vblora_stored(model) -> float:
    """h·b + n_sub·(k−1) + n_sub·k·f, n_sub = Σ r·(in + out)/b, f = 1/4 for uint8 indices (h < 256)."""
    config = model.vbshare.config
    h, b, k, r = config.num_vectors, config.vector_length, config.topk, config.r
    assert h < 256, "this formula's index width assumes uint8 indices"
    n_sub = sum(r * (out + inp) // b for out, inp in model.vbshare.targets.values())
    return h * b + n_sub * (k - 1) + n_sub * k * 0.25


def aslora_stored(model) -> float:
    """One A (r, in) per role plus one B (out, r) per distinct tie-set, read from the saved metadata."""
    state = model.vbshare
    r, meta = state.config.r, state.metadata()
    total = 0
    for role, names in meta["groups"].items():
        out, inp = state.targets[names[0]]
        total += r * inp + len(meta["ties"][role]) * out * r
    return total


def sora_stored(model) -> float:
    """Σ r_kept·(in + out), r_kept = the module's non-zero gates (what pruning keeps)."""
    state = model.vbshare
    total = 0
    for name, module in model.named_modules():
        if name in state.targets and hasattr(module, "gate"):
            out, inp = state.targets[name]
            total += int(torch.count_nonzero(module.gate.detach())) * (out + inp)
    return total


def tied_lora_stored(model) -> float:
    """Per role r·in (trained A) + out·r (trained B); per layer r (trained u) + out (trained v)."""
    state = model.vbshare
    r, trained = state.config.r, set(state.config.train)
    roles: dict[str, tuple[int, int]] = {}
    total = 0
    for name, (out, inp) in state.targets.items():
        roles[re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", name)] = (out, inp)
        total += r * ("u" in trained) + out * ("v" in trained)
    for out, inp in roles.values():
        total += r * inp * ("A" in trained) + out * r * ("B" in trained)
    return total


def nola_stored(model) -> float:
    """k + l coefficients per module, whatever its shape and r."""
    config = model.vbshare.config
    k = config.num_basis_a
    l = config.num_basis_b if config.num_basis_b is not None else k
    return len(model.vbshare.targets) * (k + l)


def vera_reference(adapter) -> torch.Tensor:
    """Draw the shared projections again from the seed (U(−√(6/fan_in), √(6/fan_in)), A (r, max_in) first, then
    B (max_out, r), one CPU generator), slice them to the module and sum the rank-one terms
    λ_d[i] · (λ_b ⊙ B[:out, i]) A[i, :in] one by one (docs/methods.md §5)."""
    config = adapter.state.config
    max_out = max(shape[0] for shape in adapter.state.targets.values())
    max_in = max(shape[1] for shape in adapter.state.targets.values())
    generator = torch.Generator().manual_seed(config.projection_seed)
    A = torch.empty(config.r, max_in).uniform_(-(6 / max_in) ** 0.5, (6 / max_in) ** 0.5, generator=generator)
    B = torch.empty(max_out, config.r).uniform_(-(6 / config.r) ** 0.5, (6 / config.r) ** 0.5, generator=generator)
    A, B = A.double()[:, : adapter.in_features], B.double()[: adapter.out_features]  # (r, in), (out, r)
    lambda_d, lambda_b = adapter.lambda_d.detach().double(), adapter.lambda_b.detach().double()  # (r,), (out,)
    delta = torch.zeros(adapter.out_features, adapter.in_features, dtype=torch.float64)
    for i in range(config.r):
        delta += lambda_d[i] * torch.outer(lambda_b * B[:, i], A[i])
    return delta


def unilora_reference(adapter) -> torch.Tensor:
    """Count, over every module's index maps, how many factor entries read each θ entry (checking the balance
    ⌊D/d⌋ / ⌈D/d⌉), then fill A and B entry by entry with θ[idx] / √count (docs/methods.md §8)."""
    state = adapter.state
    d = state.config.theta_d_length
    every_index = [int(i) for a in state.adapters().values() for m in (a.indices_A, a.indices_B) for i in m.reshape(-1)]
    uses = Counter(every_index)
    total = len(every_index)
    assert set(uses.values()) <= {total // d, -(-total // d)}, "the index assignment is not balanced"
    theta = state.theta.detach().double()

    def fill(indices: torch.Tensor) -> torch.Tensor:
        rows = [[theta[int(k)] / uses[int(k)] ** 0.5 for k in row] for row in indices]
        return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)

    A, B = fill(adapter.indices_A), fill(adapter.indices_B)  # (r, in), (out, r)
    return B @ A


def vera_stored(model) -> float:
    """Σ (out + r) over modules: λ_b and λ_d; the projections are rebuilt from the seed (save_projection off)."""
    state = model.vbshare
    assert not state.config.save_projection, "this formula counts the projections as rebuilt, not saved"
    return sum(out + state.config.r for out, _ in state.targets.values())


def unilora_stored(model) -> float:
    """d: the one trained vector θ; the indices and scales are rebuilt from proj_seed (save_indices off)."""
    config = model.vbshare.config
    assert not config.save_indices, "this formula counts the indices as rebuilt, not saved"
    return config.theta_d_length


def loraxs_reference(adapter) -> torch.Tensor:
    """ΔW = (α/r)·U_r R Σ_r V_rᵀ (docs/methods.md §13) from a numpy float64 SVD of the base weight read directly
    (a Conv1D's stored (in, out) weight transposed to (out, in)), each singular pair signed so that u_i's
    largest-magnitude entry (the first on a tie) is positive, summed one term R[i, k]·σ_k·u_i v_kᵀ at a time."""
    config = adapter.state.config
    weight = adapter.base_layer.weight.detach().double().numpy()
    weight = weight.T if adapter.fan_in_fan_out else weight  # (out, in)
    U, S, Vt = np.linalg.svd(weight, full_matrices=False)
    for i in range(config.r):
        if U[np.argmax(np.abs(U[:, i])), i] < 0:
            U[:, i], Vt[i] = -U[:, i], -Vt[i]
    R = adapter.R.detach().double().numpy()  # (r, r)
    delta = np.zeros_like(weight)
    for i in range(config.r):
        for k in range(config.r):
            delta += R[i, k] * S[k] * np.outer(U[:, i], Vt[k])
    return torch.from_numpy((config.alpha / config.r) * delta)


def mos_reference(adapter) -> torch.Tensor:
    """Rebuild the module's index tables by the documented rule (docs/methods.md §14) and its A and B shard by
    shard: the module is number i of the L targets of its role; the first P = (e−p)·L·l pool rows are public and
    rows P + [i·p·l, (i+1)·p·l) its private ones; each factor's table is the (r−p)·l public rows with the
    smallest keys SHA-256("<seed>/<name>/<A|B>/<row>")[:8] (little-endian, top bit cleared), then the private
    rows; rank vector j concatenates the rows at table positions j·l … j·l+l−1. ΔW = (α/r)·B A."""
    state, config = adapter.state, adapter.state.config
    role_of = lambda name: re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", name)
    role = role_of(adapter.name)
    names = [n for n in state.targets if role_of(n) == role]
    i, L = names.index(adapter.name), len(names)
    r, e, p, l = config.r, config.equivalent_rank, config.private_rank, config.shards_per_vector
    public = (e - p) * L * l

    def key(row: int, factor: str) -> int:
        digest = hashlib.sha256(f"{config.seed}/{adapter.name}/{factor}/{row}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & (2**63 - 1)

    def table(factor: str) -> list[int]:
        chosen = sorted(range(public), key=lambda row: key(row, factor))[: (r - p) * l]
        return chosen + list(range(public + i * p * l, public + (i + 1) * p * l))

    tensors = state.state_dict()
    group = re.sub(r"[^0-9A-Za-z_]", "_", role.replace("*", "N"))
    pool_A, pool_B = tensors[f"pool_A_{group}"].double(), tensors[f"pool_B_{group}"].double()  # (N, in/l), (N, out/l)
    d_in, d_out = pool_A.shape[1], pool_B.shape[1]
    idx_A, idx_B = table("A"), table("B")
    A = torch.zeros(r, adapter.in_features, dtype=torch.float64)
    B = torch.zeros(adapter.out_features, r, dtype=torch.float64)
    for j in range(r):
        for t in range(l):
            A[j, t * d_in:(t + 1) * d_in] = pool_A[idx_A[j * l + t]]
            B[t * d_out:(t + 1) * d_out, j] = pool_B[idx_B[j * l + t]]
    return (config.alpha / r) * B @ A


def loraxs_stored(model) -> float:
    """Σ r² over modules: only R; the SVD factors are recomputed from the base (save_factors off)."""
    state = model.vbshare
    assert not state.config.save_factors, "this formula counts the factors as recomputed, not saved"
    return len(state.targets) * state.config.r ** 2


def mos_stored(model) -> float:
    """e · Σ (in + out): the pools, which hold the parameters of a rank-e LoRA; the index tables come from the seed."""
    state = model.vbshare
    return state.config.equivalent_rank * sum(out + inp for out, inp in state.targets.values())


def randlora_reference(adapter) -> torch.Tensor:
    """Draw the shared bases again by the documented rule (one CPU generator seeded with projection_seed; bfloat16
    U(±gain·√(3/fan_in)) with gain √(2/(1+5)): A (r, 1, d_g) with fan_in d_g first, then n_g slabs (D_g, 1, r) with
    fan_in r; each of A and B divided by its own bf16 std), then sum M = Σ_{j<r, i<n} λ[j, i] · b_{j·n+i} (a_j ⊙ γ_i)ᵀ
    term by term, b_p = basis_B[:D, p // r, p % r], a_j = A[j, :d]; ΔW = (α/r)·M, transposed when in > out
    (docs/methods.md §10)."""
    config = adapter.state.config
    r = config.r
    max_out = max(shape[0] for shape in adapter.state.targets.values())
    max_in = max(shape[1] for shape in adapter.state.targets.values())
    d_g, D_g = min(max_out, max_in), max(max_out, max_in)
    n_g = math.ceil(d_g / r)
    generator = torch.Generator().manual_seed(config.projection_seed)

    def uniform(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
        bound = math.sqrt(2.0 / 6.0) * math.sqrt(3.0 / fan_in)
        return torch.empty(shape, dtype=torch.bfloat16).uniform_(-bound, bound, generator=generator)

    A = uniform((r, 1, d_g), d_g)
    B = torch.cat([uniform((D_g, 1, r), r) for _ in range(n_g)], dim=1)  # (D_g, n_g, r)
    A, B = (A / A.std()).double()[:, 0], (B / B.std()).double()  # (r, d_g), (D_g, n_g, r)
    d, D = min(adapter.in_features, adapter.out_features), max(adapter.in_features, adapter.out_features)
    n = math.ceil(d / r)
    lambdas, gammas = adapter.lambdas.detach().double(), adapter.gammas.detach().double()  # (r, n), (n, d)
    M = torch.zeros(D, d, dtype=torch.float64)
    for j in range(r):
        for i in range(n):
            p = j * n + i
            M += lambdas[j, i] * torch.outer(B[:D, p // r, p % r], A[j, :d] * gammas[i])
    delta = M if adapter.in_features <= adapter.out_features else M.T  # (out, in)
    return (config.alpha / r) * delta


def randlora_stored(model) -> float:
    """Σ n·(r + d) over modules, d = min(in, out), n = ⌈d / r⌉ (lambdas and gammas); the bases come from the
    seed."""
    state = model.vbshare
    assert not state.config.save_projection, "this formula counts the bases as rebuilt, not saved"
    r = state.config.r
    return sum(math.ceil(min(shape) / r) * (r + min(shape)) for shape in state.targets.values())


def pvera_reference(adapter) -> torch.Tensor:
    """The deterministic (mean) path, docs/methods.md §11: draw the shared projections again from the seed
    (U(−√(6/fan_in), √(6/fan_in)), A (2r, max_in) first, then B (max_out, r), one CPU generator), keep A's first r
    rows (the mean half) and sum λ_d[i] · (λ_b ⊙ B[:out, i]) A[i, :in] over i < r one term at a time."""
    config = adapter.state.config
    r = config.r
    max_out = max(shape[0] for shape in adapter.state.targets.values())
    max_in = max(shape[1] for shape in adapter.state.targets.values())
    generator = torch.Generator().manual_seed(config.projection_seed)
    A = torch.empty(2 * r, max_in).uniform_(-(6 / max_in) ** 0.5, (6 / max_in) ** 0.5, generator=generator)
    B = torch.empty(max_out, r).uniform_(-(6 / r) ** 0.5, (6 / r) ** 0.5, generator=generator)
    A, B = A.double()[:, : adapter.in_features], B.double()[: adapter.out_features]  # (2r, in), (out, r)
    lambda_d, lambda_b = adapter.lambda_d.detach().double(), adapter.lambda_b.detach().double()  # (2r,), (out,)
    delta = torch.zeros(adapter.out_features, adapter.in_features, dtype=torch.float64)
    for i in range(r):
        delta += lambda_d[i] * torch.outer(lambda_b * B[:, i], A[i])
    return delta


def pvera_stored(model) -> float:
    """Σ (out + 2r) over modules: λ_b and λ_d (mean and log-variance halves); projections rebuilt from the seed."""
    state = model.vbshare
    assert not state.config.save_projection, "this formula counts the projections as rebuilt, not saved"
    return sum(out + 2 * state.config.r for out, _ in state.targets.values())


def tinylora_groups(count: int, weight_tying: float) -> list[int]:
    """docs/methods.md §12: G = max(1, round(L(1 − t))) groups of max(1, ⌊L/G⌋) modules, the rest in the last."""
    groups = max(1, round(count * (1 - weight_tying)))
    size = max(1, count // groups)
    return [min(i // size, groups - 1) for i in range(count)]


def tinylora_reference(adapter) -> torch.Tensor:
    """ΔW = Σ_t v_t · U_r Σ^½ P_t Σ^½ V_rᵀ (docs/methods.md §12), from a numpy float64 SVD of the base weight read
    directly (signs: u_i's largest-magnitude entry positive), P_t of module i redrawn as randn·(1/√r) from seed
    projection_seed + i, v the module's group row of the state's `vectors`, summed one term v_t P_t[j,k] at a time."""
    state, config = adapter.state, adapter.state.config
    r, u = config.r, config.u
    names = list(state.targets)
    i = names.index(adapter.name)
    v = state.state_dict()["vectors"].double()[tinylora_groups(len(names), config.weight_tying)[i]]  # (u,)
    generator = torch.Generator().manual_seed(config.projection_seed + i)
    P = (torch.randn(u, r, r, generator=generator) / math.sqrt(r)).double().numpy()  # (u, r, r)
    weight = adapter.base_layer.weight.detach().double().numpy()
    weight = weight.T if adapter.fan_in_fan_out else weight  # (out, in)
    U, S, Vt = np.linalg.svd(weight, full_matrices=False)
    for j in range(r):
        if U[np.argmax(np.abs(U[:, j])), j] < 0:
            U[:, j], Vt[j] = -U[:, j], -Vt[j]
    delta = np.zeros_like(weight)
    for t in range(u):
        for j in range(r):
            for k in range(r):
                delta += float(v[t]) * P[t, j, k] * math.sqrt(S[j] * S[k]) * np.outer(U[:, j], Vt[k])
    return torch.from_numpy(delta)


def tinylora_stored(model) -> float:
    """G · u: the tied vectors only; P comes from the seed and the SVD factors from the base (both not saved)."""
    state = model.vbshare
    config = state.config
    assert not (config.save_projection or config.save_factors), "this formula counts P and the factors as rebuilt"
    return (max(tinylora_groups(len(state.targets), config.weight_tying)) + 1) * config.u


CASES: dict[str, Case] = {
    "lora": Case("lora", {"r": 4, "alpha": 8}, lora_reference, lora_stored),
    "vblora": Case("vblora", {"r": 2, "num_vectors": 16, "vector_length": 8, "topk": 2}, vblora_reference,
                   vblora_stored),
    # merge_start=1, merge_every=1: every group of 2 layers ties its pair at step 1, so each check sees ties
    "aslora": Case("aslora", {"r": 4, "alpha": 8, "merge_start": 1, "merge_every": 1}, aslora_reference,
                   aslora_stored),
    # lam small: τ = lr·λ = 1e-4 per step, so 3 steps at lr 1e-2 train the adapter without pruning it away
    "sora": Case("sora", {"r": 4, "alpha": 8, "lam": 0.01}, sora_reference, sora_stored),
    # every factor trained (the default): B starts at 0, so training steps are what make ΔW non-zero
    "tied_lora": Case("tied_lora", {"r": 4, "alpha": 8}, tied_lora_reference, tied_lora_stored),
    # k != l so a swap of the two coefficient vectors or basis sets cannot go unnoticed
    "nola": Case("nola", {"r": 4, "alpha": 8, "num_basis_a": 16, "num_basis_b": 12}, nola_reference, nola_stored),
        # unequal target shapes in both models, so every module reads its own slice of the shared projections;
    # d_initial 1: the matrix loss (mean square of a LayerNorm output) gives λ_b gradients near Adam's eps at 0.1
    "vera": Case("vera", {"r": 8, "projection_seed": 3, "d_initial": 1.0}, vera_reference,
                 vera_stored),
    # D = Σ r(in + out) is not a multiple of d (each θ entry read once or twice), so the balanced assignment's
    # extra reads are exercised; the wider init moves BERT's LayerNorm'd output measurably in 3 steps
    "unilora": Case("unilora", {"r": 2, "theta_d_length": 1000, "proj_seed": 5, "init_theta_d_bound": 0.1},
                    unilora_reference, unilora_stored),
    # the tiny models' random weights have singular values ~0.3, so ΔW = s·U R Σ Vᵀ moves slowly: a large α
    "loraxs": Case("loraxs", {"r": 4, "alpha": 64}, loraxs_reference, loraxs_stored),
    # r = e with one private rank: the TwoLinear roles (one module each) can still fill r; the 2-layer models' modules
    # each draw 3·2 of their role's 12 public shards, A and B independently
    "mos": Case("mos", {"r": 4, "equivalent_rank": 4, "private_rank": 1, "shards_per_vector": 2, "seed": 3},
                mos_reference, mos_stored),
    # r = 5 does not divide d = 32, so n = 7 bases overshoot it; the targets' shapes differ in both orientations and
    # stay below the shared bases' (d_g, D_g), so every module reads its own slice
    "randlora": Case("randlora", {"r": 5, "alpha": 100, "projection_seed": 3}, randlora_reference, randlora_stored),
    # the mean path against a float64 reference; training (3 steps) samples the latent, so the checks see trained λ's
    # of both halves; d_initial 1 as for VeRA (λ_b's gradients are near Adam's eps at 0.1)
    "pvera": Case("pvera", {"r": 8, "projection_seed": 3, "d_initial": 1.0}, pvera_reference, pvera_stored),
    # weight_tying 0.5: the 10 (BERT) / 6 (GPT-2) targets share 5 / 3 vectors, pairs of modules reading one row; the
    # tiny models' singular values (~0.3) and s = 1 make 3 steps from v = 0 move too little: v starts U(−1, 1)
    "tinylora": Case("tinylora", {"r": 4, "u": 8, "weight_tying": 0.5, "projection_seed": 7, "init_v_bound": 1.0},
                     tinylora_reference,
                     tinylora_stored),
}


# -- bad configurations of the cases above (a new Case may pass bad_configs= directly) -------------------------------
BAD_CONFIGS: dict[str, list[tuple[dict, str]]] = {
    "lora": [({"r": 0}, r"r must be a positive integer, got 0"),
             ({"alpha": -1.0}, r"alpha must be positive \(a finite number > 0\) or None, got -1.0")],
    "vblora": [({"topk": 0}, r"topk must be a positive integer, got 0"),
               ({"num_vectors": 1}, r"topk=2 exceeds num_vectors=1; choose topk <= num_vectors"),
               ({"vector_length": 5}, r"vector_length=5 does not divide module .*e\.g\. vector_length=4")],
    "aslora": [({"pairs": "nearest"}, r"pairs must be one of adjacent, all, got 'nearest'"),
               ({"share_ratio": 2.0}, r"share_ratio must be in \[0, 1\] or None, got 2.0")],
    "sora": [({"lam": -1.0}, r"lam must be a finite number >= 0, got -1.0"),
             ({"r": 0}, r"r must be a positive integer")],
    "tied_lora": [({"train": []}, "at least one"), ({"train": ["A", "C"]}, "train must name"),
                  ({"train": ["u", "u"]}, "at most once"), ({"train": "uv"}, "must be a list"),
                  ({"alpha": 0}, "alpha must be positive"), ({"r": 0}, "r must be a positive integer")],
    "nola": [({"num_basis_a": 0}, "num_basis_a must be a positive integer"),
             ({"num_basis_b": 2.5}, "num_basis_b must be a positive integer"),
             ({"cache_bases": "yes"}, "cache_bases must be true or false"),
             ({"chunk_size": 0}, "chunk_size must be a positive integer or null"), ({"alpha": -1.0}, "alpha must be positive"),
             ({"seed": "x"}, "seed must be an integer"), ({"bases": 4}, "unknown nola hyperparameter")],
    "vera": [({"d_initial": "big"}, "d_initial must be a finite number"),
             ({"projection_seed": -1}, "projection_seed must be a non-negative integer"),
             ({"save_projection": "yes"}, "save_projection must be true or false"),
             ({"r": 0}, "r must be a positive integer")],
    "unilora": [({"theta_d_length": 0}, "theta_d_length must be a positive integer"),
                ({"init_theta_d_bound": 0.0}, "init_theta_d_bound must be a positive number"),
                ({"proj_seed": -3}, "proj_seed must be a non-negative integer"),
                ({"save_indices": 1}, "save_indices must be true or false")],
    "loraxs": [({"r": 40}, r"loraxs r=40 exceeds min\(in, out\) = 32 of module .*choose r <= 32"),
               ({"alpha": 0}, r"alpha must be a positive number, got 0")],
    "mos": [({"equivalent_rank": 0}, r"equivalent_rank must be a positive integer, got 0"),
            ({"shards_per_vector": 3}, r"shards_per_vector=3 does not divide module .*e\.g\. shards_per_vector=2")],
    "randlora": [({"alpha": 0}, r"alpha must be a positive number, got 0"),
                 ({"bases": "dense2"}, r"bases must be one of dense, sparse, very_sparse, got 'dense2'"),
                 ({"projection_seed": -1}, r"projection_seed must be an integer >= 0, got -1"),
                 ({"save_projection": "yes"}, r"save_projection must be true or false, got 'yes'")],
    "pvera": [({"kl_weight": -1.0}, r"kl_weight must be a non-negative number, got -1.0"),
              ({"sample_seed": "x"}, r"sample_seed must be a non-negative integer, got 'x'"),
              ({"sample_at_inference": "yes"}, r"sample_at_inference must be true or false, got 'yes'")],
    "tinylora": [({"u": 0}, r"u must be a positive integer, got 0"),
                 ({"weight_tying": 1.5}, r"weight_tying must be a number in \[0, 1\]"),
                 ({"r": 40}, r"tinylora r=40 exceeds min\(in, out\) = 32 of module .*choose r <= 32"),
                 ({"init_v_bound": -1.0}, r"init_v_bound must be a non-negative number, got -1.0")],
}
for _name, _bad in BAD_CONFIGS.items():
    CASES[_name].bad_configs = [*CASES[_name].bad_configs, *_bad]
