"""vbshare — sharing-based low-rank adapters (LoRA, VB-LoRA, ASLoRA, SoRA) side by side.

    import vbshare
    vbshare.inject(model, "vblora", targets=["query", "value"], r=4, vector_length=128)
    optimizer = torch.optim.AdamW(vbshare.param_groups(model, lr={"logits": 1e-2, "bank": 1e-3, "head": 1e-3}))
    ...  # loss = task_loss + (vbshare.extra_loss(model) or 0); step; vbshare.after_step(model, optimizer, step)
    vbshare.save_adapter(model, "out/adapter", topk_only=True)
"""
from .adapters import METHODS, AdapterConfig, AdapterState, LowRankAdapter
from .checkpoint import adapter_state_dict, load_adapter, read_adapter_config, save_adapter
from .core import (
    AdapterSummary,
    adapters,
    after_step,
    disabled,
    extra_loss,
    inject,
    merge,
    param_groups,
    parameter_roles,
    state_of,
    summary,
    unmerge,
)
from .errors import VBShareError
from .peft_interop import export_peft, import_peft
from .sora import prune

__version__ = "0.1.0"

__all__ = [
    "METHODS", "AdapterConfig", "AdapterState", "AdapterSummary", "LowRankAdapter", "VBShareError",
    "adapter_state_dict", "adapters", "after_step", "disabled", "export_peft", "extra_loss", "import_peft",
    "inject", "load_adapter", "merge", "param_groups", "parameter_roles", "prune", "read_adapter_config", "save_adapter",
    "state_of", "summary", "unmerge",
]
