"""ASLoRA — one A shared across layers, B matrices merged adaptively during training. docs/methods.md §3.

Modules with the same role (`targets.module_role`: the path with layer indices replaced by `*`) form a
*sharing group*. A group shares ONE A (r, in); every layer starts with its own B_i (out, r):
    Δh_i = s · B_i (A x),   s = α / r,   A ~ kaiming_uniform(a=√5),   B_i = 0.
After each optimiser step the running average of every distinct B is updated, B̄ ← B̄ + (B − B̄)/t.
From `merge_start`, every `merge_every` steps, each group ties its closest pair of distinct B's (or a random
pair, the control) until its merge budget is spent; afterwards both layers use ONE B parameter.

There is no public code for the paper; every open choice is an option (defaults in `ASLoRAConfig`):

* `pairs`: "adjacent" (tie-sets next to each other in depth, after earlier merges) | "all".
* `distance`: "b" = ‖B̄_i − B̄_j‖_F | "delta" = ‖(B̄_i − B̄_j) A‖_F (basis-independent). Computed in float64.
  Ties in distance go to the pair that comes first (shallowest).
* `merge_into`: "upper" — the lower tie-set adopts the upper (deeper) one's B (the paper) | "average" — the
  surviving parameter (still the upper one's object) takes the value (B_lower + B_upper)/2. In both modes the
  optimiser state of the surviving (upper) parameter is kept unchanged and the dropped one's is discarded.
* `pairing`: "similarity" | "random" (uniform over the eligible pairs, `seed`-ed Python RNG whose state is
  saved with the adapter, so a resumed run draws the same pairs).
* Budget per group of n layers: at most min(n − 1, `max_merges`, floor(`share_ratio` · n)) merges
  (`None` switches a limit off; the share ratio of a group is merges / n = the fraction of its layers whose
  own B has been tied away).
* The merged running average continues as the plain mean of the two (not weighted by tie-set size).
* Every merge is recorded in `state.history` (saved in the adapter metadata) and, with `history_path`,
  appended to a JSONL file; `write_merge_history(model, path)` writes the whole history at any time.

Tensors live in the model-wide `ASLoRAState` (`model.vbshare`), each exactly once:
    A_<group key>      (r, in)   role "A"
    B_<tie-set key>    (out, r)  role "B"     key = the key of the tie-set's surviving (upper-most) member
    avg_B_<tie-set key>          running average buffer (saved with the adapter)

Resuming mid-training: `load_adapter(fresh_base, dir)` (rebuilds the ties from the metadata before the tensors
load, with running averages, counters, history and RNG state), then build the optimiser from
`vbshare.param_groups(model, ...)` with the same arguments, then `optimizer.load_state_dict(saved)`, and
continue calling `after_step` with the global step number (the one after the last completed step).
The optimiser state dict must have been saved after the same `after_step` call as the adapter.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import VBShareError
from ..files import atomic_write
from ..targets import layer_index, module_role, role_key
from ..checks import integer, number
from .base import AdapterConfig, AdapterState, LowRankAdapter, check_alpha, state_of

METADATA_VERSION = 1


@dataclass
class ASLoRAConfig(AdapterConfig):
    r: int = 8
    alpha: float | None = None  # None -> alpha = r, so s = 1
    dropout: float = 0.0
    merge_start: int = 100  # first merge after this many completed optimiser steps
    merge_every: int = 100  # then every this many steps
    max_merges: int | None = None  # per sharing group; None = no limit of its own
    share_ratio: float | None = 0.75  # per group: merges <= floor(share_ratio * n); None = no limit of its own
    pairs: str = "adjacent"  # adjacent | all
    distance: str = "b"  # b | delta
    merge_into: str = "upper"  # upper | average
    pairing: str = "similarity"  # similarity | random (the control)
    seed: int = 0  # random pairing only
    history_path: str | None = None  # JSONL file every merge is appended to; None = only in the metadata

    def validate(self) -> None:
        super().validate()
        choices = {"pairs": ("adjacent", "all"), "distance": ("b", "delta"), "merge_into": ("upper", "average"),
                   "pairing": ("similarity", "random")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise VBShareError(f"{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        integer("merge_start", self.merge_start, low=0, allowed="a non-negative integer")
        integer("merge_every", self.merge_every, low=1)
        integer("max_merges", self.max_merges, low=0, null=True, allowed="a non-negative integer or None")
        number("share_ratio", self.share_ratio, 0, 1, null=True, allowed="in [0, 1] or None")
        check_alpha(self.alpha)
        integer("seed", self.seed)
        if self.history_path is not None and not isinstance(self.history_path, (str, os.PathLike)):
            raise VBShareError(f"history_path must be a file path or None, got {self.history_path!r}")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.r) / self.r


class ASLoRAState(AdapterState):
    """Owns every A (one per sharing group) and every B (one per tie-set), plus the running averages.

    Attributes (besides the tensors):
        groups: group (role) -> its module names, in depth order.
        tie_sets: B key -> module names sharing that B, in depth order.
        b_key: module name -> the key of the B it uses.
        merges: group -> merges done so far.
        num_updates: running-average updates so far (t).
        history: one dict per merge (step, group, layers, distance, ...).
    """

    decay_free_roles = frozenset()

    def __init__(self, method: str, config: ASLoRAConfig, targets: dict[str, tuple[int, int]]):
        super().__init__(method, config, targets)
        self.roles: dict[str, str] = {}  # per instance: the tensor names change as B's are tied
        order = {name: i for i, name in enumerate(targets)}
        groups: dict[str, list[str]] = {}
        for name in targets:
            groups.setdefault(module_role(name), []).append(name)

        def depth_key(name: str) -> tuple[int, int]:
            index = layer_index(name)
            return (index if index is not None else -1, order[name])

        self.groups = {g: sorted(names, key=depth_key) for g, names in groups.items()}
        self.group_of = {name: g for g, names in self.groups.items() for name in names}
        self.depth = {name: i for names in self.groups.values() for i, name in enumerate(names)}
        self.target_order = order

        used: set[str] = set()

        def unique(text: str) -> str:
            key, i = role_key(text), 2
            while key in used:
                key, i = f"{role_key(text)}_{i}", i + 1
            used.add(key)
            return key

        self.a_key = {g: unique(g) for g in self.groups}
        used = set()
        self.initial_b_key = {name: unique(name) for name in targets}  # deterministic: same in a fresh inject
        self.b_key = dict(self.initial_b_key)
        self.tie_sets = {self.b_key[name]: [name] for name in targets}

        r = config.r
        for group, names in self.groups.items():
            shapes = {tuple(targets[n]) for n in names}
            if len(shapes) > 1:
                raise VBShareError(
                    f"aslora shares A and B across the modules of role {group}, but they have different shapes "
                    f"{sorted(shapes)}; target roles whose layers all have one shape"
                )
            in_features = targets[names[0]][1]
            A = nn.Parameter(torch.empty(r, in_features))  # (r, in)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            self._add_param(f"A_{self.a_key[group]}", A, "A")
        for name in targets:
            self._add_b(self.b_key[name], targets[name][0], None, torch.get_default_dtype())

        self.merges = {g: 0 for g in self.groups}
        self.num_updates = 0
        self.history: list[dict[str, Any]] = []
        self.rng = random.Random(config.seed)

    # -- tensors ---------------------------------------------------------------------------------------------
    def _add_param(self, name: str, param: nn.Parameter, role: str) -> None:
        self.register_parameter(name, param)
        self.roles[name] = role

    def _add_b(self, key: str, out_features: int, device: torch.device | None, dtype: torch.dtype) -> None:
        r = self.config.r
        self._add_param(f"B_{key}", nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype)), "B")
        self.register_buffer(f"avg_B_{key}", torch.zeros(out_features, r, device=device, dtype=dtype))

    def _remove_b(self, key: str) -> None:
        del self._parameters[f"B_{key}"]
        del self._buffers[f"avg_B_{key}"]
        del self.roles[f"B_{key}"]

    def A_of(self, name: str) -> nn.Parameter:
        """The shared A (r, in) the module `name` uses."""
        return self._parameters[f"A_{self.a_key[self.group_of[name]]}"]

    def B_of(self, name: str) -> nn.Parameter:
        """The B (out, r) the module `name` uses (one object per tie-set)."""
        return self._parameters[f"B_{self.b_key[name]}"]

    def B_avg(self, key: str) -> Tensor:
        return self._buffers[f"avg_B_{key}"]

    def group_tie_sets(self, group: str) -> list[str]:
        """The B keys of a group's tie-sets, ordered by their shallowest member."""
        keys = {self.b_key[name] for name in self.groups[group]}
        return sorted(keys, key=lambda k: self.depth[self.tie_sets[k][0]])

    # -- accounting ------------------------------------------------------------------------------------------
    def stored_parameters(self, topk_only: bool = True) -> float:
        """One A per group + one B per tie-set (running averages are training state, not counted)."""
        return sum(p.numel() for p in self.parameters(recurse=False))

    def merge_budget(self, group: str) -> int:
        n = len(self.groups[group])
        budget = n - 1
        if self.config.max_merges is not None:
            budget = min(budget, self.config.max_merges)
        if self.config.share_ratio is not None:
            budget = min(budget, math.floor(self.config.share_ratio * n + 1e-9))
        return max(budget, 0)

    def merge_due(self, step: int) -> bool:
        c = self.config
        return step >= c.merge_start and (step - c.merge_start) % c.merge_every == 0

    # -- pairing ---------------------------------------------------------------------------------------------
    def candidate_pairs(self, group: str) -> list[tuple[str, str]]:
        """Eligible (lower key, upper key) pairs of the group's tie-sets under `pairs`."""
        keys = self.group_tie_sets(group)
        if self.config.pairs == "adjacent":
            pairs = list(zip(keys, keys[1:]))
        else:
            pairs = list(itertools.combinations(keys, 2))
        return [self._lower_upper(a, b) for a, b in pairs]

    def _lower_upper(self, a: str, b: str) -> tuple[str, str]:
        deepest = lambda k: self.depth[self.tie_sets[k][-1]]  # noqa: E731
        return (a, b) if deepest(a) < deepest(b) else (b, a)

    def pair_distance(self, a: str, b: str) -> float:
        """Distance of two tie-sets' running averages in float64 (option `distance`)."""
        diff = self.B_avg(a).double() - self.B_avg(b).double()  # (out, r)
        if self.config.distance == "delta":
            group = self.group_of[self.tie_sets[a][0]]
            diff = diff @ self._parameters[f"A_{self.a_key[group]}"].detach().double()  # (out, in)
        return float(torch.linalg.norm(diff))

    def choose_pair(self, group: str) -> tuple[str, str, float] | None:
        pairs = self.candidate_pairs(group)
        if not pairs:
            return None
        distances = [self.pair_distance(a, b) for a, b in pairs]
        if self.config.pairing == "random":
            i = self.rng.randrange(len(pairs))
        else:
            i = min(range(len(pairs)), key=lambda j: (distances[j], j))
        return pairs[i][0], pairs[i][1], distances[i]

    # -- tying -----------------------------------------------------------------------------------------------
    def _layers(self, key: str) -> list[int]:
        out = []
        for name in self.tie_sets[key]:
            index = layer_index(name)
            out.append(index if index is not None else self.depth[name])
        return out

    @torch.no_grad()
    def tie(self, lower: str, upper: str, optimizer: torch.optim.Optimizer | None, step: int,
            distance: float | None = None) -> dict[str, Any]:
        """Tie two tie-sets of one group: afterwards every member uses the upper set's B parameter.

        The dropped parameter leaves `optimizer.param_groups` and `optimizer.state`; the survivor keeps its
        optimiser state. Returns the history record.
        """
        group = self.group_of[self.tie_sets[lower][0]]
        if self.group_of[self.tie_sets[upper][0]] != group or lower == upper:
            raise VBShareError(f"cannot tie {lower} and {upper}: they must be two tie-sets of the same sharing group")
        members = self.tie_sets[lower] + self.tie_sets[upper]
        if any(self._adapters[n].merged for n in members if n in self._adapters):
            raise VBShareError("cannot tie B matrices while adapters are merged into the base; call vbshare.unmerge first")
        if distance is None:
            distance = self.pair_distance(lower, upper)
        keep = self._parameters[f"B_{upper}"]
        drop = self._parameters[f"B_{lower}"]
        if self.config.merge_into == "average":
            keep.copy_((keep + drop) / 2)
        avg = self.B_avg(upper)
        avg.copy_((avg + self.B_avg(lower)) / 2)
        if optimizer is not None:
            drop_from_optimizer(optimizer, drop)
        drop.grad = None
        record = {
            "merge": len(self.history) + 1,
            "step": int(step),
            "group": group,
            "layers": [self._layers(lower), self._layers(upper)],
            "modules": [list(self.tie_sets[lower]), list(self.tie_sets[upper])],
            "distance": distance,
            "distance_kind": self.config.distance,
            "pairing": self.config.pairing,
            "merge_into": self.config.merge_into,
            "kept": upper,
            "dropped": lower,
        }
        self._remove_b(lower)
        moved = self.tie_sets.pop(lower)
        self.tie_sets[upper] = sorted(self.tie_sets[upper] + moved, key=lambda n: self.depth[n])
        for name in moved:
            self.b_key[name] = upper
        self.merges[group] += 1
        self.history.append(record)
        if self.config.history_path:
            path = Path(self.config.history_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        return record

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Update the running averages, then (on schedule) tie one pair per group with merge budget left."""
        super().after_step(optimizer, step)
        self.num_updates += 1
        t = self.num_updates
        for key in self.tie_sets:
            avg = self.B_avg(key)
            avg.add_((self._parameters[f"B_{key}"].detach().to(avg.dtype) - avg) / t)
        if not self.merge_due(step):
            return
        for group in self.groups:
            if self.merges[group] >= self.merge_budget(group):
                continue
            chosen = self.choose_pair(group)
            if chosen is not None:
                self.tie(chosen[0], chosen[1], optimizer, step, distance=chosen[2])

    # -- what a training run records ---------------------------------------------------------------------------
    def sharing_pattern(self) -> dict[str, Any]:
        return {"merges": len(self.history)}

    def run_records(self) -> dict[str, list[dict[str, Any]]]:
        return {"merge_history": [dict(h) for h in self.history]}  # the sharing pattern (docs/methods.md §3)

    # -- metadata --------------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {
            "version": METADATA_VERSION,
            "groups": {g: list(names) for g, names in self.groups.items()},
            "ties": {g: {k: list(self.tie_sets[k]) for k in self.group_tie_sets(g)} for g in self.groups},
            "merges": dict(self.merges),
            "num_updates": self.num_updates,
            "history": [dict(h) for h in self.history],
            "rng_state": [version, list(internal), gauss],
        }

    def load_metadata(self, metadata: dict[str, Any]) -> None:
        """Rebuild the tie structure (one B parameter + running average per saved tie-set), counters and RNG."""
        if not metadata:
            return
        if metadata.get("version") != METADATA_VERSION:
            raise VBShareError(
                f"aslora metadata version {metadata.get('version')!r} is not {METADATA_VERSION}; save it with this vbshare"
            )
        saved_groups = {g: sorted(v) for g, v in metadata["groups"].items()}
        if saved_groups != {g: sorted(v) for g, v in self.groups.items()}:
            raise VBShareError("the aslora sharing groups in the checkpoint differ from this model's; load into a fresh base model")
        ties: dict[str, list[str]] = {}
        for group, sets in metadata["ties"].items():
            for key, names in sets.items():
                if key not in self.initial_b_key.values() or not names:
                    raise VBShareError(f"aslora checkpoint names an unknown tie-set {key!r}; save the adapter again")
                ties[key] = list(names)
        covered = sorted(n for names in ties.values() for n in names)
        if covered != sorted(self.targets):
            raise VBShareError("aslora checkpoint tie-sets do not cover each adapted module exactly once; save it again")

        any_b = next(iter(self._parameters[f"B_{k}"] for k in self.tie_sets))
        device, dtype = any_b.device, any_b.dtype
        for key in list(self.tie_sets):
            self._remove_b(key)
        key_module = {k: n for n, k in self.initial_b_key.items()}
        for key in sorted(ties, key=lambda k: self.target_order[key_module[k]]):  # the live run's order
            self._add_b(key, self.targets[ties[key][0]][0], device, dtype)
        self.tie_sets = {k: sorted(v, key=lambda n: self.depth[n]) for k, v in ties.items()}
        self.b_key = {name: key for key, names in ties.items() for name in names}
        self.merges = {g: int(metadata["merges"].get(g, 0)) for g in self.groups}
        self.num_updates = int(metadata["num_updates"])
        self.history = [dict(h) for h in metadata.get("history", [])]
        version, internal, gauss = metadata["rng_state"]
        self.rng.setstate((version, tuple(internal), gauss))


def drop_from_optimizer(optimizer: torch.optim.Optimizer, param: Tensor) -> None:
    """Remove `param` (by identity) from every param group (and the group's parallel name lists) and its state."""
    for group in optimizer.param_groups:
        params = group["params"]
        for i in reversed([i for i, p in enumerate(params) if p is param]):
            for names_key in ("names", "param_names"):
                names = group.get(names_key)
                if isinstance(names, list) and len(names) == len(params):
                    del names[i]
            del params[i]
    optimizer.state.pop(param, None)


class ASLoRA(LowRankAdapter):
    """One adapted layer: its group's shared A and its tie-set's B, both owned by `model.vbshare`."""

    config_class = ASLoRAConfig
    state_class = ASLoRAState
    roles: dict[str, str] = {}  # no tensors of its own

    def __init__(self, base_layer: nn.Module, name: str, config: ASLoRAConfig, state: ASLoRAState):
        super().__init__(base_layer, name, config, state)
        self.scale = config.scale
        self.group = module_role(name)

    def factors(self) -> tuple[Tensor, Tensor, float]:
        return self.state.A_of(self.name), self.state.B_of(self.name), self.scale


def write_merge_history(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's ASLoRA merge history (one JSON object per merge) to `path` as JSONL."""
    state = state_of(model)
    if not isinstance(state, ASLoRAState):
        raise VBShareError(f"merge history exists for aslora adapters only, this model carries {state.method}")
    path = Path(path)
    atomic_write(path, "".join(json.dumps(record) + "\n" for record in state.history).encode("utf-8"))
    return path
