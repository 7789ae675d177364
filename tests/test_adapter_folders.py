"""Adapter folders, PEFT folders, run folders and data files that are malformed or do not fit: each is refused
in ONE line (a `VBShareError`) and a refused load leaves the model a plain base; what does fit loads strictly.

Also the base-weight sample `save_adapter` records: the same weights in bf16 / fp16 or after a simulated 4-bit
NF4 round trip are accepted, a base drawn from another seed is refused (unless `check_base=False`), a merged
model records its unmerged weights. The references are hand-indexed weights and hand-built tensors, not the
code's own output.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel

import vbshare
from vbshare import VBShareError
from vbshare.checkpoint import base_sample, fingerprint, sample_difference
from vbshare.data.tasks import Split, Task, files, warn_unseen_labels

from adapter_cases import TwoLinear

CONFIG, WEIGHTS, MODULES = "adapter_config.json", "adapter_model.safetensors", "modules.safetensors"
LORA = dict(targets=["query", "value"], r=2)
QUERY0 = "encoder.layer.0.attention.self.query"


def tiny_bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64)).eval()


def classifier(num_labels: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    num_labels=num_labels)).eval()


def trained(model: nn.Module, method: str = "lora", **hyperparameters) -> nn.Module:
    """Inject and give every adapter tensor non-zero values (a few random draws stand in for training)."""
    vbshare.inject(model, method, **hyperparameters)
    torch.manual_seed(123)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.1)
    return model


def saved(folder: Path, method: str = "lora", model: nn.Module | None = None, **kwargs) -> Path:
    hyperparameters = {**LORA, **kwargs} if method == "lora" else kwargs
    vbshare.save_adapter(trained(model if model is not None else tiny_bert(), method, **hyperparameters), folder)
    return folder


def edit_config(folder: Path, change) -> None:
    path = folder / CONFIG
    described = json.loads(path.read_text())
    change(described)
    path.write_text(json.dumps(described))


def rewrite_tensors(folder: Path, change, file: str = WEIGHTS) -> None:
    """Change the tensors of one safetensors file and record its new checksum, as a careful tamperer would."""
    tensors = safetensors.torch.load_file(str(folder / file))
    change(tensors)
    blob = safetensors.torch.save(tensors)
    (folder / file).write_bytes(blob)
    edit_config(folder, lambda d: d["files"].__setitem__(file, hashlib.sha256(blob).hexdigest()))


def refused(model: nn.Module, folder: Path, match: str, load=vbshare.load_adapter, **kwargs) -> str:
    """The load raises a one-line VBShareError matching `match` and leaves `model` exactly as it was."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p.requires_grad for p in model.parameters()]
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    with pytest.raises(VBShareError, match=match) as info:
        load(model, folder, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    assert vbshare.state_of(model, required=False) is None and not vbshare.adapters(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert [p.requires_grad for p in model.parameters()] == trainable
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
    return message


def set_target_shape(described: dict, name: str, shape: list[int], keep_fingerprint: bool = False) -> None:
    described["targets"][name] = shape
    if not keep_fingerprint:
        described["fingerprint"] = fingerprint(described["targets"])


def reorder_targets(described: dict) -> None:
    described["targets"] = dict(reversed(list(described["targets"].items())))  # the fingerprint sorts names


# -- adapter_config.json ------------------------------------------------------------------------------------------
CONFIG_EDITS = {
    "no targets": (lambda d: d.pop("targets"), r"adapter_config.json has no 'targets' entry"),
    "no files": (lambda d: d.pop("files"), r"has no 'files' entry"),
    "no config": (lambda d: d.pop("config"), r"has no 'config' entry"),
    "no method": (lambda d: d.pop("method"), r"has no 'method' entry"),
    "no state": (lambda d: d.pop("state"), r"has no 'state' entry"),
    "config a list": (lambda d: d.__setitem__("config", [2]), r"'config' must be an object of hyperparameters, got \[2\]"),
    "targets a list": (lambda d: d.__setitem__("targets", ["query"]), r"'targets' must be an object mapping"),
    "shape not integers": (lambda d: set_target_shape(d, QUERY0, ["32", 32]), r"'targets' must be an object mapping"),
    "shape negative": (lambda d: set_target_shape(d, QUERY0, [32, -1]), r"'targets' must be an object mapping"),
    "topk_only a string": (lambda d: d.__setitem__("topk_only", "no"), r"'topk_only' must be true or false"),
    "state a list": (lambda d: d.__setitem__("state", []), r"'state' must be an object"),
    "version a string": (lambda d: d.__setitem__("version", "1"), r"'version' must be an integer"),
    "newer version": (lambda d: d.__setitem__("version", 99), r"format version 99, newer than this vbshare's 1"),
    "checksum not hex": (lambda d: d["files"].__setitem__(WEIGHTS, "abc"), r"'files' must be an object mapping"),
    "modules a string": (lambda d: d.__setitem__("modules", "classifier"), r"'modules' must be a list"),
    "modules without file": (lambda d: d.__setitem__("modules", ["pooler"]), r"names head modules but no modules"),
    "target_spec a number": (lambda d: d.__setitem__("target_spec", 3), r"'target_spec' must be an object or null"),
    "base_sample a string": (lambda d: d.__setitem__("base_sample", "x"), r"'base_sample' must be null or an object"),
    "base_sample too short": (lambda d: d["base_sample"].__setitem__(QUERY0, [0.1]), r"'base_sample' must be null"),
    "targets edited, fingerprint not": (lambda d: set_target_shape(d, QUERY0, [32, 16], keep_fingerprint=True),
                                        r"'targets' do not match the 'fingerprint'"),
    "unknown method": (lambda d: d.__setitem__("method", "dora"), r"unknown adapter method 'dora'"),
    "r = 0": (lambda d: d["config"].__setitem__("r", 0),
              r"'config' is not a valid lora config \(r must be a positive integer, got 0\)"),
    "r a string": (lambda d: d["config"].__setitem__("r", "2"), r"'config' is not a valid lora config"),
    "unknown hyperparameter": (lambda d: d["config"].__setitem__("rank", 2), r"unknown lora hyperparameter\(s\) rank"),
    "r changed": (lambda d: d["config"].__setitem__("r", 4),
                  rf"tensor {QUERY0}.lora_A has shape \(2, 32\) but this model's adapter needs \(4, 32\)"),
    "shape changed": (lambda d: set_target_shape(d, QUERY0, [32, 16]),
                      rf"module {QUERY0} has shape \(out, in\) = \(32, 32\) but the adapter was trained on \(32, 16\)"),
    "embedding target": (lambda d: set_target_shape(d, "embeddings.word_embeddings", [64, 32]),
                         r"targets embeddings.word_embeddings, of type Embedding, which is not a linear layer"),
    "missing module": (lambda d: set_target_shape(d, "encoder.layer.7.attention.self.query", [32, 32]),
                       r"targets encoder.layer.7.attention.self.query, which this model does not have"),
    "targets reordered": (reorder_targets, r"'targets' are not this model's modules in model order"),
}


@pytest.mark.parametrize("edit, match", CONFIG_EDITS.values(), ids=CONFIG_EDITS.keys())
def test_tampered_adapter_config_is_refused_in_one_line(tmp_path, edit, match):
    folder = saved(tmp_path)
    edit_config(folder, edit)
    refused(tiny_bert(), folder, match)


def test_config_json_not_an_object_is_refused(tmp_path):
    folder = saved(tmp_path)
    (folder / CONFIG).write_text("[1, 2]")
    refused(tiny_bert(), folder, r"is not a vbshare adapter config")


def test_untampered_folder_loads_the_saved_tensors(tmp_path):
    """The control of the tampering tests: the same folder, unedited, loads and gives back the saved values."""
    model = trained(tiny_bert(), "lora", **LORA)
    vbshare.save_adapter(model, tmp_path)
    fresh = vbshare.load_adapter(tiny_bert(), tmp_path)
    for key, value in vbshare.adapter_state_dict(model).items():
        assert torch.equal(vbshare.adapter_state_dict(fresh)[key], value), key


# -- the tensors ----------------------------------------------------------------------------------------------------
TENSOR_EDITS = {
    "extra tensor": (lambda t: t.__setitem__(f"{QUERY0}.lora_C", torch.zeros(2)), r"unexpected \['encoder"),
    "missing tensor": (lambda t: t.pop(f"{QUERY0}.lora_B"), rf"missing \['{QUERY0}.lora_B'\]"),
    "wrong shape": (lambda t: t.__setitem__(f"{QUERY0}.lora_A", torch.zeros(3, 32)),
                    rf"tensor {QUERY0}.lora_A has shape \(3, 32\) but this model's adapter needs \(2, 32\)"),
    "integers for floats": (lambda t: t.__setitem__(f"{QUERY0}.lora_A", torch.zeros(2, 32, dtype=torch.int32)),
                            rf"tensor {QUERY0}.lora_A is torch.int32 but this model's adapter keeps it as torch.float32"),
}


@pytest.mark.parametrize("edit, match", TENSOR_EDITS.values(), ids=TENSOR_EDITS.keys())
def test_tampered_tensors_are_refused_in_one_line(tmp_path, edit, match):
    folder = saved(tmp_path)
    rewrite_tensors(folder, edit)
    refused(tiny_bert(), folder, match)


VB = dict(targets=["query", "value"], r=2, num_vectors=300, vector_length=16, topk=2)  # 300 bank vectors: int16
TOPK = f"{QUERY0}.logits_A_topk_indices"


def set_index(tensors: dict, value: int) -> None:
    indices = tensors[TOPK].clone()
    indices.view(-1)[0] = value
    tensors[TOPK] = indices


def duplicate_index(tensors: dict) -> None:
    indices = tensors[TOPK].clone()
    indices[..., 1] = indices[..., 0]
    tensors[TOPK] = indices


TOPK_EDITS = {
    "index = num_vectors": (lambda t: set_index(t, 300), r"top-k indices of .* range over \[\d+, 300\], outside the "
                                                        r"bank's num_vectors=300 vectors \[0, 299\]"),
    "negative index": (lambda t: set_index(t, -7), r"range over \[-7, \d+\], outside the bank's num_vectors=300"),
    "one vector twice": (duplicate_index, r"select one bank vector twice"),
    "weights above 1": (lambda t: t.__setitem__(TOPK.replace("indices", "weights"),
                                                t[TOPK.replace("indices", "weights")] + 2.0), r"are not softmax weights"),
    "float indices": (lambda t: t.__setitem__(TOPK, t[TOPK].float()), r"expected integer indices"),
    "weights missing": (lambda t: t.pop(TOPK.replace("indices", "weights")), r"has no matching _topk_weights"),
}


@pytest.mark.parametrize("edit, match", TOPK_EDITS.values(), ids=TOPK_EDITS.keys())
def test_vblora_topk_indices_out_of_range_are_refused(tmp_path, edit, match):
    model = trained(tiny_bert(), "vblora", **VB)
    vbshare.save_adapter(model, tmp_path, topk_only=True)
    assert safetensors.torch.load_file(str(tmp_path / WEIGHTS))[TOPK].dtype == torch.int16
    vbshare.load_adapter(tiny_bert(), tmp_path)  # the untouched folder loads
    rewrite_tensors(tmp_path, edit)
    refused(tiny_bert(), tmp_path, match)


UNI = dict(targets=["query", "value"], r=2, theta_d_length=64, save_indices=True)
INDICES = f"{QUERY0}.indices_A"


def set_uni_index(tensors: dict, value: int) -> None:
    indices = tensors[INDICES].clone()
    indices[0, 0] = value
    tensors[INDICES] = indices


UNI_EDITS = {
    "index = theta_d_length": (lambda t: set_uni_index(t, 64), r"Uni-LoRA indices .* range over \[\d+, 64\], outside "
                                                               r"theta \[0, 63\]"),
    "negative index": (lambda t: set_uni_index(t, -1), r"range over \[-1, \d+\]"),
    "float indices": (lambda t: t.__setitem__(INDICES, t[INDICES].float()), r"are torch.float32, not integers"),
    "scale not 1/sqrt(uses)": (lambda t: t.__setitem__("vbshare.theta_scale", t["vbshare.theta_scale"] * 2),
                               r"theta_scale is not 1/sqrt\(uses\) of the saved indices"),
}


@pytest.mark.parametrize("edit, match", UNI_EDITS.values(), ids=UNI_EDITS.keys())
def test_unilora_saved_indices_out_of_range_are_refused(tmp_path, edit, match):
    vbshare.save_adapter(trained(tiny_bert(), "unilora", **UNI), tmp_path)
    vbshare.load_adapter(tiny_bert(), tmp_path)
    rewrite_tensors(tmp_path, edit)
    refused(tiny_bert(), tmp_path, match)


# -- the task head (modules.safetensors) loads strictly -------------------------------------------------------------
@pytest.fixture
def with_head(tmp_path) -> tuple[nn.Module, Path]:
    model = trained(classifier(5), "lora", **LORA)
    with torch.no_grad():
        model.classifier.weight.normal_()
    model.classifier.requires_grad_(True)
    vbshare.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / CONFIG).read_text())["modules"] == ["classifier"]
    return model, tmp_path


