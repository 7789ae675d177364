"""What every PEFT type module shares: PEFT's key layout, one name table per method used both ways, and the
record of a type (`PeftType`).

A PEFT folder holds `adapter_config.json` and `adapter_model.safetensors`. Tensors of an adapted module are
stored under `base_model.model.<module name>.<PEFT's local name>`, tensors PEFT keeps once for the whole model
(VB-LoRA's bank, VeRA's projections, Uni-LoRA's θ) under `base_model.<name>`. vbshare keeps the former on the
adapted module and the latter on `model.vbshare` (`STATE_ATTR`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor, nn

from ..adapters.base import STATE_ATTR
from ..errors import VBShareError

PEFT_PREFIX = "base_model.model."  # before every module name in PEFT's keys

ExportFn = Callable[[nn.Module, bool], tuple[dict[str, Any], dict[str, Tensor]]]
ImportFn = Callable[[nn.Module, dict[str, Any], dict[str, Tensor]], nn.Module]


def strip_prefix(key: str) -> str:
    """`base_model.model.<rest>` -> `<rest>`; any other key is refused in one line."""
    if not key.startswith(PEFT_PREFIX):
        raise VBShareError(f"unexpected tensor {key} in the PEFT adapter (expected the {PEFT_PREFIX} prefix)")
    return key[len(PEFT_PREFIX):]


@dataclass(frozen=True)
class KeyTable:
    """One method's tensor names in vbshare and in PEFT; export reads it left to right, import right to left.

    Attributes:
        module: a module tensor's local name in vbshare -> in PEFT (`"lambda_d" -> "vera_lambda_d"`). A name
            may carry a tail that both sides keep (`logits_A_topk_indices` <-> `vblora_logits_A_topk_indices`).
        shared: a tensor on `model.vbshare` -> PEFT's whole key (`"projection_A" -> "base_model.vera_A"`).
        what: the method's name in error messages ("VeRA").
    """

    module: dict[str, str]
    shared: dict[str, str] = field(default_factory=dict)
    what: str = "adapter"

    def to_peft(self, key: str) -> str:
        """vbshare's state_dict key -> PEFT's."""
        if key.startswith(STATE_ATTR + "."):
            local = key[len(STATE_ATTR) + 1:]
            if local in self.shared:
                return self.shared[local]
        else:
            module, _, local = key.rpartition(".")
            for ours, theirs in self.module.items():
                if local.startswith(ours):
                    return f"{PEFT_PREFIX}{module}.{theirs}{local[len(ours):]}"
        raise VBShareError(f"tensor {key} has no counterpart in PEFT's {self.what}")

    def to_ours(self, key: str) -> str:
        """PEFT's key -> vbshare's state_dict key; a key the table does not know is refused in one line."""
        for local, theirs in self.shared.items():
            if key == theirs:
                return f"{STATE_ATTR}.{local}"
        rest = strip_prefix(key)
        for ours, theirs in self.module.items():
            at = rest.rfind("." + theirs)
            tail = rest[at + 1 + len(theirs):] if at >= 0 else ""
            if at >= 0 and "." not in tail:  # the name is the key's last part, up to a tail both sides keep
                return f"{rest[:at]}.{ours}{tail}"
        raise VBShareError(f"unexpected tensor {key} in the PEFT {self.what} adapter (a bias? an embedding "
                           "adapter? vbshare imports bias='none' adapters of linear layers)")

    def shared_in(self, ours: dict[str, Tensor]) -> list[str]:
        """The shared tensors a folder holds (renamed keys `ours`): all of them or none, else refused in one line."""
        saved = [local for local in self.shared if f"{STATE_ATTR}.{local}" in ours]
        if saved and len(saved) != len(self.shared):
            raise VBShareError(f"the PEFT {self.what} adapter holds only some of {', '.join(self.shared.values())}; "
                               "is it a complete save?")
        return saved

    def check_shared_shapes(self, ours: dict[str, Tensor], state: nn.Module, saved: list[str], r: int) -> None:
        """Refuse, in one line, a saved shared tensor whose shape differs from the one injected for these targets."""
        for local in saved:
            key, needed = f"{STATE_ATTR}.{local}", tuple(getattr(state, local).shape)
            if tuple(ours[key].shape) != needed:
                raise VBShareError(f"the PEFT {self.what} {local} has shape {tuple(ours[key].shape)}, but r={r} on these "
                                   f"targets needs {needed}; import into the base model the adapter was trained on")

    def modules_with(self, ours: dict[str, Tensor], local: str) -> list[str]:
        """The module names that hold the vbshare tensor `local` among already renamed keys, sorted."""
        return sorted(k.rpartition(".")[0] for k in ours if k.rpartition(".")[2] == local)


@dataclass(frozen=True)
class PeftType:
    """One PEFT adapter type: `export(model, topk_only)` -> (its config keys, tensors under PEFT's keys);
    `load(base, config, tensors)` injects and loads it into a plain base model (tensors: PEFT keys, head left out)."""

    peft_type: str
    export: ExportFn
    load: ImportFn
    required: tuple[str, ...] = ("r",)  # config keys an import cannot do without


def peft_pattern(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule: a pattern key matches a module name that ends with it at a dot boundary (regex allowed)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default
