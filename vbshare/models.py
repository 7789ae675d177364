"""Loading models for the training app: the embedded defaults from package folders (no hub access), a tiny
random BERT for tests, and any transformers model from a local folder or the Hugging Face cache / Hub.

Every loader has the signature `(task, num_labels, seed, ..., dtype) -> (model, tokenizer)` with `task` one of
"classification" (a sequence classifier with a fresh `num_labels` head; `num_labels == 1` is regression) or
"lm" (a causal language model), and `dtype` one of "fp32" | "bf16" | "fp16" (the dtype the whole model is
loaded in; adapters injected later keep their own fp32 parameters). The Hydra configs in `configs/model/`
point at these functions and pass `model.dtype` and `model.quantization` (null | "nf4" | "fp4" | "int8": a
bitsandbytes-quantized frozen base, vbshare/quantization.py; a folder loads through transformers'
`BitsAndBytesConfig`, a model built in memory is quantized in place; the heads stay unquantized).
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path

import torch
from torch import nn

from huggingface_hub import HfApi, snapshot_download, try_to_load_from_cache
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

from .assets import minilm_dir, smollm2_gguf
from .errors import VBShareError
from .quantization import bnb_config, check_quantization, quantize
from .targets import HEAD_NAMES

log = logging.getLogger(__name__)

TASKS = ("classification", "lm")
SMOLLM2_CACHE_NAME = "smollm2-135m-fp32"  # folder under the cache dir holding the converted GGUF
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # model.dtype -> torch dtype
HUB_PROBE_TIMEOUT_S = 10.0  # one metadata request to the Hub before downloading an uncached model
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # either set to 1: never contact the Hub
CONFIG_FILE = "config.json"  # every transformers model folder has one


def _check_task(task: str, supported: tuple[str, ...], model_name: str) -> None:
    if task not in supported:
        hint = "model=smollm2_135m or model=hf" if task == "lm" else "model=minilm, model=tiny_bert or model=hf"
        raise VBShareError(f"model {model_name} cannot do the {task!r} task (it supports {', '.join(supported)}); use {hint}")


def _quiet_transformers():
    """Context manager: silence transformers' expected "newly initialised head" notices."""
    import contextlib

    from transformers.utils import logging as hf_logging

    @contextlib.contextmanager
    def quiet():
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)

    return quiet()


