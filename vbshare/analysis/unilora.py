"""Uni-LoRA's sharing pattern: which factor entries read each entry of the one shared vector θ
(docs/methods.md §8, §4).

Every entry j of every module's A (r, in) and B (out, r) reads θ[idx_j] · c_j with c_j = 1/√(uses of θ[idx_j]).
The map idx is fixed (balanced, shuffled by `proj_seed`), so what training learns is θ alone; the interesting
questions are how widely each θ entry is shared (by how many factor entries, modules, layers and module kinds)
and how the learned values are distributed. The index map is read from the folder when it was saved
(`save_indices`), else rebuilt from the seed and the targets exactly as at injection.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..adapters.unilora import build_index_map
from ..errors import VBShareError
from ..targets import layer_index
from .common import STATE_PREFIX, AdapterFolder, PathLike, method_folder, module_kind, short_name

FACTORS = ("A", "B")
ENTRY_COLUMNS = ["entry", "value", "uses", "scale", "read_value", "uses_A", "uses_B", "modules", "layers", "kinds"]
MODULE_COLUMNS = ["module", "short", "layer", "kind", "factor_entries", "theta_entries", "theta_share",
                  "mean_uses"]

IndexMap = dict[str, tuple[Tensor, Tensor]]  # module -> (idx_A (r, in), idx_B (out, r)), in flattening order


# -- the index map ------------------------------------------------------------------------------------------
def _folder(source: PathLike | AdapterFolder) -> AdapterFolder:
    return method_folder(source, "unilora")


def index_map(source: PathLike | AdapterFolder) -> IndexMap:
    """The folder's index map: its saved indices when it has them, else rebuilt from the seed."""
    folder = _folder(source)
    if all(f"{m}.indices_A" in folder.tensors for m in folder.targets):
        return {m: (folder.tensors[f"{m}.indices_A"].long(), folder.tensors[f"{m}.indices_B"].long())
                for m in folder.targets}
    config = folder.config
    return build_index_map(folder.targets, int(config["r"]), int(config["theta_d_length"]), int(config["proj_seed"]))


def theta_of(source: PathLike | AdapterFolder) -> Tensor:
    """The learned θ (d,) of a unilora adapter folder or run directory."""
    return _folder(source).tensors[f"{STATE_PREFIX}theta"].float()


# -- tables -------------------------------------------------------------------------------------------------
def entry_table_from(theta: Tensor, indices: IndexMap) -> pd.DataFrame:
    """One row per θ entry: entry, value (θ), uses (factor entries reading it), scale (c = 1/√uses, 0 if unread),
    read_value (θ·c, what each of those entries holds), uses_A / uses_B (of them in A / B factors), and how many
    distinct modules, layers and module kinds read it."""
    d = theta.numel()
    uses = {f: np.zeros(d, dtype=np.int64) for f in FACTORS}
    readers: dict[str, list[set]] = {what: [set() for _ in range(d)] for what in ("modules", "layers", "kinds")}
    for module, pair in indices.items():
        read = set()
        for factor, index in zip(FACTORS, pair):
            flat = index.reshape(-1).long().numpy()
            if flat.size and (flat.min() < 0 or flat.max() >= d):
                raise VBShareError(f"module {module} reads θ entries outside 0..{d - 1}; the map does not fit this θ")
            uses[factor] += np.bincount(flat, minlength=d)
            read.update(np.unique(flat).tolist())
        for entry in read:
            readers["modules"][entry].add(module)
            readers["layers"][entry].add(layer_index(module))
            readers["kinds"][entry].add(module_kind(module))
    total = uses["A"] + uses["B"]
    scale = np.divide(1.0, np.sqrt(total), out=np.zeros(d), where=total > 0)
    values = theta.detach().double().numpy()
    return pd.DataFrame({
        "entry": np.arange(d), "value": values, "uses": total, "scale": scale, "read_value": values * scale,
        "uses_A": uses["A"], "uses_B": uses["B"],
        **{what: [len(s) for s in sets] for what, sets in readers.items()},
    }, columns=ENTRY_COLUMNS)


def entry_table(source: PathLike | AdapterFolder) -> pd.DataFrame:
    """`entry_table_from` of a unilora adapter folder or run directory."""
    return entry_table_from(theta_of(source), index_map(source))


def module_table_from(indices: IndexMap, theta_d_length: int) -> pd.DataFrame:
    """One row per module: its factor entries (r·(in + out)), the distinct θ entries they read, that as a share of
    d, and the mean number of its entries per θ entry read (how often it reuses one value)."""
    rows = []
    for module, (idx_A, idx_B) in indices.items():
        flat = torch.cat([idx_A.reshape(-1), idx_B.reshape(-1)])
        distinct = int(flat.unique().numel())
        rows.append({"module": module, "short": short_name(module), "layer": layer_index(module),
                     "kind": module_kind(module), "factor_entries": int(flat.numel()), "theta_entries": distinct,
                     "theta_share": distinct / theta_d_length,
                     "mean_uses": flat.numel() / distinct if distinct else 0.0})
    return pd.DataFrame(rows, columns=MODULE_COLUMNS)


def module_table(source: PathLike | AdapterFolder) -> pd.DataFrame:
    """`module_table_from` of a unilora adapter folder or run directory."""
    return module_table_from(index_map(source), int(_folder(source).config["theta_d_length"]))


def sharing_matrix(indices: IndexMap, theta_d_length: int, by: str = "module") -> pd.DataFrame:
    """Rows and columns = modules (or `by` = "short", "layer", "kind"); entry (i, j): the number of θ entries
    read by both i and j (the diagonal: by i at all)."""
    if by not in ("module", "short", "layer", "kind"):
        raise VBShareError(f"by must be module, short, layer or kind, got {by!r}")
    label = {"module": lambda m: m, "short": short_name, "layer": layer_index, "kind": module_kind}[by]
    groups: dict[Any, np.ndarray] = {}
    for module, (idx_A, idx_B) in indices.items():
        key = label(module)
        reads = groups.setdefault(key, np.zeros(theta_d_length, dtype=bool))
        reads[torch.cat([idx_A.reshape(-1), idx_B.reshape(-1)]).long().numpy()] = True
    names = list(groups)
    reads = np.stack([groups[n] for n in names]).astype(np.int64)  # (groups, d)
    matrix = pd.DataFrame(reads @ reads.T, index=names, columns=names)
    matrix.index.name = matrix.columns.name = by
    return matrix


def usage_summary(entries: pd.DataFrame) -> dict[str, Any]:
    """Headline numbers: d, D (factor entries), uses per θ entry (min / max), θ entries nobody reads, mean modules
    and layers per θ entry, and θ's spread."""
    values = entries["value"].to_numpy(dtype=float)
    return {
        "theta_d_length": int(len(entries)),
        "factor_entries": int(entries["uses"].sum()),
        "uses_min": int(entries["uses"].min()),
        "uses_max": int(entries["uses"].max()),
        "unread": int((entries["uses"] == 0).sum()),
        "mean_modules_per_entry": float(entries["modules"].mean()),
        "mean_layers_per_entry": float(entries["layers"].mean()),
        "theta_std": float(values.std()),
        "theta_abs_max": float(np.abs(values).max()) if len(values) else 0.0,
    }


# -- figures ------------------------------------------------------------------------------------------------
def _count_ticks(axis) -> None:
    """Whole-number ticks on a matplotlib axis that shows a count, even when its view holds a single integer
    (one bar at 14 spans 13.6..14.4; MaxNLocator's default would then fall back to 0.1 steps)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def plot_sharing(entries: pd.DataFrame, title: str | None = None):
    """How widely θ entries are shared: histograms of factor entries, modules and layers per θ entry (counts on
    both axes, so whole-number ticks)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.2), layout="constrained")
    for ax, column, label in zip(fig.subplots(1, 3), ("uses", "modules", "layers"),
                                 ("factor entries", "modules", "layers")):
        counts = entries[column].value_counts().sort_index()
        ax.bar(counts.index, counts.to_numpy(), width=0.8)
        ax.set_xlabel(f"{label} reading one θ entry")
        ax.set_ylabel("θ entries")
        ax.set_ylim(0, max(int(counts.max()), 1) * 1.1)
        _count_ticks(ax.xaxis)
        _count_ticks(ax.yaxis)
    fig.suptitle(title or f"Uni-LoRA: how many read each θ entry (d = {len(entries)}, "
                          f"D = {int(entries['uses'].sum())})")
    return fig


def plot_theta_distribution(entries: pd.DataFrame, bins: int = 50, init_bound: float | None = None,
                            title: str | None = None):
    """Histograms of the learned θ and of what factor entries read (θ·c); `init_bound` marks U(−b, b) at init.
    The y axes count θ entries (whole-number ticks)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.2), layout="constrained")
    for ax, column, label in zip(fig.subplots(1, 2), ("value", "read_value"), ("θ", "θ · c (read by factors)")):
        ax.hist(entries[column].to_numpy(dtype=float), bins=bins)
        if init_bound is not None and column == "value":
            for x in (-init_bound, init_bound):
                ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel(label)
        ax.set_ylabel("θ entries")
        _count_ticks(ax.yaxis)
    fig.suptitle(title or "Uni-LoRA: the learned vector" + (" (dashed: init range)" if init_bound else ""))
    return fig


def plot_sharing_matrix(matrix: pd.DataFrame, title: str | None = None):
    """Heatmap of `sharing_matrix`: θ entries two modules (layers, kinds) both read, from 0 (a count: the colour
    bar has whole-number ticks)."""
    from matplotlib.figure import Figure

    size = min(10, 2.5 + 0.28 * len(matrix))
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix.to_numpy(dtype=float), vmin=0, cmap="magma", interpolation="nearest")
    labels = [str(i) for i in matrix.index]
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title(title or "Uni-LoRA: θ entries read by both")
    bar = fig.colorbar(image, ax=ax, shrink=0.8, label="shared θ entries")
    _count_ticks(bar.ax.yaxis)
    return fig
