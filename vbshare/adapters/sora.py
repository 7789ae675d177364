"""SoRA (Ding et al., EMNLP 2023) — a LoRA whose rank is gated and pruned by a proximal step. docs/methods.md §2.

    Δh = s · B (g ⊙ (A x)),   A (r_max, in) ~ kaiming_uniform(a=√5),  B (out, r_max) = 0,  g (r_max),
    s = α / r_max.

The gate g is folded into the factors (`factors()` returns A, B·diag(g), s), so forward, ΔW, merge and
disabling come from the `LowRankAdapter` contract. After every optimiser step the gate is soft-thresholded
(`soft_threshold`): τ = η_t · λ (`threshold="lr_lambda"`, the paper; η_t is the lr of the gate's param group)
or τ = λ read as a constant ξ (`threshold="constant"`, the official code's mode). Gates that reach zero drop
their rank-one component; `prune` then turns the model into a plain LoRA with per-module ranks.

All of SoRA lives in this file, top to bottom: the proximal operator, the adapter, pruning to a LoRA, and the
sparsifying scheduler (`vbshare.sora` is the short public name of the last two):

    vbshare.inject(model, "sora", targets=["query", "value"], r=8, lam=0.1)
    records = sparsify(model, train_steps, evaluate, SparsifySchedule(schedule="linear", num_stages=4, max=2.0,
                       dense_steps=200, stage_steps=100), out="runs/sora_stages.jsonl")
    vbshare.prune(model)  # now a LoRA with per-module ranks: save_adapter / export_peft / summary as LoRA

`train_steps(n_steps, lam)` and `evaluate(split)` are the caller's: the scheduler only sets λ on the model, asks
for steps, and reads back the gates and the metrics. The training app runs it after its own (dense) training
through the contract's `sparsifier` hook (`trainer.sparsify`), which writes the records to `<run>/sora_stages.jsonl`.
"""
from __future__ import annotations

import copy
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..errors import VBShareError
from ..files import atomic_write
from ..records import read_jsonl
from .base import STATE_ATTR, AdapterConfig, AdapterState, LowRankAdapter, adapters, check_alpha, state_of
from .lora import LoRA, LoRAConfig

THRESHOLDS = ("lr_lambda", "constant")
GATE_INITS = ("ones", "normal")
SCHEDULES = ("linear", "log", "exp")


# -- the proximal operator: standalone, usable with any torch optimiser -----------------------------------------
def soft_threshold(g: Tensor, tau: float | Tensor) -> Tensor:
    """prox of τ‖·‖₁: sign(g) · max(|g| − τ, 0), computed out of place (no 2τ bug: |g| ∈ (τ, 2τ) is shrunk, kept)."""
    return torch.sign(g) * torch.clamp(g.abs() - tau, min=0.0)


def param_lr(optimizer: torch.optim.Optimizer, param: Tensor) -> float | None:
    """The learning rate of the optimiser param group holding `param` (None when it is in none)."""
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            lr = group["lr"]
            return float(lr.item() if isinstance(lr, Tensor) else lr)
    return None


@torch.no_grad()
def proximal_step_(
    params: Iterable[Tensor],
    optimizer: torch.optim.Optimizer | None,
    lam: float,
    threshold: str = "lr_lambda",
) -> None:
    """Soft-threshold each tensor in place, right after `optimizer.step()` (and before any lr scheduler step).

    threshold="lr_lambda": τ = lr · lam, the lr of the param group that holds the tensor;
    threshold="constant": τ = lam (the optimiser is not consulted).
    """
    if threshold not in THRESHOLDS:
        raise VBShareError(f"threshold must be one of {', '.join(THRESHOLDS)}, got {threshold!r}")
    if lam == 0:
        return
    for param in params:
        if threshold == "constant":
            tau = lam
        else:
            if optimizer is None:
                raise VBShareError("threshold='lr_lambda' needs the optimiser to read the gate's learning rate")
            lr = param_lr(optimizer, param)
            if lr is None:
                if not param.requires_grad:
                    continue  # a frozen gate is not being trained: leave it
                raise VBShareError(
                    "a SoRA gate is not in any param group of this optimiser; build the optimiser from "
                    "vbshare.param_groups(model, ...) so the gates get their own 'gate' group"
                )
            tau = lr * lam
        param.copy_(soft_threshold(param, tau))


