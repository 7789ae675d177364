"""Shared pytest set-up: the `decoder` marker (SmolLM2 tests; deselect with -m "not decoder"), and no progress bars
from transformers' weight loading in the test output (the `slow` marker is registered in pyproject.toml).
Helpers the test files share (compose, train, read the JSON lines) are in tests/helpers.py."""
from transformers.utils import logging as hf_logging


def pytest_configure(config):
    config.addinivalue_line("markers", "decoder: runs the SmolLM2-135M decoder path (one-time GGUF conversion)")
    hf_logging.disable_progress_bar()  # "Loading weights: 100%|...|" on every model built in a test
