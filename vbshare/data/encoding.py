"""Tokenisation of a task, once per run: `tokenize_task` turns its splits into `Encoded` token-id lists
(classification examples truncated, LM text cut into blocks, chats encoded with targets on the responses)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable

from ..errors import VBShareError
from .chat import ASSISTANT, IGNORE_INDEX, encode_chat, pack
from .examples import Task

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """A tokenised split. input_ids: one list of token ids per example (unpadded, ≤ max_length);
    labels: class ids / scores for classification, None for LM.
    lm_labels (LM only, optional): per-token target ids, same length as input_ids, IGNORE_INDEX (-100) where
    no loss falls (prompt tokens); the loss compares position t's prediction with lm_labels[t + 1] (the usual
    one-position shift). None: every next token is a target (a plain token stream).
    prompts / references (generation tasks): each example's prompt ids (the sequence up to its answer, what the
    model continues when decoding) and its reference answer text."""

    input_ids: list[list[int]]
    labels: list[Any] | None
    token_type_ids: list[list[int]] | None = None
    lm_labels: list[list[int]] | None = None
    prompts: list[list[int]] | None = None
    references: list[str] | None = None

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



def _instruction_examples(chats: list[list[dict[str, str]]], tokenizer, task: Task, split: str) -> Encoded:
    """Encode, truncate to task.max_length, drop chats whose targets were cut away entirely, optionally pack.
    A generation task cuts the prompt instead (`_generation_example`) and packs the training split only."""
    examples, prompts, references = [], [], []
    for chat in chats:
        if task.decoding is not None:
            ids, labels, prompt = _generation_example(chat, tokenizer, task)
            prompts.append(prompt)
            references.append(chat[-1]["content"])
        else:
            ids, labels = encode_chat(chat, tokenizer, task.chat_template)
            ids, labels = ids[:task.max_length], labels[:task.max_length]
        if any(label != IGNORE_INDEX for label in labels[1:]):  # position 0 is never predicted
            examples.append((ids, labels))
    if len(examples) < len(chats):
        if task.decoding is not None:
            raise VBShareError(f"{split} split of {task.name}: {len(chats) - len(examples)} examples have an empty "
                               "answer; drop them from the data")
        log.warning("%s split of %s: %d of %d examples have no response token within data.max_length=%d and are "
                    "left out", split, task.name, len(chats) - len(examples), len(chats), task.max_length)
    if not examples:
        raise VBShareError(f"no {split} example of {task.name} keeps a response token within data.max_length="
                           f"{task.max_length}; raise data.max_length or shorten the prompts")
    if task.packing and (task.decoding is None or split == "train"):
        examples = pack(examples, task.max_length)
    if task.decoding is None or split == "train":
        prompts, references = None, None
    return Encoded([ids for ids, _ in examples], None, lm_labels=[labels for _, labels in examples],
                   prompts=prompts, references=references)


def _generation_example(chat: list[dict[str, str]], tokenizer, task: Task) -> tuple[list[int], list[int], list[int]]:
    """(input ids, lm labels, prompt ids) of a chat that ends on its answer: the last user turn is cut to
    task.max_length tokens, the answer to decoding.max_new_tokens tokens (plus its end marker), and the prompt
    is everything before the answer (with the template's generation prompt), which decoding continues."""
    if chat[-1]["role"] != ASSISTANT:
        raise VBShareError(f"a generation task's chats must end on the {ASSISTANT!r} answer; one ends on "
                           f"{chat[-1]['role']!r}")
    chat = [dict(turn) for turn in chat]
    last_user = max((i for i, turn in enumerate(chat) if turn["role"] != ASSISTANT), default=None)
    if last_user is not None:
        tokens = tokenizer(chat[last_user]["content"], add_special_tokens=False)["input_ids"]
        if len(tokens) > task.max_length:
            chat[last_user]["content"] = tokenizer.decode(tokens[:task.max_length])
    ids, labels = encode_chat(chat, tokenizer, task.chat_template)
    start = len(labels)  # the answer's first position: the start of the last run of targets
    while start > 0 and labels[start - 1] == IGNORE_INDEX:
        start -= 1
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    end = start + task.decoding.max_new_tokens + 1
    return ids[:end], labels[:end], ids[:start]
