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


# -- analysis: TinyLoRA's tied vectors ------------------------------------------------------------------------------
def test_tinylora_group_and_core_tables_on_a_hand_built_state():
    """Five modules at weight_tying 0.5: G = round(2.5) = 2 groups of ⌊5/2⌋ = 2, the fifth joining the last, so the
    groups are [0, 0, 1, 1, 1]. v_0 = (3, 4, 0), v_1 = (1, 0, 0); every module's P is (I, E_01, 0), so module 0's core
    is R = [[3, 4], [0, 3]]: ‖R‖_F = √34 and singular values √((34 ± √832) / 2) (s₁² + s₂² = 34, s₁·s₂ = det = 9)."""
    from vbshare.analysis import tinylora as TL

    modules = [f"layers.{i}.fc" for i in range(5)]
    vectors = torch.tensor([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0]])
    groups = TL.group_table_from(vectors, modules, 0.5)
    assert groups[["group", "modules", "first", "last"]].values.tolist() == [[0, 2, "L0.fc", "L1.fc"],
                                                                            [1, 3, "L2.fc", "L4.fc"]]
    assert groups["norm"].tolist() == pytest.approx([5.0, 1.0])
    P = torch.stack([torch.eye(2), torch.tensor([[0.0, 1.0], [0.0, 0.0]]), torch.zeros(2, 2)])  # (u=3, r=2, r=2)
    cores = TL.core_table_from(vectors, {m: P for m in modules}, 0.5)
    assert cores["group"].tolist() == [0, 0, 1, 1, 1]
    assert cores["core_norm"].tolist() == pytest.approx([34 ** 0.5] * 2 + [2 ** 0.5] * 3)
    assert cores.loc[0, "core_sv_max"] == pytest.approx(((34 + 832 ** 0.5) / 2) ** 0.5)
    assert cores.loc[0, "core_sv_min"] == pytest.approx(((34 - 832 ** 0.5) / 2) ** 0.5)
    with pytest.raises(vbshare.VBShareError, match="2 vectors, but weight_tying=0.0 on 5 modules gives 5 groups"):
        TL.group_table_from(vectors, modules, 0.0)


@pytest.mark.parametrize("save_projection", [False, True])
def test_tinylora_tables_from_a_saved_adapter(save_projection, tmp_path):
    """From a folder, P comes from the file or from the seed: the cores equal the live model's R, and the figure draws."""
    from matplotlib.figure import Figure

    from vbshare.analysis import tinylora as TL

    model = vbshare.inject(fresh("linear"), "tinylora", targets=targets("linear"), weight_tying=0.5,
                           save_projection=save_projection, **TINYLORA)
    randomise([vbshare.state_of(model).vectors], 8)
    vbshare.save_adapter(model, tmp_path)
    cores = TL.core_table(tmp_path)
    live = [torch.einsum("u,urs->rs", a.vector.detach().double(), a.projection.double()).norm().item()
            for a in vbshare.adapters(model).values()]
    assert cores["module"].tolist() == list(vbshare.adapters(model))
    assert cores["core_norm"].tolist() == pytest.approx(live, rel=1e-6)
    groups = TL.group_table(tmp_path)
    assert groups["modules"].sum() == len(live) and len(groups) == 4
    figure = TL.plot_vectors(TL.vector_matrix(tmp_path), cores)
    assert isinstance(figure, Figure)
    figure.savefig(tmp_path / "vectors.png")
