"""TinyLoRA's tied vectors (docs/methods.md §12, §4): which modules share a trained vector, and what each module
makes of it.

Module i adapts with ΔW_i = U_r Σ^½ R_i Σ^½ V_rᵀ, R_i = Σ_t v_{g(i)}[t] · P_i[t], where v_g (u) is the trained
vector of its tying group g(i) and P_i (u, r, r) its own frozen random tensor. The adapter folder holds the G
vectors as `vbshare.vectors` (G, u); P_i is read from the folder when saved (`<module>.projection`), else drawn
again from the seed (projection_seed + i). The vectors' entries are coordinates in each module's own random basis
P_i, so entries of different modules' vectors are not comparable one to one; their norms are, and so are the
cores R_i they produce: `core_table` gives ‖R_i‖_F and R_i's singular values, the size and shape of the update
each module builds from its (possibly shared) vector.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..adapters.tinylora import draw_projection, tying_groups
from ..errors import VBShareError
from .common import STATE_PREFIX, AdapterFolder, PathLike, method_folder, module_columns

GROUP_COLUMNS = ["group", "modules", "first", "last", "norm", "rms", "max_abs"]
CORE_COLUMNS = ["module", "short", "layer", "kind", "group", "vector_norm", "core_norm", "core_sv_max", "core_sv_min"]


def _folder(source: PathLike | AdapterFolder) -> AdapterFolder:
    return method_folder(source, "tinylora")


def _vectors(tensors: Mapping[str, Tensor]) -> Tensor:
    key = STATE_PREFIX + "vectors"
    if key not in tensors:
        raise VBShareError(f"no tensor {key}; is this a tinylora adapter?")
    return tensors[key].detach().double()  # (G, u)


def group_table_from(vectors: Tensor, modules: Sequence[str], weight_tying: float) -> pd.DataFrame:
    """One row per tying group: group, modules (how many read it), first / last (short names of the first and last
    module in target order), norm (L2 of its vector), rms (norm/√u), max_abs (largest |entry|)."""
    groups = tying_groups(len(modules), weight_tying)
    if max(groups) + 1 != vectors.shape[0]:
        raise VBShareError(f"{vectors.shape[0]} vectors, but weight_tying={weight_tying} on {len(modules)} modules "
                           f"gives {max(groups) + 1} groups; read the folder's own config")
    rows = []
    for g, vector in enumerate(vectors.double()):
        members = [m for m, mine in zip(modules, groups) if mine == g]
        rows.append({"group": g, "modules": len(members), "first": module_columns(members[0])["short"],
                     "last": module_columns(members[-1])["short"], "norm": vector.norm().item(),
                     "rms": vector.pow(2).mean().sqrt().item(), "max_abs": vector.abs().max().item()})
    return pd.DataFrame(rows, columns=GROUP_COLUMNS)


def core_table_from(vectors: Tensor, projections: Mapping[str, Tensor], weight_tying: float) -> pd.DataFrame:
    """One row per module (in the order of `projections`: module -> its P (u, r, r)): naming columns, group,
    vector_norm (‖v_g‖), core_norm (‖R‖_F, R = Σ_t v_g[t] P[t]) and R's largest and smallest singular values."""
    modules = list(projections)
    groups = tying_groups(len(modules), weight_tying)
    rows = []
    for module, g in zip(modules, groups):
        v = vectors[g].double()  # (u,)
        R = torch.einsum("u,urs->rs", v, projections[module].double())  # (u,), (u, r, r) -> (r, r)
        singular = torch.linalg.svdvals(R)
        rows.append({**module_columns(module), "group": g, "vector_norm": v.norm().item(),
                     "core_norm": R.norm().item(), "core_sv_max": singular[0].item(),
                     "core_sv_min": singular[-1].item()})
    return pd.DataFrame(rows, columns=CORE_COLUMNS)


def projections_of(folder: AdapterFolder) -> dict[str, Tensor]:
    """Module -> its P (u, r, r): from the folder when saved, else drawn again from projection_seed + position."""
    config = folder.config
    found = {}
    for i, module in enumerate(folder.targets):
        key = f"{module}.projection"
        found[module] = folder.tensors[key] if key in folder.tensors else draw_projection(
            config["u"], config["r"], config["projection_seed"] + i)
    return found


def group_table(source: PathLike | AdapterFolder) -> pd.DataFrame:
    """`group_table_from` of a tinylora adapter folder or run directory."""
    folder = _folder(source)
    return group_table_from(_vectors(folder.tensors), list(folder.targets), folder.config["weight_tying"])


def core_table(source: PathLike | AdapterFolder) -> pd.DataFrame:
    """`core_table_from` of a tinylora adapter folder or run directory."""
    folder = _folder(source)
    return core_table_from(_vectors(folder.tensors), projections_of(folder), folder.config["weight_tying"])


def vector_matrix(source: PathLike | AdapterFolder) -> pd.DataFrame:
    """The trained vectors as a (G, u) table: index "group", columns "entry"."""
    values = _vectors(_folder(source).tensors).numpy()
    table = pd.DataFrame(values)  # (G, u)
    table.index.name, table.columns.name = "group", "entry"
    return table


def plot_vectors(vectors: pd.DataFrame, cores: pd.DataFrame):
    """Two panels: the (G, u) vectors as a heatmap centred on 0 (their start), and ‖R‖_F per module in target
    order, coloured by group (modules sharing a vector share a colour)."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 3.2 + 0.12 * len(vectors)), layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=[1, 1.4])
    data = vectors.to_numpy(dtype=float)
    spread = max(float(np.abs(data).max()), 1e-12)
    image = left.imshow(data, aspect="auto", interpolation="nearest", cmap="coolwarm",
                        norm=TwoSlopeNorm(vcenter=0.0, vmin=-spread, vmax=spread))
    left.set_xlabel("entry")
    left.set_ylabel("group")
    left.set_title(f"trained vectors ({data.shape[0]} × {data.shape[1]})", fontsize=9)
    figure.colorbar(image, ax=left, shrink=0.8, label="value (start 0)")
    colours = [f"C{g % 10}" for g in cores["group"]]
    right.bar(range(len(cores)), cores["core_norm"], color=colours)
    right.set_xticks(range(len(cores)), cores["short"], rotation=90, fontsize=6)
    right.set_ylabel("‖R‖_F")
    right.set_title("each module's core R = Σ v_t P_t (colour: group, cycling after 10)", fontsize=9)
    return figure
