"""The contract every adapter follows.

Two small classes make up a method:

* `AdapterState` — one per adapted model, attached as `model.vbshare`. It holds the method's config, the
  targeted shapes, every tensor that modules *share* (VB-LoRA's bank, ASLoRA's A), and the model-wide hooks.
  Because the model owns it once, a shared tensor appears once in `named_parameters()`, `state_dict()` and a
  checkpoint.
* `LowRankAdapter` — wraps one base linear layer. A subclass says only how to build its factors
  (A: (r, in), B: (out, r), scale s); the forward pass `base(x) + s·B(A(dropout(x)))`, ΔW, merge/unmerge,
  disabling, the stored-parameter count and the optimiser roles all follow from that, once, here.

The factors are always composed with autocast switched off (`composed_factors`), so a method's composition
(VB-LoRA's top-k / softmax / mix, any method's products of its pieces) runs in the parameters' dtype, fp32 for
an fp32 model under bf16 / fp16 autocast; only the two low-rank products with x follow the autocast dtype.

Also here, because every layer above needs them and they need nothing but the contract: where a model keeps
its state (`STATE_ATTR`), `state_of(model)` and `adapters(model)`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import integer, number
from ..errors import VBShareError
from ..quantization import dequantized_weight, plain_linear, quantization_of
from ..targets import linear_shape

STATE_ATTR = "vbshare"  # the attribute of an adapted model that holds its `AdapterState`


# -- seeded frozen tensors (methods whose fixed random tensors are rebuilt from a seed, never stored) ---------
def derived_seed(seed: int, *parts: str) -> int:
    """A 63-bit generator seed from `seed` and names, the same in every process (SHA-256, not Python's hash)."""
    text = "/".join([str(seed), *parts]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & (2**63 - 1)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off for the block where it is on; nothing otherwise (torch knows no autocast for the meta
    device, on which a model built without weights is planned)."""
    if device_type != "meta" and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def check_alpha(alpha: Any) -> None:
    """alpha, for the scale s = alpha / r: a finite number > 0, or None (alpha = r, so s = 1)."""
    number("alpha", alpha, 0, low_open=True, null=True, allowed="positive (a finite number > 0) or None")


@dataclass
class AdapterConfig:
    """Hyperparameters shared by every method. Subclasses add their own fields (with defaults)."""

    r: int = 8
    dropout: float = 0.0

    def validate(self) -> None:
        """Every hyperparameter's type and range, one VBShareError line for the first bad one (subclasses
        call this first, then check their own fields)."""
        integer("r", self.r, low=1)
        number("dropout", self.dropout, 0, 1, high_open=True, allowed="in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], method: str) -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise VBShareError(
                f"unknown {method} hyperparameter(s) {', '.join(unknown)}; valid ones are: {', '.join(sorted(known))}"
            )
        config = cls(**values)
        config.validate()
        return config


class AdapterState(nn.Module):
    """Model-wide state of one injected method (attached as `model.vbshare`).

    Attributes:
        method: the method's registry name.
        config: its `AdapterConfig`.
        targets: adapted module name -> (out_features, in_features) of its base layer.
        inference_only: set when weights came from a lossy stored form (VB-LoRA top-k); training then refuses.
        head_modules: modules loaded together with the adapter (a task head); saving the adapter again keeps them.
    """

    roles: ClassVar[dict[str, str]] = {}  # local parameter name -> optimiser role, for shared tensors
    decay_free_roles: ClassVar[frozenset[str]] = frozenset()
    # True when `pack(..., topk_only=True)` has a meaning: a compact, lossy, inference-only stored form.
    topk_form: ClassVar[bool] = False
    # Extra adapter folders a training run writes beside `adapter/`: folder name -> keyword arguments of
    # `vbshare.save_adapter` (VB-LoRA: {"adapter_topk": {"topk_only": True}}, its compact inference form).
    extra_saves: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, method: str, config: AdapterConfig, targets: dict[str, tuple[int, int]]):
        super().__init__()
        self.method = method
        self.config = config
        self.targets = dict(targets)
        self.inference_only = False
        self.head_modules: list[str] = []
        object.__setattr__(self, "_adapters", {})  # name -> adapter, owned by the model, so not registered here

    # -- bookkeeping ------------------------------------------------------------------------------------------
    def register(self, name: str, adapter: "LowRankAdapter") -> None:
        self._adapters[name] = adapter

    def adapters(self) -> dict[str, "LowRankAdapter"]:
        return dict(self._adapters)

    # -- forward-pass bracket (called by hooks that `vbshare.inject` registers on the root model) ---------------
    def begin_forward(self) -> None:
        """Called before every forward pass of the adapted (root) model; a state that caches per-pass work
        (VB-LoRA's composed factors) starts a new pass here. Default: nothing."""

    def end_forward(self) -> None:
        """Called after every forward pass of the root model (also when it raised). Default: nothing."""

    # -- hooks (the training loop calls these once per step, through vbshare.extra_loss / vbshare.after_step) --
    def extra_loss(self) -> Tensor | None:
        """Sum of the modules' extra loss terms, or None when no module has one."""
        terms = [t for t in (a.extra_loss() for a in self._adapters.values()) if t is not None]
        return torch.stack(terms).sum() if terms else None

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Called right after every `optimizer.step()`; `step` counts completed steps from 1."""
        for adapter in self._adapters.values():
            adapter.after_step(optimizer, step)

    # -- what a training run records about the method (the training app calls these; no method names there) ---
    def sharing_pattern(self) -> dict[str, Any] | None:
        """A compact JSON-able record of what the method shares or keeps (docs/methods.md §4), written into a
        run's summary (SoRA: retained rank per module; ASLoRA: number of merges). Default: None."""
        return None

    def run_records(self) -> dict[str, list[dict[str, Any]]]:
        """The method's own records of a finished training: record name -> rows (ASLoRA: {"merge_history": one
        row per merge}); where and how they are written is the caller's (the training app: `<run>/<name>.jsonl`).
        Default: none."""
        return {}

    def sparsifier(self, model: nn.Module, schedule: dict[str, Any]) -> Callable[..., list[dict[str, Any]]]:
        """The method's sparsifying scheduler (the training app's `trainer.sparsify`), bound to `model` and a
        schedule it validates now: `run(train_steps, evaluate, out=None, on_stage=None) -> stage records` (`out`:
        a JSON-lines file the caller chooses for the records, rewritten after every stage).
        It raises the method's sparsity knob stage by stage, asking `train_steps(n_steps, knob)` to continue
        training and `evaluate(split)` for scores ("train": a fixed training subset, "eval": held-out data).
        Only a method with such a knob has one (SoRA: λ); by default this raises."""
        raise VBShareError(f"{self.method} has no sparsity knob: only methods with a sparsity knob support "
                           "trainer.sparsify; drop trainer.sparsify or pick such a method")

    # -- storage ---------------------------------------------------------------------------------------------
    def saved_form(self, model: nn.Module) -> nn.Module:
        """The model whose adapter `save_adapter` writes: by default the model itself; a method whose stored
        form is another method's (SoRA -> its pruned LoRA) returns a converted copy, leaving `model` as it is."""
        return model

    def stored_parameters(self, topk_only: bool = True) -> float:
        """Parameters of the shared tensors (counted once); modules count their own."""
        return sum(p.numel() for p in self.parameters(recurse=False))

    def metadata(self) -> dict[str, Any]:
        """JSON-able state saved with the adapter (e.g. ASLoRA's tie-sets); restored before tensors load."""
        return {}

    def load_metadata(self, metadata: dict[str, Any]) -> None:
        pass

    def pack(self, tensors: dict[str, Tensor], topk_only: bool = False) -> dict[str, Tensor]:
        """Turn adapter tensors (model state_dict keys) into the form written to disk."""
        if topk_only:
            raise VBShareError(f"{self.method} adapters have no top-k stored form; drop topk_only=True")
        return tensors

    def unpack(self, tensors: dict[str, Tensor], topk_only: bool = False) -> dict[str, Tensor]:
        """Inverse of `pack`: tensors read from disk -> model state_dict keys."""
        return tensors


class LowRankAdapter(nn.Module):
    """One adapted linear layer: y = base(x) + s · B (A (dropout(x))).

    Subclasses set `config_class`, optionally `state_class`, `roles` (local parameter name -> optimiser
    role) and implement `factors()`. Shapes: x (..., in) -> y (..., out); A (r, in); B (out, r).
    """

    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    state_class: ClassVar[type[AdapterState]] = AdapterState
    roles: ClassVar[dict[str, str]] = {}
    decay_free_roles: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, base_layer: nn.Module, name: str, config: AdapterConfig, state: AdapterState):
        super().__init__()
        self.base_layer = base_layer
        self.name = name
        self.out_features, self.in_features, self.fan_in_fan_out = linear_shape(base_layer)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        object.__setattr__(self, "_state", state)  # owned by the model (model.vbshare), not by this module
        state.register(name, self)

    @property
    def state(self) -> AdapterState:
        return self._state

    # -- what a subclass provides ------------------------------------------------------------------------------
    def factors(self) -> tuple[Tensor, Tensor, float]:
        """(A (r, in), B (out, r), scale s) as used in the forward pass."""
        raise NotImplementedError

    def low_rank_forward(self, x: Tensor) -> Tensor | None:
        """The adapter's output s · B (A x) for an input x (..., in) -> (..., out), computed the method's own way
        when that is cheaper than forming A and B (e.g. scaling activations by trained vectors instead of scaling
        whole factors); None (the default) uses `factors()`. It must equal x ΔWᵀ: ΔW, merging and export keep
        coming from `factors()`."""
        return None

    def extra_loss(self) -> Tensor | None:
        """An extra term added to the training loss (e.g. an L1 penalty), or None."""
        return None

    def after_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Called after every optimiser step (e.g. a proximal update)."""

    def stored_parameters(self, topk_only: bool = True) -> float:
        """Parameters this module adds to a checkpoint (shared tensors are counted by the state)."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("base_layer."))

    def base_weight(self) -> Tensor:
        """The frozen base weight as a plain (out, in) tensor, whatever the layer stores: a transformers Conv1D's
        (in, out) weight transposed. For methods whose init reads the base (an SVD of W, say). It is a view of
        the stored weight where one exists: do not write into it (merge does that, through `_add_to_base`).
        A weight on the meta device stays on it (planning without weights). A quantized base (bitsandbytes
        4-bit / 8-bit) gives a new dequantized tensor, in the dtype it computes with (`dequantized_weight`)."""
        if quantization_of(self.base_layer):
            return dequantized_weight(self.base_layer)  # (out, in)
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight  # (out, in)

    @property
    def rank(self) -> int:
        with torch.no_grad():
            return self.composed_factors()[0].shape[0]

    # -- derived once for every method -------------------------------------------------------------------------
    def composed_factors(self) -> tuple[Tensor, Tensor, float]:
        """`factors()` computed with autocast off, so the composition runs in the parameters' dtype."""
        with autocast_off(self.base_layer.weight.device.type):
            return self.factors()

    def delta_weight(self) -> Tensor:
        """ΔW = s · B A, shape (out, in) — always the nn.Linear orientation, whatever the base layer stores."""
        A, B, scale = self.composed_factors()
        return (B @ A) * scale

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)  # (..., out)
        if self.disabled or self.merged:
            return result
        x = self.dropout(x)
        own = self.low_rank_forward(x)
        if own is not None:
            return result + own.to(result.dtype)
        A, B, scale = self.composed_factors()
        h = F.linear(x.to(A.dtype), A)  # (..., r)
        if h.dtype == result.dtype and result.is_contiguous():
            # one GEMM computes result + s·h Bᵀ (no separate scale, add or cast kernels)
            out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), B.t(), alpha=scale)
            return out.view(result.shape)
        return result + (F.linear(h, B) * scale).to(result.dtype)

    @torch.no_grad()
    def merge(self, dequantize: bool = False) -> None:
        """Add ΔW into the base weight in place; a second call does nothing. A quantized base takes ΔW only
        with `dequantize=True`, which first replaces it by a plain Linear holding its dequantized weight
        (`dequantize_base`); re-quantizing W + ΔW would lose most of ΔW, so that is never done."""
        if self.merged:
            return
        quantization = quantization_of(self.base_layer)
        if quantization and not dequantize:
            raise VBShareError(f"{self.name}'s base weight is {quantization}-quantized and cannot take ΔW (re-quantizing "
                               "would lose most of it); merge with dequantize=True (vbshare.merge(model, "
                               "dequantize=True)), which replaces it by a plain Linear holding W + ΔW")
        if quantization:
            self.dequantize_base()
        self._add_to_base(self.delta_weight(), sign=1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW back out of the base weight; does nothing when not merged."""
        if not self.merged:
            return
        self._add_to_base(self.delta_weight(), sign=-1.0)
        self.merged = False

    def dequantize_base(self) -> None:
        """Replace a quantized base layer by a frozen `nn.Linear` holding its dequantized weight and bias (what a
        dequantized merge writes into); a plain base stays as it is."""
        if quantization_of(self.base_layer):
            self.base_layer = plain_linear(self.base_layer)

    def _add_to_base(self, delta: Tensor, sign: float) -> None:
        weight = self.base_layer.weight
        delta = delta.T if self.fan_in_fan_out else delta  # Conv1D stores (in, out)
        weight.add_(delta.to(device=weight.device, dtype=weight.dtype), alpha=sign)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, in={self.in_features}, out={self.out_features}, merged={self.merged}"


# -- where a model keeps its adapters ---------------------------------------------------------------------------
def state_of(model: nn.Module, required: bool = True) -> AdapterState | None:
    """The model's `AdapterState`, or None / an error when nothing was injected."""
    state = getattr(model, STATE_ATTR, None)
    if state is None and required:
        raise VBShareError("this model has no vbshare adapters; call vbshare.inject(model, method, targets=...) first")
    return state


def adapters(model: nn.Module) -> dict[str, LowRankAdapter]:
    """Adapted module name -> its `LowRankAdapter`, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankAdapter)}
