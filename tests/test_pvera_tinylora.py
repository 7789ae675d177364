"""PVeRA and TinyLoRA beyond the shared matrix (docs/methods.md §11, §12): Hugging Face PEFT as the independent
reference both ways (our export loads in PEFT, we import PEFT's saves) on a tiny BERT (nn.Linear) and a tiny GPT-2
(Conv1D) with targets of unequal shapes; PVeRA's sampled training path and KL term against float64 formulas with
independently seeded noise; TinyLoRA's tying groups and projections against PEFT's; counts on a model built
without weights."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

import vbshare
from test_vera_unilora_peft import ATOL, BASES, assert_moves_output, fresh, out, peft_layers, targets, tokens

import peft  # the reference (dev extra); missing must fail, not skip

PVERA = dict(r=4)
TINYLORA = dict(r=2, u=5)


def randomise(parameters, seed: int) -> None:
    """Every tensor drawn N(0, 1) from one seeded generator, so the adapter does something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in parameters:
            param.copy_(torch.randn(param.shape, generator=generator))


def peft_delta(layer) -> torch.Tensor:
    return layer.get_delta_weight("default")


def our_delta(adapter) -> torch.Tensor:
    delta = adapter.delta_weight().detach()
    return delta.T if adapter.fan_in_fan_out else delta  # the base weight's own layout, as PEFT returns it


# -- PVeRA ----------------------------------------------------------------------------------------------------------
def peft_pvera(kind: str, **extra) -> torch.nn.Module:
    config = peft.PveraConfig(target_modules=targets(kind), fan_in_fan_out=(kind == "conv1d"), **PVERA, **extra)
    model = peft.get_peft_model(fresh(kind), config).eval()
    randomise([p for n, p in model.named_parameters() if "pvera_lambda_" in n], 11)
    return model


@pytest.mark.parametrize("kind", BASES)
def test_pvera_projections_are_peft_bits(kind):
    theirs = peft_pvera(kind, projection_prng_key=7)
    ours = vbshare.inject(fresh(kind), "pvera", targets=targets(kind), projection_seed=7, **PVERA)
    state = vbshare.state_of(ours)
    assert torch.equal(state.projection_A, theirs.base_model.pvera_A["default"])  # (2r, max_in)
    assert torch.equal(state.projection_B, theirs.base_model.pvera_B["default"])  # (max_out, r)


