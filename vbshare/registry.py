"""The one list of adapter methods, by name, and the checks a method must pass to join it.

Adding a method to vbshare = its module under `vbshare/adapters/` plus ONE `register(...)` line below. A method
from outside the package joins the same way at run time: `vbshare.register_method("mine", MyAdapter)`.
Everything above this module (inject, checkpoints, summaries, PEFT export, the training app) finds methods here
and works through the contract in `vbshare/adapters/base.py`, never by a method's name.
"""
from __future__ import annotations

import dataclasses
import re

from .adapters.aslora import ASLoRA
from .adapters.base import AdapterConfig, AdapterState, LowRankAdapter
from .adapters.lora import LoRA
from .adapters.loraxs import LoRAXS
from .adapters.mos import MoS
from .adapters.nola import NOLA
from .adapters.randlora import RandLoRA
from .adapters.pvera import PVeRA
from .adapters.sora import SoRA
from .adapters.tinylora import TinyLoRA
from .adapters.tied_lora import TiedLoRA
from .adapters.unilora import UniLoRA
from .adapters.vblora import VBLoRA
from .adapters.vera import VeRA
from .errors import VBShareError

METHODS: dict[str, type[LowRankAdapter]] = {}  # name -> adapter class, in registration order
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def register(name: str, adapter_class: type[LowRankAdapter]) -> type[LowRankAdapter]:
    """Add `adapter_class` to METHODS under `name` after checking it follows the contract; returns the class.

    Checked: the name is a lowercase identifier not taken by another class; the class subclasses
    `LowRankAdapter` and implements `factors()`; its `config_class` is an `AdapterConfig` dataclass whose
    defaults construct and validate; its `state_class` subclasses `AdapterState`; its roles map names to names.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise VBShareError(f"method name {name!r} must be a lowercase identifier such as 'my_lora'")
    if not (isinstance(adapter_class, type) and issubclass(adapter_class, LowRankAdapter)):
        raise VBShareError(f"method {name!r}: {adapter_class!r} is not a subclass of vbshare.LowRankAdapter")
    if METHODS.get(name, adapter_class) is not adapter_class:
        raise VBShareError(f"method name {name!r} is already taken by {METHODS[name].__name__}; choose another name")
    if adapter_class.factors is LowRankAdapter.factors:
        raise VBShareError(f"method {name!r}: {adapter_class.__name__} must implement factors() -> (A, B, scale)")
    config_class = adapter_class.config_class
    if not (dataclasses.is_dataclass(config_class) and issubclass(config_class, AdapterConfig)):
        raise VBShareError(f"method {name!r}: config_class must be an AdapterConfig dataclass, got {config_class!r}")
    try:
        config_class().validate()
    except (TypeError, VBShareError) as err:
        raise VBShareError(f"method {name!r}: {config_class.__name__}() must build from defaults alone ({err})") from None
    if not (isinstance(adapter_class.state_class, type) and issubclass(adapter_class.state_class, AdapterState)):
        raise VBShareError(f"method {name!r}: state_class must subclass AdapterState, got {adapter_class.state_class!r}")
    for owner in (adapter_class, adapter_class.state_class):
        roles = owner.roles
        if not (isinstance(roles, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in roles.items())):
            raise VBShareError(f"method {name!r}: {owner.__name__}.roles must map parameter names to role names")
    METHODS[name] = adapter_class
    return adapter_class


def get_method(name: str) -> type[LowRankAdapter]:
    """The adapter class registered under `name`; a one-line error listing the known names otherwise."""
    if name not in METHODS:
        raise VBShareError(f"unknown adapter method {name!r}; known methods are: {', '.join(sorted(METHODS))}")
    return METHODS[name]


register("lora", LoRA)
register("vblora", VBLoRA)
register("aslora", ASLoRA)
register("sora", SoRA)
register("tied_lora", TiedLoRA)
register("nola", NOLA)
register("vera", VeRA)
register("unilora", UniLoRA)
register("loraxs", LoRAXS)
register("mos", MoS)
register("randlora", RandLoRA)
register("pvera", PVeRA)
register("tinylora", TinyLoRA)
