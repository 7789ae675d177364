"""`python -m vbshare.train [+adapter=lora|vblora|aslora|sora|...] [model=...] [data=...] [trainer=...] [logger=...]`

The Hydra training app: compose the config (configs/ at the repo root), then setup -> train -> save.
Data-parallel: `torchrun --nproc_per_node N -m vbshare.train ...` or `accelerate launch -m vbshare.train ...`.

    run_training(cfg, run_dir, overrides)  the programmatic entry (Hydra's compose API, or the CLI below)
    main()                      the console entry; bad input becomes one `error: ...` line and exit status 2

The parts, each in its own module: setup.py (engine, task, model, optimiser), modes.py (adapter / full
fine-tuning / head-only), engine.py (Accelerate: processes, precision, DDP/FSDP), loop.py (the steps),
step.py (one optimiser step), batches.py (data order, padding, losses), evaluation.py (scores, predictions),
checkpoints.py (resume, snapshots), interrupt.py (SIGINT / SIGTERM), outputs.py (metrics, summary),
sparsify.py (trainer.sparsify: stages after the dense training), folders.py (one writer and one run per folder).

A resumption (`trainer.resume=<run dir>`) continues the run in its own folder: Hydra's output folder is set to
it, so train.log, the metrics log and the summary stay one record per run. Ctrl-C or SIGTERM saves a checkpoint
at the end of the current step, prints one line with the command that continues, and exits with 130 / 143.

Every run folder (vbshare.rundir) records the config it trained with twice: resolved as YAML (for people and
vbshare.report) and as the overrides it was composed with from configs/, which vbshare.evaluate composes again:
nothing in a run folder is ever instantiated).
"""
from __future__ import annotations

import logging
import math
import os
import shlex
import sys
import json
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..files import atomic_write
from ..errors import VBShareError, WriteError
from ..rundir import RunDir
from . import checkpoints, folders, interrupt
from .loop import Diverged, train
from .forgetting import loss_before
from .outputs import save_outputs
from .setup import setup
from .sparsify import sparsify_stages

log = logging.getLogger("vbshare.train")

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # repo-root configs/ (editable install)
USER_ERRORS = (VBShareError, HydraException, OmegaConfBaseException)  # reported as one line, no traceback
# Warnings that say nothing to a user of the app (a library's deprecated alias that another library reads);
# everything else still shows.
KNOWN_WARNINGS = (r"`is_gradient_checkpointing` is deprecated",)
# Hydra plugins' start-up lines in sweeps, by logger: messages beginning with these are dropped.
PLUGIN_CHATTER = {"hydra_plugins.hydra_joblib_launcher._core": ("Joblib.Parallel(",),
                  "hydra_plugins.hydra_optuna_sweeper._impl": ("Storage: ", "Sampler: ", "Directions: ")}
QUIET_LOGGERS = ("alembic",)  # Optuna's storage layer logs every plugin it sets up, at INFO
# Overrides that say where and from which step a run continues: replaced in the printed resume command.
RESUME_SET_KEYS = ("trainer.resume=", "trainer.stop_at_step=", "hydra.run.dir=", "hydra.output_subdir=")
MULTIRUN_FLAGS = ("-m", "--multirun")


def run_training(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] | None = None) -> dict[str, Any] | None:
    """setup -> train -> save for a composed config; returns the summary's content (None if stopped early,
    and on every process but rank 0).

    Usable in-process with Hydra's compose API: `run_training(compose("train", overrides), tmp_dir, overrides)`.
    `overrides`: what `cfg` was composed with from configs/, recorded in the run folder (rundir.OVERRIDES) so
    that vbshare.evaluate can rebuild the run (without them, the run trains but cannot be evaluated again).
    SIGINT / SIGTERM during the run: a checkpoint of the current step, then `TrainingInterrupted`.
    The run's folder is held while it runs (one writer per folder) and a fresh run refuses one holding another run.
    """
    started = time.perf_counter()
    try:
        with folders.claim(cfg, run_dir), interrupt.catch_stop_signals(), warnings.catch_warnings():
            for message in KNOWN_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=FutureWarning)
            return _train(cfg, Path(run_dir), started, None if overrides is None else [str(o) for o in overrides])
    except WriteError as err:  # disk full, permission denied: every write is atomic, so nothing is torn
        raise VBShareError(f"{err}; then {continuation(cfg, Path(run_dir))}") from err


def continuation(cfg: DictConfig, run_dir: Path) -> str:
    """What continues a run that stopped: a resumption from its checkpoint when it has one."""
    folder = Path(cfg.trainer.resume) if cfg.trainer.resume else run_dir
    try:
        checkpoints.find_checkpoint(folder)
    except VBShareError:
        return "run it again"
    return f"continue with trainer.resume={folder} (its last checkpoint is intact)"


def _train(cfg: DictConfig, run_dir: Path, started: float, overrides: list[str] | None) -> dict[str, Any] | None:
    run = setup(cfg, run_dir)
    run.segment_started = started  # wall time counts model loading too (earlier segments: from the checkpoint)
    try:
        if run.is_main:
            folder = RunDir(run.run_dir)
            atomic_write(folder.config, OmegaConf.to_yaml(cfg, resolve=True).encode())
            if overrides is not None:
                atomic_write(folder.overrides, json.dumps({"overrides": overrides}, indent=2).encode())
        run.logger_id = run.logger.start(run.run_dir, OmegaConf.to_container(cfg, resolve=True), run.logger_id)
        try:
            stages = sparsify_stages(run)  # trainer.sparsify: checked before the first step, run after the last
            run.forgetting_before = loss_before(run)  # trainer.forgetting_eval without an adapter to switch off
            if not train(run):
                return None
            if stages is not None:
                stages()
            run.rank_diff = run.engine.check_in_sync(run.optimizer, run.step)  # identical before rank 0 saves
            return save_outputs(run)
        finally:
            run.logger.finish({"best_" + k: v for k, v in (run.best or {}).items() if k != "split"})
    finally:
        run.engine.end()


