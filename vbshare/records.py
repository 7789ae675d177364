"""Plain run records shared by the trainer, the report, SoRA's scheduler and the analysis notebooks."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .errors import VBShareError

log = logging.getLogger("vbshare.records")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every non-empty line of a JSON-lines file (a run's metrics log, a method's records), each a
    JSON object.

    A torn last line (after the last newline, not valid JSON: a process killed while appending it) is dropped
    with a one-line warning. Every other line must be a whole JSON object: a bad one is an error naming the file
    and the line, since a torn write can only be the last.
    """
    path = Path(path)
    *lines, tail = path.read_bytes().split(b"\n")  # tail: what follows the last newline (b"" when it ends one)
    rows = [_row(line, path, number) for number, line in enumerate(lines, 1) if line.strip()]
    if tail.strip():
        try:
            rows.append(_row(tail, path, len(lines) + 1))
        except VBShareError:
            log.warning("%s: dropped its last line, cut short (a process stopped while writing it)", path)
    return rows


def _row(line: bytes, path: Path, number: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        raise VBShareError(f"{path} line {number} is not JSON ({str(err).split(':')[0]}); the file is damaged: "
                           "restore it, or remove that line") from None
    if not isinstance(row, dict):
        raise VBShareError(f"{path} line {number} is not a JSON object; the file is damaged: restore it, or "
                           "remove that line")
    return row


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {dotted key: leaf}: {"a": {"b": 1}} -> {"a.b": 1}; empty dicts vanish."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat
