"""Loading the embedded default's pretrained models from package folders (no hub access)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .assets import minilm_dir


def load_sequence_classifier(path: str | Path, num_labels: int, seed: int = 0) -> tuple[nn.Module, object]:
    """(model, tokenizer) for sequence classification from a local transformers folder.

    The encoder's weights are pretrained; the classification head is new, initialised from `seed`.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    torch.manual_seed(seed)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the "newly initialised head" notice is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=num_labels)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    finally:
        logging.set_verbosity(verbosity)
    return model, tokenizer


def load_minilm_classifier(num_labels: int, seed: int = 0) -> tuple[nn.Module, object]:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, FFN 1536) with a fresh `num_labels` head."""
    return load_sequence_classifier(minilm_dir(), num_labels, seed)
