"""Tied-LoRA's per-layer scaling vectors (docs/methods.md §6, §4): what each layer makes of its role's shared A, B.

Layer i of a role adapts with ΔW_i = s · diag(v_i) B diag(u_i) A, where A (r, in) and B (out, r) are the role's
and u_i (r) and v_i (out) are the layer's own. The vectors are therefore the whole per-layer difference: u
re-weights the shared rank-one directions, v the output channels. The tables here read them from an adapter
folder (keys `<module>.u`, `<module>.v`); a vector that was not trained is frozen at ones and is reported
with `trained=False` (docs/methods.md §6: only trained tensors are saved).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..adapters.tied_lora import TiedLoRAConfig
from ..errors import VBShareError
from .common import (AdapterFolder, PathLike, layer_entry_matrix, method_folder, module_columns, module_kind,
                     plot_layer_entry_heatmap, plot_stat_by_layer, vector_stats)

VECTORS = ("u", "v")
VECTOR_COLUMNS = ["module", "short", "layer", "kind", "vector", "trained", "size", "init", "norm", "rms", "mean",
                  "min", "max", "drift"]


def _initial_value(config: TiedLoRAConfig, vector: str) -> float:
    """The value every entry of a vector starts at: 0 for the one zeroed to make ΔW = 0 at init, else 1."""
    return 0.0 if config.zero_factor == vector else 1.0


def vectors_from_tensors(tensors: Mapping[str, Tensor], targets: Mapping[str, Sequence[int]], r: int,
                         train: Sequence[str] = ("A", "B", "u", "v")) -> dict[tuple[str, str], Tensor]:
    """(module, "u" | "v") -> the vector, for every module of `targets` (name -> (out, in)), in target order.
    Trained vectors come from `tensors` (keys `<module>.u` / `.v`); frozen ones are ones (r or out long)."""
    config = TiedLoRAConfig(r=r, train=list(train))
    config.validate()
    found = {}
    for module, (out_features, _) in targets.items():
        for vector, size in (("u", r), ("v", out_features)):
            if vector in config.train:
                key = f"{module}.{vector}"
                if key not in tensors:
                    raise VBShareError(f"no tensor {key}; is this a tied_lora adapter that trains {vector}?")
                found[(module, vector)] = tensors[key].detach().float().reshape(-1)
            else:
                found[(module, vector)] = torch.ones(size)
    return found


def vector_table_from_tensors(tensors: Mapping[str, Tensor], targets: Mapping[str, Sequence[int]], r: int,
                              train: Sequence[str] = ("A", "B", "u", "v")) -> pd.DataFrame:
    """One row per (module, vector): module, short, layer, kind, vector ("u" / "v"), trained, size, init (the
    entries' starting value), norm (L2), rms (norm/√size), mean, min, max, drift (rms of vector − init)."""
    config = TiedLoRAConfig(r=r, train=list(train))
    config.validate()
    rows = []
    for (module, vector), values in vectors_from_tensors(tensors, targets, r, train).items():
        rows.append({**module_columns(module), "vector": vector, "trained": vector in config.train,
                     **vector_stats(values, _initial_value(config, vector))})
    return pd.DataFrame(rows, columns=VECTOR_COLUMNS)


def _folder(source: PathLike | AdapterFolder) -> AdapterFolder:
    return method_folder(source, "tied_lora")


def vector_table(source: PathLike | AdapterFolder) -> pd.DataFrame:
    """`vector_table_from_tensors` of a tied_lora adapter folder or run directory."""
    folder = _folder(source)
    return vector_table_from_tensors(folder.tensors, folder.targets, int(folder.config["r"]), folder.config["train"])


def vector_values(source: PathLike | AdapterFolder | Mapping[tuple[str, str], Tensor], kind: str,
                  vector: str = "u") -> pd.DataFrame:
    """Layer × entry matrix of one vector for one module kind (e.g. `attention.self.query`): rows are layers in
    depth order, columns the r entries of u (or the out entries of v). `source` may be a folder or the dict of
    `vectors_from_tensors`."""
    if not isinstance(source, Mapping):
        folder = _folder(source)
        source = vectors_from_tensors(folder.tensors, folder.targets, int(folder.config["r"]), folder.config["train"])
    return layer_entry_matrix(source, kind, vector, VECTORS)  # (layers, r or out)


# -- figures ----------------------------------------------------------------------------------------------------
def plot_vector_norms(table: pd.DataFrame, stat: str = "rms", title: str | None = None):
    """Two panels (u, v): the vectors' `stat` ("rms", "drift", "norm", "mean") per layer, one line per module
    kind (dotted where frozen); y from 0, the starting value dashed (for rms / mean)."""
    from matplotlib.figure import Figure

    if stat not in ("rms", "drift", "norm", "mean"):
        raise VBShareError(f"stat must be rms, drift, norm or mean, got {stat!r}")
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, vector in zip(axes, VECTORS):
        mine = table[table["vector"] == vector]
        plot_stat_by_layer(ax, mine, stat, set(mine["init"]) if stat in ("rms", "mean") else ())
        ax.set_ylabel(f"{stat} of {vector}")
        ax.set_title(f"{vector} ({'r entries' if vector == 'u' else 'out entries'}; dotted = frozen)", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(title or f"Tied-LoRA: per-layer scaling vectors ({stat}; dashed = value at init)")
    return fig


def plot_vector_heatmap(values: pd.DataFrame, center: float = 1.0, title: str | None = None, ax=None):
    """Heatmap of a layer × entry matrix (`vector_values`), diverging around `center` (the starting value)."""
    return plot_layer_entry_heatmap(values, center, title or "scaling vector per layer", ax)


def plot_u_heatmaps(source: PathLike | AdapterFolder):
    """One `plot_vector_heatmap` of u (layers × r) per module kind of a tied_lora adapter, side by side."""
    from matplotlib.figure import Figure

    folder = _folder(source)
    config = TiedLoRAConfig(r=int(folder.config["r"]), train=list(folder.config["train"]))
    config.validate()
    found = vectors_from_tensors(folder.tensors, folder.targets, config.r, config.train)
    kinds = list(dict.fromkeys(module_kind(m) for m in folder.targets))
    cols = min(3, len(kinds))
    rows = -(-len(kinds) // cols)
    fig = Figure(figsize=(4.2 * cols, 0.9 + 2.6 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, kind in zip(axes, kinds):
        plot_vector_heatmap(vector_values(found, kind, "u"), center=_initial_value(config, "u"), title=kind, ax=ax)
    for ax in axes[len(kinds):]:
        ax.set_visible(False)
    fig.suptitle("Tied-LoRA: u per layer (how each layer re-weights its role's shared rank-one directions)")
    return fig
