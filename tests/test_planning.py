"""Planning without weights: every registered method injects into, and is summarised on, a model built on the meta
device (no tensor materialised), with the counts of the same model built with weights; the published count of
LoRA r = 64 on Llama-2-7B; and the planner's memory estimate (`vbshare.plan`)."""
from __future__ import annotations

import accelerate
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlamaForCausalLM

import vbshare
from vbshare.registry import METHODS

from adapter_cases import CASES
from test_matrix import BASES, build_adapted


class Materialised(TorchDispatchMode):
    """Records every tensor an operation makes off the meta device (name of the op, bytes)."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.made.append((str(func), t.numel() * t.element_size()))
        return out


def counts(summary: vbshare.AdapterSummary) -> tuple:
    return (summary.trainable, summary.stored, summary.adapter_bytes,
            [(row["module"], row["shape"], row["rank"], row["trainable"], row["stored"]) for row in summary.rows])


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("kind", sorted(BASES))
def test_every_method_plans_on_the_meta_device(method, kind):
    """`torch.device("meta")` for BERT, `accelerate.init_empty_weights` (parameters only) for GPT-2's Conv1D:
    inject and summary make no tensor off the meta device, and count what the model with weights counts."""
    with_weights = vbshare.summary(build_adapted(method, kind))
    empty = accelerate.init_empty_weights(include_buffers=True) if kind == "gpt2" else torch.device("meta")
    with empty:
        model = BASES[kind][0]()
    with Materialised() as seen:
        vbshare.inject(model, method, targets=BASES[kind][1], **CASES[method].hyperparameters)
        planned = vbshare.summary(model)
    assert seen.made == []
    assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert counts(planned) == counts(with_weights)


LLAMA_2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def test_llama2_7b_lora_r64_count():
    """LoRA r = 64 on every linear layer of Llama-2-7B except the LM head stores 159,907,840 parameters (the count
    PEFT reports for this QLoRA-style setup: 32 layers × 64 × (4·(4096 + 4096) + 3·(4096 + 11008)))."""
    with accelerate.init_empty_weights(include_buffers=True):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_2_7B))
    vbshare.inject(model, "lora", targets="all-linear", r=64)
    counted = vbshare.summary(model)
    assert len(vbshare.adapters(model)) == 7 * 32 and "lm_head" not in vbshare.adapters(model)
    assert counted.trainable == counted.stored == 159_907_840
    assert counted.adapter_bytes == 4 * 159_907_840
