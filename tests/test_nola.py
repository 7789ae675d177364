"""NOLA (docs/methods.md §7): the bases are the documented splitmix64 numbers (a numpy reimplementation), never
saved and rebuilt bit-identically (on load, in another process, after `.to()` moves of dtype and device, chunk by
chunk), cached and chunked bases give the same numbers while the chunked path keeps no bases in the autograd graph
and its memory stays that of a chunk, stored = k + l per module, defaults, bad configs."""
from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

import vbshare
from vbshare.adapters.nola import NOLAConfig
from vbshare.checkpoint import WEIGHTS_FILE

from adapter_cases import splitmix64_bases
from toy_model import Toy, batch, build_toy, train

K, L, R = 10, 6, 3


def toy() -> Toy:
    return build_toy(blocks=2)


def adapted(**hyperparameters) -> Toy:
    model = toy()
    torch.manual_seed(1)
    options = {"r": R, "num_basis_a": K, "num_basis_b": L, "alpha": 6.0, **hyperparameters}
    return vbshare.inject(model, "nola", targets=["fc", "proj"], **options)


def bases_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{which}": b for name, a in vbshare.adapters(model).items() for which, b in zip("AB", a.bases())}


def test_defaults_follow_the_paper():
    config = NOLAConfig()
    assert (config.num_basis_a, config.num_basis_l, config.r) == (1024, 1024, 8)
    assert config.cache_bases is None and config.chunk_size is None
    model = vbshare.inject(toy(), "nola", targets=["fc"], num_basis_a=7)  # l follows k unless given
    assert {a.coef_B.numel() for a in vbshare.adapters(model).values()} == {7}


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "chunked"])
def test_bases_are_the_documented_numbers(cache):
    """Every basis entry equals the numpy splitmix64 rule bit for bit (seed from SHA-256 of "<seed>/<name>/<A|B>"),
    whether cached or made in chunks of 4 that do not divide k = 10."""
    model = adapted(cache_bases=cache, chunk_size=4)
    for name, adapter in vbshare.adapters(model).items():
        for factor, made in zip("AB", adapter.bases()):
            digest = hashlib.sha256(f"0/{name}/{factor}".encode()).digest()
            expected = splitmix64_bases(int.from_bytes(digest[:8], "little") & (2**63 - 1), tuple(made.shape))
            assert made.dtype == torch.float32 and np.array_equal(made.numpy(), expected.astype(np.float32)), name
    bound = 1 / K**0.5
    every = vbshare.adapters(adapted(num_basis_a=K, r=8))["layers.0.proj"].bases()[0]  # (10, 8, 12): 960 draws
    assert every.abs().max() < bound and abs(every.var().item() / (bound**2 / 3) - 1) < 0.15


