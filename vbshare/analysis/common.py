"""Reading run directories and adapter folders for the analysis notebooks.

A run directory of `python -m vbshare.train` (vbshare.rundir names its files) holds its config, metrics log and
summary, `adapter/` (the stored form), `adapter_topk/` (VB-LoRA), `merge_history.jsonl` (ASLoRA) and `checkpoint/adapter/` (the
training form). The analysis adds one convention of its own: `snapshots/step_<N>/` (or `stage_<N>/`), adapter
folders copied along the run (the trainer overwrites `checkpoint/` each time; `vbshare.analysis.demo` writes
snapshots for its own small runs, and any list of `(step, folder)` pairs works the same way).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import safetensors.torch
from torch import Tensor

from ..checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_adapter_config
from ..errors import VBShareError
from ..records import read_jsonl  # noqa: F401  (re-exported for the analysis modules)
from ..rundir import RunDir
from ..targets import layer_index, module_role

STATE_PREFIX = "vbshare."  # state_dict prefix of the model-wide shared tensors (VB-LoRA bank, ASLoRA A / B)

PathLike = str | os.PathLike


@dataclass
class AdapterFolder:
    """One `vbshare.save_adapter` folder, read without building a model."""

    path: Path
    described: dict[str, Any]  # adapter_config.json
    tensors: dict[str, Tensor]  # adapter_model.safetensors (model state_dict keys)

    @property
    def method(self) -> str:
        return self.described["method"]

    @property
    def config(self) -> dict[str, Any]:
        return self.described["config"]

    @property
    def targets(self) -> dict[str, tuple[int, int]]:
        """Adapted module -> (out, in), in injection order."""
        return {k: tuple(v) for k, v in self.described["targets"].items()}

    @property
    def state(self) -> dict[str, Any]:
        return self.described.get("state") or {}

    @property
    def topk_only(self) -> bool:
        return bool(self.described.get("topk_only"))


def read_adapter(folder: PathLike) -> AdapterFolder:
    """The JSON description (validated) and the tensors of an adapter folder, without a model."""
    folder = Path(folder)
    described = read_adapter_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise VBShareError(f"{weights} is missing; point at a folder written by vbshare.save_adapter")
    return AdapterFolder(folder, described, safetensors.torch.load_file(str(weights)))


def adapter_dir(run_or_adapter: PathLike, prefer: Sequence[str] = ("adapter", "checkpoint/adapter")) -> Path:
    """An adapter folder: the path itself when it is one, else the first of `prefer` inside a run directory."""
    path = Path(run_or_adapter)
    if (path / CONFIG_FILE).is_file():
        return path
    for name in prefer:
        if (path / name / CONFIG_FILE).is_file():
            return path / name
    raise VBShareError(f"{path} holds no adapter folder (looked for {', '.join(prefer)}); give a run directory "
                       "of python -m vbshare.train or a vbshare.save_adapter folder")


def method_folder(source: PathLike | AdapterFolder, method: str) -> AdapterFolder:
    """The adapter folder of `source` (a `vbshare.save_adapter` folder, a run directory holding one, or one
    already read), refusing an adapter of any method but `method`."""
    folder = source if isinstance(source, AdapterFolder) else read_adapter(adapter_dir(source))
    if folder.method != method:
        raise VBShareError(f"{folder.path} holds a {folder.method} adapter, not {method}")
    return folder


def module_kind(name: str) -> str:
    """The module type without the model prefix and layer index: `bert.encoder.layer.3.attention.self.query`
    -> `attention.self.query` (the part after the layer index; the role when there is no index)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i + 1:]) or module_role(name)
    return name


def short_name(name: str) -> str:
    """`L3.attention.self.query` for a layered module, the name itself otherwise."""
    index = layer_index(name)
    return name if index is None else f"L{index}.{module_kind(name)}"


def module_columns(name: str) -> dict[str, Any]:
    """The naming columns of a per-module table row: module (full name), short, layer (None without an index),
    kind."""
    return {"module": name, "short": short_name(name), "layer": layer_index(name), "kind": module_kind(name)}


def module_table(names: Iterable[str]) -> "pd.DataFrame":  # noqa: F821
    """One row per module: module, short, layer, kind (in the given order)."""
    import pandas as pd

    return pd.DataFrame([module_columns(n) for n in names], columns=["module", "short", "layer", "kind"])