def torch_dtype(name: str) -> torch.dtype:
    """model.dtype ("fp32" | "bf16" | "fp16") as a torch dtype."""
    if name not in DTYPES:
        raise VBShareError(f"model.dtype={name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _quantized_loading(quantization: str | None, dtype: str, device: str | None) -> dict:
    """Extra `from_pretrained` arguments for model.quantization: transformers' BitsAndBytesConfig computing in
    `dtype`, the task / LM heads left unquantized (they may be trained), the whole model on `device` (bitsandbytes
    quantizes where it loads; Accelerate then trains it there). None: no extra arguments."""
    if check_quantization(quantization) is None:
        return {}
    config = bnb_config(quantization, torch_dtype(dtype))
    config.llm_int8_skip_modules = sorted(HEAD_NAMES)  # the name covers 4-bit too
    return {"quantization_config": config, "device_map": {"": str(device or "cpu")}}


def load_sequence_classifier(path: str | Path, num_labels: int, seed: int = 0, dtype: str = "fp32",
                             quantization: str | None = None, device: str | None = None) -> tuple[nn.Module, object]:
    """(model, tokenizer) for sequence classification from a local transformers folder.

    The encoder's weights are pretrained; the classification head is new, initialised from `seed` (a head
    saved in the folder is kept only when it has `num_labels` outputs). `quantization` / `device`: see
    `_quantized_loading`.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    weights_dtype = torch_dtype(dtype)
    torch.manual_seed(seed)
    with _quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=num_labels, dtype=weights_dtype, ignore_mismatched_sizes=True,
            **_quantized_loading(quantization, dtype, device))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def load_causal_lm(path: str | Path, seed: int = 0, dtype: str = "fp32", quantization: str | None = None,
                   device: str | None = None) -> tuple[nn.Module, object]:
    """(model, tokenizer) of a causal language model from a local transformers folder (`quantization` /
    `device`: see `_quantized_loading`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights_dtype = torch_dtype(dtype)
    torch.manual_seed(seed)
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=weights_dtype,
                                                     **_quantized_loading(quantization, dtype, device))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def load_minilm_classifier(num_labels: int, seed: int = 0, dtype: str = "fp32", quantization: str | None = None,
                           device: str | None = None) -> tuple[nn.Module, object]:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, FFN 1536) with a fresh `num_labels` head."""
    return load_sequence_classifier(minilm_dir(), num_labels, seed, dtype, quantization, device)


def _built_in_memory(model: nn.Module, dtype: str, quantization: str | None, device: str | None) -> nn.Module:
    """A model built in-process (initialised in fp32, the same numbers for every dtype) cast to `dtype`, then, for
    model.quantization, moved to `device` and quantized there (`vbshare.quantization.quantize`)."""
    model = model.to(torch_dtype(dtype))
    if check_quantization(quantization) is None:
        return model
    return quantize(model.to(device or "cpu"), quantization, compute_dtype=torch_dtype(dtype))


# -- Hydra-facing loaders (configs/model/*.yaml) ------------------------------------------------------------------
def minilm(task: str, num_labels: int, seed: int = 0, dtype: str = "fp32", quantization: str | None = None,
           device: str | None = None) -> tuple[nn.Module, object]:
    """all-MiniLM-L6-v2 from its package folder; classification only (it is an encoder)."""
    _check_task(task, ("classification",), "minilm")
    return load_minilm_classifier(num_labels, seed, dtype, quantization, device)


def tiny_bert(
    task: str,
    num_labels: int,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 128,
    max_positions: int = 512,
    dtype: str = "fp32",
    quantization: str | None = None,
    device: str | None = None,
) -> tuple[nn.Module, object]:
    """A small randomly initialised BERT built in-process (no files), with MiniLM's tokenizer (vocab 30,522)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    _check_task(task, ("classification",), "tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_positions,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)  # initialised in fp32 (the same numbers for every dtype), then cast
    return _built_in_memory(BertForSequenceClassification(config), dtype, quantization, device), tokenizer


def tiny_llama(
    task: str,
    num_labels: int = 0,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_positions: int = 512,
    dtype: str = "fp32",
    quantization: str | None = None,
    device: str | None = None,
) -> tuple[nn.Module, object]:
    """A small randomly initialised Llama (grouped-query attention, SwiGLU MLP) built in-process (no files), with
    MiniLM's tokenizer (vocab 30,522; its [SEP] ends each text, as a decoder's EOS does). A causal LM for
    task "lm", a last-token classifier (`score` head) for "classification"."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    _check_task(task, TASKS, "tiny_llama")
    torch_dtype(dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tokenizer.eos_token = tokenizer.sep_token
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_positions,
        num_labels=max(num_labels, 1),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    torch.manual_seed(seed)  # initialised in fp32 (the same numbers for every dtype), then cast
    model = LlamaForCausalLM(config) if task == "lm" else LlamaForSequenceClassification(config)
    return _built_in_memory(model, dtype, quantization, device), tokenizer


def cache_dir() -> Path:
    """Where converted models are kept: $VBSHARE_CACHE, else ~/.cache/vbshare."""
    return Path(os.environ.get("VBSHARE_CACHE") or Path.home() / ".cache" / "vbshare")


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantise a GGUF file into an fp32 transformers folder at `target` (once; atomic).

    The folder is written under a temporary name next to `target` and renamed into place, so an interrupted
    conversion never leaves a half-written cache behind.
    """
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to an fp32 safetensors folder at %s (one time per machine)...", gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
    tmp.mkdir()  # mode 0o777 minus the umask, like any folder the user makes (mkdtemp's would be private)
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        # The weights are now plain fp32: drop any quantiser marker so the saved folder loads as ordinary.
        for attr in ("quantization_config",):
            if hasattr(model.config, attr):
                delattr(model.config, attr)
        for attr in ("is_quantized", "hf_quantizer"):
            if getattr(model, attr, None):
                setattr(model, attr, False if attr == "is_quantized" else None)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep its folder
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.warning("conversion done: %s", target)
    return target


