"""VB-LoRA's sharing pattern: which bank vectors each module's sub-vectors choose (docs/methods.md §1, §4).

Every sub-vector u of every adapted module mixes k bank vectors: u = Σ_{s ∈ TopK(σ)} w_s 𝔅_s. A *selection*
is one (sub-vector, slot) pair with its bank index s and admixture weight w_s. The tables here are built from
the logits (training form, `adapter/` or `checkpoint/adapter/`) or from the stored top-k form (`adapter_topk/`),
with the layouts of vbshare.adapters.vblora:  logits_A (r, in/b, h), logits_B (out/b, r, h).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..errors import VBShareError
from ..targets import layer_index
from .common import AdapterFolder, PathLike, adapter_dir, method_folder, module_kind, read_adapter, short_name

FACTORS = ("A", "B")
SELECTION_COLUMNS = ["module", "short", "layer", "kind", "factor", "rank", "position", "slot", "vector", "weight"]


# -- tables -------------------------------------------------------------------------------------------------
def _topk_from_logits(logits: Tensor, topk: int) -> tuple[Tensor, Tensor]:
    """(indices, weights), each (..., k): the k largest logits and the softmax over them (as `mix` does)."""
    top_logits, top_index = logits.float().topk(topk, dim=-1)
    return top_index, top_logits.softmax(-1)


def _topk_from_stored(indices: Tensor, head: Tensor) -> tuple[Tensor, Tensor]:
    """The stored form keeps k indices and the first k−1 weights; the last weight is 1 − Σ."""
    head = head.float()
    return indices.long(), torch.cat([head, 1.0 - head.sum(-1, keepdim=True)], dim=-1)


def selections_from_tensors(tensors: Mapping[str, Tensor], topk: int | None = None,
                            modules: Sequence[str] | None = None) -> pd.DataFrame:
    """The selection table of VB-LoRA adapter tensors (keys `<module>.logits_A` / `.logits_B`, or their
    `_topk_indices` / `_topk_weights` pairs). `topk` is needed for logits; `modules` fixes the row order.

    Columns: module, short, layer, kind, factor ("A"/"B"), rank (the rank-one component i), position (the
    sub-vector's index along in/b for A, out/b for B), slot (0 = largest weight), vector (bank index), weight.
    """
    found: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
    for key, value in tensors.items():
        for factor in FACTORS:
            base = f".logits_{factor}"
            if key.endswith(base):
                if topk is None:
                    raise VBShareError("selections from logits need topk (the adapter config's topk)")
                found[(key[: -len(base)], factor)] = _topk_from_logits(value, topk)
            elif key.endswith(base + "_topk_indices"):
                module = key[: -len(base + "_topk_indices")]
                head = tensors[f"{module}{base}_topk_weights"]
                found[(module, factor)] = _topk_from_stored(value, head)
    if not found:
        raise VBShareError("no VB-LoRA logits or top-k tensors found; is this a vblora adapter?")
    names = list(modules) if modules is not None else list(dict.fromkeys(m for m, _ in found))
    frames = []
    for module in names:
        for factor in FACTORS:
            if (module, factor) not in found:
                continue
            index, weight = found[(module, factor)]  # A: (r, in/b, k); B: (out/b, r, k)
            if factor == "B":
                index, weight = index.transpose(0, 1), weight.transpose(0, 1)  # -> (r, out/b, k)
            r, n, k = index.shape
            rank, position, slot = np.meshgrid(np.arange(r), np.arange(n), np.arange(k), indexing="ij")
            frames.append(pd.DataFrame({
                "module": module, "short": short_name(module), "layer": layer_index(module),
                "kind": module_kind(module), "factor": factor, "rank": rank.ravel(), "position": position.ravel(),
                "slot": slot.ravel(), "vector": index.reshape(-1).numpy(), "weight": weight.reshape(-1).numpy(),
            }))
    return pd.concat(frames, ignore_index=True)[SELECTION_COLUMNS]


def selections(source: PathLike | AdapterFolder) -> pd.DataFrame:
    """The selection table of a VB-LoRA adapter folder (training or top-k form) or run directory."""
    folder = method_folder(source, "vblora")
    return selections_from_tensors(folder.tensors, folder.config["topk"], modules=list(folder.targets))


def num_vectors_of(source: PathLike | AdapterFolder) -> int:
    folder = source if isinstance(source, AdapterFolder) else read_adapter(adapter_dir(source))
    return int(folder.config["num_vectors"])


def usage_matrix(sel: pd.DataFrame, num_vectors: int, by: str = "module", value: str = "weight") -> pd.DataFrame:
    """Rows = modules (or `by` = "short", "layer", "kind", "factor"), columns = bank vectors 0..h−1; entries:
    summed admixture weight (`value="weight"`) or the number of selections (`value="count"`)."""
    if value not in ("weight", "count"):
        raise VBShareError(f"value must be weight or count, got {value!r}")
    data = sel.assign(count=1)
    table = data.pivot_table(index=by, columns="vector", values=value, aggfunc="sum", fill_value=0, sort=False)
    table = table.reindex(columns=range(num_vectors), fill_value=0)
    table.columns.name = "vector"
    return table


def usage_counts(sel: pd.DataFrame, num_vectors: int) -> pd.DataFrame:
    """One row per bank vector: count (selections), weight (summed), modules (distinct modules choosing it)."""
    grouped = sel.groupby("vector")
    table = pd.DataFrame({"count": grouped.size(), "weight": grouped["weight"].sum(),
                          "modules": grouped["module"].nunique()})
    table = table.reindex(range(num_vectors), fill_value=0)
    table["count"] = table["count"].astype(int)
    table["modules"] = table["modules"].astype(int)
    table.index.name = "vector"
    return table


def usage_summary(sel: pd.DataFrame, num_vectors: int, top: int = 5) -> dict[str, Any]:
    """Headline numbers: selections, vectors used / never chosen, the most chosen vectors and their share."""
    counts = usage_counts(sel, num_vectors)
    ranked = counts.sort_values(["count", "weight"], ascending=False)
    total = int(counts["count"].sum())
    return {
        "selections": total,
        "num_vectors": num_vectors,
        "used": int((counts["count"] > 0).sum()),
        "never_chosen": int((counts["count"] == 0).sum()),
        "most_chosen": [(int(v), int(c)) for v, c in ranked["count"].head(top).items()],
        "top_share": float(ranked["count"].head(top).sum() / total) if total else 0.0,
        "shared_by_2plus_modules": int((counts["modules"] >= 2).sum()),
    }


def similarity(usage: pd.DataFrame) -> pd.DataFrame:
    """Cosine similarity of the rows of a usage matrix (1 = the same vectors in the same proportions)."""
    values = usage.to_numpy(dtype=float)
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    unit = np.divide(values, norms, out=np.zeros_like(values), where=norms > 0)
    return pd.DataFrame(unit @ unit.T, index=usage.index, columns=usage.index)


def cluster_order(sim: pd.DataFrame) -> list:
    """Row labels in the leaf order of an average-linkage clustering on 1 − similarity (similar rows adjacent)."""
    if len(sim) < 3:
        return list(sim.index)
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    distance = np.clip(1.0 - sim.to_numpy(dtype=float), 0.0, None)
    distance = (distance + distance.T) / 2
    np.fill_diagonal(distance, 0.0)
    order = leaves_list(linkage(squareform(distance, checks=False), method="average", optimal_ordering=True))
    return [sim.index[i] for i in order]


def selection_sets(sel: pd.DataFrame) -> pd.Series:
    """Per sub-vector (module, factor, rank, position): the frozenset of chosen bank indices."""
    return sel.groupby(["module", "factor", "rank", "position"], sort=False)["vector"].agg(frozenset)


def selection_drift(snapshots: Sequence[tuple[int, PathLike | pd.DataFrame]]) -> pd.DataFrame:
    """How the selections changed along training, from `(step, adapter folder or selection table)` pairs.

    One row per snapshot: step, changed_vs_previous / changed_vs_final (fraction of sub-vectors whose chosen
    set differs), overlap_with_final (mean |S ∩ S_final| / k), vectors_used (distinct bank vectors chosen).
    """
    if not snapshots:
        raise VBShareError("selection_drift needs at least one (step, adapter folder) snapshot")
    tables = [(step, src if isinstance(src, pd.DataFrame) else selections(src)) for step, src in snapshots]
    sets = [(step, selection_sets(t)) for step, t in tables]
    final = sets[-1][1]
    k = max(len(s) for s in final)
    rows, previous = [], None
    for (step, current), (_, table) in zip(sets, tables):
        aligned = current.reindex(final.index)
        rows.append({
            "step": step,
            "changed_vs_previous": float(np.mean([a != b for a, b in zip(aligned, previous)])) if previous is not None else 0.0,
            "changed_vs_final": float(np.mean([a != b for a, b in zip(aligned, final)])),
            "overlap_with_final": float(np.mean([len(a & b) / k for a, b in zip(aligned, final)])),
            "vectors_used": int(table["vector"].nunique()),
        })
        previous = aligned
    return pd.DataFrame(rows)


# -- figures ------------------------------------------------------------------------------------------------
def plot_usage_heatmap(usage: pd.DataFrame, sort_vectors: bool = True, title: str | None = None):
    """Module × bank-vector heatmap of the admixture weight (vectors sorted by total use when `sort_vectors`)."""
    from matplotlib.figure import Figure

    table = usage
    if sort_vectors:
        table = usage[usage.sum(axis=0).sort_values(ascending=False, kind="stable").index]
    fig = Figure(figsize=(10, 0.25 * len(table) + 1.5), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(table.to_numpy(dtype=float), aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(table)), [str(i) for i in table.index], fontsize=7)
    ax.set_xlabel("bank vector" + (" (sorted by total weight)" if sort_vectors else ""))
    if len(table.columns) <= 40:
        ax.set_xticks(range(len(table.columns)), [str(c) for c in table.columns], fontsize=6)
    ax.set_title(title or "VB-LoRA: admixture weight per module and bank vector")
    fig.colorbar(image, ax=ax, label="summed weight")
    return fig


def plot_usage_counts(counts: pd.DataFrame, title: str | None = None):
    """Bank vectors ranked by how often they are chosen, and the histogram of the counts."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    ranked = counts["count"].sort_values(ascending=False).to_numpy()
    left.bar(np.arange(len(ranked)), ranked, width=1.0)
    left.set_xlabel("bank vectors, most chosen first")
    left.set_ylabel("selections")
    unused = int((ranked == 0).sum())
    left.set_title(f"{unused} of {len(ranked)} vectors never chosen")
    right.hist(counts["count"], bins=np.arange(counts["count"].max() + 2) - 0.5)
    right.set_xlabel("selections per vector")
    right.set_ylabel("vectors")
    fig.suptitle(title or "VB-LoRA: bank usage")
    return fig


def plot_similarity(sim: pd.DataFrame, order: Sequence | None = None, title: str | None = None):
    """Similarity matrix of selections, rows / columns in `order` (e.g. `cluster_order(sim)`)."""
    from matplotlib.figure import Figure

    order = list(order) if order is not None else list(sim.index)
    table = sim.loc[order, order]
    size = min(10, 2.5 + 0.28 * len(table))
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(table.to_numpy(dtype=float), vmin=0, vmax=1, cmap="magma", interpolation="nearest")
    labels = [str(i) for i in table.index]
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title(title or "cosine similarity of bank usage")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def plot_drift(drift: pd.DataFrame, title: str | None = None):
    """Fraction of sub-vectors whose choice differs from the previous snapshot and from the final one."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(drift["step"], drift["changed_vs_previous"], marker="o", label="changed since previous snapshot")
    ax.plot(drift["step"], drift["changed_vs_final"], marker="s", label="differs from final")
    ax.plot(drift["step"], drift["overlap_with_final"], marker="^", label="overlap with final (|S∩S_final|/k)")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("fraction of sub-vectors")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title(title or "VB-LoRA: how the selections moved during training")
    return fig