def test_chunked_memory_is_a_chunk():
    """One training step's peak of tensor bytes (torch's profiler) with chunked bases is the base weight plus one
    chunk's working set (its int64 counters: a few 8-byte tensors per entry), far below the cached bases
    (k = l = 128, r = 8, 256 × 256: 2 MiB of bases; chunks of 8 bases: 16,384 entries)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile

    def peak(cache: bool) -> int:
        model = nn.Sequential(nn.Linear(256, 256))
        vbshare.inject(model, "nola", targets=["0"], r=8, num_basis_a=128, cache_bases=cache, chunk_size=8)
        held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        x = torch.randn(4, 256)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
            model[0](x).pow(2).sum().backward()
        live = top = 0
        for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
            live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
            top = max(top, live)
        return held + top

    bases, weight, chunk = 2 * 128 * 8 * 256 * 4, 256 * 256 * 4, 8 * 8 * 256
    cached, chunked = peak(True), peak(False)
    assert cached > bases + weight and chunked < weight + 4 * 8 * chunk < weight + bases / 2


def test_default_caches_only_bases_that_fit():
    """cache_bases=None keeps the bases while all of them, 4·r·(k·in + l·out) bytes per module, fit in 2 GiB: the
    toy's do; a Llama-2-7B's q_proj alone at k = l = 1024, r = 8 (4·8·(1024·4096·2) = 256 MiB) times 224 modules
    does not, so planning it shows no bases held."""
    assert all(a.cache_bases for a in vbshare.adapters(adapted()).values())
    config = NOLAConfig(r=8, num_basis_a=1024)
    seven_b = {f"layers.{i}.{m}": (4096, 4096) for i in range(32) for m in ("q", "k", "v", "o")}
    assert config.caches(dict(list(seven_b.items())[:8])) and not config.caches(seven_b)
    assert NOLAConfig(cache_bases=True).caches(seven_b)


def test_bases_never_saved_and_rebuilt_on_load(tmp_path):
    model = adapted()
    train(model)
    vbshare.save_adapter(model, tmp_path)
    saved = safetensors.torch.load_file(str(tmp_path / WEIGHTS_FILE))
    assert set(saved) == {f"{name}.coef_{f}" for name in vbshare.adapters(model) for f in "AB"}
    assert (tmp_path / WEIGHTS_FILE).stat().st_size < 4 * (K + L) * 4 + 2048  # 4 modules of k + l floats + header
    fresh = vbshare.load_adapter(toy(), tmp_path)
    expected = bases_of(model)
    for key, value in bases_of(fresh).items():
        assert torch.equal(value, expected[key]), key
    with torch.no_grad():
        assert torch.equal(fresh(batch(0)), model(batch(0)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("cache", [True, False], ids=["cached", "chunked"])
def test_bases_after_dtype_move(dtype, cache, tmp_path):
    """After `.to(dtype)` the bases are the float32 draw cast once, whichever way they are kept and also
    after a load; the adapter then runs in that dtype."""
    reference = bases_of(adapted())  # float32, cached
    model = adapted(cache_bases=cache)
    train(model)
    vbshare.save_adapter(model, tmp_path)
    for moved in (model.to(dtype), vbshare.load_adapter(toy(), tmp_path).to(dtype)):
        for key, value in bases_of(moved).items():
            assert value.dtype == dtype and torch.equal(value, reference[key].to(dtype)), key
        with torch.no_grad():
            assert moved(batch(0).to(dtype)).dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cache", [True, False], ids=["cached", "chunked"])
def test_bases_after_device_move(cache):
    reference = bases_of(adapted())
    model = adapted(cache_bases=cache).to("cuda")
    for key, value in bases_of(model).items():
        assert value.is_cuda and torch.equal(value.cpu(), reference[key]), key


@pytest.mark.slow
def test_bases_are_the_same_in_another_process():
    """The per-module seed comes from SHA-256, not Python's salted hash(): a process with another hash seed draws
    the same bits."""
    here = hashlib.sha256(b"".join(v.numpy().tobytes() for v in bases_of(adapted()).values())).hexdigest()
    script = (
        "import hashlib, sys, torch, vbshare\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from test_nola import adapted, bases_of\n"
        "print(hashlib.sha256(b''.join(v.numpy().tobytes() for v in bases_of(adapted()).values())).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    there = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)], env=env, check=True,
                           capture_output=True, text=True).stdout.strip()
    assert there == here


def test_modules_and_seeds_get_their_own_bases():
    model = adapted()
    layers = vbshare.adapters(model)
    first, second = layers["layers.0.fc"].bases()[0], layers["layers.1.fc"].bases()[0]
    assert first.shape == second.shape and not torch.equal(first, second)
    other = adapted(seed=1)
    assert not torch.equal(first, vbshare.adapters(other)["layers.0.fc"].bases()[0])


def test_cached_and_regenerated_agree():
    cached, regenerated = adapted(cache_bases=True), adapted(cache_bases=False)
    for (name, a), b in zip(vbshare.adapters(cached).items(), vbshare.adapters(regenerated).values()):
        assert torch.equal(a.coef_A, b.coef_A), "the coefficients' init must not depend on cache_bases"
        assert torch.equal(a.bases()[0], b.bases()[0]) and torch.equal(a.bases()[1], b.bases()[1]), name
    train(cached)
    train(regenerated)
    for (name, a), b in zip(vbshare.adapters(cached).items(), vbshare.adapters(regenerated).values()):
        assert a.coef_B.abs().max() > 0, f"{name}: β did not train"
        torch.testing.assert_close(a.coef_A, b.coef_A, atol=1e-7, rtol=0)
        torch.testing.assert_close(a.coef_B, b.coef_B, atol=1e-7, rtol=0)
        torch.testing.assert_close(a.delta_weight(), b.delta_weight(), atol=1e-7, rtol=0)


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "chunked"])
def test_evaluation_combines_the_bases_once_until_a_coefficient_changes(cache, monkeypatch):
    """Under no_grad the factors are combined once and reused (each decoded token is a forward pass); an optimiser
    step, a load or a move changes them, and the output is always that of freshly combined factors (float64 ref)."""
    model = adapted(cache_bases=cache)
    train(model)
    layer = vbshare.adapters(model)["layers.0.fc"]
    draws = []
    real_draw = type(layer.spec_A).draw
    monkeypatch.setattr(type(layer.spec_A), "draw", lambda self, *a, **k: (draws.append(1), real_draw(self, *a, **k))[1])
    combines = []
    nola = importlib.import_module("vbshare.adapters.nola")  # (vbshare.adapters is also a function)
    real_combine = nola.combine
    monkeypatch.setattr(nola, "combine", lambda c, b: (combines.append(1), real_combine(c, b))[1])

    def reference(x: torch.Tensor) -> torch.Tensor:  # float64: W x + s · B A x with A, B from the bases
        bases_A, bases_B = (b.double() for b in layer.bases())
        A = torch.einsum("k,kri->ri", layer.coef_A.double(), bases_A)  # (r, in)
        B = torch.einsum("l,lor->or", layer.coef_B.double(), bases_B)  # (out, r)
        base = layer.base_layer
        return x.double() @ base.weight.double().T + base.bias.double() + layer.scale * (x.double() @ A.T @ B.T)
    x = torch.randn(5, layer.in_features)
    with torch.no_grad():
        first = layer(x)
        work = len(draws) + len(combines)
        assert work > 0
        second = layer(x)
        assert len(draws) + len(combines) == work  # nothing combined or drawn again
        torch.testing.assert_close(second.double(), reference(x), atol=1e-5, rtol=0)
        layer.coef_B.add_(0.5)  # what an optimiser step does
        third = layer(x)
        assert len(draws) + len(combines) > work and not torch.allclose(third, first)
    with torch.no_grad():
        torch.testing.assert_close(third.double(), reference(x), atol=1e-5, rtol=0)
    layer.to(torch.float64)  # a move replaces the coefficients
    with torch.no_grad():
        torch.testing.assert_close(layer(x.double()), reference(x), atol=1e-10, rtol=0)


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "chunked"])
def test_regenerated_bases_are_not_kept_for_backward(cache):
    """Cached bases are saved for backward (they are alive anyway); regenerated ones are drawn again in backward,
    so nothing basis-sized is saved."""
    model = adapted(num_basis_a=64, num_basis_b=64, cache_bases=cache)
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t.numel()), t)[1], lambda t: t):
        loss = model(batch(0)).pow(2).mean()
    loss.backward()
    smallest_bases = 64 * R * 8  # (k, r, in) of fc
    assert (max(saved) >= smallest_bases) is cache
    assert all(a.coef_B.grad is not None for a in vbshare.adapters(model).values())


def test_stored_is_k_plus_l_per_module_whatever_the_shape_and_rank():
    for r in (1, 5):
        summary = vbshare.summary(adapted(r=r))
        rows = [row for row in summary.rows if row["shape"] is not None]
        assert {row["shape"] for row in rows} == {(12, 8), (8, 12)}
        assert all(row["stored"] == K + L and row["trainable"] == K + L for row in rows)
        assert summary.stored == 4 * (K + L)
    assert set(vbshare.parameter_roles(adapted()).values()) == {"coefficients"}


def test_init_is_zero_delta_with_lora_like_A():
    model = adapted(num_basis_a=1024, r=8)
    x = batch(0)
    with torch.no_grad():
        assert torch.equal(model(x), toy()(x)), "β = 0 must give ΔW = 0 exactly"
        A = vbshare.adapters(model)["layers.0.proj"].factors()[0]  # (8, 12), entries should have var 1/(3·12)
    assert abs(A.var().item() * 3 * 12 - 1.0) < 0.3
