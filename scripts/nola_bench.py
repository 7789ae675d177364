"""NOLA's basis handling, measured: one training step of a stack of square linear layers.

    python scripts/nola_bench.py --size 4096 --layers 8 --hp '{"bases": "chunked"}'

A stack of `--layers` nn.Linear(size, size) (random frozen weights), NOLA on every layer with k = l = 1024, r = 8
unless --hp says otherwise; one input batch of `--tokens` rows. Reported (one JSON line): the time to inject, the
time of one training step (forward, backward, AdamW step; the second step, so AdamW's states exist), and the peak
of tensor bytes during a third step measured by torch's profiler (plan_check.py's method) plus the bytes the
model holds (base weights, coefficients, cached bases). `--memory rss` reports the process's peak resident memory
instead (everything it held, Python and the base weights included): cruder, but without the profiler, whose event
record itself grows large when chunked bases make thousands of small tensors.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from torch import nn

import vbshare

CHECK = Path(__file__).with_name("plan_check.py")


def load_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_check", CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Stack(nn.Module):
    """`layers` square linear layers applied in turn: x (tokens, size) -> (tokens, size)."""

    def __init__(self, size: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(size, size) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hp", default="{}", help="NOLA hyperparameters as JSON, over k = l = 1024, r = 8")
    parser.add_argument("--memory", choices=["profiler", "rss"], default="profiler",
                        help="peak tensor bytes of a third step (torch profiler) or the process's peak RSS")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Stack(args.size, args.layers)
    hp = {"r": 8, "num_basis_a": 1024, **json.loads(args.hp)}
    started = time.perf_counter()
    vbshare.inject(model, "nola", targets="all-linear", **hp)
    inject_s = time.perf_counter() - started
    optimizer = torch.optim.AdamW(vbshare.param_groups(model, lr=1e-3))
    x = torch.randn(args.tokens, args.size)

    def step() -> None:
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    started = time.perf_counter()
    step()
    step_s = time.perf_counter() - started
    if args.memory == "rss":
        memory = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}  # KiB -> GiB
    else:
        check = load_check()
        held = check.held_bytes(model)
        peak = held + check.peak_during(step)
        memory = {"held_gib": round(held / 2**30, 3), "peak_gib": round(peak / 2**30, 3)}
    print(json.dumps({"size": args.size, "layers": args.layers, "tokens": args.tokens, "hp": hp,
                      "inject_s": round(inject_s, 2), "step_s": round(step_s, 2), **memory}))


if __name__ == "__main__":
    main()