# -- config, state, module --------------------------------------------------------------------------------------
@dataclass
class SoRAConfig(AdapterConfig):
    r: int = 8  # r_max
    alpha: float | None = None  # None -> alpha = r, so s = 1
    gate_init: str = "normal"  # "normal" (N(0, 1), the official code) | "ones" (every gate equal: prunes all-or-nothing)
    threshold: str = "lr_lambda"  # τ = lr·lam ("lr_lambda", the paper) | τ = lam ("constant", official code's ξ)
    lam: float = 0.1  # λ (lr_lambda) or ξ (constant); the sparsifying scheduler raises it stage by stage
    l1: float = 0.0  # optional extra loss l1 · mean|g| per module
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_alpha(self.alpha)
        if self.gate_init not in GATE_INITS:
            raise VBShareError(f"gate_init must be one of {', '.join(GATE_INITS)}, got {self.gate_init!r}")
        if self.threshold not in THRESHOLDS:
            raise VBShareError(f"threshold must be one of {', '.join(THRESHOLDS)}, got {self.threshold!r}")
        for key in ("lam", "l1"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
                raise VBShareError(f"{key} must be a finite number >= 0, got {value!r}")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.r) / self.r


class SoRAState(AdapterState):
    """Applies the proximal step to every gate after each optimiser step; saves the pruned (LoRA) form."""

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        gates = [a.gate for a in self._adapters.values()]
        proximal_step_(gates, optimizer, self.config.lam, self.config.threshold)

    def sharing_pattern(self) -> dict[str, Any]:
        ranks = {name: 0 for name in self.targets}
        ranks.update({name: adapter.retained_rank for name, adapter in self._adapters.items()})
        return {"retained_rank": sum(ranks.values()), "retained_ranks": ranks}  # in all, and per module

    def saved_form(self, model: nn.Module) -> nn.Module:
        """A pruned copy (plain LoRA with per-module ranks); the model itself is left as it is.

        Frozen tensors (the base weights) are shared with the copy rather than duplicated: pruning only
        replaces modules and never writes into a base weight.
        """
        frozen = [t for t in (*model.parameters(), *model.buffers()) if not t.requires_grad]
        return prune(copy.deepcopy(model, memo={id(t): t for t in frozen}))

    def sparsifier(self, model: nn.Module, schedule: Mapping[str, Any]) -> Callable[..., list[dict[str, Any]]]:
        """The sparsifying scheduler bound to `model` and a validated `SparsifySchedule(**schedule)`:
        `run(train_steps, evaluate, out=None, on_stage=None)` runs `sparsify`, writing the records to the JSON-lines
        file `out` when given (the training app chooses it)."""
        known = set(SparsifySchedule.__dataclass_fields__)
        unknown = sorted(set(schedule) - known)
        if unknown:
            raise VBShareError(f"unknown sparsifying-schedule key(s) {', '.join(unknown)}; valid ones are: "
                               f"{', '.join(sorted(known))}")
        plan = SparsifySchedule(**schedule)
        plan.validate()

        def run(train_steps: Callable[[int, float], Any], evaluate: Callable[[str], Any],
                out: str | os.PathLike | None = None,
                on_stage: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
            return sparsify(model, train_steps, evaluate, plan, out=out, on_stage=on_stage)

        return run


class SoRA(LowRankAdapter):
    config_class = SoRAConfig
    state_class = SoRAState
    roles = {"lora_A": "A", "lora_B": "B", "gate": "gate"}
    decay_free_roles = frozenset({"gate"})

    def __init__(self, base_layer: nn.Module, name: str, config: SoRAConfig, state: SoRAState):
        super().__init__(base_layer, name, config, state)
        r = config.r
        device = base_layer.weight.device
        self.scale = config.scale
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))  # (out, r)
        self.gate = nn.Parameter(torch.ones(r, device=device))  # (r,)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if config.gate_init == "normal":
            nn.init.normal_(self.gate, 0.0, 1.0)

    def factors(self) -> tuple[Tensor, Tensor, float]:
        return self.lora_A, self.lora_B * self.gate, self.scale  # B·diag(g): (out, r) * (r,)

    def extra_loss(self) -> Tensor | None:
        l1 = self.state.config.l1
        return l1 * self.gate.abs().mean() if l1 else None

    def kept(self) -> Tensor:
        """Indices of the non-zero gates (the retained rank-one components)."""
        if self.gate.is_meta:  # planning without weights: no gate has been pruned yet
            return torch.arange(self.gate.numel(), device="meta")
        return torch.nonzero(self.gate.detach() != 0).flatten()

    @property
    def retained_rank(self) -> int:
        if self.gate.is_meta:  # planning without weights: no gate has been pruned yet
            return self.gate.numel()
        return int((self.gate.detach() != 0).sum())

    @property
    def rank(self) -> int:
        """The retained rank (what pruning keeps); r_max is `self.gate.numel()`."""
        return self.retained_rank

    def stored_parameters(self, topk_only: bool = True) -> float:
        """What saving stores: the pruned LoRA, r_kept · (in + out)."""
        return self.retained_rank * (self.in_features + self.out_features)