def test_head_loads_exactly(with_head):
    model, folder = with_head
    fresh = vbshare.load_adapter(classifier(5, seed=0), folder)
    assert torch.equal(fresh.classifier.weight, model.classifier.weight)
    assert torch.equal(fresh.classifier.bias, model.classifier.bias)


def test_head_with_other_number_of_labels_is_refused(with_head):
    _, folder = with_head
    refused(classifier(3), folder, r"head tensor classifier.weight in .*modules.safetensors has shape \(5, 32\) but "
                                   r"this model's is \(3, 32\); build the base with the head the adapter was trained "
                                   r"with \(a classifier: num_labels=5 instead of 3\)")


HEAD_EDITS = {
    "key of no module": (lambda t: t.__setitem__("pooler.dense.weight", torch.zeros(32, 32)),
                         r"holds pooler.dense.weight, which is no tensor of the head modules \['classifier'\]"),
    "key of no tensor": (lambda t: t.__setitem__("classifier.scale", torch.zeros(1)), r"holds classifier.scale"),
    "tensor left out": (lambda t: t.pop("classifier.bias"), r"lacks classifier.bias of head module 'classifier'"),
}


@pytest.mark.parametrize("edit, match", HEAD_EDITS.values(), ids=HEAD_EDITS.keys())
def test_head_file_that_does_not_fit_is_refused(with_head, edit, match):
    _, folder = with_head
    rewrite_tensors(folder, edit, file=MODULES)
    refused(classifier(5), folder, match)


