"""Parameter accounting of an adapted model (docs/methods.md §4): trainable and stored parameters, adapter bytes
and one row per module, for every method through the contract.

* trainable: adapter parameters the optimiser updates (a task head is reported apart, as other_trainable).
* stored: parameters needed to rebuild the adapted model from the frozen base, as float32 equivalents: shared
  tensors counted once (by the state), each module its own, in the method's stored form (`stored_parameters`:
  VB-LoRA's top-k form counts each index at its byte width relative to fp32, SoRA its pruned ranks).
* adapter bytes: the bytes of the tensors the adapter file holds (`vbshare.core.stored_tensors`; safetensors
  writes them as they are, after a JSON header that names them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .adapters.base import adapters, state_of
from .core import parameter_roles, stored_tensors
from .quantization import describe as describe_quantization


@dataclass
class AdapterSummary:
    """What `summary` returns; `str()` prints the per-module table and the totals."""

    method: str
    trainable: int
    other_trainable: int
    stored: float
    adapter_bytes: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    base_quantization: str | None = None  # the adapted layers' quantized base ("nf4", "fp4", "int8"), or None

    def __str__(self) -> str:
        header = f"{'module':<56} {'shape (out, in)':>16} {'rank':>5} {'trainable':>11} {'stored':>12}"
        lines = [header, "-" * len(header)]
        for row in self.rows:
            shape = "" if row["shape"] is None else f"({row['shape'][0]}, {row['shape'][1]})"
            rank = "" if row["rank"] is None else str(row["rank"])
            lines.append(f"{row['module']:<56} {shape:>16} {rank:>5} {row['trainable']:>11,} {_count(row['stored']):>12}")
        lines.append("-" * len(header))
        lines.append(
            f"{self.method}: trainable {self.trainable:,} | stored {_count(self.stored)} | "
            f"adapter bytes {self.adapter_bytes:,} | other trainable (head) {self.other_trainable:,}"
            + (f" | base {self.base_quantization}-quantized" if self.base_quantization else "")
        )
        return "\n".join(lines)


def _count(value: float) -> str:
    """A parameter count: an integer with thousands separators, two decimals only when fractional."""
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.2f}"


def summary(model: nn.Module, topk_only: bool = True) -> AdapterSummary:
    """Trainable and stored parameters, adapter bytes and a per-module table.

    topk_only: count a method that has a top-k stored form (VB-LoRA, docs/methods.md §1) in that form; False
    counts its full training form. Methods without one are counted the same either way.
    """
    state = state_of(model)
    compact = topk_only and state.topk_form
    roles = parameter_roles(model)
    named = dict(model.named_parameters())
    rows = []
    shared = state.stored_parameters(compact)
    if shared:
        shared_trainable = sum(p.numel() for p in state.parameters() if p.requires_grad)
        rows.append({"module": "(shared)", "shape": None, "rank": None, "trainable": shared_trainable,
                     "stored": float(shared)})
    for name, adapter in adapters(model).items():
        own = [p for n, p in adapter.named_parameters() if not n.startswith("base_layer.")]
        rows.append({
            "module": name,
            "shape": (adapter.out_features, adapter.in_features),
            "rank": adapter.rank,
            "trainable": sum(p.numel() for p in own if p.requires_grad),
            "stored": float(adapter.stored_parameters(compact)),
        })
    return AdapterSummary(
        method=state.method,
        trainable=sum(named[n].numel() for n, r in roles.items() if r != "head"),
        other_trainable=sum(named[n].numel() for n, r in roles.items() if r == "head"),
        stored=sum(row["stored"] for row in rows),
        adapter_bytes=sum(t.numel() * t.element_size() for t in stored_tensors(model, topk_only=compact).values()),
        rows=rows,
        base_quantization=describe_quantization(a.base_layer for a in adapters(model).values()),
    )
