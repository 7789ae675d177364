#!/usr/bin/env python
"""Adapter overhead, side by side, in ONE process with interleaved measurements (issue 8).

For every model shape and batch size, each measurement round runs one training step (forward + backward +
AdamW step + the method's after-step hook) of every variant, in a rotating order, so background load hits
all variants alike; the table reports medians over the rounds. Variants:

* floor       — the frozen base; the input embeddings require grad, so gradients flow back through every
                layer but no weight gets a gradient (the least work an adapter in every layer must cause)
* lora, vblora, aslora, sora — vbshare, on the same targets and rank
* peft-lora, peft-vblora     — Hugging Face PEFT on the same targets, rank (and VB-LoRA bank)

Also: peak memory of one training step (CUDA: `max_memory_allocated` above what was allocated before the
step; CPU: an estimate = bytes saved for backward (distinct storages, frozen weights excluded) + 4 × the
trainable bytes (weight, grad, two AdamW moments)), and merged-inference latency of every vbshare method
against the base model (no grad, eval mode).

    python scripts/bench.py --quick                       # a few minutes on CPU
    python scripts/bench.py --device cuda --repeats 20    # on a GPU
    python scripts/bench.py --inference-only --models bert-base --inference-repeats 30
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import vbshare
from vbshare.train import train_step

TARGETS = ["query", "key", "value", "output.dense", "intermediate.dense"]  # every linear layer of the encoder
OURS = ["lora", "vblora", "aslora", "sora"]
PEFT = ["peft-lora", "peft-vblora"]
MINILM_SHAPE = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
BERT_BASE_SHAPE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


# -- models -------------------------------------------------------------------------------------------------
def bert_config(name: str):
    from transformers import BertConfig

    shape = MINILM_SHAPE if name == "minilm" else BERT_BASE_SHAPE
    if name == "minilm":
        try:  # the real MiniLM-L6 config when its package is installed (weights are irrelevant to timing)
            from vbshare.assets import minilm_dir

            config = BertConfig.from_pretrained(str(minilm_dir()))
            config.vocab_size = min(config.vocab_size, 30522)
            return config
        except Exception:  # noqa: BLE001 — fall back to the documented shape
            pass
    return BertConfig(vocab_size=30522, **shape)


def build_base(name: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import BertModel

    torch.manual_seed(0)
    model = BertModel(bert_config(name), add_pooling_layer=False).to(device=device, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.train()


def shared_copy(base: nn.Module) -> nn.Module:
    """A structural copy that shares the frozen weights (so seven variants cost one model's memory)."""
    memo = {id(t): t for t in (*base.parameters(), *base.buffers())}
    return copy.deepcopy(base, memo=memo)


def vector_length(hidden: int, intermediate: int) -> int:
    return 256 if hidden % 256 == 0 and intermediate % 256 == 0 else 128


def build_variant(variant: str, base: nn.Module, rank: int, b: int) -> nn.Module:
    model = shared_copy(base)
    if variant == "floor":
        return model
    if variant in OURS:
        extra = dict(num_vectors=256, vector_length=b, topk=2) if variant == "vblora" else {}
        return vbshare.inject(model, variant, targets=TARGETS, r=rank, **extra).train()
    import peft

    if variant == "peft-lora":
        config = peft.LoraConfig(target_modules=TARGETS, r=rank, lora_alpha=rank, lora_dropout=0.0)
    else:
        config = peft.VBLoRAConfig(target_modules=TARGETS, r=rank, num_vectors=256, vector_length=b, topk=2)
    return peft.get_peft_model(model, config).train()


# -- one training step --------------------------------------------------------------------------------------
class Runner:
    def __init__(self, variant: str, model: nn.Module, ids: torch.Tensor, lr: float = 1e-4):
        self.variant, self.model, self.ids = variant, model, ids
        self.step_no = 0
        if variant == "floor":
            embeds = model.embeddings.word_embeddings(ids).detach()
            self.embeds = embeds.requires_grad_(True)
            self.optimizer = None
        else:
            groups = vbshare.param_groups(model, lr=lr) if variant in OURS else [
                {"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
            self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)

    def trainable_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)

    def step(self) -> None:
        if self.variant == "floor":
            out = self.model(inputs_embeds=self.embeds).last_hidden_state
            out.float().pow(2).mean().backward()
            self.embeds.grad = None
            return
        self.step_no += 1
        train_step(self.model, self.optimizer, lambda: self.model(input_ids=self.ids).last_hidden_state.float().pow(2).mean(),
                   self.step_no)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def peak_memory(runner: Runner, device: torch.device) -> int:
    """Bytes one training step needs on top of the frozen model (see the module docstring)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        runner.step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before + 3 * runner.trainable_bytes()  # + weight, AdamW m, v
    frozen = {p.untyped_storage().data_ptr() for p in runner.model.parameters() if not p.requires_grad}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in frozen and not (isinstance(t, nn.Parameter) and t.requires_grad):
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        runner.step()
    return sum(saved.values()) + 4 * runner.trainable_bytes()


# -- the benchmark ------------------------------------------------------------------------------------------
def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def bench_training(name, base, variants, batch, seq, args, device, progress) -> dict:
    cfg = base.config
    b = vector_length(cfg.hidden_size, cfg.intermediate_size)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(batch),
                        ).to(device)
    runners = {v: Runner(v, build_variant(v, base, args.rank, b), ids) for v in variants}
    for runner in runners.values():  # warm-up: allocator, AdamW state, lazy init
        for _ in range(args.warmup):
            runner.step()
    # the memory step is untimed, so with --warmup 0 it is the warm-up (the CPU estimate counts AdamW's
    # state analytically; on CUDA use --warmup >= 1 so the moments exist before the measured step)
    memory = {v: peak_memory(r, device) for v, r in runners.items()}
    times: dict[str, list[float]] = {v: [] for v in variants}
    order = list(variants)
    for round_no in range(args.repeats):
        shift = round_no % len(order)
        for v in order[shift:] + order[:shift]:  # rotate, so no variant always runs right after another
            times[v].append(timed(runners[v].step, device))
            progress.update(1)
    trainable = {v: sum(p.numel() for p in r.model.parameters() if p.requires_grad) for v, r in runners.items()}
    del runners
    return {"model": name, "batch": batch, "seq": seq, "vector_length": b,
            "median_s": {v: median(t) for v, t in times.items()}, "times_s": times,
            "peak_bytes": memory, "trainable": trainable}


@torch.no_grad()
def bench_inference(name, base, methods, batch, seq, args, device, progress) -> dict:
    cfg = base.config
    b = vector_length(cfg.hidden_size, cfg.intermediate_size)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(7)).to(device)
    models = {"base": base.eval()}
    for method in methods:
        torch.manual_seed(1)
        model = copy.deepcopy(base)  # merging writes into the weights: own copy
        extra = dict(num_vectors=256, vector_length=b, topk=2) if method == "vblora" else {}
        vbshare.inject(model, method, targets=TARGETS, r=args.rank, **extra)
        vbshare.merge(model)
        models[method] = model.eval()
    for model in models.values():
        for _ in range(max(1, args.warmup)):  # a forward pass is cheap next to a training step
            model(input_ids=ids)
    times: dict[str, list[float]] = {k: [] for k in models}
    order = list(models)
    for round_no in range(args.inference_repeats):
        shift = round_no % len(order)
        for k in order[shift:] + order[:shift]:
            times[k].append(timed(lambda: models[k](input_ids=ids), device))
            progress.update(1)
    base.train()
    return {"model": name, "batch": batch, "seq": seq, "median_s": {k: median(t) for k, t in times.items()},
            "times_s": times}


def print_tables(results: dict) -> None:
    for run in results["training"]:
        med, mem = run["median_s"], run["peak_bytes"]
        floor, lora = med.get("floor"), med.get("lora")
        print(f"\nTraining step — {run['model']}, batch {run['batch']} x {run['seq']} "
              f"(median of {len(next(iter(run['times_s'].values())))}, {results['device']})")
        print(f"{'variant':<12} {'step ms':>9} {'x floor':>8} {'x lora':>7} {'peak MiB':>9} {'x lora mem':>10} "
              f"{'trainable':>11}")
        for v, t in med.items():
            xf = f"{t / floor:.3f}" if floor else "-"
            xl = f"{t / lora:.3f}" if lora and v != "floor" else "-"
            xm = f"{mem[v] / mem['lora']:.3f}" if "lora" in mem and v != "floor" else "-"
            print(f"{v:<12} {t * 1e3:>9.1f} {xf:>8} {xl:>7} {mem[v] / 2**20:>9.1f} {xm:>10} {run['trainable'][v]:>11,}")
    for run in results["inference"]:
        med = run["median_s"]
        print(f"\nMerged inference — {run['model']}, batch {run['batch']} x {run['seq']} "
              f"(no grad, median of {len(run['times_s']['base'])})")
        print(f"{'model':<12} {'ms':>9} {'x base':>8}")
        for k, t in med.items():
            print(f"{k:<12} {t * 1e3:>9.1f} {t / med['base']:>8.3f}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--models", default="minilm,bert-base", help="comma list of minilm, bert-base")
    parser.add_argument("--batch-sizes", default="4,16")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved measurement rounds")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", default="floor,lora,vblora,aslora,sora,peft-lora,peft-vblora")
    parser.add_argument("--no-inference", action="store_true", help="skip the merged-inference comparison")
    parser.add_argument("--inference-only", action="store_true", help="only the merged-inference comparison")
    parser.add_argument("--inference-repeats", type=int, default=None,
                        help="rounds of the (cheap) merged-inference comparison; default max(10, --repeats)")
    parser.add_argument("--quick", action="store_true",
                        help="short CPU run: at most 3 rounds, no separate warm-up step (the untimed memory step "
                             "warms up), merged inference at batch 1")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    parser.add_argument("--json", default="results/bench.json", help="where to write all timings")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    variants = [v for v in args.variants.split(",") if v]
    try:
        import peft  # noqa: F401
    except ImportError:
        variants = [v for v in variants if not v.startswith("peft")]
        print("peft is not installed: the PEFT variants are skipped", file=sys.stderr)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    plan = [(name, b, args.seq_len) for name in args.models.split(",") for b in sorted(batches, reverse=True)]
    inference_batch = 1 if args.quick else min(batches)
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 3), 0
    if args.inference_repeats is None:
        args.inference_repeats = max(10, args.repeats)
    if args.inference_only:
        variants, args.no_inference = [], False

    from tqdm import tqdm

    steps = sum(args.repeats * len(variants) for _ in plan)
    steps += 0 if args.no_inference else len({m for m, _, _ in plan}) * args.inference_repeats * (1 + len(OURS))
    results = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
               "dtype": args.dtype, "torch": torch.__version__, "python": platform.python_version(),
               "threads": torch.get_num_threads(), "rank": args.rank, "targets": TARGETS,
               "repeats": args.repeats, "inference_repeats": args.inference_repeats, "warmup": args.warmup,
               "training": [], "inference": []}
    bases: dict[str, nn.Module] = {}
    with tqdm(total=steps, desc="bench", unit="step", file=sys.stderr) as progress:
        for name, batch, seq in plan:
            base = bases.setdefault(name, build_base(name, device, dtype))
            if not variants:
                continue
            progress.set_postfix_str(f"{name} {batch}x{seq}")
            results["training"].append(bench_training(name, base, variants, batch, seq, args, device, progress))
            write_json(results, args.json)  # partial results survive an interrupted run
        if not args.no_inference:
            for name in dict.fromkeys(m for m, _, _ in plan):
                progress.set_postfix_str(f"{name} merged inference {inference_batch}x{args.seq_len}")
                results["inference"].append(bench_inference(
                    name, bases[name], OURS, inference_batch, args.seq_len, args, device, progress))
                write_json(results, args.json)
    print_tables(results)
    print(f"\nwrote {write_json(results, args.json)}")
    return results


def write_json(results: dict, where: str) -> Path:
    path = Path(where)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    return path


if __name__ == "__main__":
    main()
