"""Analysis of learned sharing patterns (docs/methods.md §4) for the notebooks in notebooks/.

Functions read run directories / adapter folders and return pandas tables and matplotlib figures (built
on `matplotlib.figure.Figure`, so no GUI backend is needed):

* `vbshare.analysis.vblora`: bank-vector selections, usage counts, module similarity, drift along training.
* `vbshare.analysis.aslora`: merge history, tie-sets, merge trees, B-distance matrices.
* `vbshare.analysis.sora`: stage records, retained ranks per module, memorisation / generalisation trade-off.
* `vbshare.analysis.vera`: VeRA's learned scaling vectors λ_d, λ_b per layer and the size of each module's ΔW.
* `vbshare.analysis.unilora`: how many factor entries, modules and layers read each θ value; the θ distribution.
* `vbshare.analysis.tied_lora`: Tied-LoRA's per-layer scaling vectors u, v (norms, drift from init, heatmaps).
* `vbshare.analysis.tinylora`: TinyLoRA's tied vectors per group and the core R each module builds from its vector.
* `vbshare.analysis.demo`: small runs for a notebook when it is given no run directory.
"""
from . import aslora, common, sora, tied_lora, tinylora, unilora, vblora, vera
from .common import AdapterFolder, adapter_dir, list_snapshots, module_table, read_adapter, read_summary

__all__ = ["AdapterFolder", "adapter_dir", "aslora", "common", "list_snapshots", "module_table", "read_adapter",
           "read_summary", "sora", "tied_lora", "tinylora", "unilora", "vblora", "vera"]
