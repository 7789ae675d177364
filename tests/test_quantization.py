"""Quantized frozen bases (bitsandbytes 4-bit NF4 / FP4 and 8-bit rows) on CPU: every registered method trains
around a 4-bit tiny Llama and its adapter round-trips; the dequantized weight is QLoRA's NF4 (a hand-written
reference); merging into a quantized weight is refused unless dequantized; the base-weight check, summary and
the training app see the quantization."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (the quant extra) does not import on this machine")

import vbshare  # noqa: E402
from vbshare.quantization import bnb_config, dequantized_weight, quantization_of, quantize  # noqa: E402
from vbshare.registry import METHODS  # noqa: E402

from adapter_cases import CASES  # noqa: E402
from test_adapter_folders import nf4_round_trip  # noqa: E402  (QLoRA's NF4 written out by hand)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(seed: int = 0) -> nn.Module:
    """A 2-layer Llama with hidden 64 (one NF4 block per row), vocab 128, random weights (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_on_a_4bit_llama_and_its_adapter_round_trips(method, tmp_path):
    model = quantize(llama(), "nf4")
    assert {quantization_of(model.get_submodule(f"model.layers.0.mlp.{n}")) for n in ("up_proj", "down_proj")} == {"nf4"}
    torch.manual_seed(1)
    vbshare.inject(model, method, targets=TARGETS, **CASES[method].hyperparameters if method in CASES else {})
    optimizer = torch.optim.AdamW(vbshare.param_groups(model, lr=1e-2))
    x, losses = tokens(), []
    model.train()
    for step in range(1, 5):
        loss = model(input_ids=x, labels=x).loss
        extra = vbshare.extra_loss(model)
        (loss if extra is None else loss + extra).backward()
        optimizer.step()
        optimizer.zero_grad()
        vbshare.after_step(model, optimizer, step)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)
    model.eval()
    vbshare.save_adapter(model, tmp_path / "adapter")
    loaded = vbshare.load_adapter(quantize(llama(), "nf4"), tmp_path / "adapter")
    assert torch.equal(logits(loaded, tokens(5)), logits(model, tokens(5)))


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_quantizing_in_memory_gives_what_transformers_loads(kind, tmp_path):
    """`quantize` (a model built in memory) and from_pretrained with `bnb_config` (a folder) hold the same codes."""
    from transformers import LlamaForCausalLM

    llama().save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_config(kind), device_map={"": "cpu"})
    ours = quantize(llama(), kind)
    for name, layer in ours.named_modules():
        if quantization_of(layer):
            theirs = loaded.get_submodule(name)
            assert quantization_of(theirs) == kind, name
            assert torch.equal(layer.weight.data, theirs.weight.data), name
            assert torch.equal(dequantized_weight(layer), dequantized_weight(theirs)), name
    assert quantization_of(ours.lm_head) is None  # the head stays as it was, as transformers leaves it
    assert torch.allclose(logits(ours, tokens()), logits(loaded, tokens()), atol=1e-5)


def test_dequantized_weight_is_qlora_nf4_and_the_forward_computes_with_it():
    plain = llama()
    model = quantize(llama(), "nf4")
    layer, weight = model.model.layers[1].mlp.down_proj, plain.model.layers[1].mlp.down_proj.weight  # (64, 128)
    reference = nf4_round_trip(weight)  # absmax per block of 64, the 16 NF4 levels
    dequantized = dequantized_weight(layer)
    assert dequantized.shape == weight.shape
    # double quantization stores each block's absmax in 8 bits: off by well under 1 % of the block's absmax
    assert (dequantized - reference).abs().max() < 0.01 * weight.abs().max()
    assert (dequantized - weight).abs().max() > 1e-3  # quantized for real
    x = torch.randn(3, 128)
    assert torch.allclose(layer.train()(x), x @ dequantized.T, atol=1e-5)
    eval_output = layer.eval()(x)  # a CPU with AVX512-BF16 repacks the codes and computes in bf16 here
    assert torch.allclose(eval_output, x @ dequantized.T, atol=0.02 * float(eval_output.abs().max()))
    # read back through the repacked layout too (whose block scales bitsandbytes keeps in bf16 from then on)
    assert torch.allclose(dequantized_weight(layer), dequantized, rtol=0.01, atol=0)
    # an SVD-initialised method reads the dequantized weight: LoRA-XS's frozen factors are its top-r SVD
    vbshare.inject(model, "loraxs", targets=["down_proj"], r=4, alpha=4)
    adapter = model.model.layers[1].mlp.down_proj
    U, S, Vh = torch.linalg.svd(reference.double())
    top = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]  # (64, 128)
    assert torch.allclose((adapter.svd_B @ adapter.svd_A).double(), top, atol=0.02 * float(top.abs().max()))


