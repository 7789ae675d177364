"""torch.compile on adapted models: the adapter forward traces into one graph (no graph breaks)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import vbshare

from adapter_cases import CASES, TwoLinear as MLP


def adapted(method: str) -> nn.Module:
    torch.manual_seed(0)
    model = MLP()
    torch.manual_seed(1)
    return vbshare.inject(model, method, targets=["lin0", "lin1"], **CASES[method].hyperparameters)


def x() -> torch.Tensor:
    return torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("method", sorted(CASES))
@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
def test_no_graph_breaks(method, grad):
    model = adapted(method).train(grad)
    with torch.set_grad_enabled(grad):
        whole = torch._dynamo.explain(model)(x())
        layer = torch._dynamo.explain(model.lin0)(x())
    assert whole.graph_break_count == 0, whole.break_reasons
    assert layer.graph_break_count == 0, layer.break_reasons
    assert whole.graph_count == 1


@pytest.mark.parametrize("method", ["lora", "vblora"])
def test_compiled_matches_eager_and_trains(method):
    model = adapted(method).train()
    reference = adapted(method).train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    inputs = x()
    out = compiled(inputs)
    expected = reference(inputs)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    out.pow(2).mean().backward()
    expected.pow(2).mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
