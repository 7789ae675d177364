"""Forgetting (`trainer.forgetting_eval=true`): how much worse the model predicts general text after training.

The general-text sample is fixed and embedded: the first FORGETTING_BLOCKS blocks of FORGETTING_BLOCK tokens of the
BBC News test-split articles (the bbc_news split; no BBC task trains on them, though data=bbc_lm scores on them
as its own test). Its LM loss (nats per token) is taken before training (the base model: the adapters switched
off, or, for full fine-tuning, the model at step 0 of this run) and after it; the run summary gets
{"loss_before", "loss_after", "loss_change", "perplexity_before", "perplexity_after"} (loss_change > 0: forgot).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..adapters.base import state_of
from ..core import disabled
from ..data.bbc import load_bbc_news
from ..data.encoding import tokenize_task
from ..data.examples import Split, Task
from ..errors import VBShareError
from .evaluation import score_split

if TYPE_CHECKING:
    from .run import Run

FORGETTING_BLOCK = 256  # tokens per block
FORGETTING_BLOCKS = 32  # blocks in the sample (8,192 tokens)


def general_text_task() -> Task:
    """The sample's source as an LM task: the BBC News test-split articles."""
    articles = load_bbc_news(seed=0)["test"]["text"]
    return Task("forgetting_sample", "lm", {"test": Split(articles)}, "perplexity", [], FORGETTING_BLOCK)


def check_forgetting(run: "Run") -> None:
    """Refuse, before any training, a run whose forgetting cannot be scored: a model that is not a causal LM, or a
    resumed full fine-tune (the loss before training is not kept in checkpoints)."""
    if not run.settings.trainer.forgetting_eval:
        return
    if run.task.kind != "lm":
        raise VBShareError("trainer.forgetting_eval=true scores a causal LM on general text; this run's model is a "
                           f"{run.task.kind} model, set trainer.forgetting_eval=false")
    if state_of(run.model, required=False) is None and run.step > 0:
        raise VBShareError("trainer.forgetting_eval=true with full fine-tuning needs the run to start at step 0 "
                           "(the loss before training is not kept in checkpoints); start a fresh run")


def general_text_loss(run: "Run") -> float:
    """LM loss (nats per token) of the run's model on the general-text sample (every process takes part)."""
    task = general_text_task()
    data = tokenize_task(task, run.tokenizer, splits=["test"])["test"]
    data.input_ids = data.input_ids[:FORGETTING_BLOCKS]  # FORGETTING_BLOCKS × (FORGETTING_BLOCK,)
    scores, _ = score_split(run.model, task, data, run.engine, run.settings.trainer.eval_batch_size, run.pad_id)
    return scores["loss"]


def loss_before(run: "Run") -> float | None:
    """The loss before training when it must be taken at the start (full fine-tuning, a fresh run); else None
    (an adapter is switched off at the end instead, which also covers resumed runs)."""
    check_forgetting(run)
    if not run.settings.trainer.forgetting_eval or state_of(run.model, required=False) is not None or run.step > 0:
        return None
    return general_text_loss(run)


def forgetting(run: "Run", before: float | None) -> dict[str, Any] | None:
    """The summary's forgetting record at the end of training (None when trainer.forgetting_eval is off)."""
    if not run.settings.trainer.forgetting_eval:
        return None
    after = general_text_loss(run)
    if before is None:
        if state_of(run.model, required=False) is None:
            raise VBShareError("trainer.forgetting_eval=true with full fine-tuning needs the run to start at step 0 "
                               "(the loss before training is not kept in checkpoints); start a fresh run")
        with disabled(run.model):
            before = general_text_loss(run)
    return {"sample": f"BBC News test-split articles, {FORGETTING_BLOCKS} blocks of {FORGETTING_BLOCK} tokens",
            "loss_before": before, "loss_after": after, "loss_change": after - before,
            "perplexity_before": math.exp(before), "perplexity_after": math.exp(after)}
