"""VeRA and Uni-LoRA beyond the shared matrix: the published stored-parameter count, the stored-form options
(save_projection, save_indices), the Uni-LoRA map's balance and isometry, and config errors."""
from __future__ import annotations

import pytest
import safetensors.torch
import torch
from torch import nn
from transformers import RobertaConfig, RobertaModel

import vbshare
from adapter_cases import TwoLinear

X = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))


def two_linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TwoLinear().eval()


# -- VeRA -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("save_projection", [False, True])
def test_vera_reproduces_the_published_roberta_base_count(save_projection):
    """VeRA paper, RoBERTa-base, r = 1024 on query and value: 43,008 stored parameters (12 layers × 2 modules ×
    (768 + 1024)) with the projections rebuilt from the seed; saving them adds r·(max_in + max_out)."""
    torch.manual_seed(0)
    model = RobertaModel(RobertaConfig(), add_pooling_layer=False)  # randomly initialised, RoBERTa-base shape
    vbshare.inject(model, "vera", targets=["query", "value"], r=1024, save_projection=save_projection)
    summary = vbshare.summary(model)
    projections = 1024 * (768 + 768)
    assert summary.trainable == 43_008
    assert summary.stored == 43_008 + (projections if save_projection else 0)
    stored_bytes = 4 * summary.stored  # float32
    assert stored_bytes <= summary.adapter_bytes < stored_bytes + 16_384  # plus the safetensors header


def test_vera_starts_at_the_base_model_and_keeps_projections_frozen():
    model = vbshare.inject(two_linear(), "vera", targets=["lin0", "lin1"], r=8)
    with torch.no_grad():
        torch.testing.assert_close(model(X), two_linear()(X), atol=0, rtol=0)  # λ_b = 0 at init
    state = vbshare.state_of(model)
    A, B = state.projection_A.clone(), state.projection_B.clone()
    assert A.shape == (8, 64) and B.shape == (64, 8)  # max_in over (32, 64), max_out over (64, 16)
    groups = vbshare.param_groups(model, lr=1e-2)
    assert [g["role"] for g in groups] == ["vectors"] and groups[0]["weight_decay"] == 0.0
    optimizer = torch.optim.AdamW(groups)
    for _ in range(2):
        model(X).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(state.projection_A, A) and torch.equal(state.projection_B, B)
    assert not state.projection_A.requires_grad
    assert all(a.lambda_b.abs().max() > 0 for a in vbshare.adapters(model).values())


