"""Tasks for the training app: raw examples per split, and their one-time tokenisation.

A task builder (the `_target_` of a `configs/data/*.yaml`) returns a `Task`: the splits' examples, what kind
of model it needs ("classification" or "lm") and its metric. Examples are texts with labels (classification),
plain texts (language modelling on a token stream) or chats (instruction data: prompt / response pairs or
`messages` lists, for causal LMs). `tokenize_task` turns a task into `Encoded` splits once per run; batches
are padded on the fly (`vbshare.data.batching`).
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import VBShareError
from .bbc import load_bbc_news, stratified_split

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # target id that cross-entropy skips (PyTorch's and transformers' convention)
ASSISTANT = "assistant"  # the chat role whose turns are the targets of instruction data

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
    """One split's raw examples: text (and optional second text) with an int label (float for regression),
    or, for instruction data, one chat per example in `messages` (a list of {"role", "content"} dicts whose
    "assistant" turns are the targets; `text` is then empty)."""

    text: list[str] = field(default_factory=list)
    label: list[Any] = field(default_factory=list)
    text_pair: list[str] | None = None
    messages: list[list[dict[str, str]]] | None = None

    def __len__(self) -> int:
        return len(self.messages) if self.messages is not None else len(self.text)

    def take(self, indices: Iterable[int]) -> "Split":
        """The examples at these indices, in the order given."""
        keep = list(indices)
        pick = lambda values: None if values is None else [values[i] for i in keep]  # noqa: E731
        return Split(pick(self.text) if self.text else [], pick(self.label) if self.label else [],
                     pick(self.text_pair), pick(self.messages))

    def sample(self, n: int, seed: int = 0) -> "Split":
        """n examples drawn without replacement by a seeded shuffle (kept in their original order)."""
        if n >= len(self):
            return self
        return self.take(sorted(np.random.default_rng(seed).permutation(len(self))[:n].tolist()))

    def per_class(self, n: int, seed: int) -> "Split":
        """Exactly n examples of every label, each class drawn by a seeded shuffle (kept in original order)."""
        if not self.label:
            raise VBShareError("data.train_per_class needs labelled examples; leave it null for this data")
        if n < 1:
            raise VBShareError(f"data.train_per_class must be a positive integer or null, got {n!r}")
        rng = np.random.default_rng(seed)
        labels = np.asarray(self.label)
        keep: list[int] = []
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            if len(members) < n:
                raise VBShareError(f"label {label} has only {len(members)} training examples, fewer than "
                                   f"data.train_per_class={n}; use at most {len(members)}")
            keep.extend(rng.permutation(members)[:n].tolist())
        return self.take(sorted(keep))


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
    packing: bool = False  # instruction data: several chats per sequence of max_length tokens
    chat_template: bool = True  # instruction data: render chats with the tokenizer's template when it has one

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def eval_splits(self) -> list[str]:
        """Splits with labels to evaluate on at the end (GLUE test labels are hidden)."""
        return [s for s in ("validation", "test") if s in self.splits and len(self.splits[s])]


# -- builders (configs/data/*.yaml) -------------------------------------------------------------------------------
def bbc_news(seed: int = 0, max_length: int = 128, train_per_class: int | None = None,
             train_subset_seed: int = 0) -> Task:
    """BBC News topic classification: 5 labels, 70/10/20 stratified split (vbshare.data.bbc).

    train_per_class: keep only this many training articles per topic (few-shot; drawn with
    train_subset_seed); None keeps all. Validation and test are never subsampled.
    """
    raw = load_bbc_news(seed=seed)
    splits = {name: Split(raw[name]["text"], raw[name]["label"]) for name in ("train", "validation", "test")}
    if train_per_class is not None:
        splits["train"] = splits["train"].per_class(train_per_class, train_subset_seed)
    task = Task("bbc_news", "classification", splits, "accuracy", raw["label_names"], max_length)
    warn_unseen_labels(task)
    return task


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
    prompt_column: str = "prompt",
    response_column: str = "response",
    messages_column: str = "messages",
    packing: bool = False,
    chat_template: bool = True,
    train_per_class: int | None = None,
    train_subset_seed: int = 0,
) -> Task:
    """Your own CSV / JSON / JSONL files: classification, or instruction data for a causal LM.

    Classification: a text column (and optional second text) and a label column; labels are mapped to ids in
    sorted order; train_per_class keeps that many training examples per label (drawn with train_subset_seed).
    Instruction data (chosen when the rows have `messages_column`, or both `prompt_column` and
    `response_column`): the loss falls on the response / assistant turns only, scored by perplexity on them;
    `chat_template` and `packing` say how chats become token sequences (see `encode_chat`, `pack`).
    Without validation_path / test_path the one file is split by `fractions` (stratified by label).
    """
    tables = {"train": read_table(path)}
    if validation_path:
        tables["validation"] = read_table(validation_path)
    if test_path:
        tables["test"] = read_table(test_path)
    for split, rows in tables.items():
        if not rows:
            raise VBShareError(f"the {split} file {_path_of(split, path, validation_path, test_path)} has no rows; give a file with data")
    first = tables["train"][0]
    if messages_column in first or (prompt_column in first and response_column in first):
        if train_per_class is not None:
            raise VBShareError("data.train_per_class needs labelled examples; instruction data has none, leave it null")
        splits = {name: Split(messages=[_chat_of(row, i, prompt_column, response_column, messages_column,
                                                 _path_of(name, path, validation_path, test_path))
                                        for i, row in enumerate(rows, start=1)])
                  for name, rows in tables.items()}
        splits = _split_if_one_file(splits, fractions, seed, path)
        return Task(Path(path).stem, "lm", splits, "perplexity", [], max_length, packing, chat_template)
    columns = [text_column, label_column] + ([text_pair_column] if text_pair_column else [])
    for split, rows in tables.items():
        missing = [c for c in columns if c not in rows[0]]
        if missing:
            raise VBShareError(
                f"column {missing[0]!r} not found in {_path_of(split, path, validation_path, test_path)}; "
                f"its columns are: {', '.join(rows[0])} (instruction data needs {prompt_column!r} and "
                f"{response_column!r}, or {messages_column!r})"
            )
    for split, rows in tables.items():
        for number, row in enumerate(rows, start=1):
            value = row.get(label_column)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise VBShareError(f"row {number} of {_path_of(split, path, validation_path, test_path)} has an empty "
                                   f"{label_column!r} value; give every row a label (or drop the row)")
    label_names = sorted({str(r[label_column]) for rows in tables.values() for r in rows})
    if len(label_names) == 1:
        raise VBShareError(f"every row of the data has the same {label_column!r} value {label_names[0]!r}; "
                           "classification needs at least two labels (is data.label_column the right column?)")
    label_id = {name: i for i, name in enumerate(label_names)}

    def to_split(rows: list[dict]) -> Split:
        return Split([str(r[text_column]) for r in rows], [label_id[str(r[label_column])] for r in rows],
                     [str(r[text_pair_column]) for r in rows] if text_pair_column else None)

    splits = _split_if_one_file({name: to_split(rows) for name, rows in tables.items()}, fractions, seed, path)
    if train_per_class is not None:
        splits["train"] = splits["train"].per_class(train_per_class, train_subset_seed)
    task = Task(Path(path).stem, "classification", splits, "accuracy", label_names, max_length)
    warn_unseen_labels(task)
    return task


def warn_unseen_labels(task: Task) -> None:
    """One warning line for each validation / test split holding labels that the training split never has:
    the model cannot learn them, so every such example is scored wrong (a few-shot subset or a small file's
    split can leave a class out)."""
    if task.kind != "classification" or task.num_labels < 2:
        return
    seen = set(task.splits["train"].label)
    for name in ("validation", "test"):
        split = task.splits.get(name)
        unseen = sorted(set(split.label) - seen) if split is not None else []
        if unseen:
            count = sum(label in unseen for label in split.label)
            names = ", ".join(repr(task.label_names[i]) for i in unseen)
            log.warning("%s split of %s: %d of %d examples have labels never seen in training (%s); the model cannot "
                        "predict them, add training examples of those labels or check the split",
                        name, task.name, count, len(split), names)


def _split_if_one_file(splits: dict[str, Split], fractions: dict[str, float] | None, seed: int,
                       path: str) -> dict[str, Split]:
    """Only a training file: divide it by `fractions` (stratified by label when there are labels)."""
    if len(splits) == 1:
        fractions = dict(fractions or {"train": 0.8, "validation": 0.1, "test": 0.1})
        whole = splits.pop("train")
        strata = whole.label or [0] * len(whole)
        splits.update({name: whole.take(idx) for name, idx in stratified_split(strata, fractions, seed).items()})
    if not len(splits["train"]):
        raise VBShareError(f"the training split of {path} is empty; give more rows or change data.fractions")
    return splits


def _chat_of(row: dict[str, Any], number: int, prompt_column: str, response_column: str, messages_column: str,
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
    labels: class ids / scores for classification, None for LM.
    lm_labels (LM only, optional): per-token target ids, same length as input_ids, IGNORE_INDEX (-100) where
    no loss falls (prompt tokens); the loss compares position t's prediction with lm_labels[t + 1] (the usual
    one-position shift). None: every next token is a target (a plain token stream)."""

    input_ids: list[list[int]]
    labels: list[Any] | None
    token_type_ids: list[list[int]] | None = None
    lm_labels: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_task(task: Task, tokenizer, max_examples: int | None = None,
                  splits: Iterable[str] | None = None) -> dict[str, Encoded]:
    """Tokenise the splits once (all of them, or those named in `splits`). Classification: truncate each
    example to task.max_length. LM on texts: join them with EOS and cut the stream into full blocks of
    task.max_length tokens (the tail is dropped). Instruction data: one sequence per chat with targets on the
    assistant turns only (`encode_chat`), several chats per sequence when task.packing (`pack`)."""
    encoded = {}
    for name in task.splits if splits is None else splits:
        if name not in task.splits:
            raise VBShareError(f"task {task.name} has no {name!r} split; it has: {', '.join(task.splits)}")
        split = task.splits[name]
        if max_examples is not None:
            split = split.sample(max_examples)
        if not len(split):
            raise VBShareError(f"the {name} split of {task.name} is empty; give data with examples in every split")
        if split.messages is not None:
            encoded[name] = _instruction_examples(split.messages, tokenizer, task, name)
        elif task.kind == "lm":
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


