"""The adapter methods: the contract (`base.py`) and one module per method.

This package knows nothing of the model-level API, checkpoints or the training app. Each method module
depends only on `base.py` and the bottom modules (`vbshare.errors`, `targets`, `files`, `records`); SoRA also on
`lora.py`, its stored form being a plain LoRA. The list of methods by name is `vbshare.registry.METHODS`.
"""
from .base import STATE_ATTR, AdapterConfig, AdapterState, LowRankAdapter, adapters, state_of

__all__ = ["STATE_ATTR", "AdapterConfig", "AdapterState", "LowRankAdapter", "adapters", "state_of"]
