"""VeRA and Uni-LoRA against Hugging Face PEFT (the independent reference), both directions of interop, on a
tiny BERT (nn.Linear) and a tiny GPT-2 (transformers Conv1D), each with targets of unequal shapes."""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

import vbshare

import peft  # the reference (dev extra); missing must fail, not skip

BASES = {
    # query (32, 32), attention.output.dense (32, 32), intermediate.dense (64, 32), output.dense (32, 64)
    "linear": (lambda: BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64, hidden_dropout_prob=0.0,
                                            attention_probs_dropout_prob=0.0)),
               ["query", "intermediate.dense", "output.dense"]),
    # c_attn (96, 32), attn.c_proj (32, 32), c_fc (128, 32), mlp.c_proj (32, 128)
    "conv1d": (lambda: GPT2Model(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                            bos_token_id=0, eos_token_id=0)),
               ["c_attn", "c_fc", "c_proj"]),
}
VERA = dict(r=6)
UNILORA = dict(r=2, theta_d_length=300)  # D is not a multiple of d on either model
ATOL = 1e-5


def fresh(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BASES[kind][0]().eval()


def targets(kind: str) -> list[str]:
    return BASES[kind][1]


def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens()).last_hidden_state


def peft_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """Our module name -> PEFT's adapter layer."""
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
            if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)}


def assert_moves_output(model: nn.Module, kind: str) -> None:
    assert (out(model) - out(fresh(kind))).abs().max() > 1e-3, "the adapter should change the outputs"


def test_unequal_shapes():
    for kind in BASES:
        shapes = {(a.out_features, a.in_features)
                  for a in vbshare.adapters(vbshare.inject(fresh(kind), "vera", targets=targets(kind), r=2)).values()}
        assert len(shapes) >= 3, shapes


# -- VeRA -----------------------------------------------------------------------------------------------------------
def peft_vera(kind: str, **extra) -> nn.Module:
    """PEFT's VeRA with random (non-zero) λ_d, λ_b, so the adapter does something."""
    config = peft.VeraConfig(target_modules=targets(kind), fan_in_fan_out=(kind == "conv1d"), **VERA, **extra)
    model = peft.get_peft_model(fresh(kind), config).eval()
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vera_lambda_" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


@pytest.mark.parametrize("kind", BASES)
def test_vera_projections_are_peft_bits(kind):
    """The seed rebuilds exactly PEFT's shared projections (so a save without them loads in either library)."""
    theirs = peft_vera(kind, projection_prng_key=7)
    ours = vbshare.inject(fresh(kind), "vera", targets=targets(kind), projection_seed=7, **VERA)
    state = vbshare.state_of(ours)
    assert torch.equal(state.projection_A, theirs.base_model.vera_A["default"])
    assert torch.equal(state.projection_B, theirs.base_model.vera_B["default"])


