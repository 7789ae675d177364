"""Model-level operations: inject adapters, merge, disable, run hooks, build optimiser groups, and name the
tensors an adapter consists of (in training form and in its stored form).

Everything here works through `model.vbshare` (the method's `AdapterState`) and the `LowRankAdapter`
modules that `inject` puts in place of the targeted layers; methods are found in `vbshare.registry`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .adapters.base import STATE_ATTR, AdapterState, LowRankAdapter, adapters, state_of
from .errors import VBShareError
from .quantization import quantization_of
from .registry import get_method
from .targets import find_targets, linear_shape


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
        method: a key of `vbshare.METHODS` (the methods registered in `vbshare.registry`).
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
    check_rank(config.r, shapes)

    trained = [param for param in model.parameters() if param.requires_grad]
    replaced: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attribute, base layer): undone on failure
    device = next(iter(modules[names[0]].parameters())).device
    try:
        for param in trained:
            param.requires_grad_(False)
        with planning(device):
            state = adapter_class.state_class(method, config, shapes)
        state.target_spec = {"targets": targets, "exclude": exclude, "layers": None if layers is None else list(
            [layers] if isinstance(layers, int) else layers)}
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            with planning(device):
                adapter = adapter_class(modules[name], name, config, state)
            setattr(parent, child, adapter.train(modules[name].training))  # keep the base layer's train/eval mode
            replaced.append((parent, child, modules[name]))
        state = state.to(device)
    except BaseException as err:
        for parent, child, base_layer in replaced:  # the model as it was
            setattr(parent, child, base_layer)
        for param in trained:
            param.requires_grad_(True)
        if not out_of_memory(err):
            raise
        raise VBShareError(f"{method} adapters with {config.to_dict()} do not fit in memory "
                           f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                           "choose smaller hyperparameters (e.g. a lower r) or fewer targets") from None
    model.add_module(STATE_ATTR, state)
    model.register_forward_pre_hook(_begin_forward)
    model.register_forward_hook(_end_forward, always_call=True)
    return model


def planning(device: torch.device) -> contextlib.AbstractContextManager:
    """Where the adapters' own tensors are made: a base on the meta device (a model built without weights, e.g.
    under `accelerate.init_empty_weights`, to plan) makes every tensor a method creates without naming a device
    a meta tensor too, so planning a 70B materialises nothing; any other base changes nothing."""
    return torch.device("meta") if device.type == "meta" else contextlib.nullcontext()


def out_of_memory(err: BaseException) -> bool:
    """An allocation that failed: MemoryError, torch.OutOfMemoryError (a GPU), or the CPU allocator's
    RuntimeError ("DefaultCPUAllocator: not enough memory: you tried to allocate ...")."""
    text = str(err).lower()
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and (
        "out of memory" in text or "not enough memory" in text or "can't allocate" in text
        or "you tried to allocate" in text))


def check_rank(r: int, shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse, before anything is allocated, a rank no target could use: above the largest target's out × in
    (the entries of its ΔW), a factorisation expresses nothing more whatever the method, and only allocates.
    `shapes`: target name -> (out_features, in_features)."""
    name, (out_features, in_features) = max(shapes.items(), key=lambda item: item[1][0] * item[1][1])
    if r > out_features * in_features:
        raise VBShareError(f"r={r} is larger than any target can use: the largest, {name} (out={out_features}, "
                           f"in={in_features}), has {out_features * in_features} weights; choose r <= "
                           f"{out_features * in_features}")


def merge(model: nn.Module, dequantize: bool = False) -> None:
    """Fold every adapter's ΔW into its base weight (idempotent). A quantized base is refused unless
    `dequantize=True`, which replaces each quantized base layer by a plain Linear holding W + ΔW (its memory
    grows to the dequantized dtype's; `unmerge` then takes ΔW back out of that plain weight)."""
    layers = adapters(model).values()
    if not dequantize:
        quantized = [a for a in layers if quantization_of(a.base_layer)]
        if quantized:  # refuse before any layer has merged
            quantized[0].merge()
    for adapter in layers:
        adapter.merge(dequantize=dequantize)


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


# -- the tensors an adapter consists of ------------------------------------------------------------------------
def _is_adapter_key(key: str, names: Iterable[str]) -> bool:
    if ".base_layer." in key or key.startswith("base_layer."):
        return False
    return key.startswith(STATE_ATTR + ".") or any(key.startswith(name + ".") for name in names)


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's adapter tensors only (parameters and persistent buffers), base layers left out."""
    names = list(adapters(model))
    return {k: v for k, v in model.state_dict().items() if _is_adapter_key(k, names)}


def stored_tensors(model: nn.Module, topk_only: bool = False, stored_form: bool = True) -> dict[str, Tensor]:
    """The tensors an adapter file holds: the method's stored form (`AdapterState.saved_form`, e.g. SoRA pruned
    to a LoRA) packed by its state (`topk_only`: VB-LoRA's top-k form). Keys are model state_dict keys."""
    if stored_form:
        model = state_of(model).saved_form(model)
    return state_of(model).pack(adapter_state_dict(model), topk_only=topk_only)


