"""VB-LoRA's batched composition and its cache (issue 8) against the per-module and float64 references."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import vbshare

from adapter_cases import CASES, TwoLinear, vblora_reference
from test_matrix import build_adapted, inputs, run

HYPER = CASES["vblora"].hyperparameters


def per_module(model: nn.Module) -> nn.Module:
    """A copy whose modules always compose their own factors (the old path, no cache)."""
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


def test_batched_composition_equals_per_module_and_float64_reference():
    model = build_adapted("vblora", "bert").double()
    state = vbshare.state_of(model)
    composed = state.compose_all()
    for name, adapter in vbshare.adapters(model).items():
        A, B = composed[name]
        A_ref, B_ref = adapter.compose()
        assert A.shape == A_ref.shape and B.shape == B_ref.shape
        torch.testing.assert_close(A, A_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(B, B_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(adapter.delta_weight(), vblora_reference(adapter), atol=1e-12, rtol=1e-10)


def test_eval_cache_reused_until_parameters_change():
    model = build_adapted("vblora", "bert").eval()
    state = vbshare.state_of(model)
    adapter = next(iter(vbshare.adapters(model).values()))
    x = inputs()
    with torch.no_grad():
        first = run(model, x)
        A1, _, _ = adapter.factors()
        run(model, x)
        A2, _, _ = adapter.factors()
        assert A1 is A2, "unchanged parameters must reuse the cached factors"
        torch.testing.assert_close(run(model, x), run(per_module(model), x), atol=1e-6, rtol=1e-5)

    # an optimiser step changes the parameters: the next eval forward must see them
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
        A3, _, _ = adapter.factors()
        assert A3 is not A1 and not torch.equal(A3, A1)
        torch.testing.assert_close(adapter.delta_weight().double(), vblora_reference(adapter), atol=1e-6, rtol=1e-5)

        # in-place edits (load_state_dict, copy_ under no_grad) bump the version too
        state.bank.mul_(2.0)
        torch.testing.assert_close(run(model, x), run(per_module(model), x), atol=1e-6, rtol=1e-5)
        adapter.logits_A.copy_(torch.randn_like(adapter.logits_A))
        torch.testing.assert_close(run(model, x), run(per_module(model), x), atol=1e-6, rtol=1e-5)

        # dtype change
        model.double()
        torch.testing.assert_close(run(model, x), run(per_module(model), x), atol=1e-12, rtol=1e-10)


def test_two_forwards_before_one_backward():
    model = build_adapted("vblora", "bert").train()
    ref = per_module(model)
    for m in (model, ref):
        loss = run(m, inputs(1)).pow(2).mean() + run(m, inputs(2)).pow(3).mean()
        loss.backward()
    assert_grads_close(model, ref)
    assert vbshare.state_of(model)._cache is None, "backward consumed the graph: the cache must be dropped"


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
    adapter = next(iter(vbshare.adapters(model).values()))
    x = torch.randn(3, adapter.in_features)
    y1, y2 = adapter(x), adapter(x)
    y1.sum().backward()
    y2.sum().backward()  # would fail if both calls shared one (already freed) composition graph


class Checkpointed(TwoLinear):
    """TwoLinear with its body under activation checkpointing."""

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


def test_copy_and_pickle_after_a_forward_without_backward(tmp_path):
    model = build_adapted("vblora", "bert").train()
    out = run(model, inputs())  # the cache now holds this pass's graph
    twin = copy.deepcopy(model)
    torch.save(model, tmp_path / "model.pt")
    assert vbshare.state_of(twin)._cache is None
    with torch.no_grad():
        torch.testing.assert_close(run(twin, inputs()), out.detach(), atol=1e-6, rtol=1e-5)
