"""Loading models for the training app: the embedded defaults from package folders (no hub access), a tiny
random BERT for tests, and any transformers model by name (for users with internet).

Every loader has the signature `(task, num_labels, seed, ...) -> (model, tokenizer)` with `task` one of
"classification" (a sequence classifier with a fresh `num_labels` head; `num_labels == 1` is regression) or
"lm" (a causal language model). The Hydra configs in `configs/model/` point at these functions.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .assets import minilm_dir, smollm2_gguf
from .errors import VBShareError

log = logging.getLogger(__name__)

TASKS = ("classification", "lm")
SMOLLM2_CACHE_NAME = "smollm2-135m-fp32"  # folder under the cache dir holding the converted GGUF


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


def load_sequence_classifier(path: str | Path, num_labels: int, seed: int = 0) -> tuple[nn.Module, object]:
    """(model, tokenizer) for sequence classification from a local transformers folder.

    The encoder's weights are pretrained; the classification head is new, initialised from `seed`.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    with _quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=num_labels)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def load_minilm_classifier(num_labels: int, seed: int = 0) -> tuple[nn.Module, object]:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, FFN 1536) with a fresh `num_labels` head."""
    return load_sequence_classifier(minilm_dir(), num_labels, seed)


# -- Hydra-facing loaders (configs/model/*.yaml) ------------------------------------------------------------------
def minilm(task: str, num_labels: int, seed: int = 0) -> tuple[nn.Module, object]:
    """all-MiniLM-L6-v2 from its package folder; classification only (it is an encoder)."""
    _check_task(task, ("classification",), "minilm")
    return load_minilm_classifier(num_labels, seed)


def tiny_bert(
    task: str,
    num_labels: int,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 128,
    max_positions: int = 512,
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
    torch.manual_seed(seed)
    return BertForSequenceClassification(config), tokenizer


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
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
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
        os.chmod(tmp, 0o755)  # mkdtemp creates it private
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


def smollm2_135m(task: str, num_labels: int = 0, seed: int = 0) -> tuple[nn.Module, object]:
    """SmolLM2-135M (decoder, 30 layers, hidden 576, FFN 1536) from the packaged Q4_1 GGUF, via the fp32 cache."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    folder = convert_gguf(smollm2_gguf(), cache_dir() / SMOLLM2_CACHE_NAME)
    torch.manual_seed(seed)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if task == "lm":
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        else:
            _check_task(task, TASKS, "smollm2_135m")
            model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=num_labels)
    _ensure_pad_token(model, tokenizer)
    return model, tokenizer


def hf(task: str, num_labels: int, name: str, seed: int = 0) -> tuple[nn.Module, object]:
    """Any transformers model by hub name or local folder (`model.name=...`); needs internet for hub names."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    _check_task(task, TASKS, f"hf:{name}")
    torch.manual_seed(seed)
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(name)
            if task == "lm":
                model = AutoModelForCausalLM.from_pretrained(name)
            else:
                model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=num_labels)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VBShareError(f"cannot load transformers model {name!r} ({first}); check the name and your connection") from None
    _ensure_pad_token(model, tokenizer)
    return model, tokenizer


def _ensure_pad_token(model: nn.Module, tokenizer) -> None:
    """Decoders often ship without a pad token: reuse EOS so batches can be padded (pads are masked out)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