def check_adapter_tensors(model: nn.Module, tensors: dict[str, Tensor], source: str) -> None:
    """Refuse, in one line, adapter tensors (model state_dict keys) that are not exactly the model's adapter
    tensors: a key missing or unexpected, a shape that differs, or an integer tensor (indices) given as floats
    or the other way round."""
    expected = adapter_state_dict(model)
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or unexpected:
        raise VBShareError(
            f"{source} does not fit this model's adapters (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); check it was saved from the same method and targets"
        )
    for key, ours in expected.items():
        theirs = tensors[key]
        if tuple(theirs.shape) != tuple(ours.shape):
            raise VBShareError(
                f"{source}: tensor {key} has shape {tuple(theirs.shape)} but this model's adapter needs "
                f"{tuple(ours.shape)}; it was saved with other hyperparameters or targets, load it with the "
                "settings and base model it was trained with"
            )
        if theirs.is_floating_point() != ours.is_floating_point():
            raise VBShareError(
                f"{source}: tensor {key} is {theirs.dtype} but this model's adapter keeps it as {ours.dtype}; "
                "the file was not written for this adapter, save it again"
            )


def load_adapter_tensors(model: nn.Module, tensors: dict[str, Tensor], source: str) -> None:
    """Load adapter tensors (model state_dict keys) after `check_adapter_tensors` found them exactly the adapter's."""
    check_adapter_tensors(model, tensors, source)
    model.load_state_dict(tensors, strict=False)


def remove_adapters(model: nn.Module) -> nn.Module:
    """Undo `inject` (in place): every adapter gives its base layer back (merged ΔW taken out first), the
    state and the forward hooks go. The base's parameters stay frozen as inject left them (`injected_or_undone`
    restores what trained before)."""
    for name, adapter in adapters(model).items():
        adapter.unmerge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, adapter.base_layer)
    if STATE_ATTR in model._modules:
        del model._modules[STATE_ATTR]
    # the two hooks inject registered, found by identity (torch keeps no handle lookup by function)
    for hooks, ours in ((model._forward_pre_hooks, _begin_forward), (model._forward_hooks, _end_forward)):
        for key in [k for k, hook in hooks.items() if hook is ours]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)
    return model


@contextlib.contextmanager
def injected_or_undone(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block a plain model may be injected and loaded; when the block raises, the injection is
    undone, so a refused load leaves the base model as it found it. A model with adapters already is left to
    the block (nothing to undo)."""
    fresh = state_of(model, required=False) is None
    trainable = [p.requires_grad for p in model.parameters()] if fresh else []
    try:
        yield model
    except BaseException:
        if fresh and state_of(model, required=False) is not None:
            remove_adapters(model)
            for param, flag in zip(model.parameters(), trainable):
                param.requires_grad_(flag)
        raise


def freeze_adapter(model: nn.Module) -> None:
    """Stop gradients to every adapter tensor (a lossy top-k load serves inference only)."""
    names = list(adapters(model))
    for key, param in model.named_parameters():
        if _is_adapter_key(key, names):
            param.requires_grad_(False)


def module_tensors(model: nn.Module, modules: Sequence[str]) -> dict[str, Tensor]:
    """Every tensor of the named submodules, under their model state_dict keys; a one-line error for a bad name."""
    tensors: dict[str, Tensor] = {}
    for name in modules:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise VBShareError(f"cannot save module {name!r}: the model has no such submodule") from None
        tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return tensors


def check_module_tensors(model: nn.Module, modules: Sequence[str], tensors: dict[str, Tensor], source: str) -> None:
    """Refuse, in one line, tensors saved beside an adapter (a task head; model state_dict keys) that are not
    exactly the named modules' tensors (`module_tensors`): a module the model lacks, a tensor matching no
    tensor of those modules, one left out, or another shape."""
    for name in modules:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise VBShareError(f"{source} carries head module {name!r}, which this model does not have; load it "
                               "into the base model it was trained on") from None
    expected = module_tensors(model, modules)
    unexpected, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
    if unexpected:
        raise VBShareError(f"{source} holds {unexpected[0]}, which is no tensor of the head modules "
                           f"{list(modules)}; the file does not belong to this adapter, save it again")
    if missing:
        raise VBShareError(f"{source} lacks {missing[0]} of head module {missing[0].rpartition('.')[0]!r}; the file "
                           "is incomplete, save the adapter again")
    for key, ours in expected.items():
        theirs = tuple(tensors[key].shape)
        if theirs != tuple(ours.shape):
            labels = (f" (a classifier: num_labels={theirs[0]} instead of {ours.shape[0]})"
                      if theirs and theirs[1:] == tuple(ours.shape[1:]) else "")
            raise VBShareError(
                f"head tensor {key} in {source} has shape {theirs} but this model's is {tuple(ours.shape)}; build "
                f"the base with the head the adapter was trained with{labels}"
            )


def head_modules(model: nn.Module) -> list[str]:
    """Modules a saved adapter must carry beside its own tensors to reproduce the model (a task head).

    Those owning trainable parameters outside the adapters, plus those loaded with the adapter
    (`AdapterState.head_modules`), in model order; a module inside another listed one is left out. A trainable
    parameter directly on the root model cannot be saved that way and raises.
    """
    owners = set(state_of(model).head_modules)
    for name, role in parameter_roles(model).items():
        if role == "head":
            owner = name.rpartition(".")[0]
            if not owner:
                raise VBShareError(
                    f"trainable parameter {name!r} sits on the model itself, not in a submodule; freeze it or pass "
                    "modules=[...] naming the modules to save"
                )
            owners.add(owner)
    ordered = [name for name, _ in model.named_modules() if name in owners]
    return [n for n in ordered if not any(n.startswith(outer + ".") for outer in ordered)]
