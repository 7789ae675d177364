"""The planner's memory estimate against a measured peak: `python scripts/plan_check.py OVERRIDES...`

    python scripts/plan_check.py model=hf model.loader.name=$HOME/.cache/vbshare/smollm2-135m-fp32 data=bbc_lm \\
        +adapter=lora trainer.batch_size=4 data.max_length=256

The same overrides go to `vbshare.plan` (the estimate, from config.json on the meta device) and to one measured
training step of the real model, loaded from the folder with its weights: forward (with the loss), backward,
AdamW step, on the CPU (or trainer.device=cuda). Measured: the bytes of every tensor the model holds before the step
plus the peak of the tensor bytes allocated during it, from torch's profiler (its memory timeline: every
allocation and free, no allocator caching or fragmentation). Prints one JSON line: estimate, measured, ratio.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Sequence

import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action, MemoryProfile

import vbshare
from vbshare.plan import PROCESSES_KEY, compose, config_file, plan
from vbshare.train.modes import inject_arguments
from vbshare.train.setup import enable_activation_checkpointing


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's tensors (parameters and buffers), each storage once."""
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in (*model.parameters(), *model.buffers())}
    return sum(storages.values())


def peak_during(step) -> int:
    """The highest number of tensor bytes allocated at once while `step()` runs, above what was live before."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    live = peak = 0
    for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
        live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak


def measure(overrides: Sequence[str]) -> dict[str, Any]:
    """One training step of the configured model and adapter: {"held": bytes before, "peak": held + step's peak}."""
    from transformers import AutoModelForCausalLM

    cfg = compose([o for o in overrides if not o.startswith(PROCESSES_KEY)])
    t = cfg.trainer
    device = torch.device("cuda" if str(t.device).startswith("cuda") else "cpu")
    model = AutoModelForCausalLM.from_pretrained(str(config_file(str(cfg.model.loader.name)).parent),
                                                 dtype=torch.float32).to(device)
    vbshare.inject(model, cfg.adapter.method, **inject_arguments(cfg.adapter))
    if t.activation_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW(vbshare.param_groups(model, lr=1e-4))
    ids = torch.randint(0, model.config.vocab_size, (t.batch_size, cfg.data.max_length), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)

    def step() -> None:
        with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    held = held_bytes(model)
    return {"held": held, "peak": held + peak_during(step)}


def main(argv: Sequence[str]) -> None:
    torch.set_num_threads(1)
    (estimate,), assumed = plan(argv)
    measured = measure(argv)
    print(json.dumps({**assumed, "method": estimate.method, "estimate_gib": round(estimate.total / 2**30, 4),
                      "measured_gib": round(measured["peak"] / 2**30, 4),
                      "estimate/measured": round(estimate.total / measured["peak"], 3)}))


if __name__ == "__main__":
    main(sys.argv[1:])
