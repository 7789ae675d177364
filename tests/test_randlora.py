"""RandLoRA beyond the shared matrix (docs/methods.md §10).

The shared bases against PEFT's (the same bits from the same seed, dense and both sparse kinds), the trained count
against PEFT's and against PEFT's published Llama-3.2-3B comparison count, the memory claims (the bases exist once
whatever the number of modules, are read through views, are never upcast in a bfloat16 model, and the composition
keeps nothing the size of ΔW for backward), the start at the base model, and the one-line errors.
"""
from __future__ import annotations

import re
import warnings

import pytest
import safetensors.torch
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel

import vbshare
from vbshare.errors import VBShareError

import peft  # the reference (dev extra); missing must fail, not skip

BASES = {
    # query (32, 32), intermediate.dense (64, 32), output.dense (32, 64) and attention.output.dense (32, 32): both
    # orientations, d = 32 < d_g = 64
    "linear": (lambda layers: BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers,
                                                   num_attention_heads=2, intermediate_size=64,
                                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
               ["query", "intermediate.dense", "output.dense"]),
    # c_attn (96, 32), attn.c_proj (32, 32), c_fc (128, 32), mlp.c_proj (32, 128)
    "conv1d": (lambda layers: GPT2Model(GPT2Config(vocab_size=64, n_embd=32, n_layer=layers, n_head=2, n_positions=16,
                                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                   bos_token_id=0, eos_token_id=0)),
               ["c_attn", "c_fc", "c_proj"]),
}


def fresh(kind: str, layers: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BASES[kind][0](layers).eval()


def ours(kind: str, layers: int = 2, **hyper) -> nn.Module:
    return vbshare.inject(fresh(kind, layers), "randlora", targets=BASES[kind][1], **{"r": 5, **hyper})


def theirs(kind: str, **hyper) -> nn.Module:
    config = peft.RandLoraConfig(target_modules=BASES[kind][1], fan_in_fan_out=(kind == "conv1d"), **{"r": 5, **hyper})
    return peft.get_peft_model(fresh(kind), config).eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens()).last_hidden_state


