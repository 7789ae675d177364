"""Model-level operations: inject adapters, merge, disable, run hooks, build optimiser groups, summarise.

Everything here works through `model.vbshare` (the method's `AdapterState`) and the `LowRankAdapter`
modules that `inject` puts in place of the targeted layers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .adapters import METHODS, AdapterState, LowRankAdapter
from .errors import VBShareError
from .targets import find_targets, linear_shape

STATE_ATTR = "vbshare"


def get_method(method: str) -> type[LowRankAdapter]:
    if method not in METHODS:
        raise VBShareError(f"unknown adapter method {method!r}; known methods are: {', '.join(sorted(METHODS))}")
    return METHODS[method]


def state_of(model: nn.Module, required: bool = True) -> AdapterState | None:
    """The model's `AdapterState`, or None / an error when nothing was injected."""
    state = getattr(model, STATE_ATTR, None)
    if state is None and required:
        raise VBShareError("this model has no vbshare adapters; call vbshare.inject(model, method, targets=...) first")
    return state


def adapters(model: nn.Module) -> dict[str, LowRankAdapter]:
    """Adapted module name -> its `LowRankAdapter`, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankAdapter)}


def _begin_forward(module: nn.Module, args: Any) -> None:
    """Forward pre-hook on the root model: tells its state a new forward pass starts (module-level, so a
    deep-copied or pickled model calls its own state)."""
    state = getattr(module, STATE_ATTR, None)
    if isinstance(state, AdapterState):
        state.begin_forward()


def _end_forward(module: nn.Module, args: Any, output: Any) -> None:
    state = getattr(module, STATE_ATTR, None)
    if isinstance(state, AdapterState):
        state.end_forward()


def inject(
    model: nn.Module,
    method: str,
    targets: str | Sequence[str] = "all-linear",
    exclude: str | Sequence[str] | None = None,
    layers: int | Iterable[int] | None = None,
    **hyperparameters: Any,
) -> nn.Module:
    """Replace the targeted linear layers of `model` (in place) with `method` adapters; freeze the base.

    Args:
        method: a key of `vbshare.adapters.METHODS` ("lora", "vblora", ...).
        targets: module-name suffixes, a regex matched against full names, or "all-linear".
        exclude: the same forms, removed from the match.
        layers: keep only modules whose first numeric path component is one of these layer indices.
        hyperparameters: the method's config fields (see its `*Config` dataclass).
    Returns the same model, for chaining.
    """
    adapter_class = get_method(method)
    if state_of(model, required=False) is not None:
        raise VBShareError(f"this model already has {state_of(model).method} adapters; inject into a fresh model")
    config = adapter_class.config_class.from_dict(hyperparameters, method)
    names = find_targets(model, targets, exclude=exclude, layers=layers)
    modules = dict(model.named_modules())
    shapes = {name: linear_shape(modules[name])[:2] for name in names}

    for param in model.parameters():
        param.requires_grad_(False)
    state = adapter_class.state_class(method, config, shapes)
    state.target_spec = {"targets": targets, "exclude": exclude, "layers": None if layers is None else list(
        [layers] if isinstance(layers, int) else layers)}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        adapter = adapter_class(modules[name], name, config, state)
        setattr(parent, child, adapter.train(modules[name].training))  # keep the base layer's train/eval mode
    device = next(iter(modules[names[0]].parameters())).device
    model.add_module(STATE_ATTR, state.to(device))
    model.register_forward_pre_hook(_begin_forward)
    model.register_forward_hook(_end_forward, always_call=True)
    return model


def merge(model: nn.Module) -> None:
    """Fold every adapter's ΔW into its base weight (idempotent)."""
    for adapter in adapters(model).values():
        adapter.merge()


def unmerge(model: nn.Module) -> None:
    """Take every merged ΔW back out of the base weights."""
    for adapter in adapters(model).values():
        adapter.unmerge()


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes the base model's outputs (merged adapters are taken out)."""
    layers = adapters(model).values()
    was_merged = [a.merged for a in layers]
    for adapter in layers:
        adapter.unmerge()
        adapter.disabled = True
    try:
        yield model
    finally:
        for adapter, merged in zip(layers, was_merged):
            adapter.disabled = False
            if merged:
                adapter.merge()


def extra_loss(model: nn.Module) -> Tensor | None:
    """The adapters' extra loss terms (e.g. SoRA's L1), summed; None when there are none."""
    return state_of(model).extra_loss()


def after_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Run the adapters' after-step hooks; call right after `optimizer.step()`, `step` counting from 1."""
    state_of(model).after_step(optimizer, step)


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """Trainable parameter name -> role. Adapter tensors get their method's roles; anything else is "head"."""
    roles: dict[str, str] = {}
    for module_name, module in model.named_modules():
        declared = module.roles if isinstance(module, (LowRankAdapter, AdapterState)) else {}
        for local, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                full = f"{module_name}.{local}" if module_name else local
                roles[full] = declared.get(local, "head")
    return roles


