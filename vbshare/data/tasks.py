"""Tasks for the training app: raw text + labels per split, and their one-time tokenisation.

A task builder (the `_target_` of a `configs/data/*.yaml`) returns a `Task`: the splits' texts and labels,
what kind of model it needs ("classification" or "lm") and its metric. `tokenize_task` turns it into
`Encoded` splits once per run; the training loop pads batches on the fly.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import VBShareError
from .bbc import load_bbc_news, stratified_split

GLUE_TASKS = {  # task -> (first text column, second text column or None, metric)
    "cola": ("sentence", None, "mcc"),
    "sst2": ("sentence", None, "accuracy"),
    "mrpc": ("sentence1", "sentence2", "f1"),
    "qqp": ("question1", "question2", "f1"),
    "stsb": ("sentence1", "sentence2", "pearson"),
    "mnli": ("premise", "hypothesis", "accuracy"),
    "qnli": ("question", "sentence", "accuracy"),
    "rte": ("sentence1", "sentence2", "accuracy"),
    "wnli": ("sentence1", "sentence2", "accuracy"),
}


@dataclass
class Split:
    """One split's raw examples: text (and optional second text) with an int label (float for regression)."""

    text: list[str]
    label: list[Any] = field(default_factory=list)
    text_pair: list[str] | None = None

    def __len__(self) -> int:
        return len(self.text)

    def sample(self, n: int, seed: int = 0) -> "Split":
        """n examples drawn without replacement by a seeded shuffle (kept in their original order)."""
        if n >= len(self):
            return self
        keep = sorted(np.random.default_rng(seed).permutation(len(self))[:n].tolist())
        pick = lambda values: None if values is None else [values[i] for i in keep]  # noqa: E731
        return Split(pick(self.text), pick(self.label) if self.label else [], pick(self.text_pair))


@dataclass
class Task:
    """kind: "classification" or "lm". metric: the headline metric ("accuracy", "f1", "mcc", "pearson",
    "perplexity"); higher is better except perplexity. num_labels: 1 means regression (GLUE STS-B)."""

    name: str
    kind: str
    splits: dict[str, Split]
    metric: str
    label_names: list[str] = field(default_factory=list)
    max_length: int = 128

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def eval_splits(self) -> list[str]:
        """Splits with labels to evaluate on at the end (GLUE test labels are hidden)."""
        return [s for s in ("validation", "test") if s in self.splits and len(self.splits[s])]


# -- builders (configs/data/*.yaml) -------------------------------------------------------------------------------
def bbc_news(seed: int = 0, max_length: int = 128) -> Task:
    """BBC News topic classification: 5 labels, 70/10/20 stratified split (vbshare.data.bbc)."""
    raw = load_bbc_news(seed=seed)
    splits = {name: Split(raw[name]["text"], raw[name]["label"]) for name in ("train", "validation", "test")}
    return Task("bbc_news", "classification", splits, "accuracy", raw["label_names"], max_length)


def bbc_lm(seed: int = 0, max_length: int = 256) -> Task:
    """Causal LM on the BBC News articles (same split as bbc_news), scored by perplexity."""
    raw = load_bbc_news(seed=seed)
    splits = {name: Split(raw[name]["text"]) for name in ("train", "validation", "test")}
    return Task("bbc_lm", "lm", splits, "perplexity", [], max_length)


def glue(task: str, max_length: int = 128) -> Task:
    """A GLUE task through `datasets` ("nyu-mll/glue"); the test split's labels are hidden, so it is dropped."""
    if task not in GLUE_TASKS:
        raise VBShareError(f"unknown GLUE task {task!r}; choose one of: {', '.join(GLUE_TASKS)}")
    import datasets

    first, second, metric = GLUE_TASKS[task]
    try:
        raw = datasets.load_dataset("nyu-mll/glue", task)
    except Exception as err:  # network / cache errors come in many types
        line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VBShareError(f"cannot load GLUE {task} through datasets ({line}); it needs internet or a local cache") from None
    validation = "validation_matched" if task == "mnli" else "validation"
    splits = {}
    for ours, theirs in (("train", "train"), ("validation", validation)):
        rows = raw[theirs]
        splits[ours] = Split(list(rows[first]), list(rows["label"]), list(rows[second]) if second else None)
    names = ["score"] if task == "stsb" else list(raw["train"].features["label"].names)
    return Task(f"glue_{task}", "classification", splits, metric, names, max_length)


