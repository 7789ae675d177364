"""Reading a finished training run for the engine and data-parallel tests: its saved adapter tensors, an
equality check between two runs' adapters, and the logged training losses."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def saved_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the run's adapter folder (adapter and head), keyed by file and name."""
    tensors = {}
    for path in sorted((run_dir / "adapter").glob("*.safetensors")):
        tensors.update({f"{path.stem}/{k}": v for k, v in load_file(path).items()})
    return tensors


def assert_same_adapter(a: Path, b: Path, atol: float) -> None:
    left, right = saved_tensors(a), saved_tensors(b)
    assert left.keys() == right.keys() and left
    for key in left:
        torch.testing.assert_close(left[key], right[key], atol=atol, rtol=0, msg=key)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, training loss) of every logged training row of metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "split" not in r]
