"""What many test files share: composing the training app's config, training a run in this process, reading
the JSON-lines files a run writes. Imported as `helpers` (pyproject puts tests/ on the path)."""
from __future__ import annotations

import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from vbshare.train import CONFIG_DIR, run_training

FAST = ["model=tiny_bert", "trainer=debug", "data.max_length=32"]  # a run in seconds: tiny BERT, 4 steps, 16 examples


def compose_config(overrides: list[str], name: str = "train") -> DictConfig:
    """The config `python -m vbshare.<name> OVERRIDES` would run with (configs/<name>.yaml)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def train(overrides: list[str], run_dir: Path) -> dict | None:
    """One training run in this process, as `python -m vbshare.train OVERRIDES` would make it in `run_dir`;
    returns its summary (None when it stopped early)."""
    return run_training(compose_config(overrides), run_dir, overrides)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def read_metrics(run_dir: Path) -> list[dict]:
    """Every row of a run's metrics.jsonl (training rows have no `split`; evaluation rows do)."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")