def files(
    path: str,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    validation_path: str | None = None,
    test_path: str | None = None,
    fractions: dict[str, float] | None = None,
    seed: int = 0,
    max_length: int = 128,
) -> Task:
    """Classification from your own CSV / JSON / JSONL files; labels are mapped to ids in sorted order."""
    tables = {"train": read_table(path)}
    if validation_path:
        tables["validation"] = read_table(validation_path)
    if test_path:
        tables["test"] = read_table(test_path)
    columns = [text_column, label_column] + ([text_pair_column] if text_pair_column else [])
    for split, rows in tables.items():
        if not rows:
            raise VBShareError(f"the {split} file {_path_of(split, path, validation_path, test_path)} has no rows; give a file with data")
        missing = [c for c in columns if c not in rows[0]]
        if missing:
            raise VBShareError(
                f"column {missing[0]!r} not found in {_path_of(split, path, validation_path, test_path)}; "
                f"its columns are: {', '.join(rows[0])}"
            )
    label_names = sorted({str(r[label_column]) for rows in tables.values() for r in rows})
    label_id = {name: i for i, name in enumerate(label_names)}

    def to_split(rows: list[dict]) -> Split:
        return Split([str(r[text_column]) for r in rows], [label_id[str(r[label_column])] for r in rows],
                     [str(r[text_pair_column]) for r in rows] if text_pair_column else None)

    splits = {name: to_split(rows) for name, rows in tables.items()}
    if len(splits) == 1:  # no separate files: split the one file, stratified by label
        fractions = dict(fractions or {"train": 0.8, "validation": 0.1, "test": 0.1})
        whole = splits.pop("train")
        for name, idx in stratified_split(whole.label, fractions, seed).items():
            splits[name] = Split([whole.text[i] for i in idx], [whole.label[i] for i in idx],
                                 None if whole.text_pair is None else [whole.text_pair[i] for i in idx])
    if not len(splits["train"]):
        raise VBShareError(f"the training split of {path} is empty; give more rows or change data.fractions")
    return Task(Path(path).stem, "classification", splits, "accuracy", label_names, max_length)


def _path_of(split: str, path: str, validation_path: str | None, test_path: str | None) -> str:
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


# -- tokenisation (once per run) ------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """A tokenised split. input_ids: one list of token ids per example (unpadded, ≤ max_length);
    labels: class ids / scores for classification, None for LM (the targets are the inputs shifted)."""

    input_ids: list[list[int]]
    labels: list[Any] | None
    token_type_ids: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_task(task: Task, tokenizer, max_examples: int | None = None) -> dict[str, Encoded]:
    """Tokenise every split once. Classification: truncate each example to task.max_length. LM: join the
    articles with EOS and cut the stream into full blocks of task.max_length tokens (the tail is dropped)."""
    encoded = {}
    for name, split in task.splits.items():
        if max_examples is not None:
            split = split.sample(max_examples)
        if not len(split):
            raise VBShareError(f"the {name} split of {task.name} is empty; give data with examples in every split")
        if task.kind == "lm":
            encoded[name] = _lm_blocks(split.text, tokenizer, task.max_length, name, task.name)
        else:
            out = tokenizer(split.text, split.text_pair, truncation=True, max_length=task.max_length)
            encoded[name] = Encoded(out["input_ids"], list(split.label), out.get("token_type_ids"))
    return encoded


def _lm_blocks(texts: list[str], tokenizer, block: int, split: str, task: str) -> Encoded:
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids + ([eos] if eos is not None else []))
    n_blocks = len(stream) // block
    if n_blocks == 0:
        raise VBShareError(
            f"the {split} split of {task} has {len(stream)} tokens, fewer than one block of data.max_length={block}; "
            "use more data or a smaller data.max_length"
        )
    blocks = [stream[i * block:(i + 1) * block] for i in range(n_blocks)]  # n_blocks × (block,)
    return Encoded(blocks, None)
