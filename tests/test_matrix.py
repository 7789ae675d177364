"""The shared adapter test matrix: every registered method (tests/adapter_cases.py) through the same checks,
on a tiny BERT (nn.Linear targets) and a tiny GPT-2 (transformers Conv1D targets)."""
from __future__ import annotations

import json

import peft  # the reference for the plain-LoRA export (dev extra); missing must fail, not skip
import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

import vbshare
from vbshare.core import adapter_state_dict
from vbshare.registry import METHODS
from vbshare.train import train_step

from adapter_cases import CASES

BASES = {
    "bert": (
        lambda: BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
        ["query", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    ),
    "gpt2": (
        lambda: GPT2Model(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)),
        ["c_attn", "c_proj", "c_fc"],
    ),
}


def build_base(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return BASES[kind][0]().eval()


def build_adapted(method: str, kind: str, seed: int = 0) -> torch.nn.Module:
    model = build_base(kind, seed)
    torch.manual_seed(seed + 1)
    return vbshare.inject(model, method, targets=BASES[kind][1], **CASES[method].hyperparameters)


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(seed))


def run(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).last_hidden_state


def train_steps(model: torch.nn.Module, steps: int = 3, lr: float = 1e-2) -> torch.optim.Optimizer:
    """A few real optimiser steps so every adapter is away from its initial (often zero) ΔW."""
    optimizer = torch.optim.AdamW(vbshare.param_groups(model, lr=lr))
    model.train()
    for step in range(1, steps + 1):
        train_step(model, optimizer, lambda: run(model, inputs(step)).pow(2).mean(), step)
    model.eval()
    return optimizer


METHOD_BASE = [(m, k) for m in CASES for k in BASES]
IDS = [f"{m}-{k}" for m, k in METHOD_BASE]


@pytest.fixture(params=METHOD_BASE, ids=IDS)
def trained(request):
    method, kind = request.param
    model = build_adapted(method, kind)
    train_steps(model)
    return method, kind, model


def test_merged_equals_unmerged(trained):
    _, _, model = trained
    x = inputs()
    with torch.no_grad():
        unmerged = run(model, x)
        vbshare.merge(model)
        merged = run(model, x)
        vbshare.merge(model)  # a second merge must not add ΔW twice
        merged_twice = run(model, x)
        vbshare.unmerge(model)
        back = run(model, x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(merged_twice, unmerged, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(back, unmerged, atol=1e-5, rtol=1e-4)


def test_disabled_gives_base(trained):
    method, kind, model = trained
    x = inputs()
    with torch.no_grad():
        base = run(build_base(kind), x)
        adapted = run(model, x)
        with vbshare.disabled(model):
            off = run(model, x)
        vbshare.merge(model)
        with vbshare.disabled(model):
            off_merged = run(model, x)
        after = run(model, x)
    assert (adapted - base).abs().max() > 1e-4, "training should have moved the adapted model off the base"
    torch.testing.assert_close(off, base, atol=1e-6, rtol=0)
    torch.testing.assert_close(off_merged, base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, adapted, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method,kind", METHOD_BASE, ids=IDS)
def test_step_changes_only_adapter_parameters(method, kind):
    model = build_adapted(method, kind)
    base_before = {k: v.clone() for k, v in model.state_dict().items() if k not in adapter_state_dict(model)}
    adapter_before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    train_steps(model, steps=2)
    base_after = {k: v for k, v in model.state_dict().items() if k not in adapter_state_dict(model)}
    assert base_before.keys() == base_after.keys()
    for key, value in base_before.items():
        assert torch.equal(value, base_after[key]), f"base tensor {key} changed"
    changed = [k for k, v in adapter_state_dict(model).items() if k in adapter_before and not torch.equal(v, adapter_before[k])]
    assert changed, "no adapter tensor changed after two optimiser steps"
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".base_layer." in n)


def test_save_load_reproduces_outputs(trained, tmp_path):
    method, kind, model = trained
    x = inputs()
    with torch.no_grad():
        expected = run(model, x)
    vbshare.save_adapter(model, tmp_path / "adapter")
    fresh = build_base(kind)
    vbshare.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, x), expected, atol=1e-5, rtol=1e-5)


def test_adapter_state_has_no_base_keys(trained):
    _, kind, model = trained
    base_keys = set(build_base(kind).state_dict())
    keys = set(adapter_state_dict(model))
    assert keys, "adapter state is empty"
    assert not keys & base_keys
    assert not [k for k in keys if "base_layer" in k]


def test_bf16_forward(trained):
    _, _, model = trained
    model.to(torch.bfloat16)
    with torch.no_grad():
        out = run(model, inputs())
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()