def test_merging_into_a_quantized_weight_is_refused_unless_dequantized():
    model = quantize(llama(), "nf4").train()  # train mode: the fp32 4-bit path (a CPU's eval path rounds to bf16)
    vbshare.inject(model, "lora", targets=TARGETS, r=4, alpha=8)
    for adapter in vbshare.adapters(model).values():
        nn.init.normal_(adapter.lora_B, std=0.05)
    unmerged = logits(model, tokens())
    with pytest.raises(vbshare.VBShareError, match=r"base weight is nf4-quantized and cannot take ΔW .* merge with "
                                                   r"dequantize=True"):
        vbshare.merge(model)
    assert not any(a.merged for a in vbshare.adapters(model).values())  # refused before any layer merged
    layer = model.model.layers[0].self_attn.q_proj
    expected = dequantized_weight(layer.base_layer).double() + layer.delta_weight().double()  # W + s·B A
    vbshare.merge(model, dequantize=True)
    assert type(layer.base_layer) is nn.Linear and not layer.base_layer.weight.requires_grad
    assert torch.allclose(layer.base_layer.weight.double(), expected, atol=1e-6)
    assert torch.allclose(logits(model, tokens()), unmerged, atol=1e-4)
    vbshare.unmerge(model)
    assert torch.allclose(logits(model, tokens()), unmerged, atol=1e-4)


def test_summary_states_the_quantization():
    model = quantize(llama(), "int8")
    vbshare.inject(model, "lora", targets=["q_proj", "v_proj"], r=2)
    summary = vbshare.summary(model)
    assert summary.base_quantization == "int8"
    assert str(summary).splitlines()[-1].endswith("| base int8-quantized")
    assert vbshare.summary(vbshare.inject(llama(), "lora", targets=["q_proj"], r=2)).base_quantization is None


def test_an_adapter_trained_on_a_4bit_base_loads_into_its_full_precision_base_only(tmp_path):
    """The base-weight sample of a quantized base is its dequantized weight: NF4 of the same weights is accepted,
    other weights are refused."""
    model = vbshare.inject(quantize(llama(), "nf4"), "lora", targets=TARGETS, r=4)
    vbshare.save_adapter(model, tmp_path / "a")
    sample = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_sample"]
    assert all(values is not None for values in sample.values())
    vbshare.load_adapter(llama(), tmp_path / "a")
    with pytest.raises(vbshare.VBShareError, match="this base model's weights are not those"):
        vbshare.load_adapter(llama(seed=3), tmp_path / "a")


def test_the_training_app_refuses_what_a_quantized_base_cannot_do(tmp_path):
    from hydra import compose, initialize_config_dir

    from vbshare.train import CONFIG_DIR, run_training

    base = ["model=tiny_llama", "data=bbc_lm", "trainer=debug", "trainer.max_steps=1"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for overrides, message in [
            (["model.quantization=nf8"], r"model.quantization='nf8' is not supported; use one of nf4, fp4, int8"),
            (["model.quantization=nf4"], r"full fine-tuning cannot train it; add \+adapter=<method>"),
        ]:
            with pytest.raises(vbshare.VBShareError, match=message):
                run_training(compose("train", overrides=base + overrides), tmp_path / "r", base + overrides)


def test_the_report_names_a_quantized_base(tmp_path):
    from vbshare import report

    from test_report import make_run

    make_run(tmp_path, "full_precision", "lora", 0, 0.9, 100.0)
    quantized = make_run(tmp_path, "nf4", "lora", 0, 0.8, 100.0)
    summary = json.loads((quantized / "summary.json").read_text())
    (quantized / "summary.json").write_text(json.dumps({**summary, "base_quantization": "nf4"}))
    runs = report.collect_runs(tmp_path)
    assert sorted(runs["model"]) == ["minilm", "minilm nf4"]
    assert sorted(runs["label"]) == ["lora model=minilm", "lora model=minilm nf4"]  # two configurations, told apart


@pytest.mark.parametrize("kind", ["fp4", "int8"])
def test_the_other_quantizations_train_too(kind, tmp_path):
    model = vbshare.inject(quantize(llama(), kind), "lora", targets=TARGETS, r=4, alpha=8).train()
    optimizer = torch.optim.AdamW(vbshare.param_groups(model, lr=1e-2))
    losses = []
    for _ in range(4):
        loss = model(input_ids=tokens(), labels=tokens()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    vbshare.save_adapter(model, tmp_path / "a")
    loaded = vbshare.load_adapter(quantize(llama(), kind).train(), tmp_path / "a")
    assert torch.allclose(logits(loaded, tokens(5)), logits(model, tokens(5)), atol=1e-6)
