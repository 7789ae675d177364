"""vbshare.report on hand-made run directories: known means, standard deviations, % of LoRA, Pareto front."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from vbshare import report


def make_run(root: Path, name: str, method: str, seed: int, accuracy: float, stored: float,
             hyper: dict | None = None, wall: float = 10.0, adapter_bytes: int | None = 1000,
             sharing: dict | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    summary = {
        "method": method, "task": "bbc_news", "model": "minilm", "metric": "accuracy",
        "hyperparameters": {"targets": ["query"], **(hyper or {})},
        "final": {"validation": {"accuracy": accuracy - 0.01}, "test": {"accuracy": accuracy}},
        "best": None, "steps": 300, "trainable_parameters": int(stored) + 5, "head_parameters": 5,
        "stored_parameters": stored, "sharing": sharing, "adapter_bytes": adapter_bytes,
        "wall_time_s": wall,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    config = {"seed": seed, "trainer": {"max_steps": 300, "batch_size": 16, "max_examples": None},
              "data": {"_target_": "vbshare.data.tasks.bbc_news", "seed": 0, "max_length": 64},
              "optim": {"full_finetune_lr": 1e-4}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "sweep"
    for seed, acc in enumerate([0.90, 0.92, 0.94]):
        make_run(root, f"lora_{seed}", "lora", seed, acc, 1000.0, {"r": 8, "lr": {"A": 1e-3}}, wall=10 + seed)
    for seed, acc in enumerate([0.91, 0.93]):
        make_run(root, f"vblora_{seed}", "vblora", seed, acc, 50.0, {"r": 4, "num_vectors": 64})
    make_run(root, "vblora_big", "vblora", 0, 0.80, 80.0, {"r": 4, "num_vectors": 128})   # dominated
    make_run(root, "full_0", "full_finetune", 0, 0.95, 2.0e7, {"lr": 1e-4}, adapter_bytes=None)
    make_run(root, "head_0", "head_only", 0, 0.70, 0.0, {"lr": {"head": 5e-3}})
    make_run(root, "sora_0", "sora", 0, 0.89, 600.0, {"r": 8, "lam": 3},
             sharing={"retained_ranks": {"a": 3, "b": 2}})
    return root


def test_collect_one_row_per_run(runs_root):
    runs = report.collect_runs(runs_root)
    assert len(runs) == 9
    assert set(runs["seed"]) == {0, 1, 2}
    assert runs.loc[runs["method"] == "lora", "split"].eq("test").all()


def test_summarise_mean_std_pct(runs_root):
    table = report.summarise(report.collect_runs(runs_root)).set_index("label")
    assert len(table) == 6
    lora = table.loc["lora"]
    assert lora["n_seeds"] == 3
    assert lora["metric_mean"] == pytest.approx(0.92)
    assert lora["metric_std"] == pytest.approx(0.02)  # sample std of 0.90, 0.92, 0.94
    assert lora["pct_of_lora"] == pytest.approx(100.0)
    assert lora["wall_time_s"] == pytest.approx(11.0)
    small = table.loc["vblora num_vectors=64"]
    assert small["n_seeds"] == 2 and small["metric_mean"] == pytest.approx(0.92)
    assert small["metric_std"] == pytest.approx(math.sqrt(2) * 0.01)
    assert small["pct_of_lora"] == pytest.approx(5.0)
    assert table.loc["vblora num_vectors=128", "metric_std"] == 0.0  # one seed
    assert table.loc["head_only", "pct_of_lora"] == 0.0
    assert table.loc["sora", "retained_rank"] == 5.0
    assert math.isnan(table.loc["full_finetune", "adapter_bytes"])
    for column in ("method", "label", "n_seeds", "metric_mean", "metric_std", "stored_params", "pct_of_lora",
                   "adapter_bytes", "wall_time_s"):
        assert column in table.reset_index().columns


def test_pareto_front_membership(runs_root):
    table = report.summarise(report.collect_runs(runs_root))
    front = dict(zip(table["label"], report.pareto_front(table)))
    assert front == {"head_only": True, "vblora num_vectors=64": True, "full_finetune": True,
                     "lora": False, "vblora num_vectors=128": False, "sora": False}


def test_pareto_lower_is_better():
    import pandas as pd

    table = pd.DataFrame({"metric": ["perplexity"] * 3, "stored_params": [10.0, 20.0, 30.0],
                          "metric_mean": [30.0, 20.0, 25.0]})
    assert report.pareto_front(table).tolist() == [True, True, False]


def test_main_writes_table_and_plots(runs_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(runs_root), "--out", str(out)]) == 0
    csv_lines = (out / "report.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 6 and "pct_of_lora" in csv_lines[0]
    assert "| lora | 3 | 0.9200 ± 0.0200 | 1,000 | 100.0 % |" in (out / "report.md").read_text()
    for name in ("pareto.png", "bars.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "9 runs, 6 configurations" in capsys.readouterr().out


def test_main_no_runs_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no finished runs")
    assert report.main([str(tmp_path / "missing")]) == 2