# -- pruning ------------------------------------------------------------------------------------------------
def retained_ranks(model: nn.Module) -> dict[str, int]:
    """Adapted module -> the rank it keeps (SoRA: non-zero gates; after pruning: the LoRA rank)."""
    state = state_of(model)
    ranks = {name: 0 for name in state.targets}
    ranks.update({name: adapter.rank for name, adapter in adapters(model).items()})
    return ranks


def retained_parameters(model: nn.Module) -> int:
    """Adapter parameters left after pruning: Σ r_kept · (in + out) over modules."""
    state = state_of(model)
    return sum(k * (state.targets[n][0] + state.targets[n][1]) for n, k in retained_ranks(model).items())


@torch.no_grad()
def prune(model: nn.Module) -> nn.Module:
    """Turn every SoRA module into a plain LoRA module of its retained rank (in place); returns the model.

    With S = {i : g_i ≠ 0}: A' = A[S, :], B' = B[:, S]·diag(g_S), and the scale stays s = α / r_max (stored as
    LoRA `rank_pattern` / `alpha_pattern`, alpha_k = s·k). Modules whose gates are all zero get their original
    base layer back. `model.vbshare` becomes a LoRA state, so save / load / export_peft / summary treat the
    model as LoRA. A model that is already LoRA is returned unchanged.
    """
    state = state_of(model)
    if state.method == "lora":
        return model
    if state.method != "sora":
        raise VBShareError(f"prune applies to sora adapters, not {state.method}")
    layers = adapters(model)
    kept = {name: a.kept() for name, a in layers.items()}
    ranks = {name: int(idx.numel()) for name, idx in kept.items() if idx.numel()}
    scale = state.config.scale
    top = max(ranks.values()) if ranks else state.config.r
    config = LoRAConfig(
        r=top, alpha=scale * top, rslora=False, dropout=state.config.dropout,
        rank_pattern={n: k for n, k in ranks.items() if k != top},
        alpha_pattern={n: scale * k for n, k in ranks.items() if k != top},
    )
    config.validate()
    new_state = AdapterState("lora", config, {n: state.targets[n] for n in ranks})
    new_state.target_spec = {"targets": list(ranks), "exclude": None, "layers": None}
    new_state.inference_only = state.inference_only
    if not ranks:
        warnings.warn("every SoRA gate is zero: prune restored the whole base model (no adapter is left)")

    for name, adapter in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if name not in ranks:
            adapter.unmerge()  # ΔW is zero here, but leave the base weight exactly as it was
            setattr(parent, child, adapter.base_layer)
            continue
        weight = adapter.base_layer.weight
        with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
            lora = LoRA(adapter.base_layer, name, config, new_state)  # its random init is replaced below
        idx = kept[name]
        A, B, gate = adapter.lora_A, adapter.lora_B, adapter.gate
        lora.lora_A = nn.Parameter(A.detach()[idx].clone(), requires_grad=A.requires_grad)  # (k, in)
        lora.lora_B = nn.Parameter((B.detach()[:, idx] * gate.detach()[idx]).clone(), requires_grad=B.requires_grad)
        lora.scale = adapter.scale  # exactly α / r_max (the config's s·k / k may differ by one rounding)
        lora.dropout = adapter.dropout
        lora.merged, lora.disabled = adapter.merged, adapter.disabled
        setattr(parent, child, lora.train(adapter.training))
    setattr(model, STATE_ATTR, new_state)
    return model


def set_lambda(model: nn.Module, lam: float) -> None:
    """Set SoRA's λ (or ξ with threshold="constant") used by the following proximal steps."""
    state = state_of(model)
    if state.method != "sora":
        raise VBShareError(f"set_lambda applies to sora adapters, not {state.method}")
    if lam < 0 or not math.isfinite(lam):
        raise VBShareError(f"lambda must be a finite number >= 0, got {lam!r}")
    state.config.lam = float(lam)