def test_head_module_the_model_lacks_is_refused(with_head):
    _, folder = with_head
    edit_config(folder, lambda d: d.__setitem__("modules", ["scorer"]))
    refused(classifier(5), folder, r"carries head module 'scorer', which this model does not have")


# -- the base-weight sample -----------------------------------------------------------------------------------------
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def nf4_round_trip(weight: torch.Tensor, block: int = 64) -> torch.Tensor:
    """4-bit NormalFloat quantisation as QLoRA does it (absmax per block of 64, the 16 NF4 levels), dequantised."""
    flat = weight.detach().reshape(-1, block)  # (n_blocks, 64)
    absmax = flat.abs().amax(dim=1, keepdim=True)  # (n_blocks, 1)
    levels = torch.tensor(NF4)
    nearest = (flat / absmax).unsqueeze(-1).sub(levels).abs().argmin(dim=-1)  # (n_blocks, 64)
    return (levels[nearest] * absmax).reshape(weight.shape)


def hand_sample(weight: torch.Tensor, n: int = 16) -> list[float]:
    """The docstring's positions, indexed by hand: row ⌊(i + ½)·out/n⌋, column ⌊frac(i·0.618…)·in⌋."""
    weight = weight.detach()
    out_features, in_features = weight.shape
    golden = (math.sqrt(5) - 1) / 2
    return [float(weight[int((i + 0.5) * out_features / n), int((i * golden % 1.0) * in_features)]) for i in range(n)]


