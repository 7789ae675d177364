"""The run folder: one writer (vbshare.locks) and one run.

    claim(cfg, run_dir)            for `run_training`: hold the folder the run writes, then check it
    claim_named(argv)              the same from the command line, before Hydra writes .hydra/ and train.log
    runs_one_job(argv)             whether a command line runs one job (no --help, --cfg, -m)
    named_value(argv, key)         a `key=value` override of a command line, when it names a folder

The folder a run writes is its `trainer.resume` folder, else the given one. Only the first process of a
data-parallel run holds it (it alone writes). A fresh run (no `trainer.resume`) refuses a folder that already
holds another run's records (rundir.RUN_RECORDS); Hydra's .hydra/ and train.log, a comparison's request.json and the
lock's own files do not count.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig

from .. import locks
from ..errors import VBShareError
from ..rundir import RunDir

BUSY_HINT = "give this run another folder (hydra.run.dir=<folder>)"
# Hydra flags after which no job runs (help, printed config, shell completion) or the jobs get their own
# folders (multirun): the command line claims nothing then.
NO_RUN_FLAGS = ("-m", "--multirun", "-c", "--cfg", "-h", "--help", "--hydra-help", "-i", "--info",
                "-sc", "--shell-completion")


def run_folder(cfg: DictConfig, run_dir: str | Path) -> Path:
    """The folder a run writes: its trainer.resume folder (continued in place), else `run_dir`."""
    return Path(cfg.trainer.resume) if cfg.trainer.resume else Path(run_dir)


def check_fresh(folder: Path) -> None:
    """A fresh run refuses a folder that holds another run's records."""
    found = RunDir(folder).records()
    if found:
        raise VBShareError(f"{folder} already holds a run ({', '.join(found)}); continue it with "
                           f"trainer.resume={folder}, or {BUSY_HINT}")


@contextlib.contextmanager
def _claim(folder: Path, fresh: bool) -> Iterator[Path]:
    with locks.hold(folder, BUSY_HINT) if locks.first_process() else contextlib.nullcontext(folder):
        if fresh:
            check_fresh(folder)
        yield folder


def claim(cfg: DictConfig, run_dir: str | Path) -> contextlib.AbstractContextManager[Path]:
    """Hold the run's folder (first process; again, counted, when the command line already holds it) and check
    that a fresh run starts in a folder without another run; yields the folder."""
    return _claim(run_folder(cfg, run_dir), fresh=not cfg.trainer.resume)


@contextlib.contextmanager
def claim_named(argv: list[str]) -> Iterator[Path | None]:
    """`claim` for a command line that names the run's folder (trainer.resume=..., or hydra.run.dir=... without
    interpolations), taken before Hydra writes anything there; yields None (nothing claimed) otherwise: default
    `${now:...}` folders and sweeps are claimed by `run_training` itself."""
    if not runs_one_job(argv):
        yield None
        return
    resume, run_dir = named_value(argv, "trainer.resume"), named_value(argv, "hydra.run.dir")
    folder = resume or run_dir
    if folder is None:
        yield None
        return
    with _claim(Path(folder), fresh=resume is None) as held:
        yield held


def runs_one_job(argv: list[str]) -> bool:
    """Whether a Hydra command line runs one job (no --help, --cfg, --multirun, ...: NO_RUN_FLAGS)."""
    return not any(arg.split("=", 1)[0] in NO_RUN_FLAGS for arg in argv if arg.startswith("-"))


def named_value(argv: list[str], key: str) -> str | None:
    """The last `key=value` (or `+key=` / `++key=`) of a command line, parsed as Hydra parses it; None when
    absent, null, empty or an interpolation (resolved only by Hydra). Unparsable arguments are left to Hydra."""
    value: Any = None
    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg or arg.split("=", 1)[0].lstrip("+") != key:
            continue
        try:
            (parsed,) = parser.parse_overrides([arg])
        except HydraException:
            continue
        value = parsed.value()
    if value is None or value == "" or "${" in str(value):
        return None
    return str(value)
