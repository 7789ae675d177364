"""SoRA: the proximal operator, the gated model vs its pruned LoRA, parameter counts, PEFT export and the
sparsifying scheduler on a small real task (pretrained MiniLM + BBC News)."""
from __future__ import annotations

import copy
import json
import math

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import BertConfig, BertModel

import vbshare
from vbshare.adapters.sora import SoRA, soft_threshold
from vbshare.errors import VBShareError
from vbshare.sora import SparsifySchedule, read_records, retained_ranks, sparsify
from vbshare.train import train_step

MAX_LENGTH = 64


# -- references ----------------------------------------------------------------------------------------------
def soft_threshold_reference(values: list[float], tau: float) -> list[float]:
    """Element by element in float64: 0 when |g| <= τ, else g − τ·sign(g)."""
    out = []
    for g in values:
        if abs(g) <= tau:
            out.append(0.0)
        else:
            out.append(g - tau if g > 0 else g + tau)
    return out


def official_inplace_bug(g: torch.Tensor, xi: float) -> torch.Tensor:
    """The official code's sequence of in-place updates (what must NOT happen): shrinks, then zeroes |g| < ξ."""
    g = g.clone()
    g[g > xi] -= xi
    g[g < -xi] += xi
    g[g.abs() <= xi] = 0
    return g


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP's spinning threads made the MiniLM tests ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def minilm():
    from vbshare.models import load_minilm_classifier

    model, tokenizer = load_minilm_classifier(num_labels=5, seed=0)
    return model.eval(), tokenizer


def short_batch(tokenizer) -> dict[str, torch.Tensor]:
    texts = ["Shares in the bank rose after strong quarterly profits.",
             "The striker scored twice as the club won the cup final.",
             "Parliament will vote on the new election bill next week."]
    return dict(tokenizer(texts, truncation=True, max_length=24, padding=True, return_tensors="pt"))


