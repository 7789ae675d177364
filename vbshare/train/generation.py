"""Decoding for evaluation: the answers a causal LM (with its adapters, merged or not) generates for a split's prompts.

Batches are left-padded (so every prompt ends where generation starts) and decoded by transformers' `generate`
with the KV cache: greedy by default, or sampled with a fixed seed per batch (so the text does not depend on
how many processes decode). The answer is cut at the first stop string. With several processes each decodes
every `processes`-th batch and the answers are gathered in example order; sharded weights (FSDP) would need
every process in every forward pass, which `generate` cannot promise, so they are refused.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.encoding import Encoded
from ..data.examples import Decoding
from ..errors import VBShareError

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("vbshare.train")

SEED_STRIDE = 1_000_003  # batch starting at example i samples with seed decoding.seed * stride + i
PROGRESS_MIN_BATCHES = 4  # show a progress bar from this many batches per process


def left_padded(prompts: list[list[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask (B, T) with each prompt right-aligned (pads on the left)."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)  # (B, T)
    for b, prompt in enumerate(prompts):
        ids[b, longest - len(prompt):] = torch.tensor(prompt)
        mask[b, longest - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """`text` up to the first occurrence of any stop string, surrounding whitespace stripped."""
    ends = [at for at in (text.find(s) for s in stop if s) if at >= 0]
    return (text[:min(ends)] if ends else text).strip()


@torch.no_grad()
def generate_batch(model: nn.Module, tokenizer, prompts: list[list[int]], decoding: Decoding, seed: int,
                   device: torch.device | str) -> list[str]:
    """The decoded answers (text, stop strings cut off) of one batch of prompts (token ids)."""
    from transformers import GenerationConfig

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_padded(prompts, pad_id, device)
    config = GenerationConfig(max_new_tokens=decoding.max_new_tokens, do_sample=decoding.do_sample,
                              temperature=decoding.temperature if decoding.do_sample else None,
                              top_p=decoding.top_p if decoding.do_sample else None, top_k=None,
                              pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id, use_cache=True,
                              stop_strings=list(decoding.stop) or None)
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # sampling leaves the run's RNG as it was
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, tokenizer=tokenizer)
    new_tokens = out[:, ids.shape[1]:]  # (B, new)
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [cut_at_stop(text, decoding.stop) for text in texts]


def generate_split(model: nn.Module, tokenizer, data: Encoded, decoding: Decoding, engine: "Engine",
                   batch_size: int, desc: str = "decoding") -> list[str]:
    """Every example's answer, in split order, on every process (each decodes its share; then gathered)."""
    if data.prompts is None:
        raise VBShareError("this split has no prompts to decode (only a generation task's evaluation splits do)")
    if engine.sharded:
        raise VBShareError("decoding a generation task with sharded weights (trainer.strategy=fsdp) is not "
                           "supported; use trainer.strategy=ddp")
    processes, me = engine.num_processes, engine.process_index
    n = len(data.prompts)
    rounds = math.ceil(n / (batch_size * processes))
    was_training = model.training
    model.eval()
    answers: list[tuple[int, str]] = []
    bar = tqdm(total=n, desc=desc, unit="ex", leave=False,
               disable=not engine.is_main or math.ceil(n / batch_size) < PROGRESS_MIN_BATCHES)
    for round_no in range(rounds):
        start = (round_no * processes + me) * batch_size
        indices = range(start, min(start + batch_size, n))
        if not len(indices):
            continue
        with engine.autocast():
            texts = generate_batch(model, tokenizer, [data.prompts[i] for i in indices], decoding,
                                   decoding.seed * SEED_STRIDE + start, engine.device)
        answers.extend(zip(indices, texts))
        bar.update(len(indices) * processes)
    bar.close()
    model.train(was_training)
    return [text for _, text in sorted(engine.gather_objects(answers))]
