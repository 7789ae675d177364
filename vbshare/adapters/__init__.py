"""The adapter methods, by name. Adding a method = writing its module and one line here."""
from .base import AdapterConfig, AdapterState, LowRankAdapter
from .lora import LoRA, LoRAConfig
from .vblora import VBLoRA, VBLoRAConfig

METHODS: dict[str, type[LowRankAdapter]] = {
    "lora": LoRA,
    "vblora": VBLoRA,
}

__all__ = ["METHODS", "AdapterConfig", "AdapterState", "LowRankAdapter", "LoRA", "LoRAConfig", "VBLoRA", "VBLoRAConfig"]