def randomise(model: nn.Module, gates: dict[str, list[float]] | None = None, seed: int = 0) -> None:
    """Give every SoRA module a non-zero B and the given gates (default: random with some exact zeros)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, adapter in vbshare.adapters(model).items():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=gen) * 0.05)
            if gates is not None:
                adapter.gate.copy_(torch.tensor(gates[name]))
            else:
                g = torch.randn(adapter.gate.shape, generator=gen)
                g[torch.rand(g.shape, generator=gen) < 0.4] = 0.0
                adapter.gate.copy_(g)


# -- the proximal operator -----------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [1e-4, 0.03, 0.5, 2.0])
def test_soft_threshold_matches_float64_reference(tau):
    gen = torch.Generator().manual_seed(int(tau * 1e4))
    random = (torch.randn(200, generator=gen, dtype=torch.float64) * 2 * tau).tolist()
    edges = [tau * (1 + 1e-6), -tau * (1 + 1e-6), tau * (1 - 1e-6), -tau * (1 - 1e-6), tau, -tau, 0.0,
             1.5 * tau, -1.5 * tau, 2 * tau * (1 - 1e-6), 3 * tau]
    values = random + edges
    got = soft_threshold(torch.tensor(values, dtype=torch.float64), tau)
    expected = torch.tensor(soft_threshold_reference(values, tau), dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-15, rtol=0)
    assert torch.equal(got != 0, expected != 0), "zeroed exactly the gates with |g| <= τ"
    # just above τ survives (shrunk to a tiny value of the same sign), just below is zeroed
    assert got[len(random)] > 0 and got[len(random) + 1] < 0
    assert got[len(random) + 2] == 0 and got[len(random) + 3] == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=20),
       st.floats(0, 5, allow_nan=False, width=32))
def test_soft_threshold_float32_property(values, tau):
    got = soft_threshold(torch.tensor(values, dtype=torch.float32), tau).double()
    expected = torch.tensor(soft_threshold_reference([float(v) for v in torch.tensor(values).tolist()], tau),
                            dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_gate_between_xi_and_2xi_is_shrunk_not_zeroed():
    xi = 0.1
    model = vbshare.inject(tiny_bert(), "sora", targets=["query"], r=5, threshold="constant", lam=xi)
    start = torch.tensor([1.5 * xi, -1.5 * xi, 0.5 * xi, 3 * xi, -1.0])
    for adapter in vbshare.adapters(model).values():
        with torch.no_grad():
            adapter.gate.copy_(start)
    optimizer = torch.optim.AdamW(vbshare.param_groups(model, lr=1e-3))
    vbshare.after_step(model, optimizer, 1)  # no gradients, so only the proximal step changes the gates
    expected = torch.tensor([0.5 * xi, -0.5 * xi, 0.0, 2 * xi, -1.0 + xi])
    assert official_inplace_bug(start, xi)[0] == 0, "the reference bug does zero this gate"
    for adapter in vbshare.adapters(model).values():
        torch.testing.assert_close(adapter.gate.detach(), expected, atol=1e-7, rtol=0)
        assert adapter.gate[0] > 0 and adapter.gate[1] < 0


@pytest.mark.parametrize("optimizer_class", [torch.optim.AdamW, torch.optim.SGD])
def test_lr_lambda_uses_the_gate_groups_lr(optimizer_class):
    model = vbshare.inject(tiny_bert(), "sora", targets=["query", "value"], r=3, lam=0.5, gate_init="ones")
    groups = vbshare.param_groups(model, lr={"A": 1e-3, "B": 1e-3, "gate": 0.2})
    assert {g["role"]: g["weight_decay"] for g in groups}["gate"] == 0.0
    optimizer = optimizer_class(groups, lr=1e-3)
    x = torch.randint(0, 64, (2, 7))
    model.train()
    model(x).last_hidden_state.pow(2).mean().backward()  # B = 0: gate gradients are zero, A gets none either
    optimizer.step()
    vbshare.after_step(model, optimizer, 1)
    for adapter in vbshare.adapters(model).values():
        torch.testing.assert_close(adapter.gate.detach(), torch.full((3,), 1.0 - 0.2 * 0.5))
    # an lr scheduler that changed the group's lr: the next proximal step uses the new value
    for group in optimizer.param_groups:
        if group["role"] == "gate":
            group["lr"] = 0.1
    vbshare.after_step(model, optimizer, 2)
    for adapter in vbshare.adapters(model).values():
        torch.testing.assert_close(adapter.gate.detach(), torch.full((3,), 0.9 - 0.1 * 0.5))


def test_gate_missing_from_optimiser_is_an_error():
    model = vbshare.inject(tiny_bert(), "sora", targets=["query"], r=2)
    only_a = [p for n, p in model.named_parameters() if n.endswith("lora_A")]
    with pytest.raises(VBShareError, match="gate"):
        vbshare.after_step(model, torch.optim.SGD(only_a, lr=0.1), 1)


def test_l1_extra_loss_matches_reference():
    model = vbshare.inject(tiny_bert(), "sora", targets=["query", "value"], r=4, l1=0.3, gate_init="normal")
    expected = sum(0.3 * sum(abs(v) for v in a.gate.tolist()) / 4 for a in vbshare.adapters(model).values())
    assert math.isclose(vbshare.extra_loss(model).item(), expected, rel_tol=1e-6)
    assert vbshare.extra_loss(vbshare.inject(tiny_bert(), "sora", targets=["query"])) is None


# -- pruning on the real pretrained model --------------------------------------------------------------------
def test_pruned_lora_gives_the_gated_models_outputs(minilm):
    model, tokenizer = copy.deepcopy(minilm[0]), minilm[1]
    vbshare.inject(model, "sora", targets=["query", "value", "intermediate.dense"], r=6, alpha=12)
    randomise(model)
    names = list(vbshare.adapters(model))
    with torch.no_grad():
        vbshare.adapters(model)[names[0]].gate.zero_()  # a module pruned away entirely
        vbshare.adapters(model)[names[1]].gate.copy_(torch.tensor([0.0, 0.7, 0.0, -1.3, 0.0, 0.0]))
    gated_ranks = retained_ranks(model)
    batch = short_batch(tokenizer)
    with torch.no_grad():
        gated = model(**batch).logits
        hidden_gated = model(**batch, output_hidden_states=True).hidden_states[-1]
    base_layer = vbshare.adapters(model)[names[0]].base_layer

    assert vbshare.prune(model) is model
    assert model.vbshare.method == "lora"
    assert model.get_submodule(names[0]) is base_layer and isinstance(base_layer, nn.Linear)
    assert names[0] not in vbshare.adapters(model)
    assert retained_ranks(model) == {n: k for n, k in gated_ranks.items() if k}
    assert vbshare.adapters(model)[names[1]].lora_A.shape == (2, 384)
    for adapter in vbshare.adapters(model).values():
        assert adapter.scale == 12 / 6  # s = α / r_max, not α / r_kept
    with torch.no_grad():
        pruned = model(**batch).logits
        hidden_pruned = model(**batch, output_hidden_states=True).hidden_states[-1]
    assert (gated - pruned).abs().max() <= 1e-5
    assert (hidden_gated - hidden_pruned).abs().max() <= 1e-5


def test_stored_parameters_hand_computed(minilm, tmp_path):
    model = copy.deepcopy(minilm[0])
    vbshare.inject(model, "sora", targets=["query", "intermediate.dense"], layers=[0, 1], r=8)
    q0, i0 = "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.intermediate.dense"
    q1, i1 = "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.intermediate.dense"
    gates = {q0: [1, 0, 2, 0, 0, 0, 3, 0], i0: [0, 1, 1, 1, 1, 1, 0, 0], q1: [0] * 8, i1: [0.5] + [0] * 7}
    randomise(model, {n: [float(v) for v in g] for n, g in gates.items()})
    # query (384 -> 384) keeps 3; intermediate (384 -> 1536) keeps 5 and 1; layer 1's query keeps nothing
    expected = 3 * (384 + 384) + 5 * (384 + 1536) + 0 + 1 * (384 + 1536)
    assert expected == 13824
    assert vbshare.summary(model).stored == expected
    assert sum(a.stored_parameters() for a in vbshare.adapters(model).values()) == expected
    vbshare.save_adapter(model, tmp_path / "sora")
    saved = safetensors.torch.load_file(str(tmp_path / "sora" / "adapter_model.safetensors"))
    assert sum(t.numel() for t in saved.values()) == expected
    vbshare.prune(model)
    assert vbshare.summary(model).stored == expected
    assert vbshare.summary(model).trainable == expected


def test_save_writes_the_pruned_form_and_loads_as_lora(minilm, tmp_path):
    model, tokenizer = copy.deepcopy(minilm[0]), minilm[1]
    vbshare.inject(model, "sora", targets=["query", "value"], r=4, alpha=8)
    randomise(model, seed=3)
    batch = short_batch(tokenizer)
    with torch.no_grad():
        expected = model(**batch).logits
    vbshare.save_adapter(model, tmp_path / "a")
    assert model.vbshare.method == "sora" and all(isinstance(a, SoRA) for a in vbshare.adapters(model).values())
    described = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert described["method"] == "lora"
    assert set(described["targets"]) == {n for n, k in retained_ranks(model).items() if k}
    fresh = copy.deepcopy(minilm[0])
    vbshare.load_adapter(fresh, tmp_path / "a")
    assert fresh.vbshare.method == "lora"
    with torch.no_grad():
        assert (fresh(**batch).logits - expected).abs().max() <= 1e-5


def test_peft_loads_the_exported_pruned_adapter(minilm, tmp_path):
    import peft
    model, tokenizer = copy.deepcopy(minilm[0]), minilm[1]
    vbshare.inject(model, "sora", targets=["query", "value", "attention.output.dense"], r=5, alpha=10)
    randomise(model, seed=7)
    with torch.no_grad():
        vbshare.adapters(model)["bert.encoder.layer.2.attention.self.value"].gate.zero_()
    batch = short_batch(tokenizer)
    with torch.no_grad():
        expected = model(**batch).logits
    vbshare.prune(model)
    ranks = retained_ranks(model)
    assert len(set(ranks.values())) > 1, "the test needs per-module ranks"
    vbshare.export_peft(model, tmp_path / "peft")
    base = copy.deepcopy(minilm[0])
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    peft_ranks = {n[len("base_model.model."):]: m.r["default"] for n, m in loaded.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert peft_ranks == ranks
    with torch.no_grad():
        got = loaded(**batch).logits
    assert (got - expected).abs().max() <= 1e-5


# -- the sparsifying scheduler -------------------------------------------------------------------------------
def test_schedule_values():
    assert SparsifySchedule("linear", 4, 2.0).values() == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert SparsifySchedule("log", 3, 1.0).values() == pytest.approx([math.log(2) / math.log(4),
                                                                       math.log(3) / math.log(4), 1.0])
    assert SparsifySchedule("exp", 3, 1.0, min=0.01).values() == pytest.approx([0.01, 0.1, 1.0])
    with pytest.raises(VBShareError, match="schedule"):
        SparsifySchedule("cosine").values()


def test_sparsify_on_bbc_news_prunes_more_as_lambda_rises(minilm, tmp_path):
    """Pretrained MiniLM, 32 + 16 BBC News articles at 64 tokens: λ = 0 keeps every rank, rising λ prunes unevenly."""
    from vbshare.data.bbc import load_bbc_news

    model, tokenizer = copy.deepcopy(minilm[0]), minilm[1]
    data = load_bbc_news(seed=0)
    n = 32
    train = tokenizer(data["train"]["text"][:n], truncation=True, max_length=MAX_LENGTH, padding=True,
                      return_tensors="pt")
    train_y = torch.tensor(data["train"]["label"][:n])
    held = tokenizer(data["validation"]["text"][:16], truncation=True, max_length=MAX_LENGTH, padding=True,
                     return_tensors="pt")
    held_y = torch.tensor(data["validation"]["label"][:16])
    memorise = {k: v[:16] for k, v in train.items()}  # the fixed training subset scored after every stage
    torch.manual_seed(0)
    r = 8
    # layers 2-5 only: backpropagation stops at layer 2, which keeps the test quick on two cores
    vbshare.inject(model, "sora", targets=["query", "value"], layers=[2, 3, 4, 5], r=r)
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(vbshare.param_groups(model, lr={"A": 5e-3, "B": 5e-3, "gate": 5e-2, "head": 5e-3}))
    done = {"steps": 0}

    def train_steps(n_steps: int, lam: float) -> None:
        assert model.vbshare.config.lam == lam
        model.train()
        for _ in range(n_steps):
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(done["steps"]))[:6]
            done["steps"] += 1
            train_step(model, optimizer, lambda: model(input_ids=train["input_ids"][idx],
                                                       attention_mask=train["attention_mask"][idx],
                                                       labels=train_y[idx]).loss, done["steps"])

    def evaluate(split: str) -> float:
        model.eval()
        batch, labels = (memorise, train_y[:16]) if split == "train" else (held, held_y)
        with torch.no_grad():
            return (model(**batch).logits.argmax(-1) == labels).float().mean().item()

    # gates start at 1 and AdamW moves them by ~lr per step: τ = 0.05·λ per step prunes them within a few stages
    schedule = SparsifySchedule("exp", num_stages=3, min=2.4, max=4.8, dense_steps=10, stage_steps=4)
    out = tmp_path / "stages.jsonl"
    records = sparsify(model, train_steps, evaluate, schedule, out=out)
    assert read_records(out) == json.loads(json.dumps(records))
    assert [rec["lam"] for rec in records] == pytest.approx([0.0, 2.4, 2.4 * 2**0.5, 4.8])
    assert done["steps"] == 10 + 3 * 4

    dense = records[0]
    assert set(dense["ranks"].values()) == {r}, "λ = 0 prunes nothing"
    assert dense["memorisation_rel"] == 1.0 and dense["param_fraction"] == 1.0
    totals = [rec["retained_rank"] for rec in records]
    assert all(a >= b for a, b in zip(totals, totals[1:])), f"retained rank should fall as λ rises: {totals}"
    assert totals[-1] < totals[0], f"the largest λ should prune something: {totals}"
    assert any(len(set(rec["ranks"].values())) > 1 for rec in records), "modules should keep different ranks"
    for rec in records:
        assert rec["nonzero_params"] == sum(k * (384 + 384) for k in rec["ranks"].values())
        assert rec["memorisation_rel"] == pytest.approx(rec["memorisation"] / dense["memorisation"])
        assert rec["generalisation_rel"] == pytest.approx(rec["generalisation"] / dense["generalisation"])
    assert retained_ranks(model) == records[-1]["ranks"]
