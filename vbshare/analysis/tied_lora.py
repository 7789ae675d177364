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
from ..targets import layer_index
from .common import AdapterFolder, PathLike, adapter_dir, module_kind, read_adapter, short_name

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
        init = _initial_value(config, vector)
        values = values.double()
        rows.append({
            "module": module, "short": short_name(module), "layer": layer_index(module), "kind": module_kind(module),
            "vector": vector, "trained": vector in config.train, "size": values.numel(), "init": init,
            "norm": values.norm().item(), "rms": values.pow(2).mean().sqrt().item(), "mean": values.mean().item(),
            "min": values.min().item(), "max": values.max().item(),
            "drift": (values - init).pow(2).mean().sqrt().item(),
        })
    return pd.DataFrame(rows, columns=VECTOR_COLUMNS)


def _folder(source: PathLike | AdapterFolder) -> AdapterFolder:
    folder = source if isinstance(source, AdapterFolder) else read_adapter(adapter_dir(source))
    if folder.method != "tied_lora":
        raise VBShareError(f"{folder.path} holds a {folder.method} adapter, not tied_lora")
    return folder


def vector_table(source: PathLike | AdapterFolder) -> pd.DataFrame:
    """`vector_table_from_tensors` of a tied_lora adapter folder or run directory."""
    folder = _folder(source)
    return vector_table_from_tensors(folder.tensors, folder.targets, int(folder.config["r"]), folder.config["train"])


def vector_values(source: PathLike | AdapterFolder | Mapping[tuple[str, str], Tensor], kind: str,
                  vector: str = "u") -> pd.DataFrame:
    """Layer × entry matrix of one vector for one module kind (e.g. `attention.self.query`): rows are layers in
    depth order, columns the r entries of u (or the out entries of v). `source` may be a folder or the dict of
    `vectors_from_tensors`."""
    if vector not in VECTORS:
        raise VBShareError(f"vector must be u or v, got {vector!r}")
    if isinstance(source, Mapping):
        found = source
    else:
        folder = _folder(source)
        found = vectors_from_tensors(folder.tensors, folder.targets, int(folder.config["r"]), folder.config["train"])
    rows = {layer_index(m): values.numpy() for (m, v), values in found.items() if v == vector and module_kind(m) == kind}
    if not rows:
        kinds = sorted({module_kind(m) for m, _ in found})
        raise VBShareError(f"no module of kind {kind!r}; kinds present: {', '.join(kinds)}")
    layers = sorted(rows, key=lambda i: -1 if i is None else i)
    table = pd.DataFrame(np.stack([rows[i] for i in layers]), index=layers)  # (layers, r or out)
    table.index.name, table.columns.name = "layer", "entry"
    return table


# -- figures ----------------------------------------------------------------------------------------------------
def plot_vector_norms(table: pd.DataFrame, stat: str = "rms", title: str | None = None):
    """Two panels (u, v): the vectors' `stat` ("rms", "drift", "norm", "mean") per layer, one line per module
    kind; y from 0, the starting value dashed (for rms / mean)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if stat not in ("rms", "drift", "norm", "mean"):
        raise VBShareError(f"stat must be rms, drift, norm or mean, got {stat!r}")
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, vector in zip(axes, VECTORS):
        mine = table[table["vector"] == vector]
        for i, (kind, rows) in enumerate(mine.groupby("kind", sort=False)):
            rows = rows.sort_values("layer")
            style = "-" if rows["trained"].all() else ":"
            ax.plot(rows["layer"], rows[stat], style, marker="o", color=f"C{i}", label=kind)
        if stat in ("rms", "mean") and len(mine):
            for init in sorted(set(mine["init"])):
                ax.axhline(init, color="grey", linestyle="--", linewidth=0.8)
        low = min(0.0, float(mine[stat].min())) if len(mine) else 0.0
        high = max(1.0, float(mine[stat].max())) if len(mine) else 1.0
        ax.set_ylim(low, high * 1.1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel(f"{stat} of {vector}")
        ax.set_title(f"{vector} ({'r entries' if vector == 'u' else 'out entries'}; dotted = frozen)", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(title or f"Tied-LoRA: per-layer scaling vectors ({stat}; dashed = value at init)")
    return fig


def plot_vector_heatmap(values: pd.DataFrame, center: float = 1.0, title: str | None = None, ax=None):
    """Heatmap of a layer × entry matrix (`vector_values`), diverging around `center` (the starting value)."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = None
    if ax is None:
        fig = Figure(figsize=(2.5 + min(0.35 * values.shape[1], 9.0), 1.2 + 0.35 * values.shape[0]),
                     layout="constrained")
        ax = fig.subplots()
    data = values.to_numpy(dtype=float)
    spread = max(float(np.abs(data - center).max()), 1e-12)
    norm = TwoSlopeNorm(vcenter=center, vmin=center - spread, vmax=center + spread)
    image = ax.imshow(data, cmap="coolwarm", norm=norm, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(values.index)), [f"L{i}" for i in values.index], fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("entry")
    ax.set_title(title or "scaling vector per layer", fontsize=9)
    ax.figure.colorbar(image, ax=ax, shrink=0.8)
    return fig if fig is not None else ax.figure


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
