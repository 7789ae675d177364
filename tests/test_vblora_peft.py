"""VB-LoRA and LoRA against Hugging Face PEFT (the independent reference), both directions of interop."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2Model

import vbshare
from adapter_cases import TwoLinear

import peft  # the reference (dev extra); missing must fail, not skip


def tiny_gpt2() -> nn.Module:
    return GPT2Model(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))


BASES = {
    "linear": (TwoLinear, ["lin0", "lin1"], lambda: torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))),
    "conv1d": (tiny_gpt2, ["c_attn", "c_fc"], lambda: torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))),
}
VB = dict(r=2, num_vectors=32, vector_length=8, topk=2)


def fresh(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BASES[kind][0]().eval()


def out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = model(x)
    return y.last_hidden_state if hasattr(y, "last_hidden_state") else y


def peft_vblora(kind: str, seed: int = 0, **extra) -> nn.Module:
    config = peft.VBLoRAConfig(target_modules=BASES[kind][1], fan_in_fan_out=(kind == "conv1d"), **VB, **extra)
    torch.manual_seed(seed + 7)
    return peft.get_peft_model(fresh(kind, seed), config).eval()


def copy_peft_into_ours(peft_model: nn.Module, ours: nn.Module) -> None:
    """Give our adapter exactly PEFT's bank and logits."""
    theirs = {n: p for n, p in peft_model.named_parameters()}
    bank = next(p for n, p in theirs.items() if "vblora_vector_bank" in n)
    with torch.no_grad():
        vbshare.state_of(ours).bank.copy_(bank)
        for name, adapter in vbshare.adapters(ours).items():
            adapter.logits_A.copy_(theirs[f"base_model.model.{name}.vblora_logits_A.default"])
            adapter.logits_B.copy_(theirs[f"base_model.model.{name}.vblora_logits_B.default"])


@pytest.mark.parametrize("kind", BASES)
def test_vblora_forward_and_delta_match_peft(kind):
    x = BASES[kind][2]()
    theirs = peft_vblora(kind)
    ours = vbshare.inject(fresh(kind), "vblora", targets=BASES[kind][1], **VB)
    copy_peft_into_ours(theirs, ours)
    with torch.no_grad():
        torch.testing.assert_close(out(ours, x), out(theirs, x), atol=1e-6, rtol=0)
        peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                       if hasattr(m, "get_delta_weight") and hasattr(m, "vblora_logits_A")}
        for name, adapter in vbshare.adapters(ours).items():
            delta = peft_layers[name].get_delta_weight("default")  # PEFT returns the base weight's layout
            mine = adapter.delta_weight().T if adapter.fan_in_fan_out else adapter.delta_weight()
            torch.testing.assert_close(mine, delta, atol=1e-6, rtol=0)


def test_gradients_reach_exactly_k_logits_per_sub_vector():
    model = vbshare.inject(fresh("linear"), "vblora", targets=["lin0", "lin1"], r=2, num_vectors=32, vector_length=8, topk=3)
    out(model, BASES["linear"][2]()).pow(2).sum().backward()
    selected_rows = set()
    for adapter in vbshare.adapters(model).values():
        for logits in (adapter.logits_A, adapter.logits_B):
            nonzero = (logits.grad != 0).sum(-1)  # (..., ) count per sub-vector
            assert torch.equal(nonzero, torch.full_like(nonzero, 3))
            chosen = logits.detach().topk(3, dim=-1).indices
            assert torch.equal((logits.grad != 0).nonzero()[:, -1].sort().values,
                               chosen.reshape(-1).sort().values)  # the non-zero grads sit at the top-3 logits
            selected_rows |= set(chosen.reshape(-1).tolist())
    bank_rows_with_grad = set((vbshare.state_of(model).bank.grad != 0).any(-1).nonzero().reshape(-1).tolist())
    assert bank_rows_with_grad == selected_rows


@pytest.mark.parametrize("kind", BASES)
@pytest.mark.parametrize("topk_only", [False, True], ids=["full", "topk"])
def test_peft_loads_our_vblora_export(kind, topk_only, tmp_path):
    x = BASES[kind][2]()
    ours = vbshare.inject(fresh(kind), "vblora", targets=BASES[kind][1], **VB)
    vbshare.export_peft(ours, tmp_path, topk_only=topk_only)
    theirs = peft.PeftModel.from_pretrained(fresh(kind), tmp_path).eval()
    with torch.no_grad():
        expected = out(ours, x)
        assert (expected - out(fresh(kind), x)).abs().max() > 1e-4  # the adapter does something
        torch.testing.assert_close(out(theirs, x), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", BASES)
@pytest.mark.parametrize("topk_only", [False, True], ids=["full", "topk"])
def test_we_load_peft_vblora_saves(kind, topk_only, tmp_path):
    x = BASES[kind][2]()
    theirs = peft_vblora(kind, save_only_topk_weights=topk_only)
    theirs.save_pretrained(tmp_path)
    ours = vbshare.import_peft(fresh(kind), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(out(ours, x), out(theirs, x), atol=1e-6, rtol=1e-5)
    if topk_only:
        with pytest.raises(vbshare.VBShareError, match="top-k-only checkpoint"):
            vbshare.param_groups(ours, lr=1e-3)


@pytest.mark.parametrize("kind", BASES)
def test_lora_round_trips_through_peft(kind, tmp_path):
    x = BASES[kind][2]()
    ours = vbshare.inject(fresh(kind), "lora", targets=BASES[kind][1], r=4, alpha=16,
                          rank_pattern={BASES[kind][1][1]: 2})
    with torch.no_grad():
        for adapter in vbshare.adapters(ours).values():
            adapter.lora_B.normal_()
    vbshare.export_peft(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(fresh(kind), tmp_path / "ours").eval()
    with torch.no_grad():
        expected = out(ours, x)
        torch.testing.assert_close(out(theirs, x), expected, atol=1e-5, rtol=1e-5)
    # and back: PEFT's own save, read by us
    theirs.save_pretrained(tmp_path / "theirs")
    again = vbshare.import_peft(fresh(kind), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(out(again, x), expected, atol=1e-5, rtol=1e-5)


def test_peft_lora_with_rslora_matches(tmp_path):
    x = BASES["linear"][2]()
    config = peft.LoraConfig(r=4, lora_alpha=12, use_rslora=True, target_modules=["lin0", "lin1"],
                             rank_pattern={"lin1": 2}, alpha_pattern={"lin1": 3}, init_lora_weights=False)
    theirs = peft.get_peft_model(fresh("linear"), config).eval()
    theirs.save_pretrained(tmp_path)
    ours = vbshare.import_peft(fresh("linear"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(out(ours, x), out(theirs, x), atol=1e-6, rtol=1e-5)


def test_topk_checkpoint_is_ten_times_smaller(tmp_path):
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])
    vbshare.inject(model, "vblora", targets=r"\d+", r=4, num_vectors=256, vector_length=16, topk=2)
    logits = sum(a.logits_A.numel() + a.logits_B.numel() for a in vbshare.adapters(model).values())
    assert logits >= 100_000
    vbshare.save_adapter(model, tmp_path / "full")
    vbshare.save_adapter(model, tmp_path / "topk", topk_only=True)
    full = os.path.getsize(tmp_path / "full" / "adapter_model.safetensors")
    compact = os.path.getsize(tmp_path / "topk" / "adapter_model.safetensors")
    assert full >= 10 * compact, (full, compact)
    # int16 indices once the bank has >= 256 vectors
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "topk" / "adapter_model.safetensors")
    assert {v.dtype for k, v in saved.items() if k.endswith("_topk_indices")} == {torch.int16}
