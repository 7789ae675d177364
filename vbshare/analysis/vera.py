"""VeRA's learned scaling vectors (docs/methods.md §5, §4): what each layer makes of the shared projections.

Every module of shape (out, in) adapts with ΔW = diag(λ_b) B[:out] diag(λ_d) A[:, :in], where A (r, max_in) and
B (max_out, r) are frozen, random and the same for the whole model. The two vectors are therefore everything a
layer learns: λ_d (r) weighs the shared rank-one directions, λ_b (out) the output channels. The tables here read
them from an adapter folder (keys `<module>.lambda_d`, `<module>.lambda_b`); λ_d starts at `d_initial`, λ_b at 0,
so "drift" (rms distance from the start) measures how far training moved each one. `delta_norm_table` adds
‖ΔW‖_F per module, with the projections read from the folder when saved, else drawn again from the seed.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd
from torch import Tensor

from ..adapters.vera import draw_projections
from ..errors import VBShareError
from .common import (STATE_PREFIX, AdapterFolder, PathLike, layer_entry_matrix, method_folder, module_columns,
                     plot_layer_entry_heatmap, plot_stat_by_layer, vector_stats)

VECTORS = ("lambda_d", "lambda_b")
VECTOR_COLUMNS = ["module", "short", "layer", "kind", "vector", "size", "init", "norm", "rms", "mean", "min", "max",
                  "drift"]
DELTA_COLUMNS = ["module", "short", "layer", "kind", "out", "in", "delta_norm", "delta_rms"]


# -- tables -------------------------------------------------------------------------------------------------
def vectors_from_tensors(tensors: Mapping[str, Tensor], modules: Sequence[str]) -> dict[tuple[str, str], Tensor]:
    """(module, "lambda_d" | "lambda_b") -> the vector (float32, 1-D), for every module in `modules`, in order."""
    found = {}
    for module in modules:
        for vector in VECTORS:
            key = f"{module}.{vector}"
            if key not in tensors:
                raise VBShareError(f"no tensor {key}; is this a vera adapter?")
            found[(module, vector)] = tensors[key].detach().float().reshape(-1)
    return found


def vector_table_from_tensors(tensors: Mapping[str, Tensor], modules: Sequence[str],
                              d_initial: float = 0.1) -> pd.DataFrame:
    """One row per (module, vector): module, short, layer, kind, vector ("lambda_d" / "lambda_b"), size, init (the
    entries' starting value: d_initial for λ_d, 0 for λ_b), norm (L2), rms (norm/√size), mean, min, max,
    drift (rms of vector − init)."""
    rows = []
    for (module, vector), values in vectors_from_tensors(tensors, modules).items():
        init = float(d_initial) if vector == "lambda_d" else 0.0
        rows.append({**module_columns(module), "vector": vector, **vector_stats(values, init)})
    return pd.DataFrame(rows, columns=VECTOR_COLUMNS)


def _folder(source: PathLike | AdapterFolder) -> AdapterFolder:
    return method_folder(source, "vera")


def vector_table(source: PathLike | AdapterFolder) -> pd.DataFrame:
    """`vector_table_from_tensors` of a vera adapter folder or run directory."""
    folder = _folder(source)
    return vector_table_from_tensors(folder.tensors, list(folder.targets), folder.config["d_initial"])


def vector_values(source: PathLike | AdapterFolder | Mapping[tuple[str, str], Tensor], kind: str,
                  vector: str = "lambda_d") -> pd.DataFrame:
    """Layer × entry matrix of one vector for one module kind (e.g. `attention.self.query`): rows are layers in
    depth order, columns the r entries of λ_d (or the out entries of λ_b). `source` may be a folder or the dict of
    `vectors_from_tensors`."""
    if not isinstance(source, Mapping):
        folder = _folder(source)
        source = vectors_from_tensors(folder.tensors, list(folder.targets))
    return layer_entry_matrix(source, kind, vector, VECTORS)  # (layers, r or out)


def delta_norm_table_from(vectors: Mapping[tuple[str, str], Tensor], targets: Mapping[str, Sequence[int]],
                          projection_A: Tensor, projection_B: Tensor) -> pd.DataFrame:
    """‖ΔW‖_F per module (and its rms, ‖ΔW‖_F/√(out·in)), with ΔW = diag(λ_b) B[:out] diag(λ_d) A[:, :in] from the
    given shared projections A (r, max_in) and B (max_out, r)."""
    A_all, B_all = projection_A.double(), projection_B.double()
    rows = []
    for module, (out_features, in_features) in targets.items():
        lambda_d = vectors[(module, "lambda_d")].double()  # (r,)
        lambda_b = vectors[(module, "lambda_b")].double()  # (out,)
        A = lambda_d[:, None] * A_all[:, :in_features]  # (r, in)
        B = lambda_b[:, None] * B_all[:out_features]  # (out, r)
        norm = (B @ A).norm().item()
        rows.append({**module_columns(module), "out": out_features, "in": in_features, "delta_norm": norm,
                     "delta_rms": norm / (out_features * in_features) ** 0.5})
    return pd.DataFrame(rows, columns=DELTA_COLUMNS)


def projections(source: PathLike | AdapterFolder) -> tuple[Tensor, Tensor]:
    """The folder's shared (A (r, max_in), B (max_out, r)): read when saved, else drawn again from the seed."""
    folder = _folder(source)
    saved_A, saved_B = f"{STATE_PREFIX}projection_A", f"{STATE_PREFIX}projection_B"
    if saved_A in folder.tensors:
        return folder.tensors[saved_A].float(), folder.tensors[saved_B].float()
    shapes = folder.targets.values()
    return draw_projections(int(folder.config["r"]), max(i for _, i in shapes), max(o for o, _ in shapes),
                            int(folder.config["projection_seed"]))


def delta_norm_table(source: PathLike | AdapterFolder) -> pd.DataFrame:
    """`delta_norm_table_from` of a vera adapter folder or run directory."""
    folder = _folder(source)
    A, B = projections(folder)
    return delta_norm_table_from(vectors_from_tensors(folder.tensors, list(folder.targets)), folder.targets, A, B)


# -- figures ------------------------------------------------------------------------------------------------
def plot_vector_norms(table: pd.DataFrame, stat: str = "rms", title: str | None = None):
    """Two panels (λ_d, λ_b): the vectors' `stat` ("rms", "drift", "norm", "mean") per layer, one line per module
    kind; y from 0, λ_d's starting value dashed (for rms / mean)."""
    from matplotlib.figure import Figure

    if stat not in ("rms", "drift", "norm", "mean"):
        raise VBShareError(f"stat must be rms, drift, norm or mean, got {stat!r}")
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, vector, label in zip(axes, VECTORS, ("λ_d (r entries)", "λ_b (out entries)")):
        mine = table[table["vector"] == vector]
        plot_stat_by_layer(ax, mine, stat, set(mine["init"]) - {0.0} if stat in ("rms", "mean") else ())
        ax.set_ylabel(f"{stat}")
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(title or f"VeRA: per-layer scaling vectors ({stat}; dashed = λ_d at init, λ_b starts at 0)")
    return fig


def plot_vector_heatmap(values: pd.DataFrame, center: float = 0.0, title: str | None = None, ax=None):
    """Heatmap of a layer × entry matrix (`vector_values`), diverging around `center` (λ_d: d_initial; λ_b: 0)."""
    return plot_layer_entry_heatmap(values, center, title or "VeRA: vector entries per layer", ax)


def plot_delta_norms(table: pd.DataFrame, stat: str = "delta_norm", title: str | None = None):
    """‖ΔW‖_F (or its rms, `stat="delta_rms"`) per layer, one line per module kind, y from 0."""
    from matplotlib.figure import Figure

    if stat not in ("delta_norm", "delta_rms"):
        raise VBShareError(f"stat must be delta_norm or delta_rms, got {stat!r}")
    fig = Figure(figsize=(6.5, 3.4), layout="constrained")
    ax = fig.subplots()
    plot_stat_by_layer(ax, table, stat)
    ax.set_ylabel("‖ΔW‖_F" if stat == "delta_norm" else "‖ΔW‖_F / √(out·in)")
    ax.legend(fontsize=7)
    ax.set_title(title or "VeRA: size of each layer's update")
    return fig