def test_recorded_sample_is_the_base_weights_at_fixed_positions(tmp_path):
    folder = saved(tmp_path)
    recorded = json.loads((folder / CONFIG).read_text())["base_sample"]
    base = dict(tiny_bert().named_modules())
    assert set(recorded) == set(vbshare.read_adapter_config(folder)["targets"])
    for name, values in recorded.items():
        assert values == pytest.approx(hand_sample(base[name].weight), abs=1e-7), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_same_weights_in_another_dtype_are_accepted(tmp_path, dtype):
    folder = saved(tmp_path)
    loaded = vbshare.load_adapter(tiny_bert().to(dtype), folder)
    assert vbshare.state_of(loaded).method == "lora"


def test_same_weights_quantised_to_nf4_are_accepted(tmp_path):
    folder = saved(tmp_path)
    quantised = tiny_bert()
    with torch.no_grad():
        for module in quantised.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(nf4_round_trip(module.weight))
    recorded = json.loads((folder / CONFIG).read_text())["base_sample"]
    worst = max(sample_difference(recorded[n], hand_sample(dict(quantised.named_modules())[n].weight))[1]
                for n in recorded)
    assert 0.03 < worst < 0.35, worst  # NF4 moves the weights (the test sees a real change) but within tolerance
    vbshare.load_adapter(quantised, folder)


