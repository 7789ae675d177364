"""Model loaders (vbshare/models.py): any local transformers folder through `model=hf`, a hub name served from
the local Hugging Face cache without network, `model.dtype` on every model config, and the one-line fast
failure for a hub name that is neither cached nor reachable.

The folders are written in the test by save_pretrained from small random models (MiniLM's tokenizer files),
and loaded weights are compared with the in-memory originals.
"""
from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import get_method
from huggingface_hub import HfApi
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from vbshare import VBShareError
from vbshare.assets import minilm_dir
from vbshare.models import DTYPES, hf, minilm, tiny_bert
from vbshare.train import CONFIG_DIR, run_training
from helpers import compose_config

REPO = Path(__file__).resolve().parents[1]
MISSING_HUB_NAME = "vbshare-tests/no-such-model"
FAIL_FAST_S = 5.0  # an uncached hub name must fail well within this (the retrying default took 50 s)
CLI_FAIL_S = 30.0  # the same through the CLI, interpreter and imports included
SENTENCE = "the cat sat on the mat"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(minilm_dir()))


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, tokenizer):
    """(folder, original model): a random 2-layer GPT-2 saved with MiniLM's tokenizer files."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=32, n_layer=2,
                                       n_head=2)).eval()
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory, tokenizer):
    """(folder, original model): a random 2-layer BERT classifier saved with MiniLM's tokenizer files."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=2)
    model = BertForSequenceClassification(config).eval()
    folder = tmp_path_factory.mktemp("bert")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def test_hf_local_folder_causal_lm(gpt2_folder):
    folder, original = gpt2_folder
    model, tokenizer = hf("lm", 0, str(folder))
    ids = tokenizer(SENTENCE, return_tensors="pt")["input_ids"]  # (1, T)
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, original(ids).logits)
    assert tokenizer.pad_token_id is not None and model.config.pad_token_id == tokenizer.pad_token_id


def test_hf_local_folder_classifier_in_bf16(bert_folder):
    """The encoder is the saved one (cast to bf16), the head is new with the task's number of labels."""
    folder, original = bert_folder
    model, _ = hf("classification", 3, str(folder), dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.classifier.out_features == 3
    saved = original.bert.state_dict()
    for name, value in model.bert.state_dict().items():
        assert torch.equal(value, saved[name].to(torch.bfloat16)), name


def test_hf_local_folder_trains_through_the_app(bert_folder, tmp_path):
    folder, _ = bert_folder
    summary = run_training(compose_config(["+adapter=lora", "model=hf", f"model.loader.name={folder}",
                                           "trainer=debug", "data.max_length=32"]), tmp_path)
    assert summary["steps"] == 4 and summary["model"] == "hf"
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_hf_folder_without_config_is_refused(tmp_path):
    with pytest.raises(VBShareError, match="has no config.json"):
        hf("lm", 0, str(tmp_path))


@pytest.mark.parametrize("offline", [True, False])
def test_uncached_hub_name_fails_fast_in_one_line(offline, monkeypatch):
    """HF_HUB_OFFLINE=1: refused without any request. Otherwise one metadata request, no retries; the request is
    replaced by one that fails as a machine without network does, so the test never touches the network."""
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(variable, raising=False)
        requests = []

        def no_network(self, name, **kwargs):
            requests.append(name)
            raise ConnectionError(f"cannot reach the Hub for {name}")

        monkeypatch.setattr(HfApi, "model_info", no_network)
    started = time.perf_counter()
    with pytest.raises(VBShareError) as caught:
        hf("classification", 2, MISSING_HUB_NAME)
    assert time.perf_counter() - started < FAIL_FAST_S
    message = str(caught.value)
    assert "\n" not in message and MISSING_HUB_NAME in message and "local folder" in message
    if offline:
        assert "HF_HUB_OFFLINE" in message
    else:
        assert requests == [MISSING_HUB_NAME]  # exactly one request, no retries


@pytest.mark.slow
def test_uncached_hub_name_cli_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "vbshare.train", "+adapter=lora", "model=hf",
                           f"model.loader.name={MISSING_HUB_NAME}", "trainer=debug", f"hydra.run.dir={tmp_path}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert time.perf_counter() - started < CLI_FAIL_S
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and MISSING_HUB_NAME in lines[0], done.stderr


@pytest.mark.slow
def test_cached_hub_name_loads_without_network(gpt2_folder, tmp_path):
    """A hub name found in the Hugging Face cache (a cache laid out by hand here) loads with no request: in this
    sandbox any request would fail or retry, so a fast, exact load shows none was made."""
    folder, original = gpt2_folder
    repo = "vbshare-tests/tiny-gpt2"
    commit = "0" * 40
    entry = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / commit)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    script = ("import time, torch, transformers; from vbshare.models import hf; "
              "transformers.AutoModelForCausalLM, transformers.GPT2LMHeadModel; t = time.perf_counter(); "
              f"model, _ = hf('lm', 0, {repo!r}); "
              "print(time.perf_counter() - t, float(model.transformer.wte.weight.detach().double().sum()))")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(variable, None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    seconds, checksum = map(float, done.stdout.split()[-2:])
    assert seconds < FAIL_FAST_S
    assert checksum == pytest.approx(float(original.transformer.wte.weight.detach().double().sum()), abs=1e-9)


# -- model.dtype ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")))
def test_every_model_config_has_dtype(config):
    extra = ["model.loader.name=some/model"] if config == "hf" else []
    cfg = compose_config([f"model={config}", *extra])
    assert cfg.model.dtype == "fp32" and cfg.model.loader.dtype == "fp32"
    assert compose_config([f"model={config}", "model.dtype=bf16", *extra]).model.loader.dtype == "bf16"
    assert "dtype" in inspect.signature(get_method(cfg.model.loader._target_)).parameters


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_tiny_bert_dtype(dtype):
    """Same initial values in every dtype (initialised in fp32, then cast)."""
    model, _ = tiny_bert("classification", 2, seed=1, dtype=dtype)
    reference, _ = tiny_bert("classification", 2, seed=1)
    expected = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    for (name, value), ref in zip(model.state_dict().items(), reference.state_dict().values()):
        assert value.dtype == (expected if ref.is_floating_point() else ref.dtype), name
        assert torch.equal(value, ref.to(value.dtype)), name


def test_minilm_bf16_weights_are_the_packaged_ones_cast():
    from safetensors.torch import load_file

    model, _ = minilm("classification", 5, dtype="bf16")
    saved = load_file(str(minilm_dir() / "model.safetensors"))
    weight = model.bert.encoder.layer[0].attention.self.query.weight
    stored = next(v for k, v in saved.items() if k.endswith("encoder.layer.0.attention.self.query.weight"))
    assert weight.dtype == torch.bfloat16 and torch.equal(weight, stored.to(torch.bfloat16))


def test_bad_dtype_one_line():
    with pytest.raises(VBShareError, match="model.dtype='fp8' is not supported; use one of fp32, bf16, fp16"):
        tiny_bert("classification", 2, dtype="fp8")