def test_vera_forward_scales_activations_and_matches_the_float64_formula():
    """The forward pass never forms the scaled factors: autograd keeps no (r, in) or (out, r) tensor, only
    activations; output and gradients equal a float64 evaluation of λ_b ⊙ (B_sl (λ_d ⊙ (A_sl x))) by hand."""
    model = vbshare.inject(two_linear(), "vera", targets=["lin0", "lin1"], r=8)
    layer = model.lin0  # (out=64, in=32)
    with torch.no_grad():
        layer.lambda_b.normal_()
        layer.lambda_d.normal_()
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (shapes.append(tuple(t.shape)), t)[1], lambda t: t):
        out = layer(X)
    assert (8, 32) not in shapes and (64, 8) not in shapes, shapes
    out.pow(2).sum().backward()
    A = model.vbshare.projection_A[:, :32].double()  # (r, in)
    B = model.vbshare.projection_B[:64].double()  # (out, r)
    d = layer.lambda_d.detach().double().requires_grad_()
    b = layer.lambda_b.detach().double().requires_grad_()
    base = layer.base_layer.weight.double()
    x = X.double()
    expected = x @ base.T + layer.base_layer.bias.double() + ((x @ A.T) * d) @ B.T * b  # (4, out)
    expected.pow(2).sum().backward()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lambda_d.grad.double(), d.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(layer.lambda_b.grad.double(), b.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("save_projection", [False, True])
def test_vera_save_projection_decides_what_is_written(save_projection, tmp_path):
    model = vbshare.inject(two_linear(), "vera", targets=["lin0", "lin1"], r=8, save_projection=save_projection)
    with torch.no_grad():
        for adapter in vbshare.adapters(model).values():
            adapter.lambda_b.normal_()
        expected = model(X)
    vbshare.save_adapter(model, tmp_path)
    keys = set(safetensors.torch.load_file(str(tmp_path / "adapter_model.safetensors")))
    assert ("vbshare.projection_A" in keys) == save_projection
    assert {k for k in keys if "lambda" in k} == {f"lin{i}.lambda_{v}" for i in (0, 1) for v in "bd"}
    stored = vbshare.summary(model).stored
    assert stored == (64 + 8) + (16 + 8) + (8 * (64 + 64) if save_projection else 0)
    loaded = vbshare.load_adapter(two_linear(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), expected, atol=0, rtol=0)


def test_vera_projections_saved_are_the_ones_loaded(tmp_path):
    """With save_projection the file, not the seed, provides the projections."""
    model = vbshare.inject(two_linear(), "vera", targets=["lin0", "lin1"], r=8, save_projection=True)
    with torch.no_grad():
        vbshare.state_of(model).projection_A.mul_(-3.0)
        for adapter in vbshare.adapters(model).values():
            adapter.lambda_b.normal_()
        expected = model(X)
    vbshare.save_adapter(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(vbshare.load_adapter(two_linear(), tmp_path)(X), expected, atol=0, rtol=0)


# -- Uni-LoRA -------------------------------------------------------------------------------------------------------
def all_entries(model: nn.Module) -> torch.Tensor:
    """Every factor entry of every module, flattened (module order, A before B)."""
    parts = []
    for adapter in vbshare.adapters(model).values():
        A, B, _ = adapter.factors()
        parts += [A.reshape(-1), B.reshape(-1)]
    return torch.cat(parts)


@pytest.mark.parametrize("d", [7, 100, 1000])
def test_unilora_map_is_balanced_and_an_isometry(d):
    """D = 2·(32 + 64) + 2·(64 + 16) = 352 entries: each θ entry is read ⌊D/d⌋ or ⌈D/d⌉ times, and with every θ
    entry read at least once ‖all factor entries‖ = ‖θ‖ (the scale c = 1/√uses makes the map an isometry)."""
    model = vbshare.inject(two_linear(), "unilora", targets=["lin0", "lin1"], r=2, theta_d_length=d)
    state = vbshare.state_of(model)
    indices = torch.cat([getattr(a, f"indices_{f}").reshape(-1).long()
                         for a in vbshare.adapters(model).values() for f in "AB"])
    assert indices.numel() == 352
    uses = torch.bincount(indices, minlength=d)
    assert set(uses.tolist()) <= {352 // d, -(-352 // d)}
    entries = all_entries(model).detach().double()
    theta = state.theta.detach().double()
    if d <= 352:
        torch.testing.assert_close(entries.norm(), theta.norm(), atol=1e-12, rtol=1e-6)
    else:  # θ entries nobody reads (scale 0) drop out of the norm
        torch.testing.assert_close(entries.norm(), theta[uses > 0].norm(), atol=1e-12, rtol=1e-6)
    assert vbshare.summary(model).stored == d


def test_unilora_is_not_the_base_model_at_init_and_trains_only_theta():
    model = vbshare.inject(two_linear(), "unilora", targets=["lin0", "lin1"], r=2, theta_d_length=50)
    with torch.no_grad():
        assert (model(X) - two_linear()(X)).abs().max() > 0
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["vbshare.theta"]
    groups = vbshare.param_groups(model, lr=1e-2)
    assert [g["role"] for g in groups] == ["theta"] and groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize("save_indices", [False, True])
def test_unilora_save_indices_decides_what_is_written(save_indices, tmp_path):
    model = vbshare.inject(two_linear(), "unilora", targets=["lin0", "lin1"], r=2, theta_d_length=50,
                           save_indices=save_indices)
    with torch.no_grad():
        seeded = model(X)
        if save_indices:
            # reverse each module's indices (every θ entry keeps its number of uses, so the scales stay right):
            # only a load that reads the indices from the file can reproduce these outputs
            for adapter in vbshare.adapters(model).values():
                adapter.indices_A.copy_(adapter.indices_A.flip(-1))
                adapter.indices_B.copy_(adapter.indices_B.flip(-1))
            assert (model(X) - seeded).abs().max() > 0
        expected = model(X)
    vbshare.save_adapter(model, tmp_path)
    saved = safetensors.torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    index_keys = {f"lin{i}.indices_{f}" for i in (0, 1) for f in "AB"}
    assert set(saved) == ({"vbshare.theta", "vbshare.theta_scale"} | index_keys if save_indices else {"vbshare.theta"})
    assert vbshare.summary(model).stored == (50 + 50 + 352 if save_indices else 50)
    loaded = vbshare.load_adapter(two_linear(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), expected, atol=0, rtol=0)


def test_unilora_indices_rebuilt_after_dtype_move():
    """The map comes from the seed alone: a model moved to float64 and a fresh one read the same entries."""
    model = vbshare.inject(two_linear(), "unilora", targets=["lin0", "lin1"], r=2, theta_d_length=50, proj_seed=3)
    model.to(torch.float64)
    again = vbshare.inject(two_linear(), "unilora", targets=["lin0", "lin1"], r=2, theta_d_length=50, proj_seed=3)
    other_seed = vbshare.inject(two_linear(), "unilora", targets=["lin0", "lin1"], r=2, theta_d_length=50, proj_seed=4)
    for name, adapter in vbshare.adapters(model).items():
        assert torch.equal(adapter.indices_A, vbshare.adapters(again)[name].indices_A)
        assert torch.equal(adapter.indices_B, vbshare.adapters(again)[name].indices_B)
    assert any(not torch.equal(a.indices_A, vbshare.adapters(other_seed)[n].indices_A)
               for n, a in vbshare.adapters(model).items())
    assert vbshare.state_of(model).theta_scale.dtype == torch.float64