def param_groups(
    model: nn.Module,
    lr: float | Mapping[str, float],
    weight_decay: float | Mapping[str, float] = 0.0,
) -> list[dict[str, Any]]:
    """Optimiser parameter groups, one per role present (`A`, `B`, `bank`, `logits`, `gate`, `head`, ...).

    Args:
        lr: one learning rate for all, or {role: lr}; a "default" key covers roles not named.
        weight_decay: one value or {role: value}. A single value is NOT applied to the roles the method
            declares decay-free (VB-LoRA's bank and logits, SoRA's gates), which get 0.
    Each group carries "role" and "names" keys besides "params", "lr" and "weight_decay".
    """
    state = state_of(model)
    if state.inference_only:
        raise VBShareError(
            "this adapter was loaded from a top-k-only checkpoint, which cannot be trained; "
            "load the full checkpoint (saved with topk_only=False) to continue training"
        )
    decay_free = set(state.decay_free_roles) | {
        r for a in state.adapters().values() for r in a.decay_free_roles
    }
    named = dict(model.named_parameters())
    by_role: dict[str, list[str]] = {}
    for name, role in parameter_roles(model).items():
        by_role.setdefault(role, []).append(name)

    def pick(value: float | Mapping[str, float], role: str, what: str, default: float | None) -> float:
        if not isinstance(value, Mapping):
            return float(value)
        if role in value:
            return float(value[role])
        if "default" in value:
            return float(value["default"])
        if default is not None:
            return default
        raise VBShareError(
            f"no {what} given for parameter role {role!r}; give {what}={{'{role}': ...}} or a 'default' entry "
            f"(roles present: {', '.join(by_role)})"
        )

    groups = []
    for role, names in by_role.items():
        decay = 0.0 if role in decay_free and not isinstance(weight_decay, Mapping) else pick(
            weight_decay, role, "weight_decay", 0.0)
        groups.append({
            "params": [named[n] for n in names],
            "names": names,
            "role": role,
            "lr": pick(lr, role, "lr", None),
            "weight_decay": decay,
        })
    return groups


@dataclass
class AdapterSummary:
    """Parameter accounting of an adapted model (docs/methods.md §4).

    trainable: adapter parameters the optimiser updates. other_trainable: anything else trainable (a task
    head), reported apart. stored: parameters needed to rebuild the adapted model from the frozen base,
    shared tensors once, in the method's compact stored form (VB-LoRA: top-k). adapter_bytes: size of that
    adapter-only checkpoint on disk.
    """

    method: str
    trainable: int
    other_trainable: int
    stored: float
    adapter_bytes: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    def __str__(self) -> str:
        header = f"{'module':<56} {'shape (out, in)':>16} {'rank':>5} {'trainable':>11} {'stored':>12}"
        lines = [header, "-" * len(header)]
        for row in self.rows:
            shape = "" if row["shape"] is None else f"({row['shape'][0]}, {row['shape'][1]})"
            rank = "" if row["rank"] is None else str(row["rank"])
            lines.append(f"{row['module']:<56} {shape:>16} {rank:>5} {row['trainable']:>11,} {row['stored']:>12,.2f}")
        lines.append("-" * len(header))
        lines.append(
            f"{self.method}: trainable {self.trainable:,} | stored {self.stored:,.2f} | "
            f"adapter bytes {self.adapter_bytes:,} | other trainable (head) {self.other_trainable:,}"
        )
        return "\n".join(lines)


def summary(model: nn.Module, topk_only: bool = True) -> AdapterSummary:
    """Trainable and stored parameters, adapter bytes and a per-module table.

    topk_only: count VB-LoRA in its top-k stored form (docs/methods.md §1); False counts the full logits.
    """
    from .checkpoint import adapter_bytes  # local: checkpoint imports this module

    state = state_of(model)
    compact = topk_only and state.method == "vblora"
    roles = parameter_roles(model)
    named = dict(model.named_parameters())
    rows = []
    shared = state.stored_parameters(topk_only)
    shared_trainable = sum(p.numel() for p in state.parameters() if p.requires_grad)
    if shared:
        rows.append({"module": "(shared)", "shape": None, "rank": None, "trainable": shared_trainable,
                     "stored": float(shared)})
    for name, adapter in adapters(model).items():
        own = [p for n, p in adapter.named_parameters() if not n.startswith("base_layer.")]
        rows.append({
            "module": name,
            "shape": (adapter.out_features, adapter.in_features),
            "rank": adapter.rank,
            "trainable": sum(p.numel() for p in own if p.requires_grad),
            "stored": float(adapter.stored_parameters(topk_only)),
        })
    return AdapterSummary(
        method=state.method,
        trainable=sum(named[n].numel() for n, r in roles.items() if r != "head"),
        other_trainable=sum(named[n].numel() for n, r in roles.items() if r == "head"),
        stored=sum(row["stored"] for row in rows),
        adapter_bytes=adapter_bytes(model, topk_only=compact),
        rows=rows,
    )
