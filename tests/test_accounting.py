"""`vbshare.summary` against the published VB-LoRA parameter counts, on randomly initialised RoBERTa shapes.

The VB-LoRA paper reports 0.027M stored parameters on RoBERTa-base and 0.033M on RoBERTa-large for h = 90
vectors of length b = 256, rank 4, top-2 (exact: 26,928 and 33,408). With docs/methods.md §1's formula
h·b + n_sub·(k−1) + n_sub·k·f (f = 1/4: uint8 indices, h < 256), n_sub = Σ r·(in + out)/b, these numbers come
out exactly when "all" means every linear layer of each encoder block — query, key, value, the attention
output dense, the intermediate dense and the output dense (6 per block: 72 on base, 144 on large) — and
neither the pooler nor the classification head:
    base:  per block 4·(768+768) + 2·(768+3072) = 13,824;  ×12 = 165,888;  n_sub = 4·165,888/256 = 2,592
           23,040 + 2,592·1 + 2,592·2·0.25 = 26,928
    large: per block 4·(1024+1024) + 2·(1024+4096) = 18,432;  ×24 = 442,368;  n_sub = 6,912
           23,040 + 6,912 + 3,456 = 33,408
"""
from __future__ import annotations

import pytest
import torch
from transformers import RobertaConfig, RobertaModel

import vbshare

ENCODER_LINEAR = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
PAPER = dict(r=4, num_vectors=90, vector_length=256, topk=2)
ROBERTA = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


def roberta(size: str) -> torch.nn.Module:
    """A randomly initialised RoBERTa of the published shape, with the pooler (a linear layer "all" leaves out)."""
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, **ROBERTA[size])
    return RobertaModel(config, add_pooling_layer=True).eval()


@pytest.mark.parametrize("size,published,modules", [("base", 26_928, 72), ("large", 33_408, 144)])
def test_vblora_reproduces_the_published_stored_counts(size, published, modules):
    model = vbshare.inject(roberta(size), "vblora", targets=ENCODER_LINEAR, **PAPER)
    assert len(vbshare.adapters(model)) == modules
    assert not [name for name in vbshare.adapters(model) if "pooler" in name]
    counted = vbshare.summary(model)
    assert counted.stored == published
    n_sub = published - 90 * 256  # = n_sub·(k−1) + n_sub·k/4 = 1.5·n_sub
    assert counted.rows[0] == {"module": "(shared)", "shape": None, "rank": None, "trainable": 90 * 256,
                               "stored": 90.0 * 256}
    assert sum(row["stored"] for row in counted.rows[1:]) == n_sub
    # the training form: the bank and the full logits, h per sub-vector
    assert counted.trainable == 90 * 256 + (n_sub / 1.5) * 90
    assert vbshare.summary(model, topk_only=False).stored == counted.trainable
    # the compact file: one uint8 index per (sub-vector, k) and k−1 = 1 fp32 weight per sub-vector, plus the bank
    assert counted.adapter_bytes == 4 * 90 * 256 + (n_sub / 1.5) * (2 * 1 + 1 * 4)


def test_summary_prints_whole_counts_without_decimals():
    model = vbshare.inject(torch.nn.Sequential(torch.nn.Linear(16, 32)), "lora", targets=["0"], r=2)
    text = str(vbshare.summary(model))
    assert "stored 96 |" in text and "96.00" not in text
    model = vbshare.inject(torch.nn.Sequential(torch.nn.Linear(16, 32)), "vblora", targets=["0"], r=1,
                           num_vectors=4, vector_length=16, topk=2)
    # h·b + n_sub·(k−1) + n_sub·k/4 with n_sub = (16 + 32)/16 = 3: 64 + 3 + 1.5
    assert "stored 68.50 |" in str(vbshare.summary(model))
