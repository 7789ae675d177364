"""Tasks for the training app: the task builders and the raw examples of their splits.

A task builder (the `_target_` of a `configs/data/*.yaml`) returns a `Task`: the splits' examples, what kind
of model it needs ("classification" or "lm") and its metric. Examples are texts with labels (classification),
plain texts (language modelling on a token stream) or chats (instruction data: prompt / response pairs or
`messages` lists, for causal LMs). Files are read by `vbshare.data.readers`; `tokenize_task`
(`vbshare.data.encoding`, chats through `vbshare.data.chat`) turns a task into `Encoded` splits once per run;
batches are padded on the fly (`vbshare.data.batching`). The names of those modules are importable from here too.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from ..errors import VBShareError
from .bbc import load_bbc_news, stratified_split
from .chat import ASSISTANT, IGNORE_INDEX, encode_chat, pack
from .encoding import Encoded, tokenize_task
from .examples import Decoding, Split, Task
from .readers import chat_of, path_of, read_table

log = logging.getLogger(__name__)

__all__ = ["ASSISTANT", "GLUE_TASKS", "IGNORE_INDEX", "Encoded", "Split", "Task", "bbc_headlines", "bbc_lm", "bbc_news", "chat_of",
           "encode_chat", "files", "glue", "pack", "path_of", "read_table", "tokenize_task", "warn_unseen_labels"]

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


def bbc_headlines(seed: int = 0, max_length: int = 256, instruction: str = "Write the headline of this news article.\n\n",
                  max_new_tokens: int = 24, metrics: Sequence[str] = ("rouge_l", "rouge1", "rouge2", "bleu"),
                  stop: Sequence[str] = ("\n",), do_sample: bool = False, temperature: float = 1.0,
                  top_p: float = 1.0, decoding_seed: int = 0, chat_template: bool = True) -> Task:
    """Headline generation on the BBC News articles (bbc_news's split, less the 17 validation / test articles whose
    body is also in an earlier split under another headline, so no body is in two splits):
    the prompt is `instruction` + the article body (cut to max_length tokens), the answer its first line, the
    headline; the loss falls on the headline, the test is the generated headline scored by ROUGE-L (and
    `metrics`). With a chat template the pair is one user / assistant exchange, else prompt then headline."""
    raw = load_bbc_news(seed=seed)
    splits, earlier = {}, set()  # bodies of the splits before: a few articles differ only in their headline
    for name in ("train", "validation", "test"):
        chats, bodies = [], set()
        for article in raw[name]["text"]:
            headline, _, body = article.partition("\n")
            if body.strip() in earlier:  # the same body in two splits would leak its headline
                continue
            bodies.add(body.strip())
            chats.append([{"role": "user", "content": instruction + body.strip()},
                          {"role": ASSISTANT, "content": headline.strip()}])
        earlier |= bodies
        splits[name] = Split(messages=chats)
    decoding = Decoding(tuple(metrics), max_new_tokens, tuple(stop), do_sample, temperature, top_p, decoding_seed)
    return Task("bbc_headlines", "lm", splits, decoding.metrics[0], [], max_length,
                chat_template=chat_template, decoding=decoding)


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
            raise VBShareError(f"the {split} file {path_of(split, path, validation_path, test_path)} has no rows; give a file with data")
    first = tables["train"][0]
    if messages_column in first or (prompt_column in first and response_column in first):
        if train_per_class is not None:
            raise VBShareError("data.train_per_class needs labelled examples; instruction data has none, leave it null")
        splits = {name: Split(messages=[chat_of(row, i, prompt_column, response_column, messages_column,
                                                 path_of(name, path, validation_path, test_path))
                                        for i, row in enumerate(rows, start=1)])
                  for name, rows in tables.items()}
        splits = _split_if_one_file(splits, fractions, seed, path)
        return Task(Path(path).stem, "lm", splits, "perplexity", [], max_length, packing, chat_template)
    columns = [text_column, label_column] + ([text_pair_column] if text_pair_column else [])
    for split, rows in tables.items():
        missing = [c for c in columns if c not in rows[0]]
        if missing:
            raise VBShareError(
                f"column {missing[0]!r} not found in {path_of(split, path, validation_path, test_path)}; "
                f"its columns are: {', '.join(rows[0])} (instruction data needs {prompt_column!r} and "
                f"{response_column!r}, or {messages_column!r})"
            )
    for split, rows in tables.items():
        for number, row in enumerate(rows, start=1):
            value = row.get(label_column)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise VBShareError(f"row {number} of {path_of(split, path, validation_path, test_path)} has an empty "
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
