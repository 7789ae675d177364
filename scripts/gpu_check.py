#!/usr/bin/env python
"""The Python steps of scripts/gpu_check.sh (that script runs them; each can also run alone).

    python scripts/gpu_check.py write-data OUT/chat.jsonl            # a tiny instruction JSONL (prompt/response)
    python scripts/gpu_check.py nola-memory --device cuda --json OUT/nola.json   # one step's peak, per NOLA path
    python scripts/gpu_check.py plan-vs-measured RUN_DIR --json OUT/plan.json -- <the run's overrides, model=hf ...>
    python scripts/gpu_check.py collect OUT                           # OUT/results.md + OUT/results.json

Exit status 3 means "skipped" (the feature is not in this vbshare; the reason is printed), which the shell
script records as such rather than as a failure.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

SKIPPED = 3  # exit status: the step does not apply to this vbshare
MIB = 2**20


def skip(reason: str) -> None:
    print(f"skipped: {reason}")
    sys.exit(SKIPPED)


# -- write-data ----------------------------------------------------------------------------------------------
def write_data(path: Path, rows: int = 96) -> None:
    """Arithmetic questions and their answers: instruction data whose loss can fall within a few dozen steps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(rows):
        a, b = 3 + (7 * i) % 41, 2 + (5 * i) % 23
        lines.append(json.dumps({"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}))
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {rows} prompt/response rows to {path}")


# -- nola-memory ---------------------------------------------------------------------------------------------
def nola_paths() -> dict[str, dict]:
    """NOLA's ways of holding its random bases in this vbshare, as inject hyperparameters: cached and drawn
    again every pass (cache_bases), and a chunked path when the config has one (a field naming chunks, or
    GPU_CHECK_NOLA_CHUNKED="key=value,..." to name it)."""
    from vbshare.registry import METHODS

    if "nola" not in METHODS:
        skip("no NOLA registered in this vbshare")
    fields = {f.name: f for f in dataclasses.fields(METHODS["nola"].config_class)}
    paths = {}
    if "cache_bases" in fields:
        paths = {"cached": {"cache_bases": True}, "redrawn": {"cache_bases": False}}
    named = os.environ.get("GPU_CHECK_NOLA_CHUNKED")
    if named:
        chunked = {}
        for pair in named.split(","):
            key, _, value = pair.partition("=")
            chunked[key.strip()] = json.loads(value) if value.strip()[:1] in "0123456789-tfn[{\"" else value
        paths["chunked"] = chunked
    else:
        for name, field in fields.items():
            if "chunk" not in name:
                continue
            default = field.default
            if isinstance(default, bool) or field.type in ("bool", bool):
                paths["chunked"] = {name: True}
            elif isinstance(default, int) or field.type in ("int", "int | None"):
                paths["chunked"] = {name: default or 64}
            break
    if "chunked" not in paths:
        print("note: this vbshare's NOLA has no chunked path (no config field naming chunks); measuring "
              f"{', '.join(paths) or 'its default path'} only")
    return paths or {"default": {}}


class Stack(nn.Module):
    """`layers` frozen width × width linears one after another (x (tokens, width) -> (tokens, width))."""

    def __init__(self, width: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def nola_memory(device: torch.device, width: int, layers: int, bases: int, tokens: int, out: Path) -> None:
    """Peak memory and time of one training step (forward, backward, AdamW) of NOLA on every linear layer of a
    stack of `layers` frozen width × width linears, for each of NOLA's paths."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench import cuda_step_peak, rss_step_peak, track_resident_memory

    import vbshare

    rows = []
    for path, extra in nola_paths().items():
        torch.manual_seed(0)
        model = Stack(width, layers).to(device)
        vbshare.inject(model, "nola", targets="all-linear", r=8, num_basis_a=bases, num_basis_b=bases, **extra)
        optimizer = torch.optim.AdamW(vbshare.param_groups(model, lr=1e-3))
        x = torch.randn(tokens, width, device=device)

        def step() -> None:
            model(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up (and the cached path's first draw)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            held = torch.cuda.memory_allocated(device)  # the model, its cached bases, the optimiser state
            start = time.perf_counter()
            peak = cuda_step_peak(step, device) + held
        else:
            held = None
            start = time.perf_counter()
            peak = rss_step_peak(step) if track_resident_memory() else None
        seconds = time.perf_counter() - start
        rows.append({"path": path, "hyperparameters": extra, "peak_mib": None if peak is None else round(peak / MIB, 1),
                     "held_mib": None if held is None else round(held / MIB, 1), "step_s": round(seconds, 4)})
        print(json.dumps(rows[-1]))
        del model, optimizer, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"device": device_name(device), "width": width, "layers": layers, "bases": bases, "tokens": tokens,
              "memory": "cuda max_memory_allocated" if device.type == "cuda" else "cpu peak RSS of the step",
              "rows": rows}
    out.write_text(json.dumps(result, indent=2))


# -- plan-vs-measured ----------------------------------------------------------------------------------------
def plan_vs_measured(run_dir: Path, overrides: list[str], out: Path) -> None:
    """The planner's estimate (`vbshare.plan.plan`) for the run's settings against the peak the run measured."""
    if importlib.util.find_spec("vbshare.plan") is None:
        skip("this vbshare has no planner (vbshare.plan)")
    from vbshare.plan import plan

    summary = json.loads((run_dir / "summary.json").read_text())
    plans, assumed = plan(overrides)
    rows = [{"method": p.method, "estimate_mib": round(p.total / MIB, 1), "weights_mib": round(p.weights / MIB, 1),
             "adapter_mib": round(p.adapter / MIB, 1), "activations_mib": round(p.activations / MIB, 1),
             "measured_mib": summary.get("peak_memory_mb"), "error": p.error} for p in plans]
    for row in rows:
        if row["measured_mib"]:
            row["estimate_over_measured"] = round(row["estimate_mib"] / row["measured_mib"], 3)
        print(json.dumps(row))
    out.write_text(json.dumps({"assumed": assumed, "device": summary.get("device"), "rows": rows}, indent=2))


# -- collect -------------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _table(header: list[str], rows: list[list]) -> list[str]:
    cell = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]]


def collect(out: Path) -> None:
    """One results.md (tables) and results.json (everything) from what the steps left in `out`."""
    read = lambda name: json.loads((out / name).read_text()) if (out / name).is_file() else None  # noqa: E731
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()] \
        if (out / "steps.jsonl").is_file() else []
    runs = {}
    for summary_file in sorted((out / "runs").glob("*/summary.json")):
        summary = json.loads(summary_file.read_text())
        runs[summary_file.parent.name] = {k: summary.get(k) for k in (
            "method", "model", "base_quantization", "precision", "device", "steps", "final", "peak_memory_mb",
            "steps_per_s", "train_time_s", "trainable_parameters")}
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry_run": os.environ.get("GPU_CHECK_DRY") == "1",
               "device": device_name(torch.device("cuda")) if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "steps": steps, "runs": runs, "bench": read("bench.json"),
               "nola": read("nola.json"), "plan": read("plan.json")}
    (out / "results.json").write_text(json.dumps(results, indent=2))

    lines = [f"# GPU check — {results['device']}" + (" (dry run: CPU, toy sizes)" if results["dry_run"] else ""),
             "", f"{results['date']}, torch {results['torch']}", "", "## Steps", ""]
    lines += _table(["step", "status", "seconds"], [[s["name"], s["status"], s["seconds"]] for s in steps])
    if runs:
        lines += ["", "## Training runs", ""]
        rows = []
        for name, r in runs.items():
            final = r["final"] or {}
            split = "test" if "test" in final else "validation"
            scores = final.get(split) or {}
            rows.append([name, r["model"], r["base_quantization"], r["precision"], r["steps"],
                         scores.get("loss"), r["peak_memory_mb"], r["steps_per_s"]])
        lines += _table(["run", "model", "quantization", "precision", "steps", "final loss", "peak MiB", "steps/s"],
                        rows)
    bench = results["bench"]
    if bench:
        lines += ["", f"## Bench ({bench.get('device')})", ""]
        for run in bench.get("training", []):
            lines += [f"Adapters — {run.get('model')} batch {run.get('batch')} x {run.get('seq')}", ""]
            med, mem = run.get("median_s", {}), run.get("peak_bytes", {})
            lines += _table(["variant", "step ms", "peak MiB"],
                            [[k, t * 1e3, None if mem.get(k) is None else mem[k] / MIB] for k, t in med.items()])
            lines.append("")
        engine = bench.get("engine")
        if engine:
            lines += [f"Engine — {engine['model']} batch {engine['batch']} x {engine['seq']}", ""]
            mem = engine["peak_bytes"]
            lines += _table(["method + configuration", "step ms", "peak MiB"],
                            [[k, t * 1e3, None if mem.get(k) is None else mem[k] / MIB]
                             for k, t in engine["median_s"].items()])
    nola = results["nola"]
    if nola:
        lines += ["", f"## NOLA paths — {nola['layers']} × ({nola['width']} × {nola['width']}), k = l = "
                      f"{nola['bases']}, {nola['tokens']} tokens ({nola['memory']})", ""]
        lines += _table(["path", "hyperparameters", "peak MiB", "held MiB", "step s"],
                        [[r["path"], json.dumps(r["hyperparameters"]), r["peak_mib"], r["held_mib"], r["step_s"]]
                         for r in nola["rows"]])
    planned = results["plan"]
    if planned:
        lines += ["", "## Planner estimate vs measured peak", ""]
        lines += _table(["method", "estimate MiB", "measured MiB", "estimate / measured"],
                        [[r["method"], r["estimate_mib"], r["measured_mib"], r.get("estimate_over_measured")]
                         for r in planned["rows"]])
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("write-data")
    data.add_argument("path", type=Path)
    nola = commands.add_parser("nola-memory")
    nola.add_argument("--device", default="cuda")
    nola.add_argument("--width", type=int, default=4096)
    nola.add_argument("--layers", type=int, default=8)
    nola.add_argument("--bases", type=int, default=1024, help="k = l")
    nola.add_argument("--tokens", type=int, default=512)
    nola.add_argument("--json", type=Path, required=True)
    planned = commands.add_parser("plan-vs-measured")
    planned.add_argument("run_dir", type=Path)
    planned.add_argument("--json", type=Path, required=True)
    planned.add_argument("overrides", nargs="*", help="after --: the training app's overrides, with model=hf")
    gather = commands.add_parser("collect")
    gather.add_argument("out", type=Path)
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []  # hydra overrides pass through untouched
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.command == "plan-vs-measured":
        args.overrides = [*args.overrides, *overrides]
    if args.command == "write-data":
        write_data(args.path)
    elif args.command == "nola-memory":
        nola_memory(torch.device(args.device), args.width, args.layers, args.bases, args.tokens, args.json)
    elif args.command == "plan-vs-measured":
        plan_vs_measured(args.run_dir, args.overrides, args.json)
    else:
        collect(args.out)


if __name__ == "__main__":
    main()