def objective(summary: dict[str, Any] | None) -> float | None:
    """The value a tuning sweeper (sweep=optuna_lr) optimises: the final validation metric (the test split is
    never used for tuning), else the final test metric for tasks without a validation split."""
    if not summary:
        return None
    final = summary["final"]
    scores = final.get("validation") or final.get("test") or {}
    value = scores.get(summary["metric"])
    return None if value is None else float(value)


def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        hydra_cfg = HydraConfig.get()
        return objective(run_training(cfg, hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task)))
    except Diverged as diverged:
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # one job of a sweep: a failed trial, the sweep goes on
            log.error("error: %s", diverged)
            return math.nan
        exit_with(diverged)
    except USER_ERRORS as err:  # report here: past this point Hydra adds its own "Error executing job" line
        exit_with(err)
    except interrupt.TrainingInterrupted as stop:
        if stop.is_main:
            log.warning("interrupted at step %d; continue with: %s", stop.step, resume_command(stop.run_dir))
        sys.exit(stop.exit_code)


def resume_command(run_dir: Path) -> str:
    """The command line that continues `run_dir`: this run's own overrides (one job's, in a sweep) plus
    trainer.resume=<run_dir>."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = ["torchrun", f"--nproc_per_node={world}"] if world > 1 else ["python"]
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else sys.argv[1:]
    kept = [arg for arg in overrides if not arg.startswith(RESUME_SET_KEYS)]
    return shlex.join([*launcher, "-m", "vbshare.train", *kept, f"trainer.resume={run_dir}"])


def hydra_quoted(value: str) -> str:
    """A value for a Hydra override, quoted so that any path parses as one string."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def resume_arguments(argv: list[str]) -> list[str]:
    """Command-line overrides for a resumption (`trainer.resume=<dir>`, single run): Hydra's output folder
    becomes the run's own, so the log goes on in <dir>/train.log, the first segment's .hydra/ stays as it was
    and no other folder is created. A folder without a checkpoint is refused before Hydra creates anything."""
    if any(arg in MULTIRUN_FLAGS for arg in argv):
        return argv
    values = [arg.split("=", 1)[1] for arg in argv if arg.startswith("trainer.resume=")]
    if not values or values[-1] in ("", "null"):
        return argv
    resume_dir = Path(values[-1].strip("'\""))
    checkpoints.find_checkpoint(resume_dir)
    if any(arg.startswith(("hydra.run.dir=", "hydra.output_subdir=")) for arg in argv):
        return argv
    return [*argv, f"hydra.run.dir={hydra_quoted(str(resume_dir))}", "hydra.output_subdir=null"]


def quiet_plugin_chatter() -> None:
    """Drop the start-up lines of Hydra's launcher and sweeper plugins (PLUGIN_CHATTER, QUIET_LOGGERS)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, prefixes in PLUGIN_CHATTER.items():
        logging.getLogger(name).addFilter(lambda record, drop=prefixes: not record.getMessage().startswith(drop))


def exit_with(err: BaseException) -> None:
    if os.environ.get("VBSHARE_DEBUG") == "1":
        raise err
    print(f"error: {one_line(err)}", file=sys.stderr)
    sys.exit(2)


def one_line(err: BaseException) -> str:
    """A user-facing one-line message: a VBShareError in the cause chain wins; otherwise Hydra's / OmegaConf's
    message with its lists folded ("options: a, b") and the config-search-path dump dropped."""
    chain, seen = [], err
    while seen is not None:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for candidate in chain:
        if isinstance(candidate, VBShareError):
            return str(candidate)
    texts = [str(chain[-1])] if type(err).__name__ == "InstantiationException" else [str(e) for e in chain[:2]]
    parts: list[str] = []
    for text in texts:
        lines = [line.strip().rstrip(".") for line in text.split("Config search path")[0].splitlines()]
        lines = [line for line in lines if line and not line.startswith(("full_key:", "object_type="))
                 and "$FULL_KEY" not in line]
        for i, line in enumerate(lines):
            if line.endswith(":"):  # Hydra ends with a header and one item per line: fold them
                parts.append(f"{line} {', '.join(lines[i + 1:])}")
                break
            parts.append(line)
    return "; ".join(parts) or type(err).__name__


def main() -> None:
    """Console entry: Hydra app; bad input (composition errors, VBShareError) -> one 'error: ...' line, exit 2.

    HYDRA_FULL_ERROR=1 (or VBSHARE_DEBUG=1) shows full tracebacks instead.
    """
    import hydra

    debug = os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("VBSHARE_DEBUG") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach this function rather than Hydra's report
    if not CONFIG_DIR.is_dir():
        print(f"error: config folder {CONFIG_DIR} not found; vbshare.train needs the repository checkout "
              "(pip install -e .)", file=sys.stderr)
        sys.exit(2)
    app = hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")(_hydra_main)
    quiet_plugin_chatter()
    try:
        sys.argv[1:] = resume_arguments(sys.argv[1:])
        with folders.claim_named(sys.argv[1:]):  # before Hydra writes .hydra/ and train.log into the folder
            app()
    except USER_ERRORS as err:  # composition errors: unknown group option, typo'd key, missing value
        if debug:
            raise
        exit_with(err)
