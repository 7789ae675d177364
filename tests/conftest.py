"""Shared pytest set-up: the `decoder` marker (SmolLM2 tests; deselect with -m "not decoder"), and no progress bars
from transformers' weight loading in the test output (the `slow` marker is registered in pyproject.toml).
Helpers the test files share (compose, train, read the JSON lines) are in tests/helpers.py."""
import sys

from transformers.utils import logging as hf_logging


def pytest_configure(config):
    config.addinivalue_line("markers", "decoder: runs the SmolLM2-135M decoder path (one-time GGUF conversion)")
    hf_logging.disable_progress_bar()  # "Loading weights: 100%|...|" on every model built in a test


def pytest_sessionstart(session):
    """rouge-score logs through absl, whose handler keeps the sys.stderr of its first use. First used inside a test,
    that is pytest's capture of the test, closed when the test ends, and every later log record (Hydra's, say)
    kills the process ('lost sys.stderr'). Bind it to the real stderr before any test runs."""
    try:
        import absl.logging
    except ImportError:
        return
    absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__