def test_output_matches_float64_reference(trained):
    """Every adapted layer: y == base(x) + x·ΔWᵀ with ΔW from the method's independent float64 reference."""
    method, _, model = trained
    reference = CASES[method].reference_delta
    x_gen = torch.Generator().manual_seed(5)
    for name, adapter in vbshare.adapters(model).items():
        x = torch.randn(3, adapter.in_features, generator=x_gen)
        with torch.no_grad():
            y = adapter(x)
            base = adapter.base_layer(x).double()
        expected = base + x.double() @ reference(adapter).T
        torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(adapter.delta_weight().double(), reference(adapter), atol=1e-6, rtol=1e-5)


def test_every_registered_method_has_a_case():
    assert set(CASES) == set(METHODS), "every method in vbshare.registry.METHODS needs a Case in tests/adapter_cases.py"


def test_factors_are_fp32_under_bf16_autocast(trained):
    """The contract composes every method's factors with autocast off: fp32 factors (within fp32 rounding of the
    float64 reference, which a bf16 composition misses by ~1e-3), and outputs within bf16 rounding of it."""
    method, _, model = trained
    reference = CASES[method].reference_delta
    layers = vbshare.adapters(model)
    during_pass = {}

    def capture(module, args):  # what the module reads inside the root model's forward (a shared composition)
        during_pass[module.name] = module.composed_factors()

    handles = [a.register_forward_pre_hook(capture) for a in layers.values()]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        run(model, inputs())
        for handle in handles:
            handle.remove()
        x_gen = torch.Generator().manual_seed(5)
        for name, adapter in layers.items():
            expected_delta = reference(adapter)  # (out, in), float64
            for A, B, scale in (during_pass[name], adapter.composed_factors()):
                assert A.dtype == B.dtype == torch.float32, name
                torch.testing.assert_close((B.double() @ A.double()) * scale, expected_delta, atol=1e-6, rtol=1e-5,
                                           msg=lambda m: f"{name}: {m}")
            x = torch.randn(3, adapter.in_features, generator=x_gen)
            y = adapter(x)
            assert y.dtype == torch.bfloat16  # the products with x do follow autocast
            expected = adapter.base_layer.weight.double()
            expected = x.double() @ (expected if adapter.fan_in_fan_out else expected.T) + adapter.base_layer.bias.double()
            expected = expected + x.double() @ expected_delta.T
            scale = expected.abs().max()
            torch.testing.assert_close(y.double() / scale, expected / scale, atol=2e-2, rtol=0,
                                       msg=lambda m: f"{name}: {m}")


def test_summary_counts_stored_trainable_and_bytes(trained, tmp_path):
    method, _, model = trained
    state = vbshare.state_of(model)
    counted = vbshare.summary(model)
    reference = CASES[method].stored_reference
    assert reference is not None, f"give the {method} Case a stored_reference: its stored-parameter formula"
    assert counted.stored == pytest.approx(reference(model), abs=1e-9)
    assert counted.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counted.other_trainable == 0
    assert [row["module"] for row in counted.rows if row["module"] != "(shared)"] == list(vbshare.adapters(model))
    assert counted.stored == pytest.approx(sum(row["stored"] for row in counted.rows))
    # adapter bytes: the tensor bytes of the file save_adapter writes (after its 8-byte length and JSON header)
    vbshare.save_adapter(model, tmp_path, topk_only=state.topk_form)
    blob = (tmp_path / "adapter_model.safetensors").read_bytes()
    assert counted.adapter_bytes == len(blob) - 8 - int.from_bytes(blob[:8], "little")


def test_exports_as_a_plain_lora_that_peft_loads(trained, tmp_path):
    method, kind, model = trained
    vbshare.export_peft(model, tmp_path, as_lora=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    theirs = peft.PeftModel.from_pretrained(build_base(kind), tmp_path).eval()
    x = inputs()
    with torch.no_grad():
        expected = run(model, x)
        assert (expected - run(build_base(kind), x)).abs().max() > 1e-4  # the adapter changes the outputs
        torch.testing.assert_close(run(theirs, x), expected, atol=1e-5, rtol=1e-5)


# -- bad configurations: every method's own, one line each ------------------------------------------------------------
BAD = [(method, bad, message) for method, case in sorted(CASES.items()) for bad, message in case.bad_configs]


def test_every_case_has_bad_configs():
    assert [m for m, case in sorted(CASES.items()) if not case.bad_configs] == []


@pytest.mark.parametrize("method, bad, message", BAD, ids=[f"{m}-{','.join(b)}" for m, b, _ in BAD])
def test_bad_config_is_one_line(method, bad, message):
    with pytest.raises(vbshare.VBShareError, match=message) as caught:
        build_adapted_with(method, "bert", **bad)
    assert "\n" not in str(caught.value)


def build_adapted_with(method: str, kind: str, **override) -> torch.nn.Module:
    return vbshare.inject(build_base(kind), method, targets=BASES[kind][1], **{**CASES[method].hyperparameters, **override})