def test_base_with_other_weights_is_refused_unless_told(tmp_path):
    folder = saved(tmp_path)
    message = refused(tiny_bert(seed=1), folder, r"this base model's weights are not those the adapter in .* was "
                                                 r"trained on \(4 of 4 adapted modules differ; .*\); load it into its "
                                                 r"own base model, or pass check_base=False")
    print(message)
    loaded = vbshare.load_adapter(tiny_bert(seed=1), folder, check_base=False)
    assert vbshare.state_of(loaded).method == "lora"


def test_base_with_other_weights_is_refused_into_an_adapted_model(tmp_path):
    folder = saved(tmp_path)
    other = vbshare.inject(tiny_bert(seed=1), "lora", **LORA)
    before = {k: v.clone() for k, v in vbshare.adapter_state_dict(other).items()}
    with pytest.raises(VBShareError, match=r"weights are not those") as info:
        vbshare.load_adapter(other, folder)
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in vbshare.adapter_state_dict(other).items())


def test_folder_without_a_sample_loads_unchecked(tmp_path):
    folder = saved(tmp_path)
    edit_config(folder, lambda d: d.pop("base_sample"))  # as written before the sample existed
    vbshare.load_adapter(tiny_bert(seed=1), folder)


def test_merged_model_records_its_unmerged_weights(tmp_path):
    model = trained(tiny_bert(), "lora", **LORA)
    with torch.no_grad():
        for adapter in vbshare.adapters(model).values():
            adapter.lora_B.normal_(0.0, 1.0)  # ΔW as large as the weights: a merged sample would be refused
    vbshare.merge(model)
    merged = {n: hand_sample(a.base_layer.weight) for n, a in vbshare.adapters(model).items()}
    vbshare.save_adapter(model, tmp_path)
    recorded = json.loads((tmp_path / CONFIG).read_text())["base_sample"]
    base = dict(tiny_bert().named_modules())
    for name, values in recorded.items():
        assert values == pytest.approx(hand_sample(base[name].weight), abs=1e-6), name
        assert sample_difference(values, merged[name])[1] > 0.35  # the merged weights would not pass
    vbshare.load_adapter(tiny_bert(), tmp_path)


def test_meta_device_records_no_sample():
    with torch.device("meta"):
        model = vbshare.inject(tiny_bert(), "lora", **LORA)
    assert base_sample(model) is None


def test_conv1d_is_sampled_in_linear_orientation():
    from transformers.pytorch_utils import Conv1D

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = Conv1D(nf=48, nx=32)  # weight (in=32, out=48)
            self.linear = nn.Linear(32, 48)

    model = Two()
    with torch.no_grad():
        model.conv.weight.normal_()
        model.linear.weight.copy_(model.conv.weight.T)
    vbshare.inject(model, "lora", targets=["conv", "linear"], r=2)
    sample = base_sample(model)
    assert sample["conv"] == sample["linear"] == pytest.approx(hand_sample(model.linear.base_layer.weight))


