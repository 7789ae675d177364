"""Chats as token sequences: `encode_chat` marks the assistant turns as the targets (through the tokenizer's chat
template when it has one), `pack` puts several encoded chats into one sequence."""
from __future__ import annotations

from ..errors import VBShareError

IGNORE_INDEX = -100  # target id that cross-entropy skips (PyTorch's and transformers' convention)
ASSISTANT = "assistant"  # the chat role whose turns are the targets of instruction data


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