# -- the sparsifying scheduler --------------------------------------------------------------------------------
@dataclass
class SparsifySchedule:
    """A dense stage (λ = 0) of `dense_steps`, then `num_stages` stages of `stage_steps` with λ rising to `max`.

    dense_steps = 0: the model was already trained densely (the training app's `trainer.max_steps`); stage 0
    then records it as it is, at the λ it trained with (the adapter's `lam`), and trains nothing.
    Stage i = 1..n:  linear: max·i/n;  log: max·ln(1+i)/ln(1+n) (rises fast, then flattens);
    exp: geometric from `min` (default max/100) to max, min·(max/min)^((i−1)/(n−1)).
    """

    schedule: str = "linear"
    num_stages: int = 4
    max: float = 1.0
    min: float | None = None
    dense_steps: int = 100
    stage_steps: int = 100

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise VBShareError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for key in ("num_stages", "stage_steps"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise VBShareError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if not isinstance(self.dense_steps, int) or self.dense_steps < 0:
            raise VBShareError(f"dense_steps must be an integer >= 0, got {self.dense_steps!r}")
        if not self.max > 0 or not math.isfinite(self.max):
            raise VBShareError(f"max must be a finite number > 0, got {self.max!r}")
        if self.min is not None and not 0 < self.min <= self.max:
            raise VBShareError(f"min must be in (0, max], got {self.min!r}")

    def values(self) -> list[float]:
        """λ of stages 1..num_stages (the dense stage 0 has λ = 0)."""
        self.validate()
        n = self.num_stages
        if self.schedule == "linear":
            return [self.max * i / n for i in range(1, n + 1)]
        if self.schedule == "log":
            return [self.max * math.log1p(i) / math.log1p(n) for i in range(1, n + 1)]
        low = self.min if self.min is not None else self.max / 100
        if n == 1:
            return [self.max]
        return [low * (self.max / low) ** ((i - 1) / (n - 1)) for i in range(1, n + 1)]


def _relative(value: Any, dense: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _relative(v, dense.get(k) if isinstance(dense, Mapping) else None) for k, v in value.items()}
    if value is None or dense is None or dense == 0:
        return None
    return float(value) / float(dense)


def sparsify(
    model: nn.Module,
    train_steps: Callable[[int, float], Any],
    evaluate: Callable[[str], float | Mapping[str, float]],
    schedule: SparsifySchedule | Mapping[str, Any] | None = None,
    out: str | os.PathLike | None = None,
    splits: tuple[str, str] = ("train", "eval"),
    on_stage: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the dense stage and the rising-λ stages, recording each; returns the records (also JSONL in `out`).

    Args:
        train_steps: `train_steps(n_steps, lam)` continues training the model for n optimiser steps (calling
            vbshare.after_step after each); λ is already set on the model, `lam` is passed for logging.
        evaluate: `evaluate(split)` -> a metric (higher = better), or a dict of them; called with
            splits[0] (a FIXED training subset: "memorisation") and splits[1] (the eval set: "generalisation").
        out: JSONL file, one record per stage, rewritten (atomically) after every stage with the records so far.
        on_stage: called with each record as soon as its stage is done (e.g. to log it or snapshot the gates).
    Each record: stage, lam, threshold, knob (what lam is: `lambda`, or `xi` with threshold=constant), steps,
    total_steps, ranks {module: r_kept}, r_max, retained_rank, nonzero_params (Σ r_kept·(in+out)), param_fraction
    (of the dense stage's), memorisation, generalisation and their *_rel (ratio to the dense stage).
    """
    if not isinstance(schedule, SparsifySchedule):
        schedule = SparsifySchedule(**(schedule or {}))
    lams = schedule.values()
    state = state_of(model)
    if state.method != "sora":
        raise VBShareError(f"sparsify drives sora adapters, not {state.method}")
    path = Path(out) if out is not None else None
    records: list[dict[str, Any]] = []
    total = 0
    dense_lam = 0.0 if schedule.dense_steps else state.config.lam  # 0 steps: the dense training happened before
    stages = [(0, dense_lam, schedule.dense_steps)] + [(i, lam, schedule.stage_steps) for i, lam in enumerate(lams, 1)]
    for stage, lam, steps in stages:
        set_lambda(model, lam)
        if steps:
            train_steps(steps, lam)
        total += steps
        was_training = model.training
        memorisation, generalisation = evaluate(splits[0]), evaluate(splits[1])
        model.train(was_training)
        ranks = retained_ranks(model)
        params = retained_parameters(model)
        dense = records[0] if records else None
        record = {
            "stage": stage,
            "kind": "dense" if stage == 0 else "sparse",
            "schedule": schedule.schedule,
            "lam": lam,
            "threshold": state.config.threshold,
            "knob": "xi" if state.config.threshold == "constant" else "lambda",  # what `lam` is, for reports
            "steps": steps,
            "total_steps": total,
            "ranks": ranks,
            "r_max": state.config.r,
            "retained_rank": sum(ranks.values()),
            "nonzero_params": params,
            "param_fraction": params / dense["nonzero_params"] if dense and dense["nonzero_params"] else 1.0,
            "memorisation": memorisation,
            "generalisation": generalisation,
            "memorisation_rel": _relative(memorisation, dense["memorisation"] if dense else memorisation),
            "generalisation_rel": _relative(generalisation, dense["generalisation"] if dense else generalisation),
        }
        records.append(record)
        if path is not None:
            atomic_write(path, "".join(json.dumps(r) + "\n" for r in records).encode())
        if on_stage is not None:
            on_stage(record)
    return records


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The stage records of a `sparsify` JSONL file (e.g. for a notebook)."""
    return read_jsonl(path)