@pytest.mark.parametrize("kind", BASES)
@pytest.mark.parametrize("save_projection", [True, False], ids=["projections", "seed"])
def test_peft_loads_our_vera_export(kind, save_projection, tmp_path):
    ours = vbshare.inject(fresh(kind), "vera", targets=targets(kind), projection_seed=3,
                          save_projection=save_projection, **VERA)
    with torch.no_grad():
        for adapter in vbshare.adapters(ours).values():
            adapter.lambda_d.normal_()
            adapter.lambda_b.normal_()
    assert_moves_output(ours, kind)
    vbshare.export_peft(ours, tmp_path)
    saved = safetensors.torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(saved)  # written either way, as PEFT advises
    theirs = peft.PeftModel.from_pretrained(fresh(kind), tmp_path).eval()
    torch.testing.assert_close(out(theirs), out(ours), atol=ATOL, rtol=0)
    for name, layer in peft_layers(theirs).items():  # and ΔW, in the base weight's own layout
        adapter = vbshare.adapters(ours)[name]
        mine = adapter.delta_weight().T if adapter.fan_in_fan_out else adapter.delta_weight()
        torch.testing.assert_close(layer.get_delta_weight("default"), mine.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", BASES)
@pytest.mark.parametrize("save_projection", [True, False], ids=["projections", "seed"])
def test_we_load_peft_vera_saves(kind, save_projection, tmp_path):
    theirs = peft_vera(kind, projection_prng_key=5, save_projection=save_projection)
    theirs.save_pretrained(tmp_path)
    ours = vbshare.import_peft(fresh(kind), tmp_path)
    assert_moves_output(ours, kind)
    torch.testing.assert_close(out(ours), out(theirs), atol=ATOL, rtol=0)
    assert vbshare.state_of(ours).config.save_projection == save_projection
    # stored: Σ (out + r) over modules, plus r·(max_in + max_out) when the projections were saved (PEFT's count of
    # its λ's, made independently of ours, is the reference for the first part)
    lambdas = sum(p.numel() for n, p in theirs.named_parameters() if "vera_lambda_" in n)
    projections = theirs.base_model.vera_A["default"].numel() + theirs.base_model.vera_B["default"].numel()
    assert vbshare.summary(ours).stored == lambdas + (projections if save_projection else 0)


def test_peft_vera_projections_loaded_not_redrawn(tmp_path):
    """Saved projections that the seed would NOT give (here: redrawn by hand) are what the import uses."""
    theirs = peft_vera("linear", projection_prng_key=5, save_projection=True)
    with torch.no_grad():
        theirs.base_model.vera_A["default"].uniform_(-1, 1, generator=torch.Generator().manual_seed(1))
        theirs.base_model.vera_B["default"].uniform_(-1, 1, generator=torch.Generator().manual_seed(2))
    theirs.save_pretrained(tmp_path)
    ours = vbshare.import_peft(fresh("linear"), tmp_path)
    # uniform(-1, 1) projections are far larger than the seeded ones, and so is the float32 rounding of the two
    # libraries' different operation orders (measured up to 1.3e-5 on outputs of size ~1.4): a relative term of
    # 1e-5 covers that, while projections redrawn from the seed would change the outputs by orders of magnitude more
    torch.testing.assert_close(out(ours), out(theirs), atol=ATOL, rtol=1e-5)


def test_peft_vera_with_bias_is_refused(tmp_path):
    theirs = peft_vera("linear", bias="vera_only")
    theirs.save_pretrained(tmp_path)
    with pytest.raises(vbshare.VBShareError, match="unexpected tensor .*bias"):
        vbshare.import_peft(fresh("linear"), tmp_path)


# -- Uni-LoRA -------------------------------------------------------------------------------------------------------
def peft_unilora(kind: str, **extra) -> nn.Module:
    config = peft.UniLoraConfig(target_modules=targets(kind), fan_in_fan_out=(kind == "conv1d"),
                                init_theta_d_bound=0.5, **UNILORA, **extra)
    torch.manual_seed(13)  # θ's draw
    return peft.get_peft_model(fresh(kind), config).eval()


def relabel_theta(per_theta: list[torch.Tensor], indices: list[torch.Tensor], seed: int = 0) -> None:
    """Rename the θ entries by a random permutation π, in place: v'[π(k)] = v[k] for every per-θ-entry vector
    (θ, our per-entry scale) and idx' = π(idx); per-factor-entry scales follow their entry unchanged. The adapter
    computes the same ΔW, but only through the new indices: a reader that regenerated idx from the seed would
    pair them with the wrong θ entries."""
    permutation = torch.randperm(per_theta[0].numel(), generator=torch.Generator().manual_seed(seed))  # old -> new
    with torch.no_grad():
        for vector in per_theta:
            vector[permutation] = vector.clone()
        for index in indices:
            index.copy_(permutation[index.long()].to(index.dtype))


@pytest.mark.parametrize("kind", BASES)
def test_unilora_indices_are_peft_assignment(kind):
    """The seed rebuilds exactly PEFT's balanced index map and its per-entry scales."""
    theirs = peft_unilora(kind, proj_seed=9)
    ours = vbshare.inject(fresh(kind), "unilora", targets=targets(kind), proj_seed=9, **UNILORA)
    scale = vbshare.state_of(ours).theta_scale
    layers = peft_layers(theirs)
    assert set(layers) == set(vbshare.adapters(ours))
    for name, adapter in vbshare.adapters(ours).items():
        for factor in ("A", "B"):
            index = getattr(adapter, f"indices_{factor}")
            assert torch.equal(index.long(), getattr(layers[name], f"unilora_indices_{factor}")["default"])
            assert torch.equal(scale[index], getattr(layers[name], f"unilora_scales_{factor}")["default"])


@pytest.mark.parametrize("kind", BASES)
def test_peft_loads_our_unilora_export_with_indices(kind, tmp_path):
    ours = vbshare.inject(fresh(kind), "unilora", targets=targets(kind), proj_seed=4, init_theta_d_bound=0.5,
                          **UNILORA)
    before = out(ours)
    state = vbshare.state_of(ours)
    relabel_theta([state.theta, state.theta_scale],
                  [getattr(a, f"indices_{f}") for a in vbshare.adapters(ours).values() for f in "AB"])
    torch.testing.assert_close(out(ours), before, atol=1e-6, rtol=0)  # the relabelling changes nothing for us
    assert_moves_output(ours, kind)
    vbshare.export_peft(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "UNILORA" and config["save_indices"] is True
    theirs = peft.PeftModel.from_pretrained(fresh(kind), tmp_path).eval()
    torch.testing.assert_close(out(theirs), out(ours), atol=ATOL, rtol=0)
    # PEFT's own regeneration from proj_seed would not give these outputs: the indices in the folder were used
    regenerated = peft_unilora(kind, proj_seed=4)
    with torch.no_grad():
        regenerated.base_model.unilora_theta_d["default"].copy_(vbshare.state_of(ours).theta)
    assert (out(regenerated) - out(ours)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", BASES)
@pytest.mark.parametrize("save_indices", [True, False], ids=["indices", "seed"])
def test_we_load_peft_unilora_saves(kind, save_indices, tmp_path):
    theirs = peft_unilora(kind, proj_seed=21, save_indices=save_indices)
    if save_indices:  # relabelled θ entries: matching PEFT then needs the saved indices, not the seed
        layers = peft_layers(theirs)
        relabel_theta([theirs.base_model.unilora_theta_d["default"]],
                      [getattr(m, f"unilora_indices_{f}")["default"] for m in layers.values() for f in "AB"])
    theirs.save_pretrained(tmp_path)
    ours = vbshare.import_peft(fresh(kind), tmp_path)
    assert_moves_output(ours, kind)
    torch.testing.assert_close(out(ours), out(theirs), atol=ATOL, rtol=0)
    state = vbshare.state_of(ours)
    assert state.config.save_indices == save_indices
    entries = sum(a.indices_A.numel() + a.indices_B.numel() for a in vbshare.adapters(ours).values())
    d = UNILORA["theta_d_length"]
    assert vbshare.summary(ours).stored == (d + entries + d if save_indices else d)


def test_peft_unilora_with_wrong_scales_is_refused(tmp_path):
    theirs = peft_unilora("linear", save_indices=True)
    theirs.save_pretrained(tmp_path)
    saved = safetensors.torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    key = next(k for k in saved if k.endswith("unilora_scales_A"))
    saved[key] = saved[key] * 2
    safetensors.torch.save_file(saved, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(vbshare.VBShareError, match="not 1/sqrt\\(uses\\)"):
        vbshare.import_peft(fresh("linear"), tmp_path)


def test_peft_unilora_all_linear_save_imports_and_unresolved_targets_are_refused(tmp_path):
    """PEFT writes "all-linear" out as module names, which vbshare matches exactly; a folder whose config still
    says "all-linear" and holds no indices cannot be matched with certainty and is refused."""
    config = peft.UniLoraConfig(target_modules="all-linear", init_theta_d_bound=0.5, **UNILORA)
    theirs = peft.get_peft_model(fresh("linear"), config).eval()
    theirs.save_pretrained(tmp_path)
    ours = vbshare.import_peft(fresh("linear"), tmp_path)
    assert_moves_output(ours, "linear")
    torch.testing.assert_close(out(ours), out(theirs), atol=ATOL, rtol=0)
    described = json.loads((tmp_path / "adapter_config.json").read_text())
    described["target_modules"] = "all-linear"
    (tmp_path / "adapter_config.json").write_text(json.dumps(described))
    with pytest.raises(vbshare.VBShareError, match="save_indices=True"):
        vbshare.import_peft(fresh("linear"), tmp_path)
