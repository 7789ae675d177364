"""Plain run records shared by the trainer, the report, SoRA's scheduler and the analysis notebooks."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every non-empty line of a JSON-lines file (metrics.jsonl, merge_history.jsonl, sora_stages.jsonl)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {dotted key: leaf}: {"a": {"b": 1}} -> {"a.b": 1}; empty dicts vanish."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat
