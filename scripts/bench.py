#!/usr/bin/env python
"""Speed and memory of vbshare's adapters, side by side, in ONE process with interleaved measurements.

Every measurement round runs one training step of every variant, in a rotating order, so background load hits
all variants alike; the tables report medians over the rounds. Three parts (--parts, default all three):

adapters   Training step (forward + backward + AdamW step + the method's after-step hook, through
           vbshare.train.train_step) on MiniLM-L6 and BERT-base shapes (random weights), every encoder linear
           layer adapted. Variants: the floor (the frozen base; the input embeddings require grad, so gradients
           flow back through every layer but no weight gets one: the least work an adapter in every layer
           must cause), every method in vbshare's registry, and Hugging Face PEFT's LoRA, VB-LoRA, VeRA,
           Uni-LoRA, RandLoRA, PVeRA and TinyLoRA on the same targets with the same sizes. Each method runs at its
           bench size (printed with the table). A method with a bench size but no registration here is skipped
           with a note.
           Peak memory: CUDA max_memory_allocated during the step above what was allocated before it, plus
           the adapter's weight and AdamW moments; on CPU an ESTIMATE: distinct storages saved for backward
           (frozen weights excluded) + 4 x the trainable bytes (weight, gradient, two AdamW moments).
inference  Merged-inference latency of every registered method against the base model (no grad, eval mode).
engine     The training app's paths on SmolLM2-135M (causal LM, the embedded model): LoRA and VB-LoRA with
           fp32 vs bf16 autocast (what Accelerate's mixed_precision=bf16 runs), with and without activation
           checkpointing (transformers' non-reentrant gradient checkpointing), with and without torch.compile;
           step time and peak memory as ratios against the same method in fp32. Peak memory: CUDA as above;
           on CPU the process's peak resident memory (VmHWM, reset before the step) above its resident memory
           before the step, plus the adapter's weight and AdamW moments; large allocations are mmap'ed so freed
           tensors leave the resident set. CPU bf16 timings do not predict GPU ones.

    python scripts/bench.py --quick --threads 1            # CPU: small shapes, 3 rounds; 5-10 min, mostly compiling
    python scripts/bench.py --device cuda --repeats 20     # the full bench on a GPU
    python scripts/bench.py --parts inference --models bert-base --batch-sizes 1 --inference-repeats 30
    python scripts/bench.py --parts engine --engine-configs fp32,bf16,bf16+ckpt+compile

Everything measured is also written as JSON (--json).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import vbshare
from vbshare.registry import METHODS
from vbshare.train import train_step
from vbshare.train.setup import enable_activation_checkpointing

TARGETS = ["query", "key", "value", "output.dense", "intermediate.dense"]  # every linear layer of the encoder
MINILM_SHAPE = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
BERT_BASE_SHAPE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
VBLORA_VECTORS, VBLORA_TOPK = 256, 2  # the bank's h and k in every VB-LoRA variant (ours and PEFT's)
VERA_RANK = 256  # VeRA trains only two vectors per module, so it runs at far higher ranks than LoRA
NOLA_BASES = 256  # k = l; cached bases cost 4·r·(k·in + l·out) bytes per module (BERT-base, r 8: 1.3 GiB)
UNILORA_THETA = 16384  # length of Uni-LoRA's one shared vector θ
RANDLORA_RANK = 32  # rank of each RandLoRA basis (PEFT's default); a module gets ⌈min(in, out) / r⌉ of them
TINYLORA_RANK, TINYLORA_U = 2, 64  # TinyLoRA's defaults (the paper's r, PEFT's u): one vector of u per module
PARTS = ("adapters", "inference", "engine")


# -- per-method bench sizes ---------------------------------------------------------------------------------
def bench_sizes(rank: int, vector_length: int) -> dict[str, dict]:
    """Hyperparameters of each method in the adapters and inference parts (vbshare.inject keyword arguments).

    A registered method not listed here runs at its config defaults with r = rank."""
    return {
        "lora": dict(r=rank),
        "vblora": dict(r=rank, num_vectors=VBLORA_VECTORS, vector_length=vector_length, topk=VBLORA_TOPK),
        "aslora": dict(r=rank),
        "sora": dict(r=rank),
        "tied_lora": dict(r=rank),
        "nola": dict(r=rank, num_basis_a=NOLA_BASES),
        "vera": dict(r=VERA_RANK),
        "unilora": dict(r=rank, theta_d_length=UNILORA_THETA),
        "randlora": dict(r=RANDLORA_RANK),
        "pvera": dict(r=VERA_RANK),
        "tinylora": dict(r=TINYLORA_RANK, u=TINYLORA_U),
    }


def method_size(method: str, rank: int, vector_length: int) -> dict:
    return bench_sizes(rank, vector_length).get(method, dict(r=rank))


def peft_config(variant: str, rank: int, vector_length: int):
    """PEFT's config for a `peft-<method>` variant, at the same size as vbshare's method (None: no peer)."""
    import peft

    size = method_size(variant.removeprefix("peft-"), rank, vector_length)
    builders = {
        "peft-lora": lambda: peft.LoraConfig(target_modules=TARGETS, r=size["r"], lora_alpha=size["r"], lora_dropout=0.0),
        "peft-vblora": lambda: peft.VBLoRAConfig(target_modules=TARGETS, r=size["r"], num_vectors=size["num_vectors"],
                                                 vector_length=size["vector_length"], topk=size["topk"]),
        "peft-vera": lambda: peft.VeraConfig(target_modules=TARGETS, r=size["r"], save_projection=False),
        "peft-unilora": lambda: peft.UniLoraConfig(target_modules=TARGETS, r=size["r"],
                                                   theta_d_length=size["theta_d_length"]),
        "peft-randlora": lambda: peft.RandLoraConfig(target_modules=TARGETS, r=size["r"], save_projection=False),
        "peft-pvera": lambda: peft.PveraConfig(target_modules=TARGETS, r=size["r"], save_projection=False),
        "peft-tinylora": lambda: peft.TinyLoraConfig(target_modules=TARGETS, r=size["r"], u=size["u"],
                                                     save_projection=False),
    }
    return builders[variant]() if variant in builders else None


PEFT_PEERS = ["peft-lora", "peft-vblora", "peft-vera", "peft-unilora", "peft-randlora", "peft-pvera", "peft-tinylora"]


def plan_variants(requested: str, notes: list[str]) -> list[str]:
    """The adapters part's variant list: `all` = floor + every registered method + the PEFT peers."""
    names = requested.split(",") if requested != "all" else ["floor", *METHODS, *PEFT_PEERS]
    known_sizes = bench_sizes(1, 1)
    for method in known_sizes:
        if requested == "all" and method not in METHODS:
            notes.append(f"{method}: not registered in this vbshare, its row is skipped")
    kept = []
    for name in names:
        if name == "floor" or name in METHODS:
            kept.append(name)
        elif name.startswith("peft-") and name in PEFT_PEERS:
            try:
                import peft  # noqa: F401
            except ImportError:
                notes.append(f"{name}: peft is not installed, skipped")
                continue
            kept.append(name)
        elif requested != "all":
            notes.append(f"{name}: not a registered method nor one of {', '.join(PEFT_PEERS)}, skipped")
    return kept


