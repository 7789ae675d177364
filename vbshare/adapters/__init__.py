"""The adapter methods: the contract (`base.py`) and one module per method.

This package knows nothing of the model-level API, checkpoints or the training app. Each method module
depends only on `base.py`, `vbshare.targets`, `vbshare.errors` and `vbshare.files` (SoRA also on `lora.py`: its
stored form is a plain LoRA). The list of methods by name is `vbshare.registry.METHODS`.
"""
from .base import STATE_ATTR, AdapterConfig, AdapterState, LowRankAdapter, adapters, state_of

__all__ = ["STATE_ATTR", "AdapterConfig", "AdapterState", "LowRankAdapter", "adapters", "state_of"]
