"""scripts/gpu_check.sh in its dry mode: every step of the GPU check runs on the CPU at toy sizes and the results
folder holds the tables. Steps whose feature this vbshare lacks (the planner, a chunked NOLA path) are recorded
as skipped, never as failed."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["bench", "smollm2_bf16", "qlora_nf4", "nola_memory", "plan_vs_measured"]


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_one_results_folder(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    out = tmp_path / "out"
    steps = {s["name"]: s["status"] for s in map(json.loads, (out / "steps.jsonl").read_text().splitlines())}
    assert list(steps) == STEPS
    for name, status in steps.items():
        assert status == "ok" or (status == "skipped" and name == "plan_vs_measured"), (
            name, status, (out / "logs" / f"{name}.log").read_text()[-2000:])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["dry_run"] is True
    runs = results["runs"]
    assert runs["bf16"]["precision"] == "bf16" and runs["bf16"]["base_quantization"] is None
    assert runs["nf4"]["base_quantization"] == "nf4"
    assert {"engine", "training"} <= set(results["bench"])
    assert {row["path"] for row in results["nola"]["rows"]} >= {"cached", "redrawn"}
    table = (out / "results.md").read_text()
    assert "## Training runs" in table and "| nf4 |" in table and "## NOLA paths" in table
