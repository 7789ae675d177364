"""`python -m vbshare.compare [model=...] [data=...] [trainer=...] compare.methods=[lora,vblora] ...`

The comparison protocol, read top to bottom: plan -> stage 1 (tuning) -> stage 2 (seeds) -> stage 3 (report).

plan:    one *point* per method in `compare.methods`, or one per size when `compare.sizes` lists that method's
         size values (the knob named by `size_key` in configs/search/<method>.yaml).
stage 1: for every point the same number of Optuna TPE trials (`compare.trials`, sampler seeded with
         `compare.sampler_seed`) over the method's `search` space (configs/search/<method>.yaml), each a training run with
         `trainer.eval_test=false`: scored on the validation split, the test split is never evaluated.
stage 2: the best trial of every point re-run with each of `compare.seeds` (the same seeds for every point: the
         same data order and head init), scored on test; `compare.seeds=N` means seeds 0, 1, ..., N-1.
workers: with `compare.workers=N` (N > 1, separate processes) N runs train at a time: in stage 1 N points are
         tuned side by side (the trials of one point stay sequential: each asks TPE after the last is told), in
         stage 2 N seeded runs. The runs, their folders and every result are the same for any N.
stage 3: vbshare.report over the stage-2 runs, with `compare.control` as the paired test's reference.

The folder (`compare.out`):
  compare.log, .hydra/           this app's log and composed config
  stage1/<point>/trial_<k>/      tuning runs (run directories of vbshare.train) + request.json (its overrides)
  trials.csv                     every trial: point, method, size, trial, state, metric, validation score,
                                 best, run_dir and one column per searched key
  stage2/<point>/trial_<k>/seed_<s>/   the best trial k of each point, one run per seed
  report/                        report.md, report.csv and the plots (vbshare.report)
A point is named after its method, plus its size when sizes are given (`lora-r8`).

One writer: the comparison holds compare.out (vbshare/locks.py: .writer.lock, .writer.json naming the holder) from
before Hydra writes there to the end, so a second comparison into the same folder is refused in one line. A run
directory without a summary (vbshare.rundir) is an attempt that did not finish: it is emptied (all but
request.json) and trained again from the start, so its metrics log and checkpoint are the new attempt's alone.

Continuing: a run directory holding a summary is finished and reused. The trials are re-derived from the
finished runs: a seeded TPE sampler asked again with the same told scores proposes the same parameters, so an
interrupted comparison continues where it stopped and ends as an uninterrupted one would. Each run records
the overrides it was made with (request.json); a run whose request differs (other settings, other search
space) stops the comparison with a message rather than mixing settings.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import hydra
import optuna
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tqdm.auto import tqdm

from . import locks, report
from .checkpoint import atomic_write
from .errors import VBShareError, WriteError
from .rundir import SUMMARY, RunDir
from .search_spaces import check_search, read_search
from .train.app import CONFIG_DIR, USER_ERRORS, exit_with, run_training
from .train.folders import named_value, runs_one_job
from .train.loop import Diverged
from .metrics import higher_is_better
from .train.settings import CompareSettings, Settings, read_settings

log = logging.getLogger("vbshare.compare")

GROUPS = ("model", "data", "optim", "trainer", "logger")  # the config groups forwarded to every run
REQUEST = "request.json"  # the overrides a comparison asked of a run folder (not a run record)
ROOT_KEY = "/"  # a search key starting with it is from the config root (e.g. /optim.full_finetune_lr)
FAILURE_TAIL_LINES = 20  # lines of a failed run's output kept in its failure.txt
CHILD_ENV: dict[str, str] = dict(os.environ)  # the environment runs start in (before main() sets debug flags)
BUSY_HINT = "use another compare.out"


# ======================================================================================================= plan
@dataclass(frozen=True)
class Point:
    """One method at one size: tuned in stage 1, seeded in stage 2."""

    method: str  # the adapter config's name (configs/adapter/<method>.yaml)
    summary_method: str  # the method its runs report in their summary (e.g. full -> full_finetune)
    search: dict[str, dict[str, Any]]  # Optuna space: key -> {low, high, log, step} or {choices}
    size_key: str | None = None
    size: Any = None

    @property
    def name(self) -> str:
        return self.method if self.size is None else f"{self.method}-{self.size_key}{self.size}"

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """The train app's overrides of this point's size and a trial's parameters."""
        fixed = {} if self.size is None else {self.size_key: self.size}
        return [f"+adapter={self.method}", *(override(key, value) for key, value in {**fixed, **params}.items())]


def override(key: str, value: Any) -> str:
    """A Hydra override setting `key` (relative to adapter., or to the root with a leading /) to `value`."""
    path = key[len(ROOT_KEY):] if key.startswith(ROOT_KEY) else f"adapter.{key}"
    return f"++{path}={hydra_value(value)}"


def hydra_value(value: Any) -> str:
    """A value written so that Hydra's override parser reads it back unchanged (floats via repr: exact)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if value is None:
        return "null"
    return json.dumps(str(value))


def base_overrides(cfg: DictConfig) -> list[str]:
    """The overrides every run gets: this app's group choices, then its own key=value overrides except
    compare.*, hydra.* and seed (set per stage)."""
    hydra_cfg = HydraConfig.get()
    forwarded = [f"{group}={hydra_cfg.runtime.choices[group]}" for group in GROUPS]
    for item in hydra_cfg.overrides.task:
        key = item.split("=", 1)[0].lstrip("+~")
        head = key.split(".", 1)[0].split("/", 1)[0]
        if head in GROUPS and "." not in key:  # a group choice: forwarded above
            continue
        if head in ("compare", "hydra", "seed"):
            continue
        forwarded.append(item)
    return forwarded


def adapter_config(method: str, overrides: list[str]) -> DictConfig:
    """configs/adapter/<method>.yaml composed as the train app would (defaults and interpolations applied)."""
    return compose("train", overrides=[*overrides, f"+adapter={method}"]).adapter


def plan(settings: CompareSettings, overrides: list[str]) -> list[Point]:
    """The points of the comparison, in compare.methods order (sizes ascending as given)."""
    sizes = settings.sizes or {}
    points = []
    for method in settings.methods:
        space = read_search(method)
        search, size_key = space.search, space.size_key
        check_search(method, search)
        summary_method = adapter_config(method, overrides).get("method")
        if method not in sizes:
            points.append(Point(method, summary_method, search))
            continue
        if not size_key:
            raise VBShareError(f"compare.sizes gives sizes for {method}, but configs/search/{method}.yaml has no "
                               "size_key naming the knob they set")
        tuned = {k: v for k, v in search.items() if k != size_key}  # a size point fixes the size
        points.extend(Point(method, summary_method, tuned, size_key, size) for size in sizes[method])
    return points


# ==================================================================================================== running
@dataclass
class Runner:
    """Starts one training run (or reuses a finished one) and returns its summary."""

    isolate: bool
    started: int = 0  # runs trained by this invocation (the rest were reused)
    reused: int = 0
    _count_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # workers count side by side

    def run(self, overrides: list[str], run_dir: Path) -> dict[str, Any]:
        check_request(run_dir, overrides)
        if RunDir(run_dir).finished:
            with self._count_lock:
                self.reused += 1
            return RunDir(run_dir).read_summary()
        start_afresh(run_dir)
        atomic_write(run_dir / REQUEST, json.dumps({"overrides": overrides}, indent=2).encode())
        with self._count_lock:
            self.started += 1
        if self.isolate:
            self._subprocess(overrides, run_dir)
        else:
            self._in_process(overrides, run_dir)
        if not RunDir(run_dir).finished:
            raise VBShareError(f"the run in {run_dir} ended without {SUMMARY} (trainer.stop_at_step set?); "
                               "remove that setting and run the comparison again to continue")
        return RunDir(run_dir).read_summary()

    def _subprocess(self, overrides: list[str], run_dir: Path) -> None:
        command = [sys.executable, "-m", "vbshare.train", *overrides, f"hydra.run.dir={hydra_value(str(run_dir))}"]
        done = subprocess.run(command, env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            tail = done.stdout.strip().splitlines()[-FAILURE_TAIL_LINES:]
            atomic_write(run_dir / "failure.txt", ("$ " + " ".join(command) + "\n" + "\n".join(tail) + "\n").encode())
            errors = [line for line in tail if line.startswith("error: ")]
            reason = errors[-1][len("error: "):] if errors else (tail[-1] if tail else f"exit {done.returncode}")
            if Diverged.said_in(reason):
                raise Diverged(f"the run in {run_dir} diverged: {reason}")
            raise VBShareError(f"the run in {run_dir} failed: {reason} (details in {run_dir / 'failure.txt'}); "
                               "fix it and run the comparison again to continue")

    def _in_process(self, overrides: list[str], run_dir: Path) -> None:
        train_log = logging.getLogger("vbshare.train")
        level = train_log.level
        train_log.setLevel(logging.WARNING)  # the progress bar speaks for the runs
        try:
            run_training(compose("train", overrides=overrides), run_dir, overrides)
        finally:
            train_log.setLevel(level)


def start_afresh(run_dir: Path) -> None:
    """Empty the folder of a run that did not finish (all but request.json), so that it trains from the start
    and writes only its own records. The folder is held meanwhile: a training still running there (left behind
    by a killed comparison) stops the comparison in one line instead of being overwritten."""
    if not run_dir.is_dir():
        return
    hint = "end that training, then run the comparison again"
    with locks.hold(run_dir, hint):
        left = sorted(p for p in run_dir.iterdir() if p.name not in (REQUEST, *locks.LOCK_FILES))
        for path in left:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    if left:
        log.info("%s did not finish: trained again from an empty folder", run_dir)


def check_request(run_dir: Path, overrides: list[str]) -> None:
    """A run directory made earlier must have been made with exactly these overrides."""
    path = run_dir / REQUEST
    if not path.is_file():
        return
    before = json.loads(path.read_text())["overrides"]
    if before != overrides:
        changed = sorted(set(before) ^ set(overrides))
        raise VBShareError(f"{run_dir} was made with other settings ({', '.join(changed)}); the search space, "
                           "sampler or settings changed since: use a new compare.out (or restore the settings)")


def validation_score(summary: dict[str, Any], run_dir: Path) -> float:
    """The stage-1 objective: the final validation metric; a test score in a tuning run is refused."""
    final = summary.get("final") or {}
    if "test" in final:
        raise VBShareError(f"the tuning run in {run_dir} evaluated the test split; the train app must honour "
                           "trainer.eval_test=false")
    scores = final.get("validation")
    if not scores or summary.get("metric") not in scores:
        raise VBShareError(f"the run in {run_dir} has no validation {summary.get('metric')}; the comparison tunes "
                           "on the validation split, so the task needs one")
    return float(scores[summary["metric"]])


# ==================================================================================================== stage 1
@dataclass
class Trial:
    point: Point
    number: int
    params: dict[str, Any]
    run_dir: Path
    metric: str | None = None
    score: float = math.nan  # validation metric
    best: bool = False

    @property
    def finite(self) -> bool:
        return math.isfinite(self.score)


def suggest(trial: optuna.trial.Trial, key: str, spec: dict[str, Any]) -> Any:
    """One parameter from a `search` entry: {choices}, an int range, or a float range (log and step optional)."""
    if "choices" in spec:
        return trial.suggest_categorical(key, list(spec["choices"]))
    low, high, log_scale, step = spec["low"], spec["high"], bool(spec.get("log", False)), spec.get("step")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)):
        return trial.suggest_int(key, low, high, step=step or 1, log=log_scale)
    return trial.suggest_float(key, float(low), float(high), step=step, log=log_scale)


def tune(point: Point, settings: CompareSettings, seed: int, overrides: list[str], runner: Runner, out: Path,
         bar: tqdm) -> list[Trial]:
    """compare.trials trials of a seeded TPE study for one point, each a validation-only run with the run seed
    `seed`.

    The study maximises the validation metric times its direction (+1 higher is better, -1 otherwise), so it
    needs no metric name before the first run. Non-finite scores, and runs that diverged (trainer.nonfinite=stop
    ended them), are told as failed trials.
    """
    sampler = optuna.samplers.TPESampler(seed=settings.sampler_seed)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    trials = []
    for number in range(settings.trials):
        asked = study.ask()
        params = {key: suggest(asked, key, spec) for key, spec in point.search.items()}
        run_dir = out / "stage1" / point.name / f"trial_{number:03d}"
        bar.set_postfix_str(f"{point.name} trial {number}")
        request = [*overrides, *point.overrides(params), f"seed={seed}", "trainer.eval_test=false"]
        try:
            summary = runner.run(request, run_dir)
        except Diverged as diverged:  # these parameters make training diverge: a failed trial, TPE moves on
            log.warning("%s trial %d failed: %s", point.name, number, diverged)
            summary = {}
        trial = Trial(point, number, params, run_dir, summary.get("metric"),
                      validation_score(summary, run_dir) if summary else math.nan)
        if trial.finite:
            study.tell(asked, trial.score * (1.0 if higher_is_better(trial.metric) else -1.0))
        else:
            study.tell(asked, state=optuna.trial.TrialState.FAIL)
        trials.append(trial)
        bar.update()
    scored = [t for t in trials if t.finite]
    if not scored:
        raise VBShareError(f"every trial of {point.name} diverged or scored NaN on validation (see {out / 'stage1' / point.name}); "
                           "narrow its search space (learning rates too high?)")
    sign = 1.0 if higher_is_better(scored[0].metric) else -1.0
    max(scored, key=lambda t: (sign * t.score, -t.number)).best = True  # ties: the earliest trial
    return trials


def write_trials(trials: list[Trial], path: Path) -> None:
    """trials.csv: one row per trial, one column per searched key (empty where a point has no such key)."""
    keys = list(dict.fromkeys(k for t in trials for k in t.params))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["point", "method", "size_key", "size", "trial", "metric", "validation_score", "best",
                     "run_dir", *keys])
    for t in trials:
        size = "" if t.point.size is None else t.point.size
        writer.writerow([t.point.name, t.point.method, t.point.size_key or "", size, t.number, t.metric, repr(t.score),
                         t.best, str(t.run_dir), *(t.params.get(k, "") for k in keys)])
    atomic_write(path, buffer.getvalue().encode())


# ==================================================================================================== stage 2
def seeded_run(best: Trial, seed: int, overrides: list[str], runner: Runner, out: Path, bar: tqdm) -> Path:
    """The best trial of a point re-run with one seed of compare.seeds, scored on test."""
    point = best.point
    run_dir = out / "stage2" / point.name / f"trial_{best.number:03d}" / f"seed_{seed}"
    bar.set_postfix_str(f"{point.name} seed {seed}")
    runner.run([*overrides, *point.overrides(best.params), f"seed={seed}"], run_dir)
    bar.update()
    return run_dir


# ==================================================================================================== workers
Job = TypeVar("Job")
Result = TypeVar("Result")


def in_workers(work: Callable[[Job], Result], jobs: Iterable[Job], workers: int) -> list[Result]:
    """work(job) for every job, `workers` at a time (threads that each wait on a training process); results in
    the order of `jobs`. The first failure stops jobs that have not started and is raised once the running
    ones end (their runs finish and are reused by the next invocation)."""
    jobs = list(jobs)
    if workers == 1:
        return [work(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="compare-worker") as pool:
        futures = [pool.submit(work, job) for job in jobs]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


# ====================================================================================================== entry
def compare(cfg: DictConfig) -> Path:
    """The whole protocol for a composed compare config, holding compare.out throughout (one writer); returns
    the report folder. The settings every run shares (trainer, optim, data, seed) and the compare block are
    checked before anything starts. A file that cannot be written (disk full) stops it with one line; running
    it again continues."""
    if cfg.get("adapter") is not None:
        raise VBShareError("vbshare.compare takes its methods from compare.methods; drop +adapter=...")
    settings = read_settings(cfg)
    out = Path(settings.compare.out).resolve()
    try:
        with locks.hold(out, BUSY_HINT):
            return _compare(cfg, settings, out)
    except WriteError as err:  # every write is atomic: finished runs stay reusable
        raise VBShareError(f"{err}; then run the comparison again with compare.out={out}: finished runs are "
                           "reused") from err


def _compare(cfg: DictConfig, settings: Settings, out: Path) -> Path:
    c = settings.compare
    workers = c.workers
    overrides = base_overrides(cfg)
    points = plan(c, overrides)
    runner = Runner(isolate=c.isolate)
    log.info("comparing %d points (%s) in %s: %d trials each, then seeds %s; %d run(s) at a time", len(points),
             ", ".join(p.name for p in points), out, c.trials, c.seeds, workers)

    tuned: dict[str, list[Trial]] = {}  # point name -> its trials, filled as points finish
    lock = threading.Lock()

    def tune_point(point: Point) -> list[Trial]:
        point_trials = tune(point, c, settings.seed, overrides, runner, out, bar)
        with lock:  # trials.csv lists the finished points in plan order, rewritten as each one finishes
            tuned[point.name] = point_trials
            write_trials([t for p in points for t in tuned.get(p.name, [])], out / "trials.csv")
        return point_trials

    with tqdm(total=len(points) * c.trials, desc="stage 1/3 tuning (validation)", unit="run") as bar:
        trials = [t for point_trials in in_workers(tune_point, points, workers) for t in point_trials]

    jobs = [(best, seed) for best in trials if best.best for seed in c.seeds]
    with tqdm(total=len(jobs), desc="stage 2/3 seeds (test)", unit="run") as bar:
        run_dirs = in_workers(lambda job: seeded_run(*job, overrides, runner, out, bar), jobs, workers)

    control = next(p.summary_method for p in points if p.method == c.control)
    runs = report.collect_runs(run_dirs, split="test")
    written = report.write_report(runs, out / "report", control=control)
    log.info("stage 3/3 report: %s", ", ".join(str(p.relative_to(out)) for p in written))
    log.info("%d runs trained, %d reused; folder %s", runner.started, runner.reused, out)
    return out / "report"


def _hydra_main(cfg: DictConfig) -> None:
    try:
        folder = compare(cfg)
    except USER_ERRORS as err:
        exit_with(err)
    print(f"report in {folder}")


def main() -> None:
    """Console entry; bad input -> one 'error: ...' line and exit 2 (HYDRA_FULL_ERROR=1 shows tracebacks)."""
    debug = os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("VBSHARE_DEBUG") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach this function rather than Hydra's report
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    app = hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="compare")(_hydra_main)
    try:
        out = named_value(sys.argv[1:], "compare.out") if runs_one_job(sys.argv[1:]) else None
        # held before Hydra writes .hydra/ and compare.log there (a default ${now} folder: by compare())
        with locks.hold(out, BUSY_HINT) if out is not None else contextlib.nullcontext():
            app()
    except USER_ERRORS as err:
        if debug:
            raise
        exit_with(err)


if __name__ == "__main__":
    main()
