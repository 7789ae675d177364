"""Injection, targets, optimiser groups, summary accounting, checkpoints and the one-line errors."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

import vbshare
import vbshare.registry as registry_module
from vbshare import VBShareError
from vbshare.adapters.base import AdapterConfig, LowRankAdapter
from vbshare.registry import METHODS, register
from vbshare.targets import find_targets, layer_index, module_role


def tiny_bert(intermediate: int = 64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                intermediate_size=intermediate)).eval()


class Pair(nn.Module):
    """Two layers with a hand-computable parameter count: (out=32, in=16) and (out=16, in=32)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.classifier = nn.Linear(16, 3)

    def forward(self, x):
        return self.classifier(self.down(self.up(x)))


# -- targets -----------------------------------------------------------------------------------------------------
def test_target_forms():
    model = tiny_bert()
    assert find_targets(model, ["query"]) == [f"encoder.layer.{i}.attention.self.query" for i in range(3)]
    # "output.dense" is a suffix of both attention.output.dense and output.dense
    assert len(find_targets(model, ["output.dense"])) == 6
    assert len(find_targets(model, ["attention.output.dense"])) == 3
    assert find_targets(model, r"encoder\.layer\.1\..*value") == ["encoder.layer.1.attention.self.value"]
    assert find_targets(model, ["query", "value"], layers=[0, 2]) == [
        "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value",
        "encoder.layer.2.attention.self.query", "encoder.layer.2.attention.self.value"]
    everything = find_targets(model, "all-linear")
    assert len(everything) == 3 * 6 + 1  # six per layer plus the pooler
    assert "encoder.layer.0.attention.self.key" not in find_targets(model, "all-linear", exclude=["key"])
    assert find_targets(Pair(), "all-linear") == ["up", "down"]  # heads are left out


def test_roles_and_layer_index():
    assert module_role("bert.encoder.layer.11.attention.self.query") == "bert.encoder.layer.*.attention.self.query"
    assert module_role("model.layers.3.mlp.down_proj") == "model.layers.*.mlp.down_proj"
    assert layer_index("transformer.h.7.attn.c_attn") == 7
    assert layer_index("pooler.dense") is None


