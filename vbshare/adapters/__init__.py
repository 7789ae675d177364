"""The adapter methods, by name. Adding a method = writing its module and one line here."""
from .aslora import ASLoRA, ASLoRAConfig, write_merge_history
from .base import AdapterConfig, AdapterState, LowRankAdapter
from .lora import LoRA, LoRAConfig
from .sora import SoRA, SoRAConfig
from .unilora import UniLoRA, UniLoRAConfig
from .vblora import VBLoRA, VBLoRAConfig
from .vera import VeRA, VeRAConfig

METHODS: dict[str, type[LowRankAdapter]] = {
    "lora": LoRA,
    "vblora": VBLoRA,
    "aslora": ASLoRA,
    "sora": SoRA,
    "vera": VeRA,
    "unilora": UniLoRA,
}

__all__ = ["METHODS", "ASLoRA", "ASLoRAConfig", "write_merge_history", "AdapterConfig", "AdapterState", "LowRankAdapter", "LoRA", "LoRAConfig", "SoRA", "SoRAConfig", "VBLoRA", "VBLoRAConfig"]
