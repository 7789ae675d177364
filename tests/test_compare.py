"""`python -m vbshare.compare` end to end on tiny BERT (trainer=debug): 2 methods x 2 trials x 2 seeds, then the
same comparison continued with a third seed in separate training processes two at a time, then re-run unchanged."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from tqdm import tqdm

from vbshare.compare import Point, Runner, check_request, in_workers, tune
from vbshare.errors import VBShareError
from vbshare.train.settings import CompareSettings
from helpers import FAST

METHODS, TRIALS = ["lora", "vblora"], 2


def compare(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "VBSHARE_DEBUG")}
    command = [sys.executable, "-m", "vbshare.compare", *FAST, f"compare.methods=[{','.join(METHODS)}]",
               f"compare.trials={TRIALS}", f"compare.out={out}", *args]
    return subprocess.run(command, cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)


def trained(done: subprocess.CompletedProcess) -> int:
    """Runs trained by that invocation (its last log line says how many were trained and reused)."""
    assert done.returncode == 0, done.stderr[-3000:]
    return int(re.search(r"(\d+) runs trained, (\d+) reused", done.stdout + done.stderr).group(1))


def contains_test(value) -> bool:
    """Whether any key or string anywhere in a JSON value names the test split."""
    if isinstance(value, dict):
        return any("test" in str(k) or contains_test(v) for k, v in value.items())
    if isinstance(value, list):
        return any(contains_test(v) for v in value)
    return isinstance(value, str) and "test" in value


@pytest.mark.slow
def test_compare_end_to_end_continue_and_rerun(tmp_path):
    out = tmp_path / "cmp"
    assert trained(compare(out, "compare.seeds=[0,1]", "compare.isolate=false")) == len(METHODS) * (TRIALS + 2)

    # stage 1: the same trial count per method, every run scored on validation and never on test
    stage1 = sorted((out / "stage1").glob("*/trial_*"))
    assert [p.parent.name for p in stage1] == [m for m in METHODS for _ in range(TRIALS)]
    for run in stage1:
        summary = json.loads((run / "summary.json").read_text())
        assert set(summary["final"]) == {"validation"} and not contains_test(summary)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert rows and not any("test" in str(r.get("split", "")) for r in rows)
        assert "trainer.eval_test=false" in json.loads((run / "request.json").read_text())["overrides"]
    trials = list(csv.DictReader((out / "trials.csv").open()))
    assert [t["method"] for t in trials] == [m for m in METHODS for _ in range(TRIALS)]
    for method in METHODS:
        mine = [t for t in trials if t["method"] == method]
        assert sum(t["best"] == "True" for t in mine) == 1 and all(t["validation_score"] != "nan" for t in mine)
        best = next(t for t in mine if t["best"] == "True")  # stage 2 re-runs exactly the best trial's settings
        run = next((out / "stage2" / method).glob("trial_*/seed_0"))
        assert run.parent.name == f"trial_{int(best['trial']):03d}"
        lr = json.loads((run / "summary.json").read_text())["hyperparameters"]["lr"]
        searched = {k.split(".", 1)[1]: float(v) for k, v in best.items() if k.startswith("lr.") and v}
        assert lr == searched

    # stage 2 + 3: test scores per seed, the report's statistics columns
    table = pd.read_csv(out / "report" / "report.csv")
    assert {"ci95_low", "ci95_high", "p_vs_control"} <= set(table.columns)
    assert sorted(table["method"]) == sorted(METHODS) and (table["n_seeds"] == 2).all()
    assert (table["ci95_low"] <= table["metric_mean"]).all() and (table["metric_mean"] <= table["ci95_high"]).all()
    for name in ("pareto.png", "bars.png", "curves.png", "report.md"):
        assert (out / "report" / name).is_file()

    # continued with a third seed, each run in its own training process, two at a time: only the 2 missing runs
    finished = {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    assert trained(compare(out, "compare.seeds=[0,1,2]", "compare.isolate=true", "compare.workers=2")) == len(METHODS)
    assert sorted(p.parent.parent.name for p in (out / "stage2").glob("*/trial_*/seed_2")) == sorted(METHODS)
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    assert (pd.read_csv(out / "report" / "report.csv")["n_seeds"] == 3).all()

    # unchanged re-run: nothing trained
    assert trained(compare(out, "compare.seeds=[0,1,2]", "compare.isolate=false")) == 0


def test_a_run_made_with_other_settings_is_refused(tmp_path):
    """Continuing with changed settings (or a changed search space) must stop, not mix runs."""
    run = tmp_path / "trial_000"
    run.mkdir()
    (run / "request.json").write_text(json.dumps({"overrides": ["+adapter=lora", "++adapter.lr.A=0.001"]}))
    check_request(run, ["+adapter=lora", "++adapter.lr.A=0.001"])  # the same: reused
    with pytest.raises(VBShareError, match=r"was made with other settings \(\+\+adapter.lr.A=0.001, "
                                           r"\+\+adapter.lr.A=0.002, trainer.max_steps=3\)"):
        check_request(run, ["+adapter=lora", "++adapter.lr.A=0.002", "trainer.max_steps=3"])


def test_search_space_overrides_and_bad_spaces():
    from vbshare.compare import Point, check_search

    point = Point("full", "full_finetune", {}, None, None)
    assert point.overrides({"/optim.full_finetune_lr": 1e-05}) == ["+adapter=full", "++optim.full_finetune_lr=1e-05"]
    sized = Point("lora", "lora", {}, "r", 4)
    assert sized.name == "lora-r4"
    assert sized.overrides({"lr.A": 0.5}) == ["+adapter=lora", "++adapter.r=4", "++adapter.lr.A=0.5"]
    with pytest.raises(VBShareError, match="has no `search` space"):
        check_search("lora", {})
    with pytest.raises(VBShareError, match=r"search.lr.A: give \{low"):
        check_search("lora", {"lr.A": {"low": 1e-4}})


class FakeRunner(Runner):
    """Scores a run by a fixed function of its learning rate after a short sleep, and records how many runs
    were in flight at once."""

    def __init__(self):
        super().__init__(isolate=True)
        self.in_flight, self.most_in_flight, self.lock = 0, 0, threading.Lock()

    def run(self, overrides, run_dir):
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(0.05)
        with self.lock:
            self.in_flight -= 1
        lr = float(next(o for o in overrides if o.startswith("++adapter.lr.A=")).split("=")[1])
        return {"metric": "accuracy", "final": {"validation": {"accuracy": -abs(math.log10(lr) + 2.5)}}}


def test_workers_tune_points_side_by_side_with_the_same_trials(tmp_path):
    """Tuning 3 points 3 at a time asks TPE for exactly the parameters that tuning them one by one asks for."""
    settings = CompareSettings(methods=["a", "b", "c"], trials=4, seeds=[0], sizes=None, control="a",
                               sampler_seed=0, isolate=True, workers=3, out=str(tmp_path))
    space = {"lr.A": {"low": 1.0e-4, "high": 1.0e-1, "log": True}}
    points = [Point(name, name, space) for name in ("a", "b", "c")]

    def tuned(workers):
        runner = FakeRunner()
        with tqdm(disable=True) as bar:
            trials = in_workers(lambda p: tune(p, settings, 0, [], runner, tmp_path, bar), points, workers)
        return [[(t.point.name, t.number, t.params, t.score, t.best) for t in ts] for ts in trials], runner

    one_by_one, serial = tuned(1)
    side_by_side, parallel = tuned(3)
    assert side_by_side == one_by_one
    assert serial.most_in_flight == 1 and parallel.most_in_flight == 3


@pytest.mark.slow
def test_workers_need_separate_processes_and_a_whole_number(tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    done = compare(out, "compare.workers=2", "compare.isolate=false")
    assert done.returncode == 2 and "set compare.isolate=true" in done.stderr, done.stderr[-2000:]
    done = compare(out, "compare.workers=0")
    assert done.returncode == 2 and "compare.workers must be a whole number >= 1" in done.stderr, done.stderr[-2000:]