def test_inject_freezes_base_and_keeps_mode():
    model = tiny_bert()
    vbshare.inject(model, "lora", targets=["query"], r=2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert all(not a.training for a in vbshare.adapters(model).values())


def test_vblora_bank_is_stored_once():
    model = tiny_bert()
    vbshare.inject(model, "vblora", targets="all-linear", r=2, num_vectors=16, vector_length=16)
    assert [n for n, _ in model.named_parameters() if "bank" in n] == ["vbshare.bank"]
    assert [k for k in model.state_dict() if "bank" in k] == ["vbshare.bank"]
    assert [k for k in vbshare.adapter_state_dict(model) if "bank" in k] == ["vbshare.bank"]


# -- optimiser groups --------------------------------------------------------------------------------------------
def test_param_groups_by_role():
    model = Pair()
    vbshare.inject(model, "vblora", targets=["up", "down"], r=2, num_vectors=16, vector_length=8)
    model.classifier.requires_grad_(True)
    groups = vbshare.param_groups(model, lr={"logits": 1e-2, "bank": 1e-3, "head": 5e-4}, weight_decay=0.1)
    by_role = {g["role"]: g for g in groups}
    assert set(by_role) == {"logits", "bank", "head"}
    assert by_role["logits"]["lr"] == 1e-2 and by_role["bank"]["lr"] == 1e-3
    assert by_role["logits"]["weight_decay"] == 0.0 and by_role["bank"]["weight_decay"] == 0.0  # docs/methods.md §1
    assert by_role["head"]["weight_decay"] == 0.1
    assert by_role["head"]["names"] == ["classifier.weight", "classifier.bias"]
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(VBShareError, match=r"no lr given for parameter role 'head'"):
        vbshare.param_groups(model, lr={"logits": 1e-2, "bank": 1e-3})


# -- summary -----------------------------------------------------------------------------------------------------
def test_summary_lora_by_hand():
    model = vbshare.inject(Pair(), "lora", targets=["up", "down"], r=4)
    s = vbshare.summary(model)
    assert s.trainable == 4 * (16 + 32) * 2 == 384
    assert s.stored == 384
    assert s.other_trainable == 0


def test_summary_vblora_matches_methods_formula():
    """h·b + n_sub·(k−1) + n_sub·k·f with n_sub = Σ r·(in+out)/b; h=16 < 256 so f = 0.25 (uint8)."""
    model = vbshare.inject(Pair(), "vblora", targets=["up", "down"], r=2, num_vectors=16, vector_length=8, topk=2)
    n_sub = 2 * (16 + 32) // 8 + 2 * (32 + 16) // 8  # 12 + 12
    assert n_sub == 24
    s = vbshare.summary(model)
    assert s.stored == pytest.approx(16 * 8 + 24 * 1 + 24 * 2 * 0.25) == 164
    assert s.trainable == 16 * 8 + 24 * 16  # bank + logits
    full = vbshare.summary(model, topk_only=False)
    assert full.stored == 16 * 8 + 24 * 16
    assert s.adapter_bytes < full.adapter_bytes
    assert "(shared)" in str(s) and "down" in str(s)


# -- checkpoints -------------------------------------------------------------------------------------------------
def trained_vblora() -> nn.Module:
    model = vbshare.inject(tiny_bert(), "vblora", targets=["query", "value"], r=2, num_vectors=16, vector_length=8)
    with torch.no_grad():
        vbshare.state_of(model).bank.normal_()
    return model


def test_checkpoint_records_method_targets_and_fingerprint(tmp_path):
    model = trained_vblora()
    vbshare.save_adapter(model, tmp_path)
    described = json.loads((tmp_path / "adapter_config.json").read_text())
    assert described["method"] == "vblora" and described["config"]["num_vectors"] == 16
    assert described["targets"]["encoder.layer.0.attention.self.query"] == [32, 32]
    assert described["target_spec"]["targets"] == ["query", "value"]
    assert len(described["fingerprint"]) == 64


def test_load_into_wrong_base_is_refused(tmp_path):
    vbshare.save_adapter(vbshare.inject(tiny_bert(), "lora", targets=["intermediate.dense"], r=2), tmp_path)
    with pytest.raises(VBShareError, match=r"module encoder.layer.0.intermediate.dense has shape .* \(48, 32\) .* \(64, 32\)"):
        vbshare.load_adapter(tiny_bert(intermediate=48), tmp_path)
    with pytest.raises(VBShareError, match=r"targets encoder.layer.0.intermediate.dense, which this model does not have"):
        vbshare.load_adapter(Pair(), tmp_path)


def test_corrupt_checkpoint_is_refused(tmp_path):
    model = trained_vblora()
    vbshare.save_adapter(model, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(VBShareError, match="does not match the checksum"):
        vbshare.load_adapter(tiny_bert(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(VBShareError, match="is corrupt"):
        vbshare.load_adapter(tiny_bert(), tmp_path)
    with pytest.raises(VBShareError, match="does not exist"):
        vbshare.load_adapter(tiny_bert(), tmp_path / "nowhere")


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = trained_vblora()
    vbshare.save_adapter(model, tmp_path)
    x = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        before = model(x).last_hidden_state
        vbshare.state_of(model).bank.mul_(3.0)  # a newer adapter

    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith(".safetensors"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        vbshare.save_adapter(model, tmp_path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    restored = vbshare.load_adapter(tiny_bert(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(restored(x).last_hidden_state, before)


def test_extra_modules_are_saved_apart(tmp_path):
    torch.manual_seed(0)
    model = vbshare.inject(Pair(), "lora", targets=["up"], r=2)
    model.classifier.requires_grad_(True)
    with torch.no_grad():
        model.classifier.weight.fill_(0.5)
    vbshare.save_adapter(model, tmp_path, modules=["classifier"])
    torch.manual_seed(0)  # the same base weights (the base-weight check compares them)
    fresh = vbshare.load_adapter(Pair(), tmp_path)
    assert torch.equal(fresh.classifier.weight, torch.full((3, 16), 0.5))
    from safetensors.torch import load_file
    assert not [k for k in load_file(tmp_path / "adapter_model.safetensors") if "classifier" in k]


def test_training_from_topk_checkpoint_is_refused(tmp_path):
    vbshare.save_adapter(trained_vblora(), tmp_path, topk_only=True)
    model = vbshare.load_adapter(tiny_bert(), tmp_path)
    with pytest.raises(VBShareError, match="top-k-only checkpoint, which cannot be trained; load the full checkpoint"):
        vbshare.param_groups(model, lr=1e-3)
    model.train()
    with pytest.raises(VBShareError, match="top-k-only checkpoint"):
        model(torch.randint(0, 64, (1, 5)))
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 64, (1, 5))).last_hidden_state).all()


# -- one-line errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call,message", [
    (lambda: vbshare.inject(tiny_bert(intermediate=48), "vblora", targets=["dense"], vector_length=32),
     r"vector_length=32 does not divide module encoder.layer.0.intermediate.dense of shape \(out=48, in=32\); "
     r"use a vector_length that divides every target, e.g. vector_length=16"),
    (lambda: vbshare.inject(tiny_bert(), "vblora", targets=["query"], num_vectors=4, vector_length=8, topk=5),
     r"topk=5 exceeds num_vectors=4; choose topk <= num_vectors"),
    (lambda: vbshare.inject(tiny_bert(), "lora", targets=["qkv"]),
     r"no linear module matched targets=\['qkv'\]; this model's linear modules are: encoder.layer.\*.attention.self.query, "),
    (lambda: vbshare.inject(tiny_bert(), "dora", targets=["query"]),
     r"unknown adapter method 'dora'; known methods are: .*lora.*vblora"),
    (lambda: vbshare.inject(tiny_bert(), "lora", targets=["query"], rank=4),
     r"unknown lora hyperparameter\(s\) rank; valid ones are: .*\br\b"),
    (lambda: vbshare.inject(tiny_bert(), "lora", targets=["query"], r=0),
     r"r must be a positive integer, got 0"),
])
def test_errors_are_one_line_and_say_what_to_change(call, message):
    with pytest.raises(VBShareError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_double_injection_is_refused():
    model = vbshare.inject(tiny_bert(), "lora", targets=["query"])
    with pytest.raises(VBShareError, match="already has lora adapters"):
        vbshare.inject(model, "vblora", targets=["value"])


# -- the registry ------------------------------------------------------------------------------------------------
@dataclass
class FixedConfig(AdapterConfig):
    r: int = 2


class Fixed(LowRankAdapter):
    """A method from outside the package: one trainable B on a fixed A of ones (ΔW = B·1)."""

    config_class = FixedConfig
    roles = {"B": "B"}

    def __init__(self, base_layer, name, config, state):
        super().__init__(base_layer, name, config, state)
        self.register_buffer("A", torch.ones(config.r, self.in_features), persistent=False)  # (r, in)
        self.B = nn.Parameter(torch.full((self.out_features, config.r), 0.5))  # (out, r)

    def factors(self):
        return self.A, self.B, 1.0


@dataclass(kw_only=True)
class NoDefaultsConfig(AdapterConfig):
    size: int


class NoDefaults(Fixed):
    config_class = NoDefaultsConfig


@pytest.fixture
def registry(monkeypatch):
    """METHODS restored after the test, so a method registered here does not leak into the matrix."""
    monkeypatch.setattr(registry_module, "METHODS", dict(METHODS))
    return registry_module


def test_a_method_from_outside_the_package_registers_and_runs(registry):
    vbshare.register_method("fixed", Fixed)
    assert registry.METHODS["fixed"] is Fixed
    model = vbshare.inject(Pair(), "fixed", targets=["up"])
    x = torch.randn(3, 16)
    with torch.no_grad():
        base = model.up.base_layer(x)
        torch.testing.assert_close(model.up(x), base + x.sum(-1, keepdim=True) * 2 * 0.5)  # ΔW x = B·(A x)
    assert vbshare.summary(model).stored == 32 * 2
    assert [g["role"] for g in vbshare.param_groups(model, lr=1e-3)] == ["B"]


@pytest.mark.parametrize("name,cls,message", [
    ("Fixed", Fixed, r"method name 'Fixed' must be a lowercase identifier"),
    ("lora", Fixed, r"method name 'lora' is already taken by LoRA; choose another name"),
    ("plain", nn.Linear, r"is not a subclass of vbshare.LowRankAdapter"),
    ("nofactors", type("NoFactors", (LowRankAdapter,), {}), r"must implement factors\(\)"),
    ("nodefaults", NoDefaults, r"must build from defaults alone"),
])
def test_registration_checks_the_contract(registry, name, cls, message):
    with pytest.raises(VBShareError, match=message) as info:
        register(name, cls)
    assert "\n" not in str(info.value)
    assert name not in registry.METHODS or registry.METHODS[name] is not cls
