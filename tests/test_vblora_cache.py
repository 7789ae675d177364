"""VB-LoRA's batched composition: once per root-model forward pass into a plain dict, per module anywhere else.

Checked against the per-module path (every module composing its own factors) and the float64 reference, in
the situations where sharing one composition could go wrong: two forwards before one backward, a backward
then a module called on its own, non-reentrant activation checkpointing (the recompute during backward),
eval / no_grad after parameter changes, and copies.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import vbshare
from vbshare.adapters.vblora import VBLoRA, VBLoRAState

from adapter_cases import CASES, TwoLinear, vblora_reference
from test_matrix import build_adapted, inputs, run

HYPER = CASES["vblora"].hyperparameters


def per_module(model: nn.Module) -> nn.Module:
    """A copy whose modules always compose their own factors (no batched composition)."""
    ref = copy.deepcopy(model)
    vbshare.state_of(ref).factors_of = lambda name: None
    return ref


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_grads_close(a: nn.Module, b: nn.Module) -> None:
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.fixture
def counted(monkeypatch):
    """Counts of batched compositions (`compose_all`) and per-module ones (`VBLoRA.compose`)."""
    calls = {"all": 0, "module": 0}
    compose_all, compose = VBLoRAState.compose_all, VBLoRA.compose

    def count_all(self):
        calls["all"] += 1
        return compose_all(self)

    def count_module(self):
        calls["module"] += 1
        return compose(self)

    monkeypatch.setattr(VBLoRAState, "compose_all", count_all)
    monkeypatch.setattr(VBLoRA, "compose", count_module)
    return calls


def test_batched_composition_equals_per_module_and_float64_reference():
    model = build_adapted("vblora", "bert").double()
    composed = vbshare.state_of(model).compose_all()
    for name, adapter in vbshare.adapters(model).items():
        A, B = composed[name]
        A_ref, B_ref = adapter.compose()
        assert A.shape == A_ref.shape and B.shape == B_ref.shape
        torch.testing.assert_close(A, A_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(B, B_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(adapter.delta_weight(), vblora_reference(adapter), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
def test_one_batched_composition_per_root_forward(counted, grad):
    model = build_adapted("vblora", "bert").train(grad)
    with torch.set_grad_enabled(grad):
        run(model, inputs())
        run(model, inputs(1))
    assert counted == {"all": 2, "module": 0}
    adapter = next(iter(vbshare.adapters(model).values()))
    with torch.set_grad_enabled(grad):
        adapter(torch.randn(2, adapter.in_features))  # on its own, outside a root forward: composes itself
    assert counted == {"all": 2, "module": 1}


def test_eval_follows_every_parameter_change():
    model = build_adapted("vblora", "bert").eval()
    state = vbshare.state_of(model)
    adapter = next(iter(vbshare.adapters(model).values()))
    x = inputs()
    with torch.no_grad():
        first = run(model, x)
        torch.testing.assert_close(run(model, x), run(per_module(model), x), atol=1e-6, rtol=1e-5)

    optimizer = torch.optim.AdamW(vbshare.param_groups(model, lr=1e-2))
    model.train()
    run(model, inputs(1)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        after = run(model, x)
        assert not torch.equal(after, first)
        torch.testing.assert_close(after, run(per_module(model), x), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(adapter.delta_weight().double(), vblora_reference(adapter), atol=1e-6, rtol=1e-5)
        state.bank.mul_(2.0)
        torch.testing.assert_close(run(model, x), run(per_module(model), x), atol=1e-6, rtol=1e-5)
        adapter.logits_A.data.normal_()  # an edit autograd cannot see: nothing is kept across passes
        torch.testing.assert_close(run(model, x), run(per_module(model), x), atol=1e-6, rtol=1e-5)
        model.double()
        torch.testing.assert_close(run(model, x), run(per_module(model), x), atol=1e-12, rtol=1e-10)


def test_two_forwards_before_one_backward():
    model = build_adapted("vblora", "bert").train()
    ref = per_module(model)
    for m in (model, ref):
        loss = run(m, inputs(1)).pow(2).mean() + run(m, inputs(2)).pow(3).mean()
        loss.backward()
    assert_grads_close(model, ref)


def test_two_forwards_then_two_backwards_and_accumulation():
    model = build_adapted("vblora", "bert").train()
    ref = per_module(model)
    for m in (model, ref):
        l1 = run(m, inputs(1)).pow(2).mean()
        l2 = run(m, inputs(2)).pow(2).mean()
        l1.backward()  # frees forward 1's graph; forward 2 must own a separate one
        l2.backward()
        l3 = run(m, inputs(3)).pow(2).mean()  # gradient accumulation: forward after a backward
        l3.backward()
    assert_grads_close(model, ref)


def test_training_steps_match_per_module_path():
    model = build_adapted("vblora", "bert").train()
    ref = per_module(model)
    opts = [torch.optim.AdamW(vbshare.param_groups(m, lr=1e-2)) for m in (model, ref)]
    for step in range(1, 4):
        for m, opt in zip((model, ref), opts):
            run(m, inputs(step)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        torch.testing.assert_close(run(model.eval(), inputs()), run(ref.eval(), inputs()), atol=1e-5, rtol=1e-5)


def test_module_called_on_its_own_keeps_its_own_graph():
    model = build_adapted("vblora", "bert").train()
    run(model, inputs()).pow(2).mean().backward()  # a root pass whose graph backward has freed
    adapter = next(iter(vbshare.adapters(model).values()))
    x = torch.randn(3, adapter.in_features)
    y1, y2 = adapter(x), adapter(x)
    y1.sum().backward()
    y2.sum().backward()  # would fail if the calls shared one (already freed) composition graph


class Checkpointed(TwoLinear):
    """TwoLinear with its body under non-reentrant activation checkpointing."""

    def forward(self, x):
        return checkpoint(lambda t: self.lin1(torch.relu(self.lin0(t))), x, use_reentrant=False)


@pytest.mark.parametrize("hook", [True, False], ids=["root-hook", "no-root-hook"])
def test_activation_checkpointing(hook):
    torch.manual_seed(0)
    model = vbshare.inject(Checkpointed(), "vblora", targets=["lin0", "lin1"], **HYPER).train()
    ref = per_module(model)
    if not hook:  # a forward that does not go through the root model's hooks
        model._forward_pre_hooks.clear()
        model._forward_hooks.clear()
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    for m in (model, ref):
        m(x).pow(2).sum().backward()
    assert_grads_close(model, ref)


def test_transformers_gradient_checkpointing_with_two_forwards_before_backward():
    model = build_adapted("vblora", "bert").train()
    ref = per_module(model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for m in (model, ref):
        (run(m, inputs(1)).pow(2).mean() + run(m, inputs(2)).pow(3).mean()).backward()
    assert_grads_close(model, ref)


def test_copy_and_pickle_after_a_forward_without_backward(tmp_path):
    model = build_adapted("vblora", "bert").train()
    out = run(model, inputs())
    twin = copy.deepcopy(model)
    torch.save(model, tmp_path / "model.pt")
    with torch.no_grad():
        torch.testing.assert_close(run(twin, inputs()), out.detach(), atol=1e-6, rtol=1e-5)
