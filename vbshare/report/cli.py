"""`python -m vbshare.report <folder> [--out DIR] [--split test|validation] [--control lora]
[--reference LABEL=RUN_DIR ...]`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..errors import VBShareError
from .markdown import write_report
from .runs import collect_runs, split_groups
from .table import DEFAULT_CONTROL


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vbshare.report", description="the side-by-side table and plots of finished runs")
    parser.add_argument("root", help="a comparison or sweep folder, or any folder holding run directories")
    parser.add_argument("--out", help="where to write the report (default <root>/report)")
    parser.add_argument("--split", choices=["test", "validation"], help="score split (default: test, else validation)")
    parser.add_argument("--control", default=DEFAULT_CONTROL, help="method of the paired test's reference runs")
    parser.add_argument("--reference", action="append", default=[], metavar="LABEL=RUN_DIR",
                        help="a finished run whose score is drawn as a labelled line, e.g. zero-shot=runs/untrained "
                             "(repeatable)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.root) / "report"
    try:
        references = {}
        for item in args.reference:
            label, sep, run_dir = item.partition("=")
            if not sep or not label or not run_dir:
                raise VBShareError(f"--reference {item}: give LABEL=RUN_DIR, e.g. --reference zero-shot=runs/untrained")
            if label in references:
                raise VBShareError(f"--reference {label} is given twice; give each reference its own label")
            references[label] = run_dir
        runs = collect_runs(args.root, args.split)
        written = write_report(runs, out, args.control, references)
    except VBShareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        if path.name == "report.md":
            print(path.read_text())
    groups = split_groups(runs)
    configs = sum(runs.loc[g.index, "config_key"].nunique() for g in groups.values())
    where = out if len(groups) == 1 else f"{out} (one folder per task and metric: {len(groups)})"
    print(f"{len(runs)} runs, {configs} configurations; report.md, report.csv and plots in {where}")
    return 0

