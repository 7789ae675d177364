"""The adapter methods, by name. Adding a method = writing its module and one line here."""
from .aslora import ASLoRA, ASLoRAConfig, write_merge_history
from .base import AdapterConfig, AdapterState, LowRankAdapter
from .lora import LoRA, LoRAConfig
from .nola import NOLA, NOLAConfig
from .sora import SoRA, SoRAConfig
from .tied_lora import TiedLoRA, TiedLoRAConfig
from .vblora import VBLoRA, VBLoRAConfig

METHODS: dict[str, type[LowRankAdapter]] = {
    "lora": LoRA,
    "vblora": VBLoRA,
    "aslora": ASLoRA,
    "sora": SoRA,
    "tied_lora": TiedLoRA,
    "nola": NOLA,
}

__all__ = ["METHODS", "ASLoRA", "ASLoRAConfig", "write_merge_history", "AdapterConfig", "AdapterState", "LowRankAdapter", "LoRA", "LoRAConfig", "SoRA", "SoRAConfig", "VBLoRA", "VBLoRAConfig"]