# -- instruction data -----------------------------------------------------------------------------------------------
def encode_chat(messages: list[dict[str, str]], tokenizer, use_template: bool = True) -> tuple[list[int], list[int]]:
    """(input ids, lm labels) of one chat; labels are the ids on assistant turns and IGNORE_INDEX elsewhere.

    With a chat template (when `use_template` and the tokenizer has one): the chat is rendered by the template;
    each assistant turn's target is the text the template adds between "everything before it, with the
    generation prompt" and "everything up to and including it" (so its end-of-turn marker is learnt too).
    The rendered pieces are tokenised one by one without added special tokens, so the boundaries are exact.
    Without a template: BOS (when the tokenizer has one), then every turn's content as is, each assistant turn
    followed by EOS (a target); put your own separator at the end of a prompt if the model needs one.
    """
    pieces: list[tuple[str | list[int], bool]] = []  # (text or token ids, is target)
    if use_template and getattr(tokenizer, "chat_template", None):
        def render(turns: list[dict[str, str]], generation_prompt: bool) -> str:
            try:
                return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
            except Exception as err:  # jinja raises its own errors for conversations a template rejects
                raise VBShareError(f"the tokenizer's chat template rejects a conversation ({err}); fix the data "
                                   "or set data.chat_template=false") from None

        done = ""
        for i, turn in enumerate(messages):
            if turn["role"] != ASSISTANT:
                continue
            before, after = render(messages[:i], True), render(messages[:i + 1], False)
            if not (before.startswith(done) and after.startswith(before)):
                raise VBShareError("the tokenizer's chat template does not render a conversation as a continuation "
                                   "of its beginning, so response tokens cannot be marked; set data.chat_template=false")
            pieces += [(before[len(done):], False), (after[len(before):], True)]
            done = after
        full = render(messages, False)
        if full.startswith(done) and len(full) > len(done):
            pieces.append((full[len(done):], False))  # turns after the last assistant turn
    else:
        if tokenizer.eos_token_id is None:
            raise VBShareError("instruction data without a chat template needs a tokenizer with an EOS token")
        if tokenizer.bos_token_id is not None:
            pieces.append(([tokenizer.bos_token_id], False))
        for turn in messages:
            is_target = turn["role"] == ASSISTANT
            pieces.append((turn["content"], is_target))
            if is_target:
                pieces.append(([tokenizer.eos_token_id], True))
    ids: list[int] = []
    labels: list[int] = []
    for piece, is_target in pieces:
        tokens = piece if isinstance(piece, list) else tokenizer(piece, add_special_tokens=False)["input_ids"]
        ids += tokens
        labels += tokens if is_target else [IGNORE_INDEX] * len(tokens)
    return ids, labels


