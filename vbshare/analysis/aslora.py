"""ASLoRA's sharing pattern: the tie-sets of B and how they formed (docs/methods.md §3, §4).

Each merge record (`merge_history.jsonl` in a run directory, or `state.history` in the adapter metadata) has
step, group, layers = [lower set, upper set] and distance. Replaying the records of a group from its singleton
layers gives the tie-sets at any step and a merge tree (a dendrogram whose joins sit at the merge step).
The B-distance matrix compares the running averages B̄ (`avg_B_<key>`) or the B's of an adapter folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import VBShareError
from ..targets import layer_index, role_key  # role_key: the state's key of a group's A
from .common import STATE_PREFIX, AdapterFolder, PathLike, adapter_dir, method_folder, read_adapter, read_jsonl

HISTORY_FILE = "merge_history.jsonl"
HISTORY_COLUMNS = ["merge", "step", "group", "lower", "upper", "distance"]


# -- the merge records ----------------------------------------------------------------------------------------
def history_table(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Merge records -> one row per merge: merge, step, group, lower, upper (tuples of layers), distance."""
    rows = []
    for i, rec in enumerate(records, start=1):
        lower, upper = rec["layers"]
        rows.append({"merge": rec.get("merge", i), "step": int(rec["step"]), "group": rec["group"],
                     "lower": tuple(lower), "upper": tuple(upper), "distance": rec.get("distance")})
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def merge_history(source: PathLike) -> pd.DataFrame:
    """The merge table of a run directory (its merge_history.jsonl, else the adapter's metadata), an adapter
    folder or a JSONL file."""
    path = Path(source)
    if path.is_file():
        return history_table(read_jsonl(path))
    if (path / HISTORY_FILE).is_file():
        return history_table(read_jsonl(path / HISTORY_FILE))
    return history_table(method_folder(path, "aslora").state.get("history", []))


def group_layers(source: PathLike | AdapterFolder) -> dict[str, list[int]]:
    """Sharing group -> its layer indices in depth order (from the adapter's metadata)."""
    folder = source if isinstance(source, AdapterFolder) else read_adapter(adapter_dir(source))
    groups = folder.state.get("groups")
    if not groups:
        raise VBShareError(f"{folder.path} has no aslora group metadata")
    return {g: [layer_index(n) if layer_index(n) is not None else i for i, n in enumerate(names)]
            for g, names in groups.items()}


def tie_sets(history: pd.DataFrame, group: str, layers: Sequence[int], upto_step: int | None = None) -> list[tuple[int, ...]]:
    """The tie-sets of `group` (tuples of layers, ordered by their shallowest layer) after replaying its merges
    up to and including `upto_step` (all when None), starting from one set per layer."""
    sets = {layer: (layer,) for layer in layers}  # shallowest member -> set
    for rec in history[history["group"] == group].itertuples():
        if upto_step is not None and rec.step > upto_step:
            break
        lower, upper = tuple(sorted(rec.lower)), tuple(sorted(rec.upper))
        if sets.get(lower[0]) != lower or sets.get(upper[0]) != upper:
            raise VBShareError(f"merge {rec.merge} of {group} joins {lower} and {upper}, which are not tie-sets "
                               f"at that point ({sorted(sets.values())}); are the records complete and in order?")
        del sets[lower[0]], sets[upper[0]]
        joined = tuple(sorted(lower + upper))
        sets[joined[0]] = joined
    return sorted(sets.values())


def merge_tree(history: pd.DataFrame, group: str, layers: Sequence[int]) -> pd.DataFrame:
    """The group's merges as a linkage table: node (leaves are 0..n−1 in layer order, merge i makes node n+i),
    left, right (child nodes), step, distance, members (tuple of layers), size. Unmerged layers stay leaves."""
    layers = list(layers)
    node_of = {(layer,): i for i, layer in enumerate(layers)}
    rows = []
    for rec in history[history["group"] == group].itertuples():
        lower, upper = tuple(sorted(rec.lower)), tuple(sorted(rec.upper))
        if lower not in node_of or upper not in node_of:
            raise VBShareError(f"merge {rec.merge} of {group} joins {lower} and {upper}, which are not tie-sets then")
        members = tuple(sorted(lower + upper))
        node = len(layers) + len(rows)
        rows.append({"node": node, "left": node_of.pop(lower), "right": node_of.pop(upper), "step": rec.step,
                     "distance": rec.distance, "members": members, "size": len(members)})
        node_of[members] = node
    return pd.DataFrame(rows, columns=["node", "left", "right", "step", "distance", "members", "size"])


