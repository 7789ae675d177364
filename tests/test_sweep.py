"""Sweeps and experiments (configs/sweep, configs/experiment, the launcher plugins), all on trainer=debug."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vbshare import report
from vbshare.train import CONFIG_DIR
from helpers import FAST



def multirun(args: list[str], sweep_dir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "VBSHARE_DEBUG")}
    done = subprocess.run([sys.executable, "-m", "vbshare.train", "-m", *args, f"hydra.sweep.dir={sweep_dir}"],
                          cwd=sweep_dir.parent, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def run_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in sweep_dir.rglob("summary.json"))


@pytest.mark.slow
def test_readme_sweep_command_flat_hyperparameters_2x2_joblib_and_report(tmp_path):
    """The issue's sweep syntax (hyperparameters directly under adapter), 2x2, two runs at a time via joblib;
    the report over the sweep folder has one row per configuration."""
    sweep = tmp_path / "sweep"
    multirun(["+adapter=vblora", "adapter.r=2,4", "adapter.num_vectors=32,64", *FAST,
              "hydra/launcher=parallel", "hydra.launcher.n_jobs=2"], sweep)
    dirs = run_dirs(sweep)
    assert len(dirs) == 4
    seen = {(json.loads((d / "summary.json").read_text())["hyperparameters"]["r"],
             json.loads((d / "summary.json").read_text())["hyperparameters"]["num_vectors"]) for d in dirs}
    assert seen == {(2, 32), (2, 64), (4, 32), (4, 64)}
    assert report.main([str(sweep), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "report.csv").read_text().strip().splitlines()
    assert len(table) == 1 + 4
    md = (tmp_path / "report" / "report.md").read_text()
    assert "vblora num_vectors=32 r=2" in md
    for name in ("pareto.png", "bars.png"):
        assert (tmp_path / "report" / name).stat().st_size > 1000


# peft_metamath needs Llama-3.2-3B and the MetaMathQA / GSM8K datasets from the Hub: tests/test_generation.py
# checks that it composes; every other experiment runs here.
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml") if p.stem != "peft_metamath")


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_runs(experiment, tmp_path):
    """Every experiment file: its sweep composes and every configuration runs (seed 0 only, debug size)."""
    sweep = tmp_path / "sweep"
    multirun([f"experiment={experiment}", *FAST, "seed=0"], sweep)
    dirs = run_dirs(sweep)
    assert dirs
    methods = {json.loads((d / "summary.json").read_text())["method"] for d in dirs}
    if experiment == "compare":
        assert methods == {"head_only", "full_finetune", "lora", "vblora", "aslora", "sora", "vera", "unilora",
                           "tied_lora", "nola", "loraxs", "mos", "randlora", "pvera", "tinylora"}
        assert len(dirs) == 16  # aslora twice: similarity and random pairing
    table = report.summarise(report.collect_runs(sweep))
    assert len(table) == len(dirs)


def hydra_sweep_params(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.sweeper.params) or {}


SWEEPS = {"ranks": "lora", "bank_sizes": "vblora", "seeds": "lora", "sora_lambda": "sora",
          "aslora_merges": "aslora", "optuna_lr": "lora"}


def test_every_sweep_preset_listed():
    assert sorted(p.stem for p in (CONFIG_DIR / "sweep").glob("*.yaml")) == sorted(SWEEPS)


@pytest.mark.parametrize("preset", sorted(SWEEPS))
def test_sweep_preset_composes(preset):
    """Each preset's swept keys exist in its adapter's config: the first value of each composes."""
    base = [f"+adapter={SWEEPS[preset]}", f"sweep={preset}", *FAST]
    params = hydra_sweep_params(base)
    assert params
    firsts = []
    for key, value in params.items():
        if str(value).startswith(("tag(", "interval(", "range(", "choice(")):
            firsts.append(f"{key}=0.001")
        else:
            firsts.append(f"{key}={str(value).split(',')[0]}")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        compose("train", overrides=[*base, *firsts])


@pytest.mark.slow
def test_optuna_lr_two_trials(tmp_path):
    done = multirun(["+adapter=lora", "sweep=optuna_lr", "hydra.sweeper.n_trials=2", *FAST], tmp_path / "sweep")
    assert "Best value" in done.stdout + done.stderr
    assert len(run_dirs(tmp_path / "sweep")) == 2


@pytest.mark.slow
def test_submitit_local_executor(tmp_path):
    """The cluster launcher's local executor: the run goes through submitit and writes a normal run dir."""
    multirun(["+adapter=lora", *FAST, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"],
             tmp_path / "sweep")
    assert len(run_dirs(tmp_path / "sweep")) == 1


def test_slurm_launcher_config_composes():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.cpus_per_task == 4


@pytest.mark.parametrize("baseline", ["head_only", "full"])
def test_baseline_resume_identical(baseline, tmp_path):
    """The baselines the experiments use: only the head (or every weight) trains, and a run stopped and
    resumed logs exactly the losses of an uninterrupted one."""
    from vbshare.train import run_training

    common = [f"+adapter={baseline}", *FAST, "trainer.max_steps=4", "trainer.checkpoint_every=2"]

    def train(overrides, run_dir):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return run_training(compose("train", overrides=overrides), run_dir, overrides)

    full = train(common, tmp_path / "full")
    assert train([*common, "trainer.stop_at_step=2"], tmp_path / "cut") is None
    resumed = train([*common, f"trainer.resume={tmp_path / 'cut'}"], tmp_path / "cut")
    assert full["final"] == resumed["final"]
    if baseline == "head_only":
        assert full["method"] == "head_only" and full["stored_parameters"] == 0
        assert full["trainable_parameters"] == full["head_parameters"] == 64 * 5 + 5
        assert (tmp_path / "full" / "adapter" / "head.safetensors").is_file()
    else:
        assert full["method"] == "full_finetune" and full["stored_parameters"] > 10**6