def smollm2_135m(task: str, num_labels: int = 0, seed: int = 0, dtype: str = "fp32", quantization: str | None = None,
                 device: str | None = None) -> tuple[nn.Module, object]:
    """SmolLM2-135M (decoder, 30 layers, hidden 576, FFN 1536) from the packaged Q4_1 GGUF, via the fp32 cache."""
    _check_task(task, TASKS, "smollm2_135m")
    torch_dtype(dtype)  # a bad dtype or quantization fails before the one-time conversion
    check_quantization(quantization)
    folder = convert_gguf(smollm2_gguf(), cache_dir() / SMOLLM2_CACHE_NAME)
    if task == "lm":
        model, tokenizer = load_causal_lm(folder, seed, dtype, quantization, device)
    else:
        model, tokenizer = load_sequence_classifier(folder, num_labels, seed, dtype, quantization, device)
    _ensure_pad_token(model, tokenizer)
    return model, tokenizer


def hf(task: str, num_labels: int, name: str, seed: int = 0, dtype: str = "fp32", quantization: str | None = None,
       device: str | None = None) -> tuple[nn.Module, object]:
    """Any transformers model (`model=hf model.loader.name=...`): a local folder (config.json, weights and
    tokenizer files, as save_pretrained writes them) or a Hugging Face Hub name.

    A hub name is loaded from the local Hugging Face cache when it is there (no network); otherwise it is
    downloaded, unless HF_HUB_OFFLINE=1 or the Hub cannot be reached, which fails at once with one line.
    """
    _check_task(task, TASKS, f"hf:{name}")
    torch_dtype(dtype)
    check_quantization(quantization)
    source = locate_model(name)
    try:
        if task == "lm":
            model, tokenizer = load_causal_lm(source, seed, dtype, quantization, device)
        else:
            model, tokenizer = load_sequence_classifier(source, num_labels, seed, dtype, quantization, device)
    except (OSError, ValueError) as err:  # missing files in a folder / cache, unknown architecture
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VBShareError(f"cannot load transformers model {name!r} ({first}); check model.loader.name") from None
    _ensure_pad_token(model, tokenizer)
    return model, tokenizer


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set (read now, not at import)."""
    return hub_constants.HF_HUB_OFFLINE or any(
        os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE") for var in OFFLINE_VARIABLES)


def locate_model(name: str) -> str:
    """What to give from_pretrained for a local folder or a hub name, checked up front.

    Local folder: must hold config.json. Hub name in the local cache: its cached snapshot folder (no network,
    no retries). Hub name not cached: one metadata request (no retries) tells a missing model, a gated
    one and an unreachable Hub apart in one line; only a reachable, existing model goes on to download.
    """
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / CONFIG_FILE).is_file():
            raise VBShareError(f"model folder {folder} has no {CONFIG_FILE}; give a folder written by save_pretrained")
        return str(folder)
    nowhere = f"{name!r} is not a local folder"
    try:
        cached = try_to_load_from_cache(name, CONFIG_FILE)
    except HFValidationError:
        raise VBShareError(f"{nowhere} and not a valid Hugging Face Hub name; set model.loader.name to a model "
                           "folder or an owner/name on the Hub") from None
    if isinstance(cached, str):  # load the cached snapshot as a folder: transformers then asks the Hub nothing
        return snapshot_download(name, local_files_only=True)
    fix = f"download it once where there is network (`hf download {name}`) or give a local folder"
    if hub_offline():
        raise VBShareError(f"{nowhere} and not in the Hugging Face cache ({hub_constants.HF_HUB_CACHE}), and "
                           f"HF_HUB_OFFLINE is set; {fix}")
    try:
        HfApi().model_info(name, timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError:
        raise VBShareError(f"{name!r} is a gated model on the Hugging Face Hub; accept its terms on the Hub and "
                           "log in (`hf auth login`), or give a local folder") from None
    except RepositoryNotFoundError:
        raise VBShareError(f"{nowhere} and the Hugging Face Hub has no model {name!r} (or it is private); "
                           "check model.loader.name") from None
    except Exception as err:  # connection / DNS / timeout errors come in many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VBShareError(f"{nowhere} and not in the Hugging Face cache, and the Hub cannot be reached ({first}); "
                           f"{fix}") from None
    return name


def _ensure_pad_token(model: nn.Module, tokenizer) -> None:
    """Decoders often ship without a pad token: reuse EOS so batches can be padded (pads are masked out)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
