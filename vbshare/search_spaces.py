"""The comparison's search spaces: `configs/search/<name>.yaml`, one per adapter config that vbshare.compare tunes.

    search:    Optuna space, dotted keys into configs/adapter/<name>.yaml (a leading / is from the config root):
               key -> {low, high, log, step} or {choices: [...]}
    size_key:  the hyperparameter compare.sizes sets for the method (absent: the method has no size knob)

They sit apart from configs/adapter/ so that the training app never sees them: an adapter config holds only
what a run trains with. vbshare.compare tunes with them; vbshare.report reads a method's size_key from them
(runs made before the spaces moved recorded it in their own config, which the report reads first).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import VBShareError

SEARCH_SPEC_KEYS = {"low", "high", "log", "step", "choices"}
SEARCH_DIR = Path(__file__).resolve().parents[1] / "configs" / "search"  # repo-root configs/ (editable install)


@dataclass(frozen=True)
class SearchSpace:
    search: dict[str, Any] = field(default_factory=dict)
    size_key: str | None = None


SEARCH_NAME = re.compile(r"[a-z][a-z0-9_]*")  # an adapter config's name: never a path


def search_path(name: str) -> Path:
    return SEARCH_DIR / f"{name}.yaml"


def read_search(name: str) -> SearchSpace:
    """configs/search/<name>.yaml as plain data; an empty space when the file is missing or `name` is no adapter
    config's name (it may come from a run folder: a path there must not choose the file), so the comparison refuses
    it with its own message."""
    path = search_path(name)
    if not SEARCH_NAME.fullmatch(name) or not path.is_file():
        return SearchSpace()
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    except OmegaConfBaseException as err:  # the YAML parser's errors arrive wrapped or as yaml errors
        raise VBShareError(f"{path} is not readable ({str(err).splitlines()[0]}); fix the file") from None
    except Exception as err:  # yaml.YAMLError, one line
        raise VBShareError(f"{path} is not valid YAML ({' '.join(str(err).split())}); fix the file") from None
    unknown = sorted(set(loaded) - {"search", "size_key"}) if isinstance(loaded, dict) else ["<not a mapping>"]
    if unknown:
        raise VBShareError(f"{path} holds {', '.join(map(str, unknown))}; a search file holds only search and size_key")
    size_key = loaded.get("size_key")
    return SearchSpace(dict(loaded.get("search") or {}), None if size_key is None else str(size_key))


def check_search(method: str, search: dict[str, Any]) -> None:
    """Refuse an empty space, or an entry that is neither a range {low, high[, log, step]} nor {choices}."""
    if not search:
        raise VBShareError(f"configs/search/{method}.yaml has no `search` space; add one (e.g. "
                           "search: {lr.head: {low: 1.0e-4, high: 3.0e-2, log: true}}) to compare it")
    for key, spec in search.items():
        ok = isinstance(spec, dict) and set(spec) <= SEARCH_SPEC_KEYS and (
            ("choices" in spec and set(spec) == {"choices"}) or {"low", "high"} <= set(spec))
        if not ok:
            raise VBShareError(f"configs/search/{method}.yaml search.{key}: give {{low: ..., high: ..., log: true}} "
                               f"or {{choices: [...]}}, got {spec!r}")