def pack(examples: list[tuple[list[int], list[int]]], max_length: int) -> list[tuple[list[int], list[int]]]:
    """Greedy packing in order: chats are appended to the current sequence while it stays ≤ max_length, then a
    new one starts; no chat is split. Attention is not masked between packed chats (their labels are, so no
    loss crosses a boundary: each chat starts with non-target tokens)."""
    packed: list[tuple[list[int], list[int]]] = []
    for ids, labels in examples:
        if packed and len(packed[-1][0]) + len(ids) <= max_length:
            packed[-1] = (packed[-1][0] + ids, packed[-1][1] + labels)
        else:
            packed.append((list(ids), list(labels)))
    return packed


def _instruction_examples(chats: list[list[dict[str, str]]], tokenizer, task: Task, split: str) -> Encoded:
    """Encode, truncate to task.max_length, drop chats whose targets were cut away entirely, optionally pack."""
    examples = []
    for chat in chats:
        ids, labels = encode_chat(chat, tokenizer, task.chat_template)
        ids, labels = ids[:task.max_length], labels[:task.max_length]
        if any(label != IGNORE_INDEX for label in labels[1:]):  # position 0 is never predicted
            examples.append((ids, labels))
    if len(examples) < len(chats):
        log.warning("%s split of %s: %d of %d examples have no response token within data.max_length=%d and are "
                    "left out", split, task.name, len(chats) - len(examples), len(chats), task.max_length)
    if not examples:
        raise VBShareError(f"no {split} example of {task.name} keeps a response token within data.max_length="
                           f"{task.max_length}; raise data.max_length or shorten the prompts")
    if task.packing:
        examples = pack(examples, task.max_length)
    return Encoded([ids for ids, _ in examples], None, lm_labels=[labels for _, labels in examples])
