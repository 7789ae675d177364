"""Reading run directories and adapter folders for the analysis notebooks.

A run directory of `python -m vbshare.train` holds `config.yaml`, `metrics.jsonl`, `summary.json`, `adapter/`
(the stored form), `adapter_topk/` (VB-LoRA), `merge_history.jsonl` (ASLoRA) and `checkpoint/adapter/` (the
training form). The analysis adds one convention of its own: `snapshots/step_<N>/` (or `stage_<N>/`), adapter
folders copied along the run (the trainer overwrites `checkpoint/` each time; `vbshare.analysis.demo` writes
snapshots for its own small runs, and any list of `(step, folder)` pairs works the same way).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import safetensors.torch
from torch import Tensor

from ..checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_adapter_config
from ..errors import VBShareError
from ..records import read_jsonl  # noqa: F401  (re-exported for the analysis modules)
from ..targets import layer_index, module_role

STATE_PREFIX = "vbshare."  # state_dict prefix of the model-wide shared tensors (VB-LoRA bank, ASLoRA A / B)
SNAPSHOTS = "snapshots"
_SNAPSHOT_NAME = re.compile(r"^(?:step|stage)_(\d+)$")

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


def module_table(names: Iterable[str]) -> "pd.DataFrame":  # noqa: F821
    """One row per module: module, short, layer, kind (in the given order)."""
    import pandas as pd

    rows = [{"module": n, "short": short_name(n), "layer": layer_index(n), "kind": module_kind(n)} for n in names]
    return pd.DataFrame(rows, columns=["module", "short", "layer", "kind"])


def list_snapshots(run_dir: PathLike) -> list[tuple[int, Path]]:
    """`(step, adapter folder)` of every `<run_dir>/snapshots/step_<N>` (or `stage_<N>`), in step order."""
    root = Path(run_dir) / SNAPSHOTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _SNAPSHOT_NAME.match(child.name)
        if match and (child / CONFIG_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def read_summary(run_dir: PathLike) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise VBShareError(f"{path} does not exist; the run has not finished (or this is not a run directory)")
    return json.loads(path.read_text())