def share_summary(history: pd.DataFrame, groups: Mapping[str, Sequence[int]]) -> pd.DataFrame:
    """Per group: layers, merges, distinct B's left, the final tie-sets and the steps of the first / last merge."""
    rows = []
    for group, layers in groups.items():
        mine = history[history["group"] == group]
        sets = tie_sets(history, group, layers)
        rows.append({"group": group, "layers": len(layers), "merges": len(mine), "distinct_B": len(sets),
                     "tie_sets": sets, "first_step": mine["step"].min() if len(mine) else None,
                     "last_step": mine["step"].max() if len(mine) else None})
    return pd.DataFrame(rows)


# -- distances --------------------------------------------------------------------------------------------------
def distance_matrix(mats: Mapping[Any, Any], A: Any = None) -> pd.DataFrame:
    """Pairwise ‖M_i − M_j‖_F in float64 of labelled (out, r) matrices; with A (r, in): ‖(M_i − M_j) A‖_F
    (ASLoRA's "delta" distance)."""
    labels = list(mats)
    values = [torch.as_tensor(mats[k]).double() for k in labels]
    A = None if A is None else torch.as_tensor(A).double()
    out = np.zeros((len(labels), len(labels)))
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            diff = values[i] - values[j]
            if A is not None:
                diff = diff @ A
            out[i, j] = out[j, i] = float(torch.linalg.norm(diff))
    return pd.DataFrame(out, index=labels, columns=labels)


def b_distance_matrix(source: PathLike | AdapterFolder, group: str, which: str = "avg",
                      kind: str = "b") -> pd.DataFrame:
    """Layer × layer distance of the B's the group's layers use in an adapter folder (or a run directory's
    `adapter/`): `which="avg"` the running averages B̄ (what merging compares), "B" the current B's;
    `kind="b"` ‖·‖_F, "delta" ‖(·) A‖_F. Layers tied together share one B, so their distance is 0."""
    if which not in ("avg", "B") or kind not in ("b", "delta"):
        raise VBShareError(f"which must be avg or B and kind b or delta, got which={which!r}, kind={kind!r}")
    folder = source if isinstance(source, AdapterFolder) else read_adapter(adapter_dir(source))
    state = folder.state
    if folder.method != "aslora" or group not in state.get("groups", {}):
        raise VBShareError(f"{folder.path} has no aslora group {group!r}; groups: {sorted(state.get('groups', {}))}")
    key_of = {name: key for key, names in state["ties"][group].items() for name in names}
    prefix = STATE_PREFIX + ("avg_B_" if which == "avg" else "B_")
    mats = {}
    for name in state["groups"][group]:
        key = prefix + key_of[name]
        if key not in folder.tensors:
            raise VBShareError(f"{folder.path} has no tensor {key}")
        index = layer_index(name)
        mats[index if index is not None else name] = folder.tensors[key]
    A = None
    if kind == "delta":
        a_key = STATE_PREFIX + "A_" + role_key(group)
        if a_key not in folder.tensors:
            raise VBShareError(f"cannot find the shared A of {group} ({a_key}) in {folder.path}")
        A = folder.tensors[a_key]
    table = distance_matrix(mats, A)
    table.index.name = table.columns.name = "layer"
    return table


