"""Shared pytest set-up: the `decoder` marker (SmolLM2 tests; deselect with -m "not decoder")."""


def pytest_configure(config):
    config.addinivalue_line("markers", "decoder: runs the SmolLM2-135M decoder path (one-time GGUF conversion)")
    config.addinivalue_line("markers", "slow: starts subprocesses or runs notebooks (deselect with -m \"not slow\")")
