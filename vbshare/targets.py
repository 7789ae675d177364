"""Finding the layers to adapt: which modules are linear, how to name their role and layer index.

A *target* is an `nn.Linear` or a transformers `Conv1D` (GPT-2 style, weight stored as (in, out)).
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

from torch import nn

from .errors import VBShareError

# Classifier / LM heads that "all-linear" leaves alone (their width is the task's, not the model's).
HEAD_NAMES = {"lm_head", "classifier", "score", "qa_outputs"}


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' `Conv1D` (a linear layer with its weight stored transposed)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(out_features, in_features, fan_in_fan_out) of a linear layer; fan_in_fan_out means weight is (in, out)."""
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return out_features, in_features, True
    return module.out_features, module.in_features, False


def module_role(name: str) -> str:
    """The module's path with every layer index replaced by `*`: `encoder.layer.*.attention.self.query`."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", name)


def role_key(role: str) -> str:
    """A parameter-name-safe key of a role: `encoder.layer.*.attention.self.query` -> `encoder_layer_N_attention_self_query`."""
    return re.sub(r"[^0-9A-Za-z_]", "_", role.replace("*", "N"))


def layer_index(name: str) -> int | None:
    """The first numeric path component (the transformer block index), or None."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def _matches(name: str, spec: str | Sequence[str]) -> bool:
    """A list of suffixes matches a name equal to, or ending in `.` + suffix; a string is a full regex."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _head_names(model: nn.Module) -> set[str]:
    heads = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in HEAD_NAMES}
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if out_emb is not None:
        heads |= {n for n, m in model.named_modules() if m is out_emb}
    return heads


def describe_linear_modules(model: nn.Module, limit: int = 12) -> str:
    """Comma-separated roles of the linear modules a model has (for error messages)."""
    roles: list[str] = []
    for name, module in model.named_modules():
        if is_linear(module) and ".base_layer" not in name:
            role = module_role(name)
            if role not in roles:
                roles.append(role)
    shown = ", ".join(roles[:limit]) + (f", … ({len(roles) - limit} more)" if len(roles) > limit else "")
    return shown or "none"


def find_targets(
    model: nn.Module,
    targets: str | Sequence[str],
    exclude: str | Sequence[str] | None = None,
    layers: int | Iterable[int] | None = None,
) -> list[str]:
    """Names of the linear modules selected by `targets`, minus `exclude`, kept to `layers` if given.

    targets: list of module-name suffixes (`["query", "value"]`), a regex matched against the whole
    name, or `"all-linear"` (every linear layer except classifier / LM heads).
    """
    if isinstance(targets, str) and targets == "all-linear":
        heads = _head_names(model)
        selector = lambda n: n not in heads  # noqa: E731
    else:
        if not targets:
            raise VBShareError("targets is empty: give module-name suffixes, a regex, or 'all-linear'")
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as err:
                raise VBShareError(f"targets regex {targets!r} does not compile ({err}); fix the pattern") from None
        selector = lambda n: _matches(n, targets)  # noqa: E731
    if isinstance(layers, int):
        layers = [layers]
    keep_layers = None if layers is None else set(layers)

    names = []
    for name, module in model.named_modules():
        if not name or not is_linear(module) or not selector(name):
            continue
        if exclude and _matches(name, exclude):
            continue
        if keep_layers is not None and layer_index(name) not in keep_layers:
            continue
        names.append(name)
    if not names:
        what = f"targets={targets!r}" + (f", exclude={exclude!r}" if exclude else "")
        what += f", layers={sorted(keep_layers)!r}" if keep_layers is not None else ""
        raise VBShareError(
            f"no linear module matched {what}; this model's linear modules are: {describe_linear_modules(model)}"
        )
    return names