def test_sample_difference_by_hand():
    assert sample_difference([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == (pytest.approx(1.0), 0.0)
    correlation, relative = sample_difference([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])  # scaled: correlated, yet 100 % off
    assert correlation == pytest.approx(1.0) and relative == pytest.approx(1.0)
    correlation, relative = sample_difference([1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0])
    assert correlation == pytest.approx(-1.0) and relative == pytest.approx(2.0)
    assert sample_difference([0.0, 0.0], [0.0, 1.0])[1] == math.inf


# -- PEFT folders ---------------------------------------------------------------------------------------------------
def exported(folder: Path, method: str = "lora", **kwargs) -> Path:
    model = trained(TwoLinear(), method, targets=["lin0", "lin1"], **kwargs)
    vbshare.export_peft(model, folder)
    return folder


PEFT_CONFIG_EDITS = {
    "a JSON list": ("lora", {}, lambda c: [c], r"adapter_config.json holds a JSON list, not an object"),
    "LoRA without r": ("lora", {"r": 2}, lambda c: c.pop("r") and None,
                       r"has no 'r', which a PEFT LORA config needs"),
    "VB-LoRA without num_vectors": ("vblora", dict(r=2, num_vectors=8, vector_length=16),
                                    lambda c: c.pop("num_vectors") and None, r"has no 'num_vectors'"),
    "Uni-LoRA without theta_d_length": ("unilora", dict(r=2, theta_d_length=32),
                                        lambda c: c.pop("theta_d_length") and None, r"has no 'theta_d_length'"),
    "modules_to_save a string": ("lora", {"r": 2}, lambda c: c.__setitem__("modules_to_save", "lin1"),
                                 r"'modules_to_save' must be a list of module names"),
    "r a string": ("lora", {"r": 2}, lambda c: c.__setitem__("r", "two"), r"r must be a positive integer"),
}


@pytest.mark.parametrize("method, hyper, edit, match", PEFT_CONFIG_EDITS.values(), ids=PEFT_CONFIG_EDITS.keys())
def test_bad_peft_config_is_refused_in_one_line(tmp_path, method, hyper, edit, match):
    folder = exported(tmp_path, method, **hyper)
    path = folder / CONFIG
    config = json.loads(path.read_text())
    changed = edit(config)
    path.write_text(json.dumps(changed if changed is not None else config))
    refused(TwoLinear(), folder, match, load=vbshare.import_peft)


def rewrite_peft(folder: Path, change) -> None:
    tensors = safetensors.torch.load_file(str(folder / WEIGHTS))
    change(tensors)
    safetensors.torch.save_file(tensors, str(folder / WEIGHTS))


PEFT_TENSOR_EDITS = {
    "LoRA A of another width": ("lora", {"r": 2}, lambda t: t.__setitem__("base_model.model.lin0.lora_A.weight",
                                                                          torch.zeros(2, 16)),
                                r"tensor lin0.lora_A has shape \(2, 16\) but this model's adapter needs \(2, 32\)"),
    "LoRA B left out": ("lora", {"r": 2}, lambda t: t.pop("base_model.model.lin1.lora_B.weight"),
                        r"has no lora_B for lin1"),
    "VB-LoRA bank of another length": ("vblora", dict(r=2, num_vectors=8, vector_length=16),
                                       lambda t: t.__setitem__("base_model.vblora_vector_bank", torch.zeros(8, 8)),
                                       r"tensor vbshare.bank has shape \(8, 8\) but this model's adapter needs \(8, 16\)"),
}


@pytest.mark.parametrize("method, hyper, edit, match", PEFT_TENSOR_EDITS.values(), ids=PEFT_TENSOR_EDITS.keys())
def test_peft_tensors_of_wrong_shape_are_refused(tmp_path, method, hyper, edit, match):
    folder = exported(tmp_path, method, **hyper)
    vbshare.import_peft(TwoLinear(), folder)  # the untouched folder imports
    rewrite_peft(folder, edit)
    refused(TwoLinear(), folder, match, load=vbshare.import_peft)


def test_peft_head_for_other_number_of_labels_is_refused(tmp_path):
    model = trained(classifier(5), "lora", **LORA)
    model.classifier.requires_grad_(True)
    vbshare.export_peft(model, tmp_path)
    vbshare.import_peft(classifier(5), tmp_path)
    refused(classifier(3), tmp_path, r"head tensor classifier.weight .* has shape \(5, 32\) but this model's is "
                                     r"\(3, 32\)", load=vbshare.import_peft)


# -- vbshare.report on a run whose config.yaml is not YAML ------------------------------------------------------------
@pytest.mark.parametrize("text, match", [
    ("trainer: {batch_size: 8\nseed: 0\n", r"config.yaml is not valid YAML \(.* at line \d+, column \d+\)"),
    ("- 1\n- 2\n", r"config.yaml is not a mapping of settings"),
    ("trainer: 3\n", r"'trainer' in config.yaml is not a mapping"),
])
def test_report_on_a_bad_config_yaml_is_one_line(tmp_path, capsys, text, match):
    from vbshare.report import main

    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"method": "lora", "task": "t", "metric": "accuracy"}))
    (run / "config.yaml").write_text(text)
    assert main([str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot read the run in "), err
    assert re.search(match, err), err


# -- data files -------------------------------------------------------------------------------------------------------
def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("text,label\n" + "".join(f"{t},{l}\n" for t, l in rows))
    return path


def test_empty_label_is_refused_naming_file_column_and_row(tmp_path):
    rows = [(f"text {i}", "ab"[i % 2]) for i in range(10)]
    rows[2] = ("text 2", "")
    path = write_csv(tmp_path / "train.csv", rows)
    with pytest.raises(VBShareError, match=rf"row 3 of {path} has an empty 'label' value; give every row a label") as info:
        files(str(path))
    assert "\n" not in str(info.value)


def test_label_column_all_empty_is_refused(tmp_path):
    path = write_csv(tmp_path / "train.csv", [(f"text {i}", "") for i in range(10)])
    with pytest.raises(VBShareError, match=r"row 1 of .*train.csv has an empty 'label' value"):
        files(str(path))


def test_jsonl_row_without_label_is_refused(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"text": f"t {i}", "label": i % 2} for i in range(6)]
    del rows[4]["label"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(VBShareError, match=r"row 5 of .*train.jsonl has an empty 'label' value"):
        files(str(path))


def test_single_label_is_refused(tmp_path):
    path = write_csv(tmp_path / "train.csv", [(f"text {i}", "spam") for i in range(10)])
    with pytest.raises(VBShareError, match=r"every row of the data has the same 'label' value 'spam'; classification "
                                           r"needs at least two labels") as info:
        files(str(path))
    assert "\n" not in str(info.value)


def test_validation_labels_never_seen_in_training_warn_in_one_line(tmp_path, caplog):
    train = write_csv(tmp_path / "train.csv", [(f"text {i}", "ab"[i % 2]) for i in range(10)])
    validation = write_csv(tmp_path / "validation.csv", [("x", "a"), ("y", "c"), ("z", "c")])
    test = write_csv(tmp_path / "test.csv", [("x", "a"), ("y", "b")])  # one example, smaller than a batch: fine
    with caplog.at_level(logging.WARNING, logger="vbshare.data.tasks"):
        task = files(str(train), validation_path=str(validation), test_path=str(test))
    assert task.label_names == ["a", "b", "c"] and len(task.splits["test"]) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith("validation split of train: 2 of 3 examples have labels never seen in training ('c')")


def test_few_shot_subset_missing_a_test_label_warns(caplog):
    """bbc_news / files with train_per_class go through the same check; here on a hand-built task."""
    splits = {"train": Split(["a", "b"], [0, 1]), "validation": Split(["c"], [1]), "test": Split(["d", "e"], [2, 0])}
    with caplog.at_level(logging.WARNING, logger="vbshare.data.tasks"):
        warn_unseen_labels(Task("few", "classification", splits, "accuracy", ["x", "y", "z"]))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["test split of few: 1 of 2 examples have labels never seen in training ('z'); the model cannot "
                        "predict them, add training examples of those labels or check the split"]


# -- vbshare.evaluate check_base=false -------------------------------------------------------------------------------
def test_evaluate_refuses_another_base_unless_check_base_false(tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from vbshare.evaluate import main
    from vbshare.train import CONFIG_DIR, run_training

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        overrides = ["+adapter=lora", "model=tiny_bert", "trainer=debug", "data.max_length=32"]
        cfg = compose("train", overrides=overrides)
    run_dir = tmp_path / "run"
    run_training(cfg, run_dir, overrides)
    with pytest.raises(SystemExit) as exited:
        main([f"run_dir={run_dir}", "seed=1"])  # tiny BERT drawn from seed 1: other base weights
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: this base model's weights are not those the adapter in"), err[-1]
    main([f"run_dir={run_dir}", "seed=1", "check_base=false"])
    assert "accuracy" in json.loads(capsys.readouterr().out)["scores"]
