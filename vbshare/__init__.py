"""vbshare — sharing-based low-rank adapters (LoRA, VB-LoRA, Uni-LoRA, VeRA, Tied-LoRA, NOLA, ASLoRA, SoRA) side by side.

    import vbshare
    vbshare.inject(model, "vblora", targets=["query", "value"], r=4, vector_length=128)
    optimizer = torch.optim.AdamW(vbshare.param_groups(model, lr={"logits": 1e-2, "bank": 1e-3, "head": 1e-3}))
    ...  # loss = task_loss + (vbshare.extra_loss(model) or 0); step; vbshare.after_step(model, optimizer, step)
    vbshare.save_adapter(model, "out/adapter", topk_only=True)

Layers, each importing only from those before it: errors, checks, targets, records, files -> adapters/base.py (the
contract, `state_of`, `adapters`) -> one module per method in adapters/ -> registry (METHODS) -> core
(inject, merge, hooks, optimiser groups, adapter tensors) -> accounting (summary), checkpoint
(save/load_adapter), peft (export/import_peft) -> train/, analysis/, report.
"""
from .accounting import AdapterSummary, summary
from .adapters.base import STATE_ATTR, AdapterConfig, AdapterState, LowRankAdapter, adapters, state_of
from .checkpoint import load_adapter, read_adapter_config, save_adapter
from .core import (
    adapter_state_dict,
    after_step,
    disabled,
    extra_loss,
    head_modules,
    inject,
    merge,
    param_groups,
    parameter_roles,
    unmerge,
)
from .errors import VBShareError
from .peft import export_peft, import_peft
from .registry import METHODS
from .registry import register as register_method
from .sora import prune

__version__ = "0.1.0"

__all__ = [
    "METHODS", "STATE_ATTR", "AdapterConfig", "AdapterState", "AdapterSummary", "LowRankAdapter", "VBShareError",
    "adapter_state_dict", "adapters", "after_step", "disabled", "export_peft", "extra_loss", "head_modules",
    "import_peft", "inject", "load_adapter", "merge", "param_groups", "parameter_roles", "prune",
    "read_adapter_config", "register_method", "save_adapter", "state_of", "summary", "unmerge",
]