def randomise(model: nn.Module, seed: int = 11) -> nn.Module:
    """Random (non-zero) scalings, PEFT's or ours, so the adapter does something: λ ~ N(0, 1), γ ~ N(0, 1/d²)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                scale = 1.0 if "lambda" in name else 1.0 / param.shape[-1]
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


def assert_moves_output(model: nn.Module, kind: str) -> None:
    assert (out(model) - out(fresh(kind))).abs().max() > 1e-2, "the adapter should change the outputs"


# -- the shared bases and the counts against PEFT ------------------------------------------------------------------
@pytest.mark.parametrize("kind,bases", [("linear", "dense"), ("conv1d", "dense"), ("linear", "sparse"),
                                        ("conv1d", "very_sparse")])
def test_bases_are_peft_bits_from_the_same_seed(kind, bases):
    flags = {"sparse": bases == "sparse", "very_sparse": bases == "very_sparse"}
    reference = theirs(kind, projection_prng_key=7, **flags).base_model
    state = vbshare.state_of(ours(kind, projection_seed=7, bases=bases))
    assert torch.equal(state.basis_A, reference.randlora_A["default"].squeeze(1))  # PEFT: (r, 1, d_g)
    assert torch.equal(state.basis_B, reference.randlora_B["default"])  # (D_g, n_g, r)
    if bases != "dense":  # ternary: three values, every one of them used
        assert torch.unique(state.basis_B).numel() == 3


@pytest.mark.parametrize("kind", sorted(BASES))
def test_trainable_count_is_pefts(kind):
    model = ours(kind)
    reference = theirs(kind)
    assert vbshare.summary(model).trainable == sum(p.numel() for p in reference.parameters() if p.requires_grad)
    for name, adapter in vbshare.adapters(model).items():  # λ (r, n), γ (n, d): PEFT's shapes, module by module
        layer = reference.base_model.model.get_submodule(name)
        assert adapter.lambdas.shape == layer.randlora_lambda["default"].shape, name
        assert adapter.gammas.shape == layer.randlora_gamma["default"].shape, name


def test_llama_3b_count_is_pefts_method_comparison():
    """PEFT's MetaMathQA comparison (experiments/randlora/llama-3.2-3B-default: r 32, q_proj and v_proj) reports
    9,289,728 trainable parameters; a Llama-3.2-3B-shaped model on the meta device (no weights) must give it."""
    config = LlamaConfig(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        model = LlamaModel(config)
    vbshare.inject(model, "randlora", targets=["q_proj", "v_proj"], r=32)
    counted = vbshare.summary(model)
    assert counted.trainable == counted.stored == 9_289_728
    assert vbshare.state_of(model).basis_B.shape == (3072, 96, 32)  # d_g = D_g = 3072, n_g = 96


def test_saved_bases_are_counted():
    model = ours("linear", save_projection=True)
    r, n_g, d_g, D_g = 5, 13, 64, 64  # largest target shape (64, 64)
    # 2 layers × 4 modules (output.dense matches two) × n·(r + d), n = ⌈32 / 5⌉ = 7
    modules = 2 * 4 * 7 * (5 + 32)
    assert vbshare.summary(model).stored == modules + r * d_g + D_g * n_g * r


# -- PEFT parity, both ways ------------------------------------------------------------------------------------------
ATOL = 1e-5


@pytest.mark.parametrize("kind,bases", [("linear", "dense"), ("conv1d", "dense"), ("conv1d", "sparse")])
def test_peft_loads_our_export(kind, bases, tmp_path):
    model = randomise(ours(kind, projection_seed=3, alpha=10, bases=bases))
    assert_moves_output(model, kind)
    vbshare.export_peft(model, tmp_path)
    saved = safetensors.torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.randlora_A", "base_model.randlora_B"} <= set(saved)  # once, as PEFT advises
    assert not [k for k in saved if k.endswith((".randlora_A", ".randlora_B")) and k.startswith("base_model.model.")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reference = peft.PeftModel.from_pretrained(fresh(kind), tmp_path).eval()
    # PEFT 0.21 lists its per-module references to the shared bases as missing (they are filled from the one copy);
    # any other missing key would be a real gap in the export
    messages = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    listed = [key for message in messages for key in re.findall(r"'([^']+)'", message)]
    assert listed and all(re.fullmatch(r"base_model\.model\..+\.randlora_[AB]\.default", k) for k in listed), listed
    torch.testing.assert_close(out(reference), out(model), atol=ATOL, rtol=0)
    for name, adapter in vbshare.adapters(model).items():  # and ΔW, in the base weight's own layout
        layer = reference.base_model.model.get_submodule(name)
        mine = adapter.delta_weight().T if adapter.fan_in_fan_out else adapter.delta_weight()
        torch.testing.assert_close(layer.get_delta_weight("default"), mine.detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", sorted(BASES))
@pytest.mark.parametrize("save_projection", [True, False], ids=["bases", "seed"])
def test_we_load_peft_saves(kind, save_projection, tmp_path):
    reference = randomise(theirs(kind, projection_prng_key=5, randlora_alpha=10, save_projection=save_projection))
    reference.save_pretrained(tmp_path)
    model = vbshare.import_peft(fresh(kind), tmp_path)
    assert_moves_output(model, kind)
    torch.testing.assert_close(out(model), out(reference), atol=ATOL, rtol=0)
    assert vbshare.state_of(model).config.save_projection == save_projection
    scalings = sum(p.numel() for p in reference.parameters() if p.requires_grad)  # PEFT's own count
    bases = reference.base_model.randlora_A["default"].numel() + reference.base_model.randlora_B["default"].numel()
    assert vbshare.summary(model).stored == scalings + (bases if save_projection else 0)


def test_peft_bases_are_loaded_not_redrawn(tmp_path):
    """Saved bases the seed would NOT give (redrawn by hand, every per-module copy with them) are what the
    import uses; a per-module copy that differs from the shared one is refused."""
    reference = randomise(theirs("linear", randlora_alpha=10))
    with torch.no_grad():
        reference.base_model.randlora_A["default"].normal_(generator=torch.Generator().manual_seed(1))
        reference.base_model.randlora_B["default"].normal_(generator=torch.Generator().manual_seed(2))
    reference.save_pretrained(tmp_path)
    model = vbshare.import_peft(fresh("linear"), tmp_path)
    torch.testing.assert_close(out(model), out(reference), atol=ATOL, rtol=1e-5)
    saved = safetensors.torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    key = next(k for k in saved if k.endswith("query.randlora_B"))
    saved[key] = saved[key] + 1
    safetensors.torch.save_file(saved, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(VBShareError, match="randlora_B differs from base_model.randlora_B"):
        vbshare.import_peft(fresh("linear"), tmp_path)


def test_peft_randlora_with_bias_is_refused(tmp_path):
    theirs("linear", bias="randlora_only").save_pretrained(tmp_path)
    with pytest.raises(VBShareError, match="unexpected tensor .*bias"):
        vbshare.import_peft(fresh("linear"), tmp_path)


# -- memory: once, views, never upcast -------------------------------------------------------------------------------
def added_buffers(model: nn.Module, kind: str, layers: int) -> dict[str, int]:
    """Buffers the adapter added to the model: name -> bytes."""
    base = {name for name, _ in fresh(kind, layers).named_buffers()}
    return {name: b.numel() * b.element_size() for name, b in model.named_buffers() if name not in base}


@pytest.mark.parametrize("kind", sorted(BASES))
def test_bases_exist_once_and_modules_read_views(kind):
    small, large = ours(kind, layers=2), ours(kind, layers=6)
    assert len(vbshare.adapters(large)) == 3 * len(vbshare.adapters(small))  # 6 layers against 2
    # the only buffers the adapter adds are the two shared bases, the same bytes at 3x the modules
    assert added_buffers(small, kind, 2) == added_buffers(large, kind, 6)
    assert sorted(added_buffers(large, kind, 6)) == ["vbshare.basis_A", "vbshare.basis_B"]
    state = vbshare.state_of(large)
    shared = {state.basis_A.untyped_storage().data_ptr(), state.basis_B.untyped_storage().data_ptr()}
    for name, adapter in vbshare.adapters(large).items():
        A, B, _ = adapter.composed_factors()
        frozen = B if adapter.in_features <= adapter.out_features else A  # the basis_B side of the product
        assert frozen.untyped_storage().data_ptr() in shared, name  # a view of the shared tensor, not a copy


def test_composition_keeps_nothing_the_size_of_delta_w_for_backward():
    """Autograd saves only the two scaling tensors and a view of basis_A while composing P (r·n, d), never a
    second (r, n, d) tensor (the intermediate λ ⊙ γ ⊙ A of a naive product)."""
    model = ours("linear")
    state = vbshare.state_of(model)
    for name, adapter in vbshare.adapters(model).items():
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            adapter.composed_factors()
        allowed = {p.untyped_storage().data_ptr() for p in (adapter.lambdas, adapter.gammas, state.basis_A)}
        assert saved and {t.untyped_storage().data_ptr() for t in saved} <= allowed, name


class DtypeLog(TorchDispatchMode):
    """Records the dtype of every tensor any operation returns."""

    def __init__(self):
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.dtypes.add(t.dtype)
        return out


def test_bf16_model_never_upcasts_the_bases():
    """In a bfloat16 model the bases, the scalings, the factors and every tensor a training step of an adapted
    layer creates stay bfloat16: no float32 copy of a basis, per module or otherwise."""
    model = ours("linear").to(torch.bfloat16)
    state = vbshare.state_of(model)
    assert state.basis_A.dtype == state.basis_B.dtype == torch.bfloat16
    for name, adapter in vbshare.adapters(model).items():
        x = torch.randn(3, adapter.in_features, dtype=torch.bfloat16, requires_grad=True)
        with DtypeLog() as log:
            adapter(x).square().sum().backward()
        assert log.dtypes == {torch.bfloat16}, (name, log.dtypes)
        assert adapter.lambdas.grad.dtype == adapter.gammas.grad.dtype == torch.bfloat16


# -- behaviour and errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(BASES))
def test_starts_at_the_base_model(kind):
    x = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(kind)(x).last_hidden_state, fresh(kind)(x).last_hidden_state)
    for adapter in vbshare.adapters(ours(kind)).values():  # λ = 0, γ = 1/d (PEFT's init)
        assert not adapter.lambdas.any() and torch.all(adapter.gammas == 1 / adapter.d)


def test_full_rank_update():
    """Random scalings give a ΔW of full rank min(in, out), which no single rank-r term could."""
    model = ours("conv1d")
    with torch.no_grad():
        for adapter in vbshare.adapters(model).values():
            adapter.lambdas.normal_()
            adapter.gammas.normal_()
            delta = adapter.delta_weight().double()
            assert torch.linalg.matrix_rank(delta) == min(adapter.in_features, adapter.out_features)


@pytest.mark.parametrize("bad,match", [({"bases": "gaussian"}, "bases must be one of dense, sparse, very_sparse"),
                                       ({"alpha": 0}, "alpha must be a positive number"),
                                       ({"projection_seed": -1}, "projection_seed must be"),
                                       ({"save_projection": "yes"}, "save_projection must be true or false")])
def test_bad_hyperparameters_are_one_line_errors(bad, match):
    with pytest.raises(VBShareError, match=match):
        ours("linear", **bad)