# -- per-layer scaling vectors (VeRA's λ_d / λ_b, Tied-LoRA's u / v) ---------------------------------------------
def vector_stats(values: Tensor, init: float) -> dict[str, float]:
    """Summary of one learned vector of n entries (any shape, read flat; computed in float64, in the units of the
    entries): size (n), init (the value every entry started at), norm (L2), rms (norm/√n), mean, min, max and
    drift (rms of values − init: how far training moved the vector from its start)."""
    values = values.detach().double().reshape(-1)
    return {"size": values.numel(), "init": init, "norm": values.norm().item(),
            "rms": values.pow(2).mean().sqrt().item(), "mean": values.mean().item(), "min": values.min().item(),
            "max": values.max().item(), "drift": (values - init).pow(2).mean().sqrt().item()}


def layer_entry_matrix(vectors: Mapping[tuple[str, str], Tensor], kind: str, vector: str,
                       names: Sequence[str]) -> "pd.DataFrame":  # noqa: F821
    """Layer × entry matrix of one vector for one module kind: `vectors` maps (module, vector name) -> 1-D tensor
    (n entries, the same n for every layer of a kind), `vector` is one of the method's vector `names`; the result
    has one row per layer of the modules of `kind` (`module_kind`), in depth order (index "layer"; a module
    without a layer index comes first), and n columns ("entry")."""
    import pandas as pd

    if vector not in names:
        raise VBShareError(f"vector must be {' or '.join(names)}, got {vector!r}")
    rows = {layer_index(m): values.numpy()
            for (m, v), values in vectors.items() if v == vector and module_kind(m) == kind}
    if not rows:
        kinds = sorted({module_kind(m) for m, _ in vectors})
        raise VBShareError(f"no module of kind {kind!r}; kinds present: {', '.join(kinds)}")
    layers = sorted(rows, key=lambda i: -1 if i is None else i)
    table = pd.DataFrame(np.stack([rows[i] for i in layers]), index=layers)  # (layers, n)
    table.index.name, table.columns.name = "layer", "entry"
    return table


def plot_stat_by_layer(ax, rows: "pd.DataFrame", stat: str, init_lines: Iterable[float] = ()) -> None:  # noqa: F821
    """Draw `stat` against layer on `ax`, one line per module kind of `rows` (a vector table: columns layer, kind,
    `stat`, and optionally trained: a kind whose vectors are not all trained is dotted), a dashed grey line at each
    of `init_lines`, whole-layer x ticks, and y from 0 (lower when a value is negative) to 1.1 × the largest value
    or init line, so the starting values stay in view."""
    from matplotlib.ticker import MaxNLocator

    for i, (kind, mine) in enumerate(rows.groupby("kind", sort=False)):
        mine = mine.sort_values("layer")
        style = ":" if "trained" in mine and not mine["trained"].all() else "-"
        ax.plot(mine["layer"], mine[stat], style, marker="o", color=f"C{i}", label=kind)
    init_lines = sorted(set(init_lines))
    for init in init_lines:
        ax.axhline(init, color="grey", linestyle="--", linewidth=0.8)
    values = [float(v) for v in rows[stat]] + init_lines
    low, high = min([0.0, *values]), max([0.0, *values])
    ax.set_ylim(low * 1.1, (high if high > 0 else 1.0) * 1.1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")


def plot_layer_entry_heatmap(values: "pd.DataFrame", center: float, title: str, ax=None):  # noqa: F821
    """Heatmap of a layer × entry matrix (`layer_entry_matrix`), coloured on a diverging scale symmetric around
    `center` (the entries' starting value), so red / blue show how far and which way each entry moved. Draws on
    `ax` when given, else on a new figure sized to the matrix; returns the figure."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if ax is None:
        ax = Figure(figsize=(2.5 + min(0.35 * values.shape[1], 9.0), 1.2 + 0.35 * values.shape[0]),
                    layout="constrained").subplots()
    data = values.to_numpy(dtype=float)
    spread = max(float(np.abs(data - center).max()), 1e-12)
    image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="coolwarm",
                      norm=TwoSlopeNorm(vcenter=center, vmin=center - spread, vmax=center + spread))
    ax.set_yticks(range(len(values.index)), [f"L{i}" for i in values.index], fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("entry")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(image, ax=ax, shrink=0.8, label=f"value (centre {center:g})")
    return ax.figure


def list_snapshots(run_dir: PathLike) -> list[tuple[int, Path]]:
    """`(step, adapter folder)` of every `<run_dir>/snapshots/step_<N>` (or `stage_<N>`), in step order."""
    return [(step, folder) for step, folder in RunDir(run_dir).list_snapshots() if (folder / CONFIG_FILE).is_file()]


def read_summary(run_dir: PathLike) -> dict[str, Any]:
    folder = RunDir(run_dir)
    if not folder.finished:
        raise VBShareError(f"{folder.summary} does not exist; the run has not finished (or this is not a run directory)")
    return folder.read_summary()
