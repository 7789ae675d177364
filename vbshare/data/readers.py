"""Reading your own data files: CSV / TSV / JSON / JSONL rows as dicts, and one instruction row as a chat."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ..errors import VBShareError
from .chat import ASSISTANT


def chat_of(row: dict[str, Any], number: int, prompt_column: str, response_column: str, messages_column: str,
             path: str) -> list[dict[str, str]]:
    """One instruction row as a chat: [user: prompt, assistant: response], or its `messages` list checked."""
    where = f"row {number} of {path}"
    if messages_column in row:
        chat = row[messages_column]
        if not isinstance(chat, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in chat):
            raise VBShareError(f"{where}: {messages_column!r} must be a list of {{\"role\": ..., \"content\": ...}} "
                               "objects with string values")
        if not any(m["role"] == ASSISTANT for m in chat):
            raise VBShareError(f"{where} has no {ASSISTANT!r} turn to learn from; add one or drop the row")
        return [{"role": m["role"], "content": m["content"]} for m in chat]
    prompt, response = row.get(prompt_column), row.get(response_column)
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise VBShareError(f"{where}: {prompt_column!r} and {response_column!r} must both be strings")
    return [{"role": "user", "content": prompt}, {"role": ASSISTANT, "content": response}]


def path_of(split: str, path: str, validation_path: str | None, test_path: str | None) -> str:
    return {"train": path, "validation": validation_path, "test": test_path}[split] or path


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .csv / .tsv, .json (a list of objects) or .jsonl file, as dicts."""
    path = Path(path)
    if not path.is_file():
        raise VBShareError(f"data file {path} does not exist; set data.path to a CSV, JSON or JSONL file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8") as handle:
                return list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
        if suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            return [json.loads(line) for line in lines if line.strip()]
        if suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(rows, dict) and len(rows) == 1:  # {"data": [...]} style
                rows = next(iter(rows.values()))
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise VBShareError(f"{path} must hold a JSON list of objects (one per example)")
            return rows
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as err:
        raise VBShareError(f"cannot parse {path} ({str(err).splitlines()[0]}); check its format") from None
    raise VBShareError(f"unsupported data file type {suffix!r} for {path}; use .csv, .tsv, .json or .jsonl")

