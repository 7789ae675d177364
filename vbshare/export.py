"""Write a finished training run's adapter as a folder that PEFT loads.

    python -m vbshare.export run_dir=RUN out=FOLDER [as_lora=true] [topk_only=true] [check_base=false]

    export_run(run_dir, out, as_lora=False, topk_only=False, check_base=True) -> Path

The run folder is read as data, as `vbshare.evaluate` reads it (and through its code): the config composed again
from the project's configs/ with the run's recorded overrides, a fresh base built as the training app builds it,
and the run's `adapter/` (safetensors and JSON, with the task head) loaded onto it. `vbshare.export_peft` then
writes FOLDER: PEFT's own type where PEFT has the method, a plain LoRA otherwise or with `as_lora=true`
(VB-LoRA's top-k form with `topk_only=true`); the task head goes along as PEFT's `modules_to_save`. Load it with
`PeftModel.from_pretrained(base, FOLDER)`. Nothing in the run folder is written; FOLDER must be new or empty.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from .adapters.base import adapters
from .errors import VBShareError
from .evaluate import check_outside, parse_overrides, rebuild_trained, run_config
from .peft import export_peft
from .train.app import USER_ERRORS, exit_with
from .train.engine import Engine
from .train.settings import read_settings

log = logging.getLogger("vbshare.export")

FLAGS = ("as_lora", "topk_only", "check_base")  # true/false options; with run_dir and out, every key this app takes
KEYS = ("run_dir", "out", *FLAGS)


def check_out(out: Path, run_dir: Path) -> None:
    check_outside(out, run_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VBShareError(f"{out} already exists and is not an empty folder; choose a new out= folder")


def export_run(run_dir: str | Path, out: str | Path, as_lora: bool = False, topk_only: bool = False,
               check_base: bool = True) -> Path:
    """Export the adapter of the finished run in `run_dir` into the PEFT folder `out`; returns `out`."""
    run_dir, out = Path(run_dir), Path(out)
    check_out(out, run_dir)
    cfg = run_config(run_dir)
    engine = Engine(read_settings(cfg).trainer)
    try:
        _, model, _, _ = rebuild_trained(cfg, run_dir, engine, check_base)
    finally:
        engine.end()
    if not adapters(model):
        kind = OmegaConf.select(cfg, "adapter.method", default=None) or "no adapter: full fine-tuning"
        raise VBShareError(f"the run in {run_dir} trained no adapter (method {kind}); only a run with an adapter "
                           "exports to PEFT")
    return export_peft(model.cpu(), out, topk_only=topk_only, as_lora=as_lora)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry: the folder written on stdout; bad input -> one `error: ...` line and exit status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in args):
        print(__doc__.strip())
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        given = {o.key_or_group: o.value() for o in parse_overrides(args)}
        unknown = sorted(set(given) - set(KEYS))
        if unknown:
            raise VBShareError(f"unknown key {unknown[0]}; vbshare.export takes {', '.join(KEYS)}")
        for key in ("run_dir", "out"):
            if not given.get(key):
                raise VBShareError(f"{key}= is required: python -m vbshare.export run_dir=RUN out=FOLDER")
        flags = {key: given.get(key, key == "check_base") for key in FLAGS}
        for key, value in flags.items():
            if not isinstance(value, bool):
                raise VBShareError(f"{key} must be true or false, got {value!r}")
        folder = export_run(str(given["run_dir"]), str(given["out"]), **flags)
    except USER_ERRORS as err:
        exit_with(err)
    print(folder)


if __name__ == "__main__":
    main()
