"""Tasks from `datasets` (the Hugging Face Hub, its local cache, or a local folder / file): `data=hf` with a column
map for any dataset, and the field's generation benchmarks as presets (`data=metamath_gsm8k`, `data=e2e_nlg`,
`data=alpaca`). Each needs the network or a datasets cache; without either it fails at once in one line.
`name` may also be a local folder of train / validation / test files, or one data file (what the tests use).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import VBShareError
from .bbc import stratified_split
from .chat import ASSISTANT
from .examples import Decoding, Split, Task

PEFT_MATH_PROMPT = "Question: {query} Think step by step.\nAnswer:"  # PEFT's method comparison (MetaMathQA)
DATA_FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_table(name: str, subset: str | None, split: str) -> list[dict[str, Any]]:
    """One split of a `datasets` dataset as rows. `name`: a Hub id (cache first), a local folder, or one data file
    (which then holds every split as "train"). Missing data or no network: one VBShareError line."""
    import datasets

    path = Path(name).expanduser()
    try:
        if path.is_file():
            kind = DATA_FILE_TYPES.get(path.suffix.lower())
            if kind is None:
                raise VBShareError(f"data file {path} must be one of {', '.join(DATA_FILE_TYPES)}")
            table = datasets.load_dataset(kind, data_files=str(path))
        elif path.is_dir():
            table = datasets.load_dataset(str(path))
        else:
            table = datasets.load_dataset(name, subset)
    except VBShareError:
        raise
    except Exception as err:  # network / cache / format errors come in many types
        line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VBShareError(f"cannot load dataset {name!r}{f' ({subset})' if subset else ''} through datasets "
                           f"({line}); it needs internet or a local datasets cache (or give a local folder)") from None
    if split not in table:
        raise VBShareError(f"dataset {name!r} has no split {split!r}; it has: {', '.join(table)}")
    return list(table[split])


def _column(rows: list[dict[str, Any]], column: str, name: str) -> None:
    if rows and column not in rows[0]:
        raise VBShareError(f"column {column!r} not found in {name}; its columns are: {', '.join(rows[0])}")


def generation_chats(rows: list[dict[str, Any]], prompt_template: str, response_column: str,
                     name: str) -> list[list[dict[str, str]]]:
    """[user: prompt_template filled from the row's columns, assistant: the response column] per row."""
    _column(rows, response_column, name)
    chats = []
    for row in rows:
        try:
            prompt = prompt_template.format(**row)
        except KeyError as err:
            raise VBShareError(f"data.prompt_template names column {err} that {name} does not have; its columns "
                               f"are: {', '.join(row)}") from None
        except (IndexError, ValueError, AttributeError) as err:
            raise VBShareError(f"data.prompt_template {prompt_template!r} is not a template of named columns ({err}); "
                               "write it like 'Question: {question}'") from None
        chats.append([{"role": "user", "content": prompt}, {"role": ASSISTANT, "content": str(row[response_column])}])
    return chats


def hf(name: str, kind: str = "generation", subset: str | None = None, train_split: str = "train",
       validation_split: str | None = "validation", test_split: str | None = "test",
       fractions: dict[str, float] | None = None, seed: int = 0, max_length: int = 256,
       text_column: str = "text", text_pair_column: str | None = None, label_column: str = "label",
       prompt_column: str = "prompt", response_column: str = "response", prompt_template: str | None = None,
       metrics: Sequence[str] = ("rouge_l", "rouge1", "rouge2", "bleu"), max_new_tokens: int = 64,
       stop: Sequence[str] = (), chat_template: bool = True, packing: bool = False) -> Task:
    """Any `datasets` dataset as a task, by a column map. kind "classification": text_column (+ text_pair_column)
    and label_column; "lm": text_column, scored by perplexity; "generation": prompt_column (or prompt_template,
    "{column}" fields) -> response_column, scored by `metrics` on the decoded answers. A split name set to null or
    missing from the dataset is cut from the training split by `fractions` (train / validation / test)."""
    if kind not in ("classification", "lm", "generation"):
        raise VBShareError(f"data.kind={kind!r} must be classification, lm or generation")
    rows = {"train": load_table(name, subset, train_split)}
    for ours, theirs in (("validation", validation_split), ("test", test_split)):
        if theirs is not None:
            try:
                rows[ours] = load_table(name, subset, theirs)
            except VBShareError as err:
                if "has no split" not in str(err):
                    raise
    rows = _split_missing(rows, fractions, seed)
    if kind == "generation":
        template = prompt_template or "{" + prompt_column + "}"
        splits = {s: Split(messages=generation_chats(r, template, response_column, name)) for s, r in rows.items()}
        decoding = Decoding(tuple(metrics), max_new_tokens, tuple(stop))
        return Task(Path(name).name, "lm", splits, decoding.metrics[0], [], max_length, packing, chat_template, decoding)
    for split, table in rows.items():
        _column(table, text_column, f"{name} {split}")
    if kind == "lm":
        return Task(Path(name).name, "lm", {s: Split([str(r[text_column]) for r in t]) for s, t in rows.items()},
                    "perplexity", [], max_length)
    for table in rows.values():
        _column(table, label_column, name)
    label_names = sorted({str(r[label_column]) for t in rows.values() for r in t})
    label_id = {label: i for i, label in enumerate(label_names)}
    splits = {s: Split([str(r[text_column]) for r in t], [label_id[str(r[label_column])] for r in t],
                       [str(r[text_pair_column]) for r in t] if text_pair_column else None) for s, t in rows.items()}
    return Task(Path(name).name, "classification", splits, "accuracy", label_names, max_length)


def _split_missing(rows: dict[str, list], fractions: dict[str, float] | None, seed: int) -> dict[str, list]:
    """Cut the splits the dataset lacks from its training rows (seeded, in the given fractions)."""
    missing = [s for s in ("validation", "test") if s not in rows]
    if not missing:
        return rows
    fractions = dict(fractions or {"train": 0.8, "validation": 0.1, "test": 0.1})
    fractions = {s: f for s, f in fractions.items() if s == "train" or s in missing}
    total = sum(fractions.values())
    parts = stratified_split([0] * len(rows["train"]), {s: f / total for s, f in fractions.items()}, seed)
    whole = rows["train"]
    return {**rows, **{s: [whole[i] for i in idx] for s, idx in parts.items()}}


def metamath_gsm8k(train_name: str = "meta-math/MetaMathQA", gsm8k_name: str = "openai/gsm8k",
                   gsm8k_subset: str | None = "main", validation_size: int = 50, max_train: int | None = None,
                   seed: int = 0, max_length: int = 256, max_new_tokens: int = 300,
                   prompt_template: str = PEFT_MATH_PROMPT, stop: Sequence[str] = ("\nQuestion:",),
                   chat_template: bool = False) -> Task:
    """PEFT's math benchmark: train on MetaMathQA (query -> response), validate on a fixed seeded sample of
    `validation_size` GSM8K train questions, test on GSM8K test; prompt "Question: {query} Think step by step.
    \\nAnswer:", scored by exact match of the final number (vbshare.train.text_metrics.extract_number)."""
    train = load_table(train_name, None, "train")
    if max_train is not None:
        train = [train[i] for i in sorted(np.random.default_rng(seed).permutation(len(train))[:max_train])]
    gsm_train, gsm_test = (load_table(gsm8k_name, gsm8k_subset, s) for s in ("train", "test"))
    pick = sorted(np.random.default_rng(seed).permutation(len(gsm_train))[:validation_size].tolist())
    as_query = lambda rows: [{"query": r["question"], "response": r["answer"]} for r in rows]  # noqa: E731
    _column(train, "query", train_name)
    for rows in (gsm_train, gsm_test):
        _column(rows, "question", gsm8k_name)
        _column(rows, "answer", gsm8k_name)
    splits = {"train": Split(messages=generation_chats(train, prompt_template, "response", train_name)),
              "validation": Split(messages=generation_chats(as_query([gsm_train[i] for i in pick]), prompt_template,
                                                            "response", gsm8k_name)),
              "test": Split(messages=generation_chats(as_query(gsm_test), prompt_template, "response", gsm8k_name))}
    decoding = Decoding(("exact_match",), max_new_tokens, tuple(stop))
    return Task("metamath_gsm8k", "lm", splits, "exact_match", [], max_length, False, chat_template, decoding)


def e2e_nlg(name: str = "tuetschek/e2e_nlg", subset: str | None = None, max_length: int = 128,
            max_new_tokens: int = 64, metrics: Sequence[str] = ("bleu", "rouge_l", "chrf", "rouge1", "rouge2"),
            prompt_template: str = "{meaning_representation}\n", chat_template: bool = False) -> Task:
    """E2E NLG: meaning representation -> restaurant description (train / validation / test as published), scored
    by BLEU, ROUGE-L and chrF. Each (MR, reference) row is one example (single-reference scores, not the
    challenge's multi-reference ones)."""
    rows = {s: load_table(name, subset, s) for s in ("train", "validation", "test")}
    splits = {s: Split(messages=generation_chats(r, prompt_template, "human_reference", name)) for s, r in rows.items()}
    decoding = Decoding(tuple(metrics), max_new_tokens, ("\n",))
    return Task("e2e_nlg", "lm", splits, decoding.metrics[0], [], max_length, False, chat_template, decoding)


def alpaca(name: str = "yahma/alpaca-cleaned", held_out: int = 200, seed: int = 0, max_length: int = 256,
           max_new_tokens: int = 128, metrics: Sequence[str] = ("rouge_l", "rouge1", "rouge2"),
           chat_template: bool = True, packing: bool = False) -> Task:
    """Cleaned Alpaca instructions (instruction + optional input -> output): `held_out` seeded examples each for
    validation and test, the rest trains; the held-out answers are generated and scored by ROUGE-L, and their
    perplexity is reported as for any language-model task."""
    rows = load_table(name, None, "train")
    for column in ("instruction", "input", "output"):
        _column(rows, column, name)
    if len(rows) < 2 * held_out + 1:
        raise VBShareError(f"{name} has {len(rows)} rows, too few to hold out data.held_out={held_out} twice")
    order = np.random.default_rng(seed).permutation(len(rows)).tolist()
    parts = {"validation": order[:held_out], "test": order[held_out:2 * held_out], "train": order[2 * held_out:]}
    prompt = lambda r: r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")  # noqa: E731
    splits = {s: Split(messages=[[{"role": "user", "content": prompt(rows[i])},
                                  {"role": ASSISTANT, "content": rows[i]["output"]}] for i in sorted(idx)])
              for s, idx in parts.items()}
    decoding = Decoding(tuple(metrics), max_new_tokens)
    return Task("alpaca", "lm", splits, decoding.metrics[0], [], max_length, packing, chat_template, decoding)