# -- figures ----------------------------------------------------------------------------------------------------
def _draw_tree(ax, tree: pd.DataFrame, layers: Sequence[int], height: str) -> None:
    n = len(layers)
    x = {i: float(i) for i in range(n)}
    y = {i: 0.0 for i in range(n)}
    for row in tree.itertuples():
        h = float(getattr(row, height))
        x[row.node] = (x[row.left] + x[row.right]) / 2
        y[row.node] = h
        for child in (row.left, row.right):
            ax.plot([x[child], x[child]], [y[child], h], color="C0")
        ax.plot([x[row.left], x[row.right]], [h, h], color="C0")
        label = f"{row.distance:.2g}" if height == "step" and row.distance is not None else f"step {row.step}"
        ax.annotate(label, (x[row.node], h), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    ax.scatter(range(n), [0] * n, color="C1", zorder=3, s=12)
    ax.set_xticks(range(n), [f"L{layer}" for layer in layers], fontsize=8)
    ax.set_ylabel("merge step" if height == "step" else "distance at merge")


def plot_merge_trees(history: pd.DataFrame, groups: Mapping[str, Sequence[int]], height: str = "step",
                     title: str | None = None):
    """One dendrogram-like panel per sharing group: leaves are layers, each join is a merge drawn at its step
    (`height="step"`, labelled with the distance) or at its distance (`height="distance"`, labelled with the step)."""
    from matplotlib.figure import Figure

    if height not in ("step", "distance"):
        raise VBShareError(f"height must be step or distance, got {height!r}")
    names = list(groups)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, group in zip(axes, names):
        _draw_tree(ax, merge_tree(history, group, groups[group]), groups[group], height)
        ax.set_title(group.split(".*.")[-1], fontsize=9)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title or "ASLoRA: which layers share B, and when")
    return fig


def plot_distance_matrix(table: pd.DataFrame, title: str | None = None, ax=None):
    """Heatmap of a layer × layer B-distance matrix."""
    from matplotlib.figure import Figure

    fig = None
    if ax is None:
        fig = Figure(figsize=(4.2, 3.6), layout="constrained")
        ax = fig.subplots()
    image = ax.imshow(table.to_numpy(dtype=float), cmap="viridis_r", interpolation="nearest")
    labels = [f"L{i}" for i in table.index]
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_title(title or "‖B̄_i − B̄_j‖", fontsize=9)
    ax.figure.colorbar(image, ax=ax, shrink=0.8)
    return fig if fig is not None else ax.figure


def plot_distance_matrices(source: PathLike | AdapterFolder, which: str = "avg", kind: str = "b"):
    """`plot_distance_matrix` for every sharing group of an adapter, side by side."""
    from matplotlib.figure import Figure

    folder = source if isinstance(source, AdapterFolder) else read_adapter(adapter_dir(source))
    names = list(folder.state["groups"])
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(4.4 * cols, 3.6 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, group in zip(axes, names):
        plot_distance_matrix(b_distance_matrix(folder, group, which, kind), title=group.split(".*.")[-1], ax=ax)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    what = "running averages B̄" if which == "avg" else "B"
    fig.suptitle(f"ASLoRA: distance between the layers' {what} ({'‖ΔB‖' if kind == 'b' else '‖ΔB·A‖'}; 0 = tied)")
    return fig


def plot_distance_snapshots(snapshots: Sequence[tuple[int, PathLike | AdapterFolder]], group: str,
                            which: str = "avg", kind: str = "b"):
    """One group's B-distance matrix at each `(step, adapter folder)` snapshot: tied layers turn to 0 as merges
    happen, and the pairs chosen are the closest ones at merge time."""
    from matplotlib.figure import Figure

    if not snapshots:
        raise VBShareError("plot_distance_snapshots needs at least one (step, adapter folder) snapshot")
    fig = Figure(figsize=(3.6 * len(snapshots), 3.3), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(snapshots), squeeze=False)).ravel()
    for ax, (step, src) in zip(axes, snapshots):
        plot_distance_matrix(b_distance_matrix(src, group, which, kind), title=f"step {step}", ax=ax)
    fig.suptitle(f"ASLoRA {group.split('.*.')[-1]}: B-distance between layers along training")
    return fig