@pytest.mark.parametrize("kind", BASES)
def test_peft_loads_our_pvera_export(kind, tmp_path):
    ours = vbshare.inject(fresh(kind), "pvera", targets=targets(kind), projection_seed=3, **PVERA)
    randomise([p for a in vbshare.adapters(ours).values() for p in (a.lambda_d, a.lambda_b)], 5)
    assert_moves_output(ours, kind)
    vbshare.export_peft(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PVERA"
    theirs = peft.PeftModel.from_pretrained(fresh(kind), tmp_path).eval()
    torch.testing.assert_close(out(theirs), out(ours), atol=ATOL, rtol=0)  # both eval: the latent's mean
    for name, layer in peft_layers(theirs).items():
        torch.testing.assert_close(peft_delta(layer), our_delta(vbshare.adapters(ours)[name]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", BASES)
@pytest.mark.parametrize("save_projection", [True, False], ids=["projections", "seed"])
def test_we_load_peft_pvera_saves(kind, save_projection, tmp_path):
    theirs = peft_pvera(kind, projection_prng_key=5, save_projection=save_projection)
    theirs.save_pretrained(tmp_path)
    ours = vbshare.import_peft(fresh(kind), tmp_path)
    assert_moves_output(ours, kind)
    torch.testing.assert_close(out(ours), out(theirs), atol=ATOL, rtol=0)
    # stored: PEFT's own count of its λ's, plus its projections when the folder holds them
    lambdas = sum(p.numel() for n, p in theirs.named_parameters() if "pvera_lambda_" in n)
    projections = theirs.base_model.pvera_A["default"].numel() + theirs.base_model.pvera_B["default"].numel()
    assert vbshare.summary(ours).stored == lambdas + (projections if save_projection else 0)


def test_pvera_training_forward_samples_the_latent_with_the_documented_seed():
    """Train mode with sample_seed: y = base(x) + λ_b ⊙ (B_sl (μ + ε ⊙ exp(½ log σ²))), ε drawn here from a CPU
    generator seeded with SHA-256("<sample_seed>/<module name>")[:8] (little-endian, top bit cleared), in float64."""
    model = vbshare.inject(fresh("linear"), "pvera", targets=targets("linear"), sample_seed=9, **PVERA)
    adapters = vbshare.adapters(model)
    randomise([p for a in adapters.values() for p in (a.lambda_d, a.lambda_b)], 2)
    model.train()
    r = PVERA["r"]
    for name, adapter in adapters.items():
        x = torch.randn(3, 4, adapter.in_features, generator=torch.Generator().manual_seed(1))
        digest = hashlib.sha256(f"9/{name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        eps = torch.randn(3, 4, r, generator=generator).double()
        A = adapter.state.projection_A.double()[:, : adapter.in_features]  # (2r, in)
        B = adapter.state.projection_B.double()[: adapter.out_features]  # (out, r)
        h = (x.double() @ A.T) * adapter.lambda_d.detach().double()  # (3, 4, 2r)
        z = h[..., :r] + eps * torch.exp(0.5 * h[..., r:])
        expected = adapter.base_layer(x).double() + (z @ B.T) * adapter.lambda_b.detach().double()
        with torch.no_grad():
            torch.testing.assert_close(adapter(x).double(), expected, atol=1e-5, rtol=1e-5)
        adapter.eval()  # the mean path, and with it the contract's ΔW
        with torch.no_grad():
            mean = adapter.base_layer(x).double() + x.double() @ adapter.delta_weight().double().T
            torch.testing.assert_close(adapter(x).double(), mean, atol=1e-5, rtol=1e-5)
            assert (adapter(x).double() - expected).abs().max() > 1e-3  # sampling did change the training output


def test_pvera_kl_term_and_inference_sampling():
    model = vbshare.inject(fresh("linear"), "pvera", targets=targets("linear"), kl_weight=0.5, **PVERA)
    adapters = vbshare.adapters(model)
    randomise([p for a in adapters.values() for p in (a.lambda_d, a.lambda_b)], 4)
    assert vbshare.extra_loss(model) is None  # nothing recorded before a training forward
    model.train()
    x = tokens()
    hidden = {}
    handles = [a.register_forward_hook(lambda m, args, y: hidden.__setitem__(m.name, args[0].detach()))
               for a in adapters.values()]
    model(x)
    for handle in handles:
        handle.remove()
    expected = 0.0
    r = PVERA["r"]
    for name, adapter in adapters.items():  # −½ · mean(1 + log σ² − μ² − σ²) per module, in float64
        A = adapter.state.projection_A.double()[:, : adapter.in_features]
        h = (hidden[name].double() @ A.T) * adapter.lambda_d.detach().double()
        mu, logvar = h[..., :r], h[..., r:]
        expected += -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).mean()
    torch.testing.assert_close(vbshare.extra_loss(model).double(), 0.5 * expected, atol=1e-6, rtol=1e-5)
    assert vbshare.extra_loss(model) is None  # each term is read once
    model.eval()
    first, second = out(model), out(model)
    assert torch.equal(first, second)  # eval: the mean, deterministic
    sampling = vbshare.inject(fresh("linear"), "pvera", targets=targets("linear"), sample_at_inference=True, **PVERA)
    randomise([p for a in vbshare.adapters(sampling).values() for p in (a.lambda_d, a.lambda_b)], 4)
    assert (out(sampling) - out(sampling)).abs().max() > 1e-4  # each eval pass draws its own latent


# -- TinyLoRA -------------------------------------------------------------------------------------------------------
def peft_tinylora(kind: str, **extra) -> torch.nn.Module:
    config = peft.TinyLoraConfig(target_modules=targets(kind), fan_in_fan_out=(kind == "conv1d"), **TINYLORA, **extra)
    model = peft.get_peft_model(fresh(kind), config).eval()
    randomise(list(model.base_model.tinylora_v["default"].values()), 12)
    return model


TYINGS = [0.0, 0.5, 0.7, 1.0]  # 8 targets on either model -> 8, 4, 2 (round(2.4)), 1 vectors


@pytest.mark.parametrize("kind", BASES)
def test_tinylora_groups_and_projections_are_peft_s(kind):
    """The same module -> vector assignment and, per module, the same P bits as PEFT for every tying degree."""
    for tying in TYINGS:
        theirs = peft_tinylora(kind, weight_tying=tying, projection_seed=3)
        ours = vbshare.inject(fresh(kind), "tinylora", targets=targets(kind), weight_tying=tying, projection_seed=3,
                              **TINYLORA)
        state = vbshare.state_of(ours)
        layers = peft_layers(theirs)
        assert set(layers) == set(state.group)
        for name, layer in layers.items():
            assert state.group[name] == int(layer._tinylora_v_key["default"]), (tying, name)
            assert torch.equal(vbshare.adapters(ours)[name].projection, layer.tinylora_P["default"]), (tying, name)
        assert state.vectors.shape[0] == len(theirs.base_model.tinylora_v["default"])


@pytest.mark.parametrize("kind", BASES)
@pytest.mark.parametrize("tying", [0.0, 0.5, 1.0])
def test_peft_loads_our_tinylora_export(kind, tying, tmp_path):
    ours = vbshare.inject(fresh(kind), "tinylora", targets=targets(kind), weight_tying=tying, **TINYLORA)
    randomise([vbshare.state_of(ours).vectors], 6)
    assert_moves_output(ours, kind)
    vbshare.export_peft(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(fresh(kind), tmp_path).eval()
    torch.testing.assert_close(out(theirs), out(ours), atol=ATOL, rtol=0)
    for name, layer in peft_layers(theirs).items():
        torch.testing.assert_close(peft_delta(layer), our_delta(vbshare.adapters(ours)[name]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", BASES)
@pytest.mark.parametrize("tying,save_projection", [(0.0, True), (0.5, False), (1.0, True)])
def test_we_load_peft_tinylora_saves(kind, tying, save_projection, tmp_path):
    theirs = peft_tinylora(kind, weight_tying=tying, save_projection=save_projection)
    theirs.save_pretrained(tmp_path)
    ours = vbshare.import_peft(fresh(kind), tmp_path)
    assert_moves_output(ours, kind)
    torch.testing.assert_close(out(ours), out(theirs), atol=ATOL, rtol=0)
    # stored: PEFT's vectors, its factors (always saved) and, when saved, its projections
    peft_stored = sum(p.numel() for p in theirs.base_model.tinylora_v["default"].values())
    for layer in peft_layers(theirs).values():
        peft_stored += layer.tinylora_A["default"].numel() + layer.tinylora_B["default"].numel()
        peft_stored += layer.tinylora_P["default"].numel() if save_projection else 0
    assert vbshare.summary(ours).stored == peft_stored


def test_tinylora_import_with_the_wrong_group_count_is_refused(tmp_path):
    theirs = peft_tinylora("linear", weight_tying=0.5)
    theirs.save_pretrained(tmp_path)
    described = json.loads((tmp_path / "adapter_config.json").read_text())
    described["weight_tying"] = 0.0  # 8 groups expected, 4 vectors in the file
    (tmp_path / "adapter_config.json").write_text(json.dumps(described))
    base = fresh("linear")
    with pytest.raises(vbshare.VBShareError, match=r"vectors \[0, 1, 2, 3\].* gives 8 groups") as err:
        vbshare.import_peft(base, tmp_path)
    assert "\n" not in str(err.value)
    assert vbshare.state_of(base, required=False) is None and not vbshare.adapters(base)  # left plain


# -- counts without weights -----------------------------------------------------------------------------------------
def test_counts_on_a_llama_3b_shaped_model_built_without_weights():
    """Llama-3.2-3B's shapes on the meta device (28 layers, q 3072 -> 3072, v 3072 -> 1024; no SVD runs there):
    PVeRA r 256 stores Σ (out + 2r) = 28 · (3072 + 1024 + 4 · 256) = 143,360; TinyLoRA u 64 stores 56 · 64 = 3,584
    untied, 64 fully tied, and with P saved adds 56 · 64 · 2² = 14,336."""
    config = LlamaConfig(vocab_size=128, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8)
    expected = [("pvera", dict(r=256), 143_360, 143_360), ("tinylora", dict(u=64), 3_584, 3_584),
                ("tinylora", dict(u=64, weight_tying=1.0), 64, 64),
                ("tinylora", dict(u=64, save_projection=True), 3_584 + 14_336, 3_584)]
    for method, hyperparameters, stored, trainable in expected:
        with torch.device("meta"):
            model = LlamaModel(config)
        vbshare.inject(model, method, targets=["q_proj", "v_proj"], **hyperparameters)
        counted = vbshare.summary(model)
        assert (counted.stored, counted.trainable) == (stored, trainable), (method, hyperparameters)