# -- models -------------------------------------------------------------------------------------------------
def bert_config(name: str):
    from transformers import BertConfig

    shape = MINILM_SHAPE if name == "minilm" else BERT_BASE_SHAPE
    return BertConfig(vocab_size=30522, **shape)


def build_base(name: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import BertModel

    torch.manual_seed(0)
    model = BertModel(bert_config(name), add_pooling_layer=False).to(device=device, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.train()


def shared_copy(base: nn.Module) -> nn.Module:
    """A structural copy that shares the frozen weights (so a dozen variants cost one model's memory)."""
    memo = {id(t): t for t in (*base.parameters(), *base.buffers())}
    return copy.deepcopy(base, memo=memo)


def vector_length(hidden: int, intermediate: int) -> int:
    return 256 if hidden % 256 == 0 and intermediate % 256 == 0 else 128


def build_variant(variant: str, base: nn.Module, rank: int, b: int, cast: torch.dtype | None = None) -> nn.Module:
    """`variant` on a copy of `base`; `cast`: then the whole adapted model, adapter included, in that dtype."""
    model = shared_copy(base)
    if variant == "floor":
        return model
    if variant in METHODS:
        torch.manual_seed(1)
        model = vbshare.inject(model, variant, targets=TARGETS, **method_size(variant, rank, b))
    else:
        import peft

        model = peft.get_peft_model(model, peft_config(variant, rank, b))
    return (model.to(cast) if cast is not None else model).train()


def trainable_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


# -- one training step --------------------------------------------------------------------------------------
class Runner:
    """One variant's model, optimiser and batch; `step()` runs one training step."""

    def __init__(self, variant: str, model: nn.Module, ids: torch.Tensor, lr: float = 1e-4):
        self.variant, self.model, self.ids = variant, model, ids
        self.step_no = 0
        if variant == "floor":
            embeds = model.embeddings.word_embeddings(ids).detach()
            self.embeds = embeds.requires_grad_(True)
            self.optimizer = None
        else:
            groups = vbshare.param_groups(model, lr=lr) if variant in METHODS else [
                {"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
            self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)

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


def estimated_peak_bytes(runner: Runner, device: torch.device) -> int:
    """Bytes one training step needs on top of the frozen model (adapters part; see the module docstring)."""
    if device.type == "cuda":
        return cuda_step_peak(runner.step, device) + 3 * trainable_bytes(runner.model)  # + weight, AdamW m, v
    frozen = {p.untyped_storage().data_ptr() for p in runner.model.parameters() if not p.requires_grad}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in frozen and not (isinstance(t, nn.Parameter) and t.requires_grad):
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        runner.step()
    return sum(saved.values()) + 4 * trainable_bytes(runner.model)


def cuda_step_peak(step, device: torch.device) -> int:
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


# -- CPU peak resident memory (engine part) -----------------------------------------------------------------
MMAP_THRESHOLD_BYTES = 64 * 1024  # glibc serves allocations at least this big with mmap, and unmaps them on free
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)


def track_resident_memory() -> bool:
    """Make freed tensors leave the resident set (fixed mmap threshold) so that the peak RSS of a step measures
    what it allocates; True when this Linux/glibc process can reset and read its peak RSS."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fixed = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and libc.mallopt(M_TRIM_THRESHOLD, MMAP_THRESHOLD_BYTES)
        Path("/proc/self/clear_refs").write_text("5")
        return bool(fixed) and resident_bytes("VmHWM") > 0
    except OSError:
        return False


def resident_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in bytes."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def rss_step_peak(step) -> int:
    before = resident_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    step()
    return resident_bytes("VmHWM") - before


# -- the adapters and inference parts -----------------------------------------------------------------------
def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def interleaved(runners: dict, repeats: int, device: torch.device, progress) -> dict[str, list[float]]:
    """`repeats` rounds; each round times one call of every runner, starting one later than the round before."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    order = list(runners)
    for round_no in range(repeats):
        shift = round_no % len(order)
        for k in order[shift:] + order[:shift]:  # rotate, so no variant always runs right after another
            times[k].append(timed(runners[k], device))
            progress.update(1)
    return times


def bench_training(name, base, variants, batch, seq, args, device, progress) -> dict:
    cfg = base.config
    b = vector_length(cfg.hidden_size, cfg.intermediate_size)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(batch),
                        ).to(device)
    cast = getattr(torch, args.dtype) if args.cast_adapters else None  # the base is in it already: stays shared
    runners = {v: Runner(v, build_variant(v, base, args.rank, b, cast), ids) for v in variants}
    for runner in runners.values():  # warm-up: allocator, AdamW state, lazy init
        for _ in range(args.warmup):
            runner.step()
    # the memory step is untimed, so with --warmup 0 it is the warm-up (the CPU estimate counts AdamW's
    # state analytically; on CUDA use --warmup >= 1 so the moments exist before the measured step)
    memory = {v: estimated_peak_bytes(r, device) for v, r in runners.items()}
    times = interleaved({v: r.step for v, r in runners.items()}, args.repeats, device, progress)
    trainable = {v: sum(p.numel() for p in r.model.parameters() if p.requires_grad) for v, r in runners.items()}
    del runners
    return {"model": name, "batch": batch, "seq": seq, "vector_length": b,
            "sizes": {v: method_size(v.removeprefix("peft-"), args.rank, b) for v in variants if v != "floor"},
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
        vbshare.inject(model, method, targets=TARGETS, **method_size(method, args.rank, b))
        vbshare.merge(model)
        models[method] = model.eval()
    for model in models.values():
        for _ in range(max(1, args.warmup)):  # a forward pass is cheap next to a training step
            model(input_ids=ids)
    times = interleaved({k: (lambda m=m: m(input_ids=ids)) for k, m in models.items()}, args.inference_repeats,
                        device, progress)
    base.train()
    return {"model": name, "batch": batch, "seq": seq, "median_s": {k: median(t) for k, t in times.items()},
            "times_s": times}


# -- the engine part: SmolLM2-135M through the training app's paths ---------------------------------------
SMOLLM2_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ENGINE_SIZES = {"lora": dict(r=8, alpha=16),  # configs/adapter/*.yaml: the app's own defaults
                "vblora": dict(r=4, num_vectors=256, vector_length=64, topk=2)}
ENGINE_CONFIGS = ["fp32", "fp32+ckpt", "fp32+compile", "fp32+ckpt+compile",
                  "bf16", "bf16+ckpt", "bf16+compile", "bf16+ckpt+compile"]
# fp16 autocast (what trainer.precision=fp16 runs on a GPU; the gradient scaler's own cost is not in the step):
# valid with --engine-configs, not in the default set
VALID_ENGINE_CONFIGS = ENGINE_CONFIGS + [c.replace("bf16", "fp16") for c in ENGINE_CONFIGS if c.startswith("bf16")]
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
QUICK_ENGINE_CONFIGS = ["fp32", "fp32+ckpt", "bf16", "bf16+ckpt", "fp32+compile", "bf16+compile"]


def engine_variants(args, methods: list[str]) -> list[tuple[str, str]]:
    """(method, configuration) pairs of the engine part; +compile configurations only for --compile-methods."""
    compiled = set(methods if args.compile_methods == "all" else args.compile_methods.split(","))
    return [(m, c) for m in methods for c in args.engine_configs if "compile" not in c or m in compiled]


def engine_runner(base: nn.Module, method: str, config: str, ids: torch.Tensor, device: torch.device):
    """(step function, trainable bytes) of one method in one configuration (`<fp32|bf16>[+ckpt][+compile]`)."""
    precision, *options = config.split("+")
    model = shared_copy(base)
    torch.manual_seed(1)
    vbshare.inject(model, method, targets=SMOLLM2_TARGETS, **ENGINE_SIZES.get(method, dict(r=8))).train()
    if "ckpt" in options:
        enable_activation_checkpointing(model)
    forward = torch.compile(model) if "compile" in options else model
    optimizer = torch.optim.AdamW(vbshare.param_groups(model, lr=1e-4), weight_decay=0.0)
    autocast_dtype = AUTOCAST.get(precision)
    steps = [0]

    def loss() -> torch.Tensor:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            return forward(input_ids=ids, labels=ids).loss

    def step() -> None:
        steps[0] += 1
        train_step(model, optimizer, loss, steps[0])

    return step, trainable_bytes(model)


def bench_engine(args, device: torch.device, progress, notes: list[str]) -> dict:
    from vbshare.models import smollm2_135m

    base, _ = smollm2_135m("lm")
    base = base.to(device)
    base.config.use_cache = False  # training: no key/value cache (checkpointing would switch it off anyway)
    for p in base.parameters():
        p.requires_grad_(False)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (args.engine_batch, args.engine_seq_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    methods = [m for m in args.engine_methods.split(",") if m]
    for method in [m for m in methods if m not in METHODS]:
        notes.append(f"engine: {method} is not registered in this vbshare, skipped")
    methods = [m for m in methods if m in METHODS]
    variants = engine_variants(args, methods)
    runners, trainable = {}, {}
    for method, config in variants:
        progress.set_postfix_str(f"SmolLM2 {method} {config}: build + warm-up (compiles)")
        step, trainable[f"{method} {config}"] = engine_runner(base, method, config, ids, device)
        for _ in range(max(1, args.warmup)):  # a compiled model compiles here, outside every measurement
            step()
        runners[f"{method} {config}"] = step
    rss = device.type == "cpu" and track_resident_memory()
    memory = {}
    for key, step in runners.items():
        peak = cuda_step_peak(step, device) if device.type == "cuda" else rss_step_peak(step) if rss else None
        memory[key] = None if peak is None else peak + 3 * trainable[key]  # + weight, AdamW m, v (fp32)
    if device.type == "cpu" and not rss:
        notes.append("engine: peak memory needs Linux /proc and glibc; not measured")
    times = interleaved(runners, args.repeats, device, progress)
    return {"model": "SmolLM2-135M", "batch": args.engine_batch, "seq": args.engine_seq_len,
            "memory": "cuda max_memory_allocated" if device.type == "cuda" else "cpu peak RSS" if rss else "none",
            "sizes": {m: ENGINE_SIZES.get(m, dict(r=8)) for m in methods}, "targets": SMOLLM2_TARGETS,
            "median_s": {k: median(t) for k, t in times.items()}, "times_s": times, "peak_bytes": memory}


# -- output -------------------------------------------------------------------------------------------------
def fmt_size(size: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in size.items())


def print_tables(results: dict) -> None:
    for run in results["training"]:
        med, mem = run["median_s"], run["peak_bytes"]
        floor, lora = med.get("floor"), med.get("lora")
        print(f"\nTraining step — {run['model']}, batch {run['batch']} x {run['seq']} "
              f"(median of {len(next(iter(run['times_s'].values())))}, {results['device']}; peak MiB: "
              f"{'CPU estimate' if results['device'] == 'cpu' else 'CUDA'})")
        print(f"{'variant':<13} {'step ms':>9} {'x floor':>8} {'x lora':>7} {'peak MiB':>9} {'x lora mem':>10} "
              f"{'trainable':>11}  size")
        for v, t in med.items():
            xf = f"{t / floor:.3f}" if floor else "-"
            xl = f"{t / lora:.3f}" if lora and v != "floor" else "-"
            xm = f"{mem[v] / mem['lora']:.3f}" if "lora" in mem and v != "floor" else "-"
            print(f"{v:<13} {t * 1e3:>9.1f} {xf:>8} {xl:>7} {mem[v] / 2**20:>9.1f} {xm:>10} "
                  f"{run['trainable'][v]:>11,}  {fmt_size(run['sizes'].get(v, {}))}")
    for run in results["inference"]:
        med = run["median_s"]
        print(f"\nMerged inference — {run['model']}, batch {run['batch']} x {run['seq']} "
              f"(no grad, median of {len(run['times_s']['base'])})")
        print(f"{'model':<12} {'ms':>9} {'x base':>8}")
        for k, t in med.items():
            print(f"{k:<12} {t * 1e3:>9.1f} {t / med['base']:>8.3f}")
    if results.get("engine"):
        run = results["engine"]
        med, mem = run["median_s"], run["peak_bytes"]
        print(f"\nTraining app paths — {run['model']}, batch {run['batch']} x {run['seq']}, causal-LM loss "
              f"(median of {len(next(iter(run['times_s'].values())))}, {results['device']}; peak memory: "
              f"{run['memory']}); sizes: " + "; ".join(f"{m} {fmt_size(s)}" for m, s in run["sizes"].items()))
        print(f"{'method':<8} {'configuration':<18} {'step ms':>9} {'x fp32':>7} {'peak MiB':>9} {'x fp32 mem':>10}")
        for key, t in med.items():
            method, config = key.split(" ", 1)
            ref = f"{method} fp32"
            xt = f"{t / med[ref]:.3f}" if ref in med else "-"
            peak = mem.get(key)
            xm = f"{peak / mem[ref]:.3f}" if peak and mem.get(ref) else "-"
            peak_text = f"{peak / 2**20:.1f}" if peak is not None else "-"
            print(f"{method:<8} {config:<18} {t * 1e3:>9.1f} {xt:>7} {peak_text:>9} {xm:>10}")
        if results["device"] == "cpu":
            print("CPU: bf16 autocast timings on a CPU do not predict GPU ones (tensor cores, memory bandwidth).")
    for note in results["notes"]:
        print(f"note: {note}")


def write_json(results: dict, where: str) -> Path:
    path = Path(where)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved measurement rounds (every part)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before measuring")
    parser.add_argument("--quick", action="store_true",
                        help="short CPU run: at most 3 rounds; adapters part on MiniLM at batch 4 and no separate "
                             "warm-up step (the untimed memory step warms up); merged inference at batch 1; engine "
                             "part at batch 1 x 64 with the configurations "
                             f"{','.join(QUICK_ENGINE_CONFIGS)} and compile for LoRA only (unless the options "
                             "below are given)")
    parser.add_argument("--json", default="results/bench.json", help="where to write all timings")
    adapters = parser.add_argument_group("adapters and inference parts")
    adapters.add_argument("--models", default=None, help="comma list of minilm, bert-base (default: both; "
                                                         "--quick: minilm)")
    adapters.add_argument("--batch-sizes", default=None, help="comma list (default 4,16; --quick: 4)")
    adapters.add_argument("--seq-len", type=int, default=128)
    adapters.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the base's dtype")
    adapters.add_argument("--cast-adapters", action="store_true",
                          help="cast each adapter to --dtype too, so the whole adapted model is in one dtype "
                               "(default: adapters stay float32, as the training app keeps them)")
    adapters.add_argument("--rank", type=int, default=8,
                          help="rank of every LoRA-like method (VeRA: 256, RandLoRA: 32)")
    adapters.add_argument("--variants", default="all",
                          help="comma list of floor, registered methods and " + ", ".join(PEFT_PEERS) +
                               " (default all: floor + every registered method + the PEFT peers)")
    adapters.add_argument("--inference-repeats", type=int, default=None,
                          help="rounds of the (cheap) merged-inference comparison; default max(10, --repeats)")
    engine = parser.add_argument_group("engine part (SmolLM2-135M)")
    engine.add_argument("--engine-methods", default="lora,vblora", help="registered methods (default lora,vblora)")
    engine.add_argument("--engine-configs", default=None,
                        help="comma list of <fp32|bf16|fp16>[+ckpt][+compile] (default: the eight fp32 / bf16 "
                             "ones; --quick: "
                             f"{','.join(QUICK_ENGINE_CONFIGS)})")
    engine.add_argument("--compile-methods", default=None,
                        help="engine methods that run the +compile configurations (default all; --quick: the first "
                             "engine method; each compile takes minutes on a CPU)")
    engine.add_argument("--engine-batch", type=int, default=None, help="sequences per step (default 8; --quick: 1)")
    engine.add_argument("--engine-seq-len", type=int, default=None, help="tokens per sequence (default 512; "
                                                                          "--quick: 64)")
    args = parser.parse_args(argv)

    quick = args.quick
    args.models = args.models or ("minilm" if quick else "minilm,bert-base")
    args.batch_sizes = args.batch_sizes or ("4" if quick else "4,16")
    configs = (args.engine_configs or ",".join(QUICK_ENGINE_CONFIGS if quick else ENGINE_CONFIGS)).split(",")
    bad = [c for c in configs if c not in VALID_ENGINE_CONFIGS]
    if bad:
        parser.error(f"unknown engine configuration(s) {', '.join(bad)}; use <fp32|bf16|fp16>[+ckpt][+compile]")
    args.engine_configs = configs
    args.compile_methods = args.compile_methods or (args.engine_methods.split(",")[0] if quick else "all")
    args.engine_batch = args.engine_batch or (1 if quick else 8)
    args.engine_seq_len = args.engine_seq_len or (64 if quick else 512)
    if quick:
        args.repeats, args.warmup = min(args.repeats, 3), 0
    if args.inference_repeats is None:
        args.inference_repeats = max(10, args.repeats)
    args.parts = [p for p in args.parts.split(",") if p]
    if unknown := [p for p in args.parts if p not in PARTS]:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    notes: list[str] = []
    variants = plan_variants(args.variants, notes) if "adapters" in args.parts else []
    batches = [int(b) for b in args.batch_sizes.split(",")]
    models = args.models.split(",")
    plan = [(name, b, args.seq_len) for name in models for b in sorted(batches, reverse=True)]
    inference_batch = 1 if args.quick else min(batches)
    methods = list(METHODS)

    from tqdm import tqdm

    steps = len(plan) * args.repeats * len(variants)
    steps += len(models) * args.inference_repeats * (1 + len(methods)) if "inference" in args.parts else 0
    engine_methods = [m for m in args.engine_methods.split(",") if m in METHODS]
    steps += args.repeats * len(engine_variants(args, engine_methods)) if "engine" in args.parts else 0
    results = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
               "dtype": args.dtype, "cast_adapters": args.cast_adapters, "torch": torch.__version__, "python": platform.python_version(),
               "threads": torch.get_num_threads(), "rank": args.rank, "targets": TARGETS,
               "repeats": args.repeats, "inference_repeats": args.inference_repeats, "warmup": args.warmup,
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv[1:] if argv is None else argv,
               "training": [], "inference": [], "engine": None, "notes": notes}
    bases: dict[str, nn.Module] = {}
    with tqdm(total=steps, desc="bench", unit="step", file=sys.stderr) as progress:
        if "adapters" in args.parts:
            for name, batch, seq in plan:
                base = bases.setdefault(name, build_base(name, device, dtype))
                progress.set_postfix_str(f"{name} {batch}x{seq}")
                results["training"].append(bench_training(name, base, variants, batch, seq, args, device, progress))
                write_json(results, args.json)  # partial results survive an interrupted run
        if "inference" in args.parts:
            for name in models:
                base = bases.setdefault(name, build_base(name, device, dtype))
                progress.set_postfix_str(f"{name} merged inference {inference_batch}x{args.seq_len}")
                results["inference"].append(bench_inference(
                    name, base, methods, inference_batch, args.seq_len, args, device, progress))
                write_json(results, args.json)
        bases.clear()
        if "engine" in args.parts:
            results["engine"] = bench_engine(args, device, progress, notes)
    print_tables(results)
    print(f"\nwrote {write_json(results, args.json)}")
    return results


if __name__ == "__main__":
    main()
